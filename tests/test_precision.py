"""Tests for `model.compute_dtype='bfloat16'` (mixed precision), on CPU.

The config field and its checks; the nets computing in bfloat16 with float32 parameters,
BatchNorm statistics and outputs; bits/dim of the published tiny model's reference weights
(`../shared/official_tiny`, skipped when absent) within 0.01 of float32; `decode(encode(x)) ==
x` exactly with bfloat16 nets; a short bfloat16 training run that lowers the loss like float32.
Models are micro DenseFlows on the 8x8 digits except for the tiny-model tests. The slow ones
(each 30-60 s on 2 shared cores, mostly compiling): the short training run (two train-step
compiles, 2 x 40 steps of a micro model) and the two tiny-model tests.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import quickstart
from denseflow_jax import cli, config_file, defaults, official, optim, parallel, train
from denseflow_jax.config_check import plan_model
from denseflow_jax.data import make_data
from denseflow_jax.model import DenseFlow, init_variables, net_compute_dtype
from denseflow_jax.nets import (BatchNorm, ConditionalCouplingNet, ContextNet,
                                DenseFlowCouplingNet, NoiseNet, float32_nets)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.normpath(os.path.join(REPO_ROOT, '..', 'shared'))
OFFICIAL_MODEL = os.path.join(SHARED, 'official_tiny', 'model')
CIFAR_TEST = os.path.join(SHARED, 'data', 'cifar10_test_subset.npz')
needs_official = pytest.mark.skipif(
    not (os.path.exists(os.path.join(OFFICIAL_MODEL, 'check', 'checkpoint.pt'))
         and os.path.exists(CIFAR_TEST)),
    reason=f'official tiny checkpoint or CIFAR-10 test subset not found under {SHARED}')


def micro_config(dtype='float32', **train_fields):
  """A micro DenseFlow on the 8x8 digits with variational dequantization (cheap to compile)."""
  config = quickstart.get_config()
  m = config.model
  m.block_conf, m.layers_conf, m.mid_channels = (2,), (1,), (8,)
  m.growth_rate, m.dense_depth, m.dense_growth = 2, 1, 8
  m.dequantization, m.deq_steps, m.deq_context_channels = 'variational', 1, 8
  m.compute_dtype = dtype
  t = config.train
  t.batch_size, t.warmup_steps, t.lr = 16, 0, 2e-3
  t.update(train_fields)
  return config


def perturbed(params, scale=0.05, seed=0):
  """`params` plus `scale` * N(0, 1) noise (no coupling stays the identity), float32."""
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.RandomState(seed)
  return jax.tree.unflatten(tree, [np.asarray(p) + scale * rng.standard_normal(np.shape(p))
                                   .astype(np.float32) for p in leaves])


def float_dtypes(tree):
  return {str(a.dtype) for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.floating)}


# ------------------------------------------------------------------------------ config


def test_config_field_default_validation_and_compatibility():
  config = defaults.get_config()
  assert config.model.compute_dtype == 'float32'
  assert net_compute_dtype(config.model) is None
  config.model.compute_dtype = 'bfloat16'
  assert net_compute_dtype(config.model) == jnp.bfloat16
  plan_model(config.model)
  config.model.compute_dtype = 'float16'
  with pytest.raises(ValueError, match=r"^model\.compute_dtype = 'float16'; expected one of "
                                       r"\('float32', 'bfloat16'\)$"):
    plan_model(config.model)
  # A config.json written before the field existed loads with float32 ...
  saved = json.loads(defaults.get_config().to_json())
  del saved['model']['compute_dtype']
  old = config_file.config_from_json(json.dumps(saved))
  assert old.model.compute_dtype == 'float32'
  # ... and a model config without the field builds a float32 model.
  bare = defaults.get_model_config()
  del bare['compute_dtype']
  plan_model(bare)
  assert net_compute_dtype(bare) is None
  # compute_dtype does not change the parameters: a float32 workdir evaluates in bfloat16.
  current = old.copy_and_resolve_references()
  current.model.compute_dtype = 'bfloat16'
  assert config_file.model_differences(old, current) == []
  current.model.growth_rate = 3
  assert config_file.model_differences(old, current) == ['model.growth_rate: 10 -> 3']
  # The tools that read a workdir take it as a --config override of the saved config.
  overridden = cli.apply_config_overrides(old, [('model.compute_dtype', 'bfloat16')])
  assert overridden.model.compute_dtype == 'bfloat16'
  assert config_file.model_differences(old, overridden) == []


# -------------------------------------------------------------------------------- nets


NETS = {
    'coupling': (lambda dt: DenseFlowCouplingNet(6, 8, dense_depth=2, dense_growth=4,
                                                 compute_dtype=dt), (2, 4, 4, 3)),
    'noise': (lambda dt: NoiseNet(2, compute_dtype=dt), (2, 4, 4, 6)),
    'dequantizer_coupling': (lambda dt: ConditionalCouplingNet(
        4, mid_channels=8, depth=2, growth=4, compute_dtype=dt), (2, 4, 4, 10)),
}


@pytest.mark.parametrize('name', sorted(NETS))
def test_nets_compute_in_bfloat16_with_float32_parameters_and_output(name):
  make, shape = NETS[name]
  x = jax.random.normal(jax.random.key(1), shape, jnp.float32)
  net32, net16 = make(None), make(jnp.bfloat16)
  variables = net32.init(jax.random.key(0), x)
  variables = {**variables, 'params': perturbed(variables['params'])}
  ref = jax.jit(net32.apply)(variables, x)
  out = jax.jit(net16.apply)(variables, x)
  assert out.dtype == jnp.float32 and float_dtypes(variables) == {'float32'}
  assert 'bf16' in str(jax.make_jaxpr(net16.apply)(variables, x))
  scale = float(jnp.max(jnp.abs(ref)))
  err = float(jnp.max(jnp.abs(out - ref)))
  assert scale > 0.01 and 0 < err < 0.03 * scale, (err, scale)
  with float32_nets():   # the inverse-exact mode: the float32 computation, bit for bit
    np.testing.assert_array_equal(jax.jit(lambda v, x: net16.apply(v, x))(variables, x), ref)


def test_context_net_in_bfloat16_returns_the_requested_dtype():
  x = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 8, 8, 3)), jnp.uint8)
  net32 = ContextNet(8, 8, depth=2, growth=4)
  net16 = ContextNet(8, 8, depth=2, growth=4, compute_dtype=jnp.bfloat16)
  variables = {'params': perturbed(net32.init(jax.random.key(0), x)['params'])}
  ref, out = jax.jit(net32.apply)(variables, x), jax.jit(net16.apply)(variables, x)
  assert ref.dtype == out.dtype == jnp.float32 and out.shape == (2, 4, 4, 8)
  assert 0 < float(jnp.max(jnp.abs(out - ref))) < 0.03 * float(jnp.max(jnp.abs(ref)))


def test_batchnorm_keeps_float32_statistics_for_bfloat16_input():
  x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (4, 6, 6, 5), jnp.float32)
  bn = BatchNorm()
  variables = bn.init(jax.random.key(1), x, train=False)
  out32, upd32 = bn.apply(variables, x, train=True, mutable=['batch_stats'])
  out16, upd16 = bn.apply(variables, x.astype(jnp.bfloat16), train=True, mutable=['batch_stats'])
  assert out16.dtype == jnp.bfloat16 and float_dtypes(upd16) == {'float32'}
  for a, b in zip(jax.tree.leaves(upd32), jax.tree.leaves(upd16)):
    np.testing.assert_allclose(b, a, rtol=1e-2)     # bf16 input rounding only
  np.testing.assert_allclose(np.asarray(out16, np.float32), out32, atol=0.02)
  eval16 = bn.apply({**variables, **upd16}, x.astype(jnp.bfloat16), train=False)
  assert eval16.dtype == jnp.bfloat16


# ------------------------------------------------------------------- micro model, no fixture


@pytest.fixture(scope='module')
def micro():
  """Perturbed variables of the micro model and a batch of digits."""
  config = micro_config()
  images = next(iter(make_data(config).train_batches(0)))
  variables = init_variables(DenseFlow(config.model), jax.random.PRNGKey(0), images)
  return {'params': perturbed(variables['params'], 0.1), 'batch_stats':
          variables['batch_stats']}, images


def test_micro_model_bfloat16_log_prob_and_exact_roundtrip(micro):
  variables, x = micro
  key = jax.random.key(7)
  out = {}
  for dtype in ('float32', 'bfloat16'):
    model = DenseFlow(micro_config(dtype).model)
    out[dtype] = jax.jit(lambda v, x, m=model: (
        m.apply(v, x, rngs={'noise': key}, method=m.bits_per_dim),
        m.apply(v, m.apply(v, x, rngs={'noise': key}, method=m.encode), method=m.decode)))(
            variables, x)
  (bpd32, x32), (bpd16, x16) = out['float32'], out['bfloat16']
  assert bpd16.dtype == jnp.float32
  diff = np.abs(np.asarray(bpd16) - np.asarray(bpd32))
  assert 0 < diff.max() < 0.05, diff      # bf16 is on, and close
  np.testing.assert_array_equal(x16, x)
  np.testing.assert_array_equal(x32, x)
  assert x16.dtype == np.uint8


def test_short_bfloat16_training_lowers_the_loss_like_float32():
  """40 steps from the same state, batches and noise: bfloat16 trains as float32 does (both
  curves fall from ~5.6 to ~5.2 bpd; about 40 s on 2 cores, mostly the two compiles)."""
  steps = 40
  config = micro_config(num_steps=steps)
  mesh = parallel.make_mesh()
  data = make_data(config)
  tx = optim.make_optimizer(config)
  schedule = optim.learning_rate_schedule(config, data.steps_per_epoch)
  batches = data.train_batches(0)
  run = [next(batches) for _ in range(steps)]
  init = train.make_init_fn(DenseFlow(config.model), tx, config, mesh)
  state0 = jax.tree.map(np.asarray, init(parallel.shard_batch(run[0], mesh)))
  losses, finals = {}, {}
  for dtype in ('float32', 'bfloat16'):
    step = train.make_train_step(DenseFlow(micro_config(dtype).model), tx, schedule, mesh)
    state, history = parallel.replicate(state0, mesh), []
    for batch in run:
      state, metrics = step(state, parallel.shard_batch(batch, mesh))
      history.append(float(metrics['loss']))
    losses[dtype], finals[dtype] = np.asarray(history), state
  f32, bf16 = losses['float32'], losses['bfloat16']
  assert np.all(np.isfinite(bf16))
  start, end32, end16 = f32[:5].mean(), f32[-10:].mean(), bf16[-10:].mean()
  curves = np.stack([f32, bf16], axis=1)
  assert end32 < start - 0.2, curves          # the run is long enough to learn something
  assert end16 < start - 0.2, curves
  assert abs(end16 - end32) < 0.02, curves    # measured: the curves agree to ~1e-4 bpd
  state = finals['bfloat16']   # parameters, BatchNorm statistics, optimizer state: float32
  assert float_dtypes((state.params, state.batch_stats, state.opt_state)) == {'float32'}


# ------------------------------------------------------------ the published tiny model


@pytest.fixture(scope='module')
def official_tiny():
  loaded = official.load_official(OFFICIAL_MODEL)
  with np.load(CIFAR_TEST) as f:
    images = np.asarray(f['images'][:32])
  return loaded, images


@needs_official
def test_bfloat16_bits_per_dim_of_the_tiny_model_within_0_01(official_tiny):
  """Same weights, images and noise: the mean bits/dim moves by far less than 0.01 (measured
  on these 32 images: 8.04537 in float32, 8.04534 in bfloat16; at most 4e-4 for one image)."""
  loaded, x = official_tiny
  key = jax.random.key(0)
  bpd = {}
  for dtype in ('float32', 'bfloat16'):
    cfg = loaded.config.model.copy_and_resolve_references()
    cfg.compute_dtype = dtype
    model = DenseFlow(cfg)
    bpd[dtype] = np.asarray(jax.jit(lambda v, x, m=model: m.apply(
        v, x, rngs={'noise': key}, method=m.bits_per_dim))(loaded.variables, x))
  diff = bpd['bfloat16'] - bpd['float32']
  assert np.all(np.isfinite(bpd['bfloat16'])) and np.any(diff != 0)
  assert abs(diff.mean()) < 0.01, (bpd['float32'].mean(), bpd['bfloat16'].mean())
  assert np.abs(diff).max() < 0.05, diff


@needs_official
def test_decode_encode_is_exact_in_bfloat16_on_the_tiny_model(official_tiny):
  loaded, x = official_tiny
  cfg = loaded.config.model.copy_and_resolve_references()
  cfg.compute_dtype = 'bfloat16'
  model = DenseFlow(cfg)
  back = jax.jit(lambda v, x: model.apply(v, model.apply(
      v, x, rngs={'noise': jax.random.key(1)}, method=model.encode), method=model.decode))(
          loaded.variables, x)
  assert back.dtype == jnp.uint8
  np.testing.assert_array_equal(back, x)
