"""Cross-platform lowering: the train step and the model's methods export for CUDA and TPU from
this CPU-only machine (`jax.export`), and the 3x3 convolutions' gradient is the tuned one only
in CPU modules (`model.conv_backward`).

How the gradients are told apart in StableHLO text: XLA's own weight gradient of a 3x3
convolution is a `stablehlo.convolution` whose result is the kernel, `tensor<3x3xCxOx...>`; the
tuned one has no such convolution but a `stablehlo.dot_general` with result `tensor<Cx(9*O)x...>`
(the input contracted with the 9 shifted output gradients), for every forward 3x3 convolution
with kernel `3x3xCxO` in the parameters. About 50 s on 2 shared CPU cores, most of it tracing
the train step once.
"""
import re
from typing import Set, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from denseflow_jax import defaults, parallel, train
from denseflow_jax.model import DenseFlow
from denseflow_jax.nets import Conv3x3, layers
from denseflow_jax.optim import learning_rate_schedule, make_optimizer

PLATFORMS = ('cpu', 'cuda', 'tpu')
BATCH = 2


def small_config(**model_fields):
  """DenseFlow's full structure (dense blocks, attention, cross-unit coupling, variational
  dequantization) at 8x8 with a few channels: cheap to trace."""
  config = defaults.get_config()
  m = config.model
  m.image_size = 8
  m.block_conf, m.layers_conf, m.mid_channels = (2, 1), (1, 1), (8, 8)
  m.growth_rate, m.dense_depth, m.dense_growth = 2, 1, 4
  m.deq_steps, m.deq_context_channels = 1, 8
  m.update(model_fields)
  config.train.batch_size = BATCH
  return config


def weight_grad_convolutions(text: str) -> int:
  """Number of `stablehlo.convolution` ops whose result is a 3x3 kernel (XLA's weight gradient)."""
  return sum(1 for line in text.splitlines()
             if 'stablehlo.convolution' in line and re.search(r'-> tensor<3x3x\d+x\d+x', line))


def conv3x3_kernels(params) -> Set[Tuple[int, int]]:
  """(C, O) of every 3x3 kernel in a parameter tree (scanned kernels carry a leading axis)."""
  return {tuple(leaf.shape[-2:]) for leaf in jax.tree.leaves(params)
          if len(leaf.shape) >= 4 and tuple(leaf.shape[-4:-2]) == (3, 3)}


def tuned_weight_grad_dots(text: str, kernels: Set[Tuple[int, int]]) -> Set[Tuple[int, int]]:
  """The kernels `(C, O)` for which a `dot_general` returns `tensor<Cx(9*O)x...>`."""
  dot_results = set()
  for line in text.splitlines():
    if 'stablehlo.dot_general' in line:
      found = re.search(r'-> tensor<(\d+)x(\d+)x\w+>$', line.split(' loc(')[0].rstrip())
      if found:
        dot_results.add((int(found.group(1)), int(found.group(2))))
  return {(c, o) for c, o in kernels if (c, 9 * o) in dot_results}


@pytest.fixture(scope='module')
def train_setup():
  config = small_config()
  model = DenseFlow(config.model)
  mesh = parallel.make_mesh(jax.devices()[:1])
  tx, schedule = make_optimizer(config), learning_rate_schedule(config, 10)
  batch = jax.ShapeDtypeStruct((BATCH, 8, 8, 3), jnp.uint8)
  state = train.make_init_fn(model, tx, config, mesh).abstract(batch)
  step = train.make_train_step(model, tx, schedule, mesh)
  return model, state, step, batch


@pytest.fixture(scope='module')
def train_step_modules(train_setup):
  """The real train step (`train.make_train_step`) exported for each platform: StableHLO text."""
  _, state, step, batch = train_setup
  return {p: jax.export.export(step, platforms=[p])(state, batch).mlir_module()
          for p in PLATFORMS}


def test_train_step_exports_for_every_platform(train_step_modules):
  for platform, text in train_step_modules.items():
    assert 'stablehlo.convolution' in text, platform
    assert 'stablehlo.while' in text, platform  # the nn.scan over glow-like modules


def test_gpu_and_tpu_train_steps_use_xlas_convolution_gradient(train_setup, train_step_modules):
  cpu = train_step_modules['cpu']
  kernels = conv3x3_kernels(train_setup[1].params)
  assert len(kernels) >= 3, kernels  # dense layers, noise nets, the dequantizer's context net
  # CPU: every 3x3 conv has its tuned weight-gradient matmul and no weight-gradient conv.
  assert tuned_weight_grad_dots(cpu, kernels) == kernels
  assert weight_grad_convolutions(cpu) == 0
  for platform in ('cuda', 'tpu'):
    text = train_step_modules[platform]
    assert tuned_weight_grad_dots(text, kernels) == set(), platform
    assert weight_grad_convolutions(text) >= len(kernels), platform
    # XLA's gradient: forward, input-gradient and weight-gradient convs for each 3x3 conv.
    assert text.count('stablehlo.convolution') > cpu.count('stablehlo.convolution'), platform


def _method_fns(model):
  def apply(method, **kw):
    return lambda v, *a: model.apply(v, *a, method=method, **kw)
  return {
      'log_prob': lambda v, x, key: model.apply(v, x, rngs={'noise': key}, method='log_prob'),
      'bits_per_dim': lambda v, x, key: model.apply(v, x, rngs={'noise': key},
                                                    method='bits_per_dim'),
      'iwbo': lambda v, x, key: model.apply(v, x, 2, 1, rngs={'noise': key}, method='iwbo'),
      'sample': lambda v, key: model.apply(v, BATCH, rngs={'noise': key}, method='sample'),
      'decode': apply('decode'),
  }


@pytest.mark.parametrize('platform', ['cuda', 'tpu'])
def test_model_methods_export(train_setup, platform):
  model, state, _, batch = train_setup
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  latents = jax.eval_shape(
      lambda v, x, k: model.apply(v, x, rngs={'noise': k}, method='encode'), variables, batch,
      key)
  args = {'log_prob': (variables, batch, key), 'bits_per_dim': (variables, batch, key),
          'iwbo': (variables, batch, key), 'sample': (variables, key),
          'decode': (variables, latents)}
  for name, fn in _method_fns(model).items():
    exported = jax.export.export(jax.jit(fn), platforms=[platform])(*args[name])
    assert exported.platforms == (platform,)
    out = exported.out_avals[0]
    if name in ('sample', 'decode'):
      assert (out.shape, out.dtype) == ((BATCH, 8, 8, 3), jnp.uint8), name
    else:
      assert out.shape == (BATCH,), name


# ------------------------------------------------------------- the switch, forced either way


def _micro_model(mode):
  """One glow-coupling module (two Conv3x3 layers) with `model.conv_backward = mode`."""
  config = small_config(coupling='glow', glow_hidden=4, augment=False, dequantization='uniform',
                        block_conf=(1,), layers_conf=(1,), mid_channels=(4,), image_size=4,
                        conv_backward=mode)
  return DenseFlow(config.model)


def _grad_module(model, platform):
  x = jax.ShapeDtypeStruct((BATCH, 4, 4, 3), jnp.uint8)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  variables = jax.eval_shape(lambda x, k: model.init({'params': k, 'noise': k}, x), x, key)

  def loss(params, x, key):
    return jnp.mean(model.apply({**variables, 'params': params}, x, rngs={'noise': key},
                                method='bits_per_dim'))
  text = jax.export.export(jax.jit(jax.grad(loss)), platforms=[platform])(
      variables['params'], x, key).mlir_module()
  return text, conv3x3_kernels(variables['params'])


@pytest.mark.parametrize('mode, tuned_on', [('auto', {'cpu'}), ('tuned', {'cpu', 'cuda', 'tpu'}),
                                            ('xla', set())])
def test_model_conv_backward_forces_either_gradient(mode, tuned_on):
  model = _micro_model(mode)
  for platform in PLATFORMS:
    text, kernels = _grad_module(model, platform)
    assert len(kernels) == 2, kernels  # the glow coupling net's conv_in and conv_out
    if platform in tuned_on:
      assert tuned_weight_grad_dots(text, kernels) == kernels, (mode, platform)
      assert weight_grad_convolutions(text) == 0, (mode, platform)
    else:
      assert tuned_weight_grad_dots(text, kernels) == set(), (mode, platform)
      assert weight_grad_convolutions(text) == 2, (mode, platform)


def test_conv3x3_layer_modes_agree_on_cpu():
  """On CPU all three modes give the same values and (to rounding) the same gradients."""
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
  results = {}
  for mode in ('auto', 'tuned', 'xla'):
    layer = Conv3x3(5, conv_backward=mode)
    variables = layer.init(jax.random.key(1), x)
    f = lambda v, x: jnp.sum(jnp.sin(layer.apply(v, x)))
    results[mode] = (layer.apply(variables, x), jax.grad(f, argnums=(0, 1))(variables, x))
  for mode in ('tuned', 'xla'):
    np.testing.assert_array_equal(results[mode][0], results['auto'][0])
    for a, b in zip(jax.tree.leaves(results[mode][1]), jax.tree.leaves(results['auto'][1])):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # 'auto' is the tuned gradient on CPU: bitwise the same.
  for a, b in zip(jax.tree.leaves(results['tuned'][1]), jax.tree.leaves(results['auto'][1])):
    np.testing.assert_array_equal(a, b)


def test_conv_backward_mode_context_and_bad_values():
  x = jnp.ones((1, 4, 4, 2))
  layer = Conv3x3(2)
  variables = layer.init(jax.random.key(0), x)
  loss = lambda w: jnp.sum(layer.apply({'params': {**variables['params'], 'kernel': w}}, x))
  grad = jax.jit(jax.grad(loss))
  with layers.conv_backward_mode('xla'):
    text = grad.lower(variables['params']['kernel']).as_text()
  assert weight_grad_convolutions(text) == 1
  text = jax.jit(jax.grad(loss)).lower(variables['params']['kernel']).as_text()
  assert weight_grad_convolutions(text) == 0  # outside the block: 'auto', tuned on CPU
  with pytest.raises(ValueError, match=r"model.conv_backward = 'fast'; expected one of"):
    with layers.conv_backward_mode('fast'):
      pass
  with pytest.raises(ValueError, match='model.conv_backward'):
    Conv3x3(2, conv_backward='cudnn').init(jax.random.key(0), x)
