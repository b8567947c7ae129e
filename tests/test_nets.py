"""Tests for denseflow_jax.nets: conv3x3's custom gradient, Nystrom attention, dense blocks,
BatchNorm, and the coupling / noise / context nets."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from denseflow_jax import bijectors, nets
from denseflow_jax.nets import (BatchNorm, ConditionalCouplingNet, ContextNet, Conv3x3, DenseBlock,
                                DenseFlowCouplingNet, GatedConv1x1, GlowCouplingNet, NoiseNet,
                                NystromAttention, PointwiseConv, conv3x3, iterative_pinv,
                                nystrom_kernel)


def normal(seed, shape, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape, dtype)


def init(module: nn.Module, x, **kwargs):
  """`module.init` under jit with `unsafe_rbg` draws (much faster to compile on CPU)."""
  return jax.jit(lambda xb: module.init(jax.random.key(0, impl='unsafe_rbg'), xb, **kwargs))(x)


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# -------------------------------------------------------------------------------- conv3x3 VJP
def _conv_reference(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _conv_grads(conv, x, w, r):
  return jax.grad(lambda a, b: jnp.sum(conv(a, b) * r), argnums=(0, 1))(x, w)


# The input gradient is a matmul up to 1024 output rows (N*H*W) and a forward conv above.
@pytest.mark.parametrize('shape', [(2, 5, 6, 3, 4), (1, 4, 4, 8, 2), (2, 24, 24, 5, 3)])
def test_conv3x3_custom_vjp_matches_lax_conv_float32(shape):
  n, h, w, c, o = shape
  x, k, r = normal(0, (n, h, w, c)), normal(1, (3, 3, c, o)), normal(2, (n, h, w, o))
  np.testing.assert_allclose(conv3x3(x, k), _conv_reference(x, k), rtol=1e-6, atol=1e-6)
  dx, dw = _conv_grads(conv3x3, x, k, r)
  dx_ref, dw_ref = _conv_grads(_conv_reference, x, k, r)
  assert dx.shape == x.shape and dw.shape == k.shape and dw.dtype == k.dtype
  assert rel_err(dx, dx_ref) < 1e-5
  assert rel_err(dw, dw_ref) < 1e-5


@pytest.mark.parametrize('hw', [(5, 6), (24, 24)])
def test_conv3x3_custom_vjp_matches_lax_conv_float64(hw):
  with jax.enable_x64(True):
    x = normal(0, (2, *hw, 3), jnp.float64)
    k = normal(1, (3, 3, 3, 4), jnp.float64)
    r = normal(2, (2, *hw, 4), jnp.float64)
    dx, dw = _conv_grads(conv3x3, x, k, r)
    dx_ref, dw_ref = _conv_grads(_conv_reference, x, k, r)
    assert dw.dtype == jnp.float64
    assert rel_err(dx, dx_ref) < 1e-12
    assert rel_err(dw, dw_ref) < 1e-12


@pytest.mark.parametrize('hw', [4, 24])
def test_conv3x3_gradient_inside_scan_equals_outside(hw):
  # nn.scan over modules puts the backward inside a while loop (a different XLA code path).
  x, r = normal(0, (2, hw, hw, 3)), normal(2, (2, hw, hw, 4))
  ks = normal(1, (2, 3, 3, 3, 4))

  def loss(x, ks):
    def body(carry, k):
      return carry, jnp.sum(conv3x3(carry, k) * r)
    return jnp.sum(jax.lax.scan(body, x, ks)[1])

  dx, dks = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, ks)
  for i in range(2):
    dx_i, dk_i = _conv_grads(_conv_reference, x, ks[i], r)
    assert rel_err(dks[i], dk_i) < 1e-5
  dx_ref = sum(_conv_grads(_conv_reference, x, ks[i], r)[0] for i in range(2))
  assert rel_err(dx, dx_ref) < 1e-5


def test_conv3x3_gradient_under_jit_and_in_the_module():
  module = Conv3x3(5)
  x = normal(0, (2, 4, 4, 3))
  params = init(module, x)['params']

  def loss(p, conv):
    y = conv(x, p['kernel']) + p['bias']
    return jnp.sum(jnp.sin(y))

  g = jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(module.apply({'params': p}, x)))))(params)
  g_ref = jax.grad(loss)(params, _conv_reference)
  assert rel_err(g['kernel'], g_ref['kernel']) < 1e-5
  assert rel_err(g['bias'], g_ref['bias']) < 1e-5


def test_conv_layers_use_pytorch_default_init():
  x = normal(0, (1, 4, 4, 6))
  k1 = init(PointwiseConv(5), x)['params']
  k3 = init(Conv3x3(5), x)['params']
  assert np.max(np.abs(k1['kernel'])) <= 1 / math.sqrt(6)
  assert np.max(np.abs(k3['kernel'])) <= 1 / math.sqrt(54)
  assert np.max(np.abs(k3['bias'])) <= 1 / math.sqrt(54)
  assert np.std(k3['kernel']) > 0.5 / math.sqrt(3 * 54)   # roughly uniform over the interval
  zero = init(PointwiseConv(5, zero_init=True), x)['params']
  assert not np.any(zero['kernel']) and not np.any(zero['bias'])


# ------------------------------------------------------------------------- Nystrom attention
def _softmax(a, axis):
  a = a - a.max(axis=axis, keepdims=True)
  e = np.exp(a)
  return e / e.sum(axis=axis, keepdims=True)


def _nystrom_reference(q, k, v, landmarks=4, iterations=6):
  """The SPEC's Nystrom formula, written independently in float64 numpy."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  n, length, e = q.shape
  block = length // landmarks
  q_lm = np.stack([q[:, i * block:(i + 1) * block].mean(1) for i in range(landmarks)], 1)
  k_lm = np.stack([k[:, i * block:(i + 1) * block].mean(1) for i in range(landmarks)], 1)
  q_lm, k_lm = q_lm / math.sqrt(length), k_lm / math.sqrt(length)
  k1 = _softmax(np.einsum('nle,nme->nlm', q, k_lm), axis=1)      # over positions
  k2 = _softmax(np.einsum('nle,nme->nlm', q_lm, k_lm), axis=1)
  k3 = _softmax(np.einsum('nle,nme->nlm', q_lm, k), axis=1)      # over landmarks
  out = []
  for b in range(n):
    m = k2[b]
    v_inv = m.T / (np.abs(m).sum(0).max() * np.abs(m).sum(1).max())
    eye = np.eye(landmarks)
    for _ in range(iterations):
      kv = m @ v_inv
      v_inv = v_inv @ (13 * eye - kv @ (15 * eye - kv @ (7 * eye - kv))) / 4
    out.append(k1[b] @ v_inv @ (k3[b] @ v[b]) + v[b])
  return np.stack(out)


def test_nystrom_kernel_matches_the_spec_formula():
  q, k, v = normal(0, (2, 16, 3)), normal(1, (2, 16, 3)), normal(2, (2, 16, 3))
  out = nystrom_kernel(q, k, v, num_landmarks=4, iterations=6)
  assert out.shape == (2, 16, 3)
  np.testing.assert_allclose(out, _nystrom_reference(q, k, v), rtol=1e-4, atol=1e-5)


def test_nystrom_layouts_differ_with_the_same_shapes():
  x = normal(0, (2, 4, 6, 8))
  published, tokens = NystromAttention(8), NystromAttention(8, layout='tokens')
  params = init(published, x)
  y_pub = published.apply(params, x)
  y_tok = tokens.apply(params, x)      # same parameter tree
  assert y_pub.shape == y_tok.shape == x.shape
  assert float(jnp.max(jnp.abs(y_pub - y_tok))) > 1e-3


def test_nystrom_published_layout_is_a_plain_reshape_of_channels_first():
  """Row r, column j of the sequence is element r*3E + j of the flat (3E, H, W) buffer."""
  n, h, w, m = 2, 4, 6, 8
  e, length = m // 2, h * w
  x = normal(0, (n, h, w, m))
  module = NystromAttention(m)
  params = init(module, x)['params']
  qkv = np.asarray(x, np.float64) @ params['qkv']['kernel'] + params['qkv']['bias']  # NHWC
  seq = np.zeros((n, length, 3 * e))
  for r in range(length):
    for j in range(3 * e):
      flat = r * 3 * e + j
      ch, pix = flat // length, flat % length
      seq[:, r, j] = qkv[:, pix // w, pix % w, ch]
  att = _nystrom_reference(seq[..., :e], seq[..., e:2 * e], seq[..., 2 * e:])   # (n, L, E)
  back = np.zeros((n, h, w, e))
  for r in range(length):
    for j in range(e):
      flat = r * e + j
      ch, pix = flat // length, flat % length
      back[:, pix // w, pix % w, ch] = att[:, r, j]
  expected = back @ params['out_transform']['kernel'] + params['out_transform']['bias']
  np.testing.assert_allclose(module.apply({'params': params}, x), expected, rtol=1e-4, atol=1e-5)


def test_nystrom_rejects_bad_sizes_and_layouts():
  with pytest.raises(ValueError, match=r'H\*W = 3\*3 = 9 is not divisible by num_landmarks=4'):
    NystromAttention(8).init(jax.random.key(0), jnp.zeros((1, 3, 3, 8)))
  with pytest.raises(ValueError, match="layout must be 'published' or 'tokens', got 'pixels'"):
    NystromAttention(8, layout='pixels').init(jax.random.key(0), jnp.zeros((1, 2, 2, 8)))


def test_iterative_pinv_approaches_the_inverse():
  a = np.eye(4) + 0.2 * np.asarray(normal(0, (3, 4, 4)))       # well-conditioned, batch of 3
  assert np.linalg.cond(a).max() < 5
  k = jnp.asarray(a, jnp.float32)
  errors = [float(np.max(np.abs(np.asarray(iterative_pinv(k, it)) - np.linalg.inv(a))))
            for it in (1, 2, 6)]
  assert errors[0] > errors[1] > errors[2]
  assert errors[2] < 1e-5
  # Each example is scaled by its own norms: a scaled copy gives the scaled inverse.
  scaled = iterative_pinv(k * jnp.array([1.0, 10.0, 0.1])[:, None, None], 6)
  np.testing.assert_allclose(scaled[1], np.linalg.inv(a[1]) / 10, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(scaled[2], np.linalg.inv(a[2]) * 10, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- dense blocks
def test_dense_block_shapes():
  x = normal(0, (2, 4, 4, 6))
  block = DenseBlock(10, depth=3, growth=4)
  variables = init(block, x)
  assert block.apply(variables, x).shape == (2, 4, 4, 10)
  p = variables['params']
  for i in range(3):
    c = 6 + 4 * i
    assert p[f'layer_{i}']['conv1x1']['kernel'].shape == (c, c)
    assert p[f'layer_{i}']['conv3x3']['kernel'].shape == (3, 3, c, 4)
  assert p['gate']['conv']['kernel'].shape == (18, 30)
  residual = DenseBlock(6, depth=2, growth=4, residual=True)
  rv = init(residual, x)
  plain_out = DenseBlock(6, depth=2, growth=4).apply(rv, x)
  np.testing.assert_allclose(residual.apply(rv, x), x + plain_out, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match=r'out_channels == input channels, got 5 and input shape '
                                       r'\(2, 4, 4, 6\)'):
    init(DenseBlock(5, depth=1, growth=4, residual=True), x)


def test_gated_conv():
  x = normal(0, (2, 3, 3, 4))
  gate = GatedConv1x1(5)
  params = init(gate, x)['params']
  h = np.asarray(x, np.float64) @ params['conv']['kernel'] + params['conv']['bias']
  a, b, c = h[..., :5], h[..., 5:10], h[..., 10:]
  np.testing.assert_allclose(gate.apply({'params': params}, x), a + b / (1 + np.exp(-c)),
                             rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------- BatchNorm
def test_batchnorm_train_updates_running_stats_with_unbiased_variance():
  bn = BatchNorm(momentum=0.9, epsilon=1e-5)
  x = 1.5 + 2.0 * normal(0, (4, 3, 3, 5))
  variables = init(bn, x, train=True)
  np.testing.assert_array_equal(variables['batch_stats']['mean'], 0.0)   # init does not update
  np.testing.assert_array_equal(variables['batch_stats']['var'], 1.0)
  y, updates = bn.apply(variables, x, train=True, mutable=['batch_stats'])
  flat = np.asarray(x, np.float64).reshape(-1, 5)
  mean, biased, unbiased = flat.mean(0), flat.var(0), flat.var(0, ddof=1)
  np.testing.assert_allclose(y, (np.asarray(x) - mean) / np.sqrt(biased + 1e-5), rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_allclose(updates['batch_stats']['mean'], 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(updates['batch_stats']['var'], 0.9 + 0.1 * unbiased, rtol=1e-5)


def test_batchnorm_eval_mode_is_deterministic_and_per_example():
  bn = BatchNorm()
  x = normal(0, (4, 3, 3, 5))
  variables = {'params': {'scale': jnp.arange(1.0, 6.0), 'bias': jnp.full((5,), 0.5)},
               'batch_stats': {'mean': jnp.linspace(-1, 1, 5), 'var': jnp.linspace(0.5, 2, 5)}}
  y = bn.apply(variables, x, train=False)
  np.testing.assert_array_equal(bn.apply(variables, x, train=False), y)
  np.testing.assert_allclose(bn.apply(variables, x[:1], train=False), y[:1], rtol=1e-6)
  st = variables['batch_stats']
  expected = ((np.asarray(x) - np.asarray(st['mean'])) / np.sqrt(np.asarray(st['var']) + 1e-5)
              * np.arange(1.0, 6.0) + 0.5)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------ coupling-type nets
@pytest.mark.parametrize('make,in_shape,out_channels', [
    (lambda: DenseFlowCouplingNet(6, 8, dense_depth=2, dense_growth=8), (2, 4, 4, 3), 6),
    (lambda: GlowCouplingNet(6, hidden=8), (2, 4, 4, 3), 6),
    (lambda: NoiseNet(3), (2, 4, 4, 5), 6),
    (lambda: ConditionalCouplingNet(4, mid_channels=8, growth=8), (2, 2, 2, 7), 4),
])
def test_conditioners_start_at_zero(make, in_shape, out_channels):
  """Every conditioner's last conv is zero-initialised, so couplings start as the identity."""
  net = make()
  x = normal(0, in_shape)
  variables = init(net, x)
  y = net.apply(variables, x)
  assert y.shape == in_shape[:3] + (out_channels,)
  np.testing.assert_array_equal(y, 0.0)


def test_denseflow_coupling_net_train_mode_updates_batch_stats():
  net = DenseFlowCouplingNet(6, 8, dense_depth=2, dense_growth=8)
  x = normal(0, (2, 4, 4, 3))
  variables = init(net, x)
  assert set(variables) == {'params', 'batch_stats'}
  _, updates = net.apply(variables, x, train=True, mutable=['batch_stats'])
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), updates['batch_stats'],
                         variables['batch_stats'])
  assert all(jax.tree.leaves(changed))


def test_hyperparameters_after_the_channel_counts_are_keyword_only():
  """Two ints in the wrong order would build a different, valid-looking net: not allowed."""
  for make in (lambda: DenseFlowCouplingNet(6, 8, 2, 8),
               lambda: NystromAttention(8, 4, 6),
               lambda: nets.DenseAttentionFusion(8, 2, 8),
               lambda: GlowCouplingNet(6, 8),
               lambda: ConditionalCouplingNet(4, 8),
               lambda: ContextNet(8, 16, 4),
               lambda: BatchNorm(0.9, 1e-5),
               lambda: PointwiseConv(4, False)):
    with pytest.raises(TypeError):
      make()
  net = DenseFlowCouplingNet(6, 8, num_landmarks=2, pinv_iterations=3, dense_depth=1)
  assert (net.num_landmarks, net.pinv_iterations, net.dense_depth) == (2, 3, 1)
  # The keywords reach the attention: 2 landmarks work where 4 cannot (H*W = 6).
  x = normal(0, (1, 2, 3, 3))
  assert init(DenseFlowCouplingNet(6, 8, num_landmarks=2, dense_depth=1), x)['params']
  with pytest.raises(ValueError, match='num_landmarks=4'):
    init(DenseFlowCouplingNet(6, 8, dense_depth=1), x)


def test_one_conv1x1_name_per_concept():
  """`bijectors.Conv1x1` is the invertible 1x1 conv; the plain layer is `nets.PointwiseConv`."""
  assert not hasattr(nets, 'Conv1x1')
  assert issubclass(bijectors.Conv1x1, bijectors.Bijector)
  assert not issubclass(PointwiseConv, bijectors.Bijector)
  params = init(PointwiseConv(5), normal(0, (1, 2, 2, 3)))['params']
  assert params['kernel'].shape == (3, 5) and params['bias'].shape == (5,)


def test_context_net_shape():
  x = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 8, 6, 3)), jnp.uint8)
  net = ContextNet(num_bits=8, channels=16)
  variables = init(net, x)
  assert jax.jit(net.apply)(variables, x).shape == (2, 4, 3, 16)
