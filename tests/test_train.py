"""Tests for denseflow_jax.train and optim: schedule, optimizer, the train step's non-finite
handling, the loop (no device-to-host transfer between check points, batches prefetched to
the devices, the stop after consecutive non-finite steps), config checks, artifacts and the
JSONL metrics writer. The in-loop evaluation and remat are in test_evaluation.py.

The model is a micro DenseFlow on the 8x8 digits (one block, one module per unit, width 4,
uniform dequantization) so that compiles stay short; the loop tests use `ToyFlow`.
"""
import json
import os
import shutil
import types

import jax
import jax.flatten_util
import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import quickstart
from denseflow_jax import artifacts, checkpoint, config_file, optim, parallel, train
from denseflow_jax.data import make_data
from denseflow_jax.nets.layers import BatchNorm


def micro_config(**train_fields):
  """Quickstart data with a micro model; cheap to compile."""
  config = quickstart.get_config()
  m = config.model
  m.block_conf, m.layers_conf, m.mid_channels = (2,), (1,), (4,)
  m.growth_rate, m.dense_depth, m.dense_growth = 2, 1, 4
  m.dequantization = 'uniform'
  t = config.train
  t.batch_size, t.num_steps, t.warmup_steps, t.lr = 16, 8, 0, 1e-3
  t.log_every, t.checkpoint_every, t.eval_every = 1, 2, 0
  config.eval.at_start, config.eval.num_samples = False, 0
  t.update(train_fields)
  return config


# ----------------------------------------------------------------------------- schedule


def test_learning_rate_schedule_values():
  config = micro_config(lr=1e-3, warmup_steps=100, decay_rate=0.5)
  schedule = optim.learning_rate_schedule(config, steps_per_epoch=40)
  expected = {0: 0.0, 50: 5e-4, 99: 9.9e-4, 100: 1e-3, 139: 1e-3, 140: 5e-4,
              100 + 3 * 40 - 1: 2.5e-4, 100 + 3 * 40: 1.25e-4, 100 + 10 * 40 + 5: 1e-3 / 1024}
  for step, lr in expected.items():
    np.testing.assert_allclose(float(schedule(step)), lr, rtol=1e-6, atol=1e-12,
                               err_msg=f'step {step}')


def test_learning_rate_schedule_without_warmup_and_public_behaviour():
  schedule = optim.learning_rate_schedule(micro_config(warmup_steps=0, decay_rate=0.5), 10)
  assert float(schedule(0)) == pytest.approx(1e-3)
  assert float(schedule(9)) == pytest.approx(1e-3)
  assert float(schedule(10)) == pytest.approx(5e-4)
  constant = optim.learning_rate_schedule(micro_config(warmup_steps=5, decay_rate=1.0), 10)
  assert float(constant(2)) == pytest.approx(4e-4)
  assert float(constant(5000)) == pytest.approx(1e-3)  # decay_rate 1: the public code


def test_num_train_steps():
  assert optim.num_train_steps(micro_config(num_steps=7), 93) == 7
  config = micro_config(num_steps=0)
  config.train.num_epochs = 3
  assert optim.num_train_steps(config, 93) == 279


def test_optimizer_is_clipped_adamax_with_injected_lr():
  config = micro_config(lr=1e-2, grad_clip_norm=1.0)
  tx = optim.make_optimizer(config)
  reference = optax.chain(optax.clip_by_global_norm(1.0), optax.adamax(1e-2, 0.9, 0.999))
  params = {'w': jnp.ones(3)}
  state, ref_state = tx.init(params), reference.init(params)
  for g in ([3.0, -4.0, 0.5], [0.1, 0.2, -0.3]):
    grads = {'w': jnp.asarray(g)}
    updates, state = tx.update(grads, state, params)
    ref_updates, ref_state = reference.update(grads, ref_state, params)
    np.testing.assert_allclose(updates['w'], ref_updates['w'], rtol=1e-6)
  half = optim.with_learning_rate(state, 5e-3)
  updates, _ = tx.update({'w': jnp.ones(3)}, half, params)
  ref_updates, _ = reference.update({'w': jnp.ones(3)}, ref_state, params)
  np.testing.assert_allclose(updates['w'], 0.5 * ref_updates['w'], rtol=1e-6)


def _tree_params(seed=0):
  rng = np.random.RandomState(seed)
  return {'conv': {'kernel': jnp.asarray(rng.randn(3, 3, 2, 4), jnp.float32),
                   'bias': jnp.asarray(rng.randn(4), jnp.float32)},
          'scale': jnp.asarray(rng.randn(5), jnp.float32)}


@pytest.mark.parametrize('clip', [0.0, 1.0])
def test_vector_update_equals_the_per_array_update(clip):
  # The optimizer on the one parameter vector does what it does on the arrays, to float32
  # rounding: the arithmetic is element-wise, but XLA:CPU compiles the fused arithmetic of a
  # long vector and of small arrays differently (a few elements differ by 1 ulp), and with
  # clipping the global norm is summed in another order.
  config = micro_config(lr=1e-2, grad_clip_norm=clip)
  tx = optim.make_optimizer(config)
  params = ref_params = _tree_params(0)
  state, ref_state = optim.init_state(tx, params), tx.init(params)
  assert jax.tree.leaves(state)[-1].shape == (3 * 3 * 2 * 4 + 4 + 5,)
  update = jax.jit(lambda g, s, p: optim.apply_update(tx, optim.parameter_vector(g), s, p))

  @jax.jit
  def ref_update(g, s, p):  # what the train step did before: one update per array
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  for seed in (1, 2, 3):
    grads = jax.tree.map(lambda x: 3.0 * x, _tree_params(seed))
    params, state = update(grads, state, params)
    ref_params, ref_state = ref_update(grads, ref_state, ref_params)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
      np.testing.assert_allclose(got, want, rtol=3e-7 if not clip else 1e-6, atol=1e-7)
  converted = optim.state_from_tree(ref_state, ref_params)
  assert jax.tree.structure(converted) == jax.tree.structure(state)
  for got, want in zip(jax.tree.leaves(converted), jax.tree.leaves(state)):
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_vector_update_keeps_everything_on_a_skipped_step():
  tx = optim.make_optimizer(micro_config(lr=1e-2))
  params = _tree_params(0)
  state = optim.init_state(tx, params)
  grads = optim.parameter_vector(_tree_params(1))
  kept = optim.apply_update(tx, grads, state, params, keep=jnp.asarray(False))
  moved = optim.apply_update(tx, grads, state, params, keep=jnp.asarray(True))
  for got, want in zip(jax.tree.leaves(kept), jax.tree.leaves((params, state))):
    np.testing.assert_array_equal(got, want)
  assert not np.array_equal(moved[0]['scale'], params['scale'])


# ----------------------------------------------------------------------------- train step


class ToyFlow(nn.Module):
  """A stand-in with DenseFlow's method names: BatchNorm statistics and a `noise` rng draw.

  Enough to exercise the train step's skip logic without compiling a flow.
  """
  config: ml_collections.ConfigDict

  def setup(self):
    self.norm = BatchNorm(name='norm')
    self.log_scale = self.param('log_scale', nn.initializers.zeros, (1,))

  def __call__(self, x, train: bool = False):
    return self.log_prob(x, train)

  def log_prob(self, x, train: bool = False):
    h = x.astype(jnp.float32) / 31.0 + 0.01 * jax.random.normal(self.make_rng('noise'), x.shape)
    h = self.norm(h, train=train) * jnp.exp(self.log_scale)
    return -0.5 * jnp.sum(h * h, axis=(1, 2, 3)) + 64 * self.log_scale[0]

  def bits_per_dim(self, x, train: bool = False):
    return -self.log_prob(x, train) / (64 * np.log(2.0))


def test_train_step_skips_nonfinite_update():
  config = micro_config()
  mesh = parallel.make_mesh()
  model = ToyFlow(config.model)
  tx = optim.make_optimizer(config)
  schedule = optim.learning_rate_schedule(config, 93)
  data = make_data(config)
  batches = data.train_batches(0)
  init_fn = train.make_init_fn(model, tx, config, mesh)
  step_fn = train.make_train_step(model, tx, schedule, mesh, nonfinite_steps=[1, 2])
  state = init_fn(parallel.shard_batch(next(iter(data.train_batches(0))), mesh))
  history = []
  for _ in range(4):
    state, metrics = step_fn(state, parallel.shard_batch(next(batches), mesh))
    history.append((jax.tree.map(np.array, (state.params, state.batch_stats, state.opt_state)),
                    jax.tree.map(np.asarray, metrics), int(state.step)))
  assert [bool(m['finite']) for _, m, _ in history] == [True, False, False, True]
  assert [int(m['nonfinite']) for _, m, _ in history] == [0, 1, 2, 0]
  assert [s for _, _, s in history] == [1, 2, 3, 4]
  assert np.isnan(history[1][1]['loss'])
  for skipped in (1, 2):  # params, BatchNorm statistics and optimizer state unchanged
    same = jax.tree.map(np.array_equal, history[0][0], history[skipped][0])
    assert all(jax.tree.leaves(same))
  for part in range(3):  # the next finite step updates all three
    same = jax.tree.map(np.array_equal, history[0][0][part], history[3][0][part])
    assert not all(jax.tree.leaves(same)), part
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(history[3][0]))
  np.testing.assert_allclose(history[3][1]['learning_rate'], schedule(3))


# ----------------------------------------------------------------------------- the loop


def _checkpoint_steps(workdir):
  return sorted(int(s) for s in os.listdir(checkpoint.checkpoint_dir(workdir)) if s.isdigit())


def test_prefetch_to_mesh_places_the_next_batch_before_handing_out_one():
  mesh = parallel.make_mesh()
  read = []

  def source(n):
    for i in range(n):
      read.append(i)
      yield np.full((2 * jax.device_count(), 3), i, np.uint8)

  batches = parallel.prefetch_to_mesh(source(3), mesh)
  assert read == []  # nothing read before the first batch is asked for
  first = next(batches)
  assert read == [0, 1]  # batch 1 is on its way to the devices while step 0 runs
  assert first.sharding == parallel.batch_sharding(mesh) and first.shape == (
      2 * jax.device_count(), 3)
  assert [int(np.asarray(b)[0, 0]) for b in batches] == [1, 2] and read == [0, 1, 2]
  read.clear()
  lazy = parallel.prefetch_to_mesh(source(2), mesh, ahead=0)
  assert int(np.asarray(next(lazy))[-1, -1]) == 0 and read == [0]
  with pytest.raises(ValueError, match='ahead=-1 must be >= 0'):
    parallel.prefetch_to_mesh(source(1), mesh, ahead=-1)


@pytest.fixture
def toy_loop(monkeypatch):
  """The real training loop on `ToyFlow` (compiles in a moment), per-step fetches an error.

  The loop runs its per-step work under `jax.transfer_guard_device_to_host(
  'disallow_explicit')` (`train.STEP_TRANSFER_GUARD`). On an accelerator the guard itself
  raises at a fetch; XLA:CPU hands arrays to numpy without a copy, which the guard does not
  check, so while that guard level is set this fixture makes the ways to fetch a jax.Array
  raise the guard's error: reading `ArrayImpl._value` (float, bool, int, item, tolist,
  `__array__`, jax.device_get) and np.asarray / np.array (which read CPU arrays through the
  buffer protocol).
  """
  # pylint: disable-next=g-import-not-at-top
  from jax._src import array as jax_array, config as jax_config
  monkeypatch.setattr(train, 'DenseFlow', ToyFlow)
  monkeypatch.setattr(train, 'STEP_TRANSFER_GUARD', 'disallow_explicit')

  def check(x):
    if (isinstance(x, jax.Array) and
        jax_config.transfer_guard_device_to_host.value == 'disallow_explicit'):
      raise RuntimeError(f'Disallowed device-to-host transfer: shape={x.shape}, '
                         f'dtype={x.dtype}')

  fetch = jax_array.ArrayImpl._value
  monkeypatch.setattr(jax_array.ArrayImpl, '_value',
                      property(lambda self: check(self) or fetch.fget(self)))
  for name in ('asarray', 'array'):
    to_numpy = getattr(np, name)
    monkeypatch.setattr(np, name, lambda x, *a, _f=to_numpy, **k: check(x) or _f(x, *a, **k))


def test_per_step_work_fetches_nothing_from_the_devices(tmp_path, toy_loop, monkeypatch):
  """8 steps (log every 4, checkpoint every 3, step 5 skipped) run with every fetch between
  check points an error; a step that fetches its loss fails at once."""
  workdir = str(tmp_path / 'run')
  config = micro_config(num_steps=8, log_every=4, checkpoint_every=3)
  state = train.train_and_evaluate(config, workdir, nonfinite_steps=[5])
  assert int(state.step) == 8
  assert _checkpoint_steps(workdir) == [3, 6, 8]  # 6: the state of the skipped step 5
  rows = [r for r in artifacts.read_metrics(workdir) if 'train_bpd' in r]
  assert [(r['step'], r['skipped_steps']) for r in rows] == [(4, 0.0), (8, 1.0)]
  assert all(r['steps_per_sec'] > 0 and np.isfinite(r['train_bpd']) for r in rows)

  compile_step = train._compile_step  # pylint: disable=protected-access

  def fetching_compile_step(*args, **kwargs):
    """The loop's compiled step, made to fetch its loss at every step (what it must not do)."""
    compiled = compile_step(*args, **kwargs)

    def fetching_step(state, batch):
      state, metrics = compiled(state, batch)
      float(metrics['loss'])
      return state, metrics

    return fetching_step

  monkeypatch.setattr(train, '_compile_step', fetching_compile_step)
  with pytest.raises(Exception, match='Disallowed device-to-host transfer'):
    train.train_and_evaluate(micro_config(num_steps=12, log_every=4, checkpoint_every=3),
                             workdir)
  assert _checkpoint_steps(workdir) == [3, 6, 8]


def test_resumes_a_checkpoint_with_one_optimizer_moment_per_array(tmp_path, toy_loop):
  """A checkpoint of the earlier layout (Adamax moments per parameter array, before the
  optimizer worked on one vector) resumes as the run that wrote it would have gone on."""
  config = micro_config(num_steps=6, log_every=3, checkpoint_every=3)
  full = train.train_and_evaluate(config, str(tmp_path / 'full'))
  workdir = str(tmp_path / 'old')
  train.train_and_evaluate(micro_config(num_steps=3, log_every=3, checkpoint_every=3), workdir)
  stored = checkpoint.CheckpointReader(workdir).restore(
      3, {checkpoint.ITEM_PARAMS: None, checkpoint.ITEM_BATCH_STATS: None,
          checkpoint.ITEM_TRAINING: None})
  params, training = stored[checkpoint.ITEM_PARAMS], stored[checkpoint.ITEM_TRAINING]
  vector, unravel = jax.flatten_util.ravel_pytree(params)
  per_array = jax.tree.map(lambda x: unravel(x) if x.shape == vector.shape else x,
                           training['opt_state'])
  assert len(jax.tree.leaves(per_array)) > len(jax.tree.leaves(training['opt_state']))
  step_dir = os.path.join(checkpoint.checkpoint_dir(workdir), '3')
  shutil.rmtree(step_dir)
  ckpts = checkpoint.Checkpoints(workdir)
  assert ckpts.save(3, params, stored[checkpoint.ITEM_BATCH_STATS],
                    dict(training, opt_state=per_array))
  ckpts.close()
  resumed = train.train_and_evaluate(config, workdir)
  assert int(resumed.step) == 6
  for got, want in zip(jax.tree.leaves(resumed), jax.tree.leaves(full)):
    np.testing.assert_array_equal(got, want)


def test_a_restart_loads_the_saved_programs_and_trains_the_same(tmp_path, toy_loop, cache_dir,
                                                               caplog):
  """With the compilation cache on, a second run loads the init and train step exports
  instead of tracing them, and trains bit for bit as the first."""
  config = micro_config(num_steps=4, log_every=2, checkpoint_every=4)
  first = train.train_and_evaluate(config, str(tmp_path / 'a'))
  names = sorted(n.split('-')[0] for n in os.listdir(os.path.join(cache_dir, 'exported')))
  assert names == ['init', 'train_step']
  caplog.clear()
  caplog.set_level('INFO')
  second = train.train_and_evaluate(config, str(tmp_path / 'b'))
  assert 'init: loaded its saved export' in caplog.text
  assert 'train_step: loaded its saved export' in caplog.text
  for got, want in zip(jax.tree.leaves(second), jax.tree.leaves(first)):
    np.testing.assert_array_equal(got, want)
  # A test hook that changes the step's program is part of the key.
  caplog.clear()
  train.train_and_evaluate(config, str(tmp_path / 'c'), nonfinite_steps=[1])
  assert 'init: loaded its saved export' in caplog.text
  assert 'train_step: loaded' not in caplog.text


def test_stops_after_consecutive_nonfinite_and_keeps_last_good_checkpoint(tmp_path, toy_loop):
  """Skips are seen at check points (log every 5, checkpoint every 3); limit 3 in a row.

  Run 1: steps 0-2 finite (checkpoint 3); 3-4 skipped (check points 5 and 6: checkpoint 3
  already holds their state, nothing saved; 6 is finite again); 5-7 finite; 8-10 skipped:
  check point 9 saves the state of the streak (the parameters after step 8), 10 sees 2 in a
  row, step 11 is finite again, and check point 12 stops the run for the 3 skips it did not
  see in a row, after saving its (finite) state. Run 2 resumes from 12: 12-13 finite, skips
  from step 14 on: check point 15 saves the state of the streak, check point 18 stops (4 in a
  row by then) without another checkpoint and names checkpoint 15.
  """
  config = micro_config(num_steps=30, log_every=5, checkpoint_every=3,
                        max_consecutive_nonfinite=3, keep_checkpoints=10)
  workdir = str(tmp_path / 'run')
  directory = checkpoint.checkpoint_dir(workdir)
  poison = [3, 4, 8, 9, 10, *range(14, 30)]
  with pytest.raises(train.NonFiniteError) as info:
    train.train_and_evaluate(config, workdir, nonfinite_steps=poison)
  assert str(info.value).startswith('3 consecutive training steps (up to step 10)')
  assert (f'Checkpoint 12 in {directory} holds the last finite state (the parameters after '
          'step 12)') in str(info.value)
  assert _checkpoint_steps(workdir) == [3, 6, 9, 12]
  params = {step: checkpoint.load_variables(workdir, step=step)[1]['params']
            for step in (6, 9, 12)}

  with pytest.raises(train.NonFiniteError) as info:
    train.train_and_evaluate(config, workdir, nonfinite_steps=poison)
  assert str(info.value).startswith('4 consecutive training steps (up to step 17)')
  assert (f'Checkpoint 15 in {directory} holds the last finite state (the parameters after '
          'step 14)') in str(info.value)
  assert _checkpoint_steps(workdir) == [3, 6, 9, 12, 15]  # none at 18, inside the streak
  step, variables = checkpoint.load_variables(workdir)
  assert step == 15 and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(variables))
  assert checkpoint.verify_manifest(os.path.join(directory, '15'))
  changed = lambda a, b: not all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))
  assert changed(params[6], params[9])  # steps 6-7 updated, step 8 was skipped
  assert changed(params[12], variables['params'])  # steps 12-13 updated
  rows = [r for r in artifacts.read_metrics(workdir) if 'skipped_steps' in r]
  assert [(r['step'], r['skipped_steps']) for r in rows] == [
      (5, 2.0), (10, 2.0), (12, 1.0), (15, 1.0), (18, 3.0)]
  assert 'train_bpd' in rows[2] and 'train_bpd' not in rows[4]  # no finite step in 15-17


# ----------------------------------------------------------------------------- config checks


def test_validate_config_messages():
  with pytest.raises(ValueError, match='train.batch_size=6 is not divisible by the device '
                     'count 4'):
    train.validate_config(micro_config(batch_size=6), num_devices=4)
  config = micro_config()
  config.eval.iwbo_k, config.eval.iwbo_chunk = 10, 3
  with pytest.raises(ValueError, match='iwbo_k=10 .* divisible by eval.iwbo_chunk=3'):
    train.validate_config(config, num_devices=1)
  with pytest.raises(ValueError, match='batch_size=2000 is larger than the training set '
                     r'\(1500 images'):
    make_data(micro_config(batch_size=2000))
  config = micro_config()
  config.model.block_conf, config.model.layers_conf, config.model.mid_channels = (
      (1, 1, 1), (1, 1, 1), (4, 4, 4))
  with pytest.raises(ValueError, match='block 2 works at 1x1'):
    train.validate_config(config, num_devices=1)


def test_saved_config_conflict_is_refused(tmp_path, caplog):
  workdir = str(tmp_path)
  config_file.check_and_save_config(micro_config(), workdir)
  saved = json.load(open(os.path.join(workdir, 'config.json')))
  assert saved['model']['block_conf'] == [2]
  other = micro_config()
  other.model.growth_rate = 4
  with pytest.raises(ValueError, match=r'different model \(model.growth_rate: 2 -> 4\)'):
    config_file.check_and_save_config(other, workdir)
  longer = micro_config(num_steps=50)
  longer.model.remat = 'full'  # implementation-only fields: allowed
  longer.model.conv_backward = 'xla'
  config_file.check_and_save_config(longer, workdir)
  assert 'train.num_steps: 8 -> 50' in caplog.text
  assert config_file.load_config(workdir).train.num_steps == 50
  assert config_file.load_config(workdir).model.block_conf == (2,)


# ----------------------------------------------------------------------------- artifacts


def test_image_grid_jsonl_metrics_and_bpd_curve(tmp_path):
  from denseflow_jax import metric_writer  # pylint: disable=g-import-not-at-top
  images = np.arange(5 * 2 * 3).reshape(5, 2, 3, 1) % 32
  grid = artifacts.image_grid(images.astype(np.uint8), num_bits=5, columns=3, padding=1)
  assert grid.shape == (2 * 3 + 1, 3 * 4 + 1, 1) and grid.dtype == np.uint8
  assert grid[1, 1, 0] == 0 and grid[1 + 1, 1 + 2, 0] == round(5 * 255 / 31)
  artifacts.save_sample_grid(str(tmp_path / 's.png'), images.astype(np.uint8), 5)
  assert artifacts.plot_bpd_curve(str(tmp_path)) is None
  writer = metric_writer.JsonlWriter(str(tmp_path))
  for step, bpd in ((1, 5.0), (2, 4.0), (2, 3.5)):
    writer.write_scalars(step, {'train_bpd': bpd})
  writer.write_scalars(2, {'test_bpd': np.float32(3.9), 'steps_per_sec': 7})
  writer.write_images(2, {'samples': np.zeros((1, 4, 4, 3), np.uint8)})  # not a scalar: ignored
  rows = artifacts.read_metrics(str(tmp_path))
  assert rows[-1] == {'step': 2, 'test_bpd': float(np.float32(3.9)), 'steps_per_sec': 7.0}
  assert len(rows) == 4
  assert artifacts.metric_curve(artifacts.read_metrics(str(tmp_path)), 'train_bpd') == {
      1: 5.0, 2: 3.5}
  path = artifacts.plot_bpd_curve(str(tmp_path))
  assert os.path.getsize(path) > 1000
