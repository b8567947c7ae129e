"""Test bits/dim: the ELBO evaluation of the training loop and the importance-weighted bound.

- `make_eval_step` / `evaluate_bpd`: mean ELBO bits/dim over the test split with one noise
  draw per example (BatchNorm in evaluation mode); the noise of eval batch i is
  `fold_in(run_key(config, EVAL_TAG), i)`, so evaluations at different steps see the same draws.
- `LoopEvaluator`: what the training loop does at an evaluation step: the test bits/dim (a
  `test_bpd` scalar), a sample grid (`<workdir>/samples/step_<s>.png` and a TensorBoard image)
  when `eval.num_samples > 0`, and the redrawn `<workdir>/bpd_curve.png`.
- `iwbo_bpd`: per-image test bits/dim by the importance-weighted bound (k noise draws, `chunk`
  at a time, `fold_in(PRNGKey(seed), i)` for batch i) and the mean with its standard error over
  images; used by experiments/evaluate.py and experiments/ablation.py.

Keys of a training run are `fold_in(PRNGKey(train.seed), tag)`, one tag per use (`run_key`).
"""
import dataclasses
import math
import os
import time
from typing import Any, Callable, Dict, Optional, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from denseflow_jax import artifacts, parallel
from denseflow_jax import data as data_lib
from denseflow_jax.data import Data

PyTree = Any
INIT_TAG, TRAIN_TAG, EVAL_TAG, SAMPLE_TAG = 0, 1, 2, 3


def run_key(config: ml_collections.ConfigDict, tag: int) -> jax.Array:
  """`fold_in(PRNGKey(train.seed), tag)`: the base key of one use (init, train, eval, sample)."""
  return jax.random.fold_in(jax.random.PRNGKey(int(config.train.seed)), tag)


# ----------------------------------------------------------------------------- ELBO


def make_eval_step(model, config: ml_collections.ConfigDict, mesh) -> Callable:
  """Jitted `(variables, images, mask, batch_index) -> (sum of masked bpd, count)`, replicated.

  ELBO bits/dim with one noise draw per example; the noise of eval batch i is fixed
  (`fold_in(eval key, i)`) so evaluations at different steps see the same draws.
  """
  rep, bat = parallel.replicated_sharding(mesh), parallel.batch_sharding(mesh)
  eval_key = run_key(config, EVAL_TAG)

  def eval_fn(variables, images, mask, batch_index):
    bpd = model.apply(variables, images, rngs={'noise': jax.random.fold_in(eval_key, batch_index)},
                      method='bits_per_dim')
    weight = mask.astype(bpd.dtype)
    return jnp.sum(bpd * weight), jnp.sum(weight)

  return jax.jit(eval_fn, in_shardings=(rep, bat, bat, rep), out_shardings=rep)


def evaluate_bpd(eval_step, variables: Dict[str, PyTree], data: Data, mesh,
                 max_examples: int = 0) -> float:
  """Mean test ELBO bits/dim over the (first `max_examples` of the) test split."""
  total, count = 0.0, 0.0
  for i, batch in enumerate(data.eval_batches(max_examples)):
    images, mask = parallel.shard_batch((batch.images, batch.mask), mesh)
    s, n = eval_step(variables, images, mask, parallel.replicate(np.int32(i), mesh))
    s, n = parallel.to_host((s, n))
    total, count = total + float(s), count + float(n)
  return total / max(count, 1.0)


class LoopEvaluator:
  """The training loop's evaluation: test bpd scalar, sample grid and image, bpd curve.

  `writer` is the loop's metric writer (its JSONL writer feeds the bpd curve); files and writes
  happen on process 0 only (`host0`), the computation on every process.
  """

  def __init__(self, model, config: ml_collections.ConfigDict, data: Data, mesh, workdir: str,
               writer, host0: bool):
    self.config, self.data, self.mesh = config, data, mesh
    self.workdir, self.writer, self.host0 = workdir, writer, host0
    self.eval_step = make_eval_step(model, config, mesh) if data.test is not None else None
    self.sampler = parallel.ShardedModel(model, mesh)
    self.last: Dict[str, float] = {}  # the newest value of each scalar, for the run's summary
    self.quality = None
    if (config.eval.sample_metrics and config.eval.num_samples > 1
        and data.train.name == 'digits'):
      self.quality = _DigitsSampleQuality(data)

  def _write(self, step: int, scalars: Dict[str, float]) -> None:
    self.last.update(scalars)
    if self.host0:
      self.writer.write_scalars(step, scalars)

  def __call__(self, step: int, variables: Dict[str, PyTree]) -> None:
    if self.eval_step is None:
      return
    config, mesh = self.config, self.mesh
    t0 = time.time()
    bpd = evaluate_bpd(self.eval_step, variables, self.data, mesh, config.eval.max_examples)
    logging.info('step %d: test bpd %.4f (%.1fs)', step, bpd, time.time() - t0)
    self._write(step, {'test_bpd': bpd})
    if config.eval.num_samples > 0:
      key = parallel.replicate(np.asarray(jax.random.fold_in(run_key(config, SAMPLE_TAG), step)),
                               mesh)
      images = parallel.to_host(self.sampler.sample(variables, key, config.eval.num_samples,
                                                    config.eval.temperature))
      if self.host0:
        path = os.path.join(self.workdir, artifacts.SAMPLES_DIR, f'step_{step}.png')
        artifacts.save_sample_grid(path, images, config.model.num_bits)
        self.writer.write_images(step, {'samples': artifacts.image_grid(
            images, config.model.num_bits)[None]})
      if self.quality is not None:
        fid, score = self.quality(images)
        logging.info('step %d: samples (T=%g, %d) FID %.2f, Inception-style score %.2f (digits '
                     'classifier)', step, config.eval.temperature, len(images), fid, score)
        self._write(step, {'sample_fid': fid, 'sample_is': score})
    if self.host0:
      self.writer.flush()  # the metrics file is complete before the curve is drawn from it
      artifacts.plot_bpd_curve(self.workdir)


class _DigitsSampleQuality:
  """FID against the training digits and the Inception-style score, both with the digits
  classifier (`metrics.digits`), of a batch of integer samples."""

  def __init__(self, data: Data):
    from denseflow_jax.metrics import digits, frechet  # pylint: disable=g-import-not-at-top
    self.classifier = digits.load_digits_classifier(log=logging.info)
    train = data.train
    images = artifacts.to_uint8(train.read_batch(np.arange(len(train))), train.num_bits)
    self.num_bits = data.num_bits
    self.reference = frechet.feature_stats(self.classifier(images))

  def __call__(self, images: np.ndarray) -> Tuple[float, float]:
    from denseflow_jax.metrics import digits, frechet  # pylint: disable=g-import-not-at-top
    features = self.classifier(artifacts.to_uint8(np.asarray(images), self.num_bits))
    fid = frechet.frechet_distance(frechet.feature_stats(features), self.reference)
    return fid, digits.inception_score(self.classifier.probabilities_from_features(features))


# ----------------------------------------------------------------------------- IWBO


@dataclasses.dataclass
class IwboResult:
  """Per-image test bits/dim by the IWBO and their mean with its standard error."""
  bpd: np.ndarray  # float64 (num_examples,), in test-split order
  k: int
  chunk: int

  @property
  def num_examples(self) -> int:
    return int(self.bpd.size)

  @property
  def mean(self) -> float:
    return float(self.bpd.mean())

  @property
  def stderr(self) -> float:
    """Sample standard deviation over images / sqrt(n) (nan for one image)."""
    return mean_and_stderr(self.bpd)[1]


def mean_and_stderr(values: np.ndarray) -> Tuple[float, float]:
  """(mean, std(ddof=1) / sqrt(n)) of a 1-d array; the standard error is nan for n < 2."""
  values = np.asarray(values, np.float64)
  n = values.size
  stderr = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else float('nan')
  return float(values.mean()), stderr


def iwbo_bpd(model, variables: Dict[str, PyTree], data: Data, mesh, k: int, chunk: int = 0,
             seed: int = 0, max_examples: int = 0, batch_size: int = 0) -> IwboResult:
  """Test bits/dim by the importance-weighted bound over the (first `max_examples` of the) split.

  log p(x) >= logsumexp_i log p(x, noise_i) - log k over k draws of the dequantization and
  cross-unit noise, `chunk` draws at a time (0 = all k); the draws of batch i use
  `fold_in(PRNGKey(seed), i)`. `batch_size` 0 = the eval batch size of `data`.
  """
  if data.test is None:
    raise ValueError('no test split: set config.data.test_npz or config.data.holdout')
  return iwbo_bpd_of_source(model, variables, data.test, mesh, k, chunk, seed, max_examples,
                            batch_size or data.eval_batch_size,
                            process_index=data.process_index, process_count=data.process_count)


def iwbo_bpd_of_source(model, variables: Dict[str, PyTree], source, mesh, k: int,
                       chunk: int = 0, seed: int = 0, max_examples: int = 0,
                       batch_size: int = 64, *, process_index: Optional[int] = None,
                       process_count: Optional[int] = None) -> IwboResult:
  """`iwbo_bpd` of any `data.ImageSource` (in its order), batches of `batch_size` (global);
  the processes default to JAX's."""
  sharded = parallel.ShardedModel(model, mesh)
  k = int(k)
  chunk = min(int(chunk), k) if chunk else k
  height, width, channels = source.shape
  num_dims = height * width * channels
  base_key = jax.random.PRNGKey(int(seed))
  values = []
  batches = data_lib.eval_batches(source, int(batch_size), max_examples,
      process_index=jax.process_index() if process_index is None else process_index,
      process_count=jax.process_count() if process_count is None else process_count)
  for i, batch in enumerate(batches):
    key = parallel.replicate(np.asarray(jax.random.fold_in(base_key, i)), mesh)
    lower = parallel.to_host(sharded.iwbo(variables, batch.images, key, k, chunk))
    mask = parallel.to_host(parallel.shard_batch(batch.mask, mesh))
    values.append(np.asarray(lower, np.float64)[np.asarray(mask, bool)])
    logging.info('batch %d: %d images, running bpd %.4f', i, int(np.sum(mask)),
                 -np.mean(np.concatenate(values)) / (num_dims * math.log(2.0)))
  bpd = -np.concatenate(values) / (num_dims * math.log(2.0))
  return IwboResult(bpd=bpd, k=k, chunk=chunk)
