"""Tests for denseflow_jax.evaluation (the evaluation inside the training loop, the ELBO eval
step, the IWBO and its standard error) and for `model.remat` in the train step's loss.

The model is test_train's micro DenseFlow on the 8x8 digits, so that compiles stay short.
"""
import io
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from denseflow_jax import artifacts, evaluation, parallel, train
from denseflow_jax.data import make_data
from denseflow_jax.model import DenseFlow, init_variables
from test_metric_writer import read_events as _events  # TensorBoard's TF-free reader
from test_train import micro_config


def _init(config, images):
  return init_variables(DenseFlow(config.model), jax.random.PRNGKey(0), images)


def _grid_size(num: int, size: int) -> int:
  """Side of `artifacts.image_grid` of `num` square images (ceil(sqrt) columns, padding 1)."""
  columns = math.ceil(math.sqrt(num))
  assert math.ceil(num / columns) == columns
  return columns * (size + 1) + 1


def test_training_loop_evaluation_writes_samples_tensorboard_curve_and_metrics(tmp_path):
  """What the quickstart's evaluation writes: sample PNG, TensorBoard image and scalar, the
  bpd curve and the eval rows of metrics.jsonl, at every `eval_every` steps."""
  config = micro_config(num_steps=4, eval_every=2, log_every=2, checkpoint_every=0)
  config.eval.num_samples, config.eval.max_examples, config.eval.batch_size = 4, 32, 16
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)

  side = _grid_size(4, 8)  # the grid of 4 samples; the PNG is enlarged by an integer factor
  for step in (2, 4):
    with Image.open(os.path.join(workdir, 'samples', f'step_{step}.png')) as png:
      assert png.size[0] == png.size[1] and png.size[0] % side == 0, png.size
      assert png.mode == 'L'  # one channel (digits)
      png.load()
  with Image.open(os.path.join(workdir, artifacts.CURVE_FILE)) as png:
    assert png.format == 'PNG' and png.size[0] > 100
    png.load()

  rows = artifacts.read_metrics(workdir)
  test_bpd = artifacts.metric_curve(rows, 'test_bpd')
  assert sorted(test_bpd) == [2, 4] and all(np.isfinite(v) for v in test_bpd.values())
  assert sorted(artifacts.metric_curve(rows, 'train_bpd')) == [2, 4]
  assert all(s > 0 for s in artifacts.metric_curve(rows, 'steps_per_sec').values())
  assert [r for r in rows if 'test_bpd' in r] == [{'step': s, 'test_bpd': test_bpd[s]}
                                                  for s in (2, 4)]  # one row per write

  events = _events(workdir)
  scalars = {step: float(v) for tag, plugin, step, v in events if tag == 'test_bpd'}
  assert scalars.keys() == test_bpd.keys()
  np.testing.assert_allclose([scalars[s] for s in (2, 4)], [test_bpd[s] for s in (2, 4)],
                             rtol=1e-6)
  images = [(step, v) for tag, plugin, step, v in events if tag == 'samples']
  assert [step for step, _ in images] == [2, 4]
  assert all(p == 'images' for tag, p, _, _ in events if tag == 'samples')
  width, height, encoded = images[-1][1]
  assert (int(width), int(height)) == (side, side)
  with Image.open(io.BytesIO(encoded)) as png:
    with Image.open(os.path.join(workdir, 'samples', 'step_4.png')) as on_disk:
      factor = on_disk.size[0] // side
      np.testing.assert_array_equal(np.asarray(png.convert('L')),
                                    np.asarray(on_disk)[::factor, ::factor])


def test_eval_step_and_evaluate_bpd_match_bits_per_dim():
  config = micro_config()
  config.eval.batch_size = 16
  data = make_data(config)
  mesh = parallel.make_mesh()
  model = DenseFlow(config.model)
  variables = _init(config, next(iter(data.train_batches(0))))
  eval_step = evaluation.make_eval_step(model, config, mesh)
  key = evaluation.run_key(config, evaluation.EVAL_TAG)
  values, counts = [], []
  for i, batch in enumerate(data.eval_batches(20)):  # 16 + 4 images, the second batch padded
    expected = np.asarray(model.apply(variables, batch.images, method='bits_per_dim',
                                      rngs={'noise': jax.random.fold_in(key, i)}))
    images, mask = parallel.shard_batch((batch.images, batch.mask), mesh)
    total, count = parallel.to_host(eval_step(variables, images, mask,
                                              parallel.replicate(np.int32(i), mesh)))
    np.testing.assert_allclose(total, expected[batch.mask].sum(), rtol=1e-5)
    values.append(expected[batch.mask])
    counts.append(float(count))
  assert counts == [16.0, 4.0]
  mean = evaluation.evaluate_bpd(eval_step, variables, data, mesh, max_examples=20)
  np.testing.assert_allclose(mean, np.concatenate(values).mean(), rtol=1e-5)


def test_iwbo_bpd_and_standard_error_against_numpy():
  config = micro_config()
  data = make_data(config)
  mesh = parallel.make_mesh()
  model = DenseFlow(config.model)
  variables = _init(config, next(iter(data.train_batches(0))))
  seed, k, chunk = 7, 4, 2
  result = evaluation.iwbo_bpd(model, variables, data, mesh, k, chunk, seed=seed,
                               max_examples=11, batch_size=8)
  lower = []
  for i, batch in enumerate(data.eval_batches(11, 8)):
    bound = model.apply(variables, batch.images, k, chunk, method='iwbo',
                        rngs={'noise': jax.random.fold_in(jax.random.PRNGKey(seed), i)})
    lower.append(np.asarray(bound, np.float64)[batch.mask])
  bpd = -np.concatenate(lower) / (8 * 8 * 1 * np.log(2.0))
  assert (result.num_examples, result.k, result.chunk) == (11, k, chunk)
  np.testing.assert_allclose(result.bpd, bpd, rtol=1e-5)
  np.testing.assert_allclose(result.mean, bpd.mean(), rtol=1e-5)
  stderr = np.sqrt(np.sum((bpd - bpd.mean()) ** 2) / (bpd.size - 1)) / np.sqrt(bpd.size)
  np.testing.assert_allclose(result.stderr, stderr, rtol=1e-4)
  assert result.stderr > 0
  mean, one = evaluation.mean_and_stderr(np.array([3.0]))
  assert mean == 3.0 and np.isnan(one)
  np.testing.assert_allclose(evaluation.mean_and_stderr(np.array([1.0, 2.0, 4.0]))[1],
                             np.std([1.0, 2.0, 4.0], ddof=1) / np.sqrt(3), rtol=1e-12)


def test_remat_gives_the_same_train_loss_and_gradients():
  """`model.remat='full'` (set by the converter from the authors' `checkpointing`) only changes
  what the backward pass stores: the same parameters give the same loss and gradients (here
  the loss is bitwise equal and the gradients differ by ~2e-7 at a largest gradient of ~0.3)."""
  config = micro_config()
  batch = next(iter(make_data(config).train_batches(0)))
  variables = _init(config, batch)
  key = jax.random.PRNGKey(3)
  results = {}
  for remat in ('none', 'full'):
    cfg = micro_config()
    cfg.model.remat = remat
    model = DenseFlow(cfg.model)

    def loss_fn(params, model=model):  # the loss of `train.make_train_step`
      bpd, updates = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                                 batch, train=True, rngs={'noise': key}, mutable=['batch_stats'],
                                 method='bits_per_dim')
      return jnp.mean(bpd), updates['batch_stats']

    (loss, stats), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        variables['params'])
    results[remat] = jax.tree.map(np.asarray, (loss, stats, grads))
  (loss, stats, grads), (loss_r, stats_r, grads_r) = results['none'], results['full']
  assert jax.tree.structure(grads) == jax.tree.structure(grads_r)
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(grads),
                                                            jax.tree.leaves(grads_r)))
  scale = max(float(np.max(np.abs(a))) for a in jax.tree.leaves(grads))
  assert diff <= 1e-5 * scale, (diff, scale)
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(stats_r)):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
