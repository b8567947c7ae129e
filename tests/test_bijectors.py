"""Numerical tests for every bijector in denseflow_jax.bijectors.

For each bijection: inverse(forward(x)) == x, the log-det against the brute-force Jacobian,
forward + inverse log-dets == 0, and agreement under `jax.jit` and `jax.vmap`. The non-square
steps (squeeze-and-drop, cross-unit coupling, dequantization) are checked against their
log-det formulas computed by hand here. Freshly initialised couplings are the identity (their
last conv is zero-initialised), so parameters are randomly perturbed before testing.

Brute-force Jacobians use `jax.jacfwd` unless a network inside uses `conv3x3`, whose custom
VJP (a faster weight gradient) rules out forward-mode differentiation; those use `jax.jacrev`.
"""
import dataclasses
import math
from typing import Any, Callable, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from denseflow_jax.bijectors import (ActNorm, AffineCoupling, Chain, ChannelSwap, Conv1x1,
                                     CrossUnitCoupling, LUConv1x1, Logit, ShiftScale, Sigmoid,
                                     Squeeze, SqueezeAndDrop, UniformDequantization, Unsqueeze,
                                     VariationalDequantization, squeeze2x2, to_distrax)
from denseflow_jax.nets import GlowCouplingNet, NoiseNet

FIXED = ('perm', 'sign_s')  # LUConv1x1 parameters that never change (not perturbed)


# ------------------------------------------------------------------------------------ helpers
class SmallConditioner(nn.Module):
  """A small coupling net (flax `nn.Conv`, so forward-mode differentiable), zero-init output."""
  out_channels: int

  @nn.compact
  def __call__(self, h, train: bool = False):
    h = jnp.tanh(nn.Conv(8, (3, 3), padding='SAME')(h))
    return nn.Conv(self.out_channels, (1, 1), kernel_init=nn.initializers.zeros)(h)


def init(module: nn.Module, x, **kwargs):
  """`module.init` (forward direction) under jit; `kwargs` are arrays (`context`, `cond`).

  Parameters are drawn with the `unsafe_rbg` generator: XLA:CPU compiles its draws several
  times faster than threefry's (one draw per parameter adds up).
  """
  rngs = {'params': jax.random.key(1, impl='unsafe_rbg'), 'noise': jax.random.key(2)}
  with jax.threefry_partitionable(False):
    return jax.jit(lambda xb, kw: module.init(rngs, xb, **kw))(x, kwargs)


def perturb(variables, seed: int, scale: float = 0.1):
  """Adds N(0, scale^2) noise to every parameter (except LU's fixed permutation and signs)."""
  params = variables['params']
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  rng = np.random.RandomState(seed)    # host-side draws: nothing to compile
  leaves = []
  for path, leaf in flat:
    name = getattr(path[-1], 'key', None)
    leaves.append(leaf if name in FIXED else
                  leaf + scale * rng.standard_normal(leaf.shape).astype(leaf.dtype))
  treedef = jax.tree_util.tree_structure(params)
  return {**variables, 'params': jax.tree_util.tree_unflatten(treedef, leaves)}


def per_example_log_det(fn: Callable, x, jac=jax.jacfwd) -> np.ndarray:
  """Brute-force `log|det d fn(x)_i / d x_i|` for every example i (fn maps a batch to a batch)."""
  out = []
  for i in range(x.shape[0]):
    def f(xi, i=i):
      return fn(x.at[i].set(xi.reshape(x.shape[1:])))[i].reshape(-1)
    jacobian = jac(f)(x[i].reshape(-1))
    assert jacobian.shape[0] == jacobian.shape[1]
    sign, logdet = np.linalg.slogdet(np.asarray(jacobian, np.float64))
    assert sign != 0
    out.append(logdet)
  return np.array(out)


def assert_log_det_close(actual, expected, rtol=1e-4, atol=1e-4):
  """Relative error below `rtol` (with an absolute floor for log-dets that are ~0)."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  err = np.abs(actual - expected)
  assert np.all(err <= rtol * np.abs(expected) + atol), (actual, expected, err)


def std_normal_logpdf(e) -> np.ndarray:
  """log N(e; 0, 1) summed over every axis but the first, in float64."""
  e = np.asarray(e, np.float64)
  return np.sum(-0.5 * e * e - 0.5 * np.log(2 * np.pi), axis=tuple(range(1, e.ndim)))


def normal(seed: int, shape, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape, dtype)


def int_images(seed: int, shape, num_bits: int = 8) -> np.ndarray:
  return np.random.RandomState(seed).randint(0, 2 ** num_bits, shape).astype(np.uint8)


# -------------------------------------------------------------------------- exact bijections
@dataclasses.dataclass
class Case:
  """A bijection to test: how to build it, its input, and keywords for both directions."""
  make: Callable[[], nn.Module]
  shape: Tuple[int, ...] = (2, 4, 4, 4)
  kwargs: Optional[Callable[[], Dict[str, Any]]] = None
  unit_interval: bool = False     # inputs in (0, 1) (Logit)
  jac: Callable = jax.jacfwd

  def kw(self) -> Dict[str, Any]:
    return self.kwargs() if self.kwargs else {}

  def input(self, seed: int = 0):
    if self.unit_interval:
      return jax.random.uniform(jax.random.key(seed), self.shape, jnp.float32, 0.05, 0.95)
    return normal(seed, self.shape)

  def setup(self):
    """`(module, perturbed variables, x, kwargs)`."""
    module, x, kw = self.make(), self.input(), self.kw()
    variables = init(module, x, **kw)
    if variables:
      variables = perturb(variables, 3)
    return module, variables, x, kw


def _context():
  return {'context': normal(7, (2, 4, 4, 3))}


BIJECTIONS = {
    'actnorm': Case(ActNorm),
    'conv1x1': Case(Conv1x1),
    'lu_conv1x1': Case(LUConv1x1),
    'affine_coupling': Case(lambda: AffineCoupling(SmallConditioner(4))),
    'affine_coupling_odd_channels': Case(lambda: AffineCoupling(SmallConditioner(4)),
                                         shape=(2, 4, 4, 5)),
    'affine_coupling_context': Case(lambda: AffineCoupling(SmallConditioner(4)),
                                    kwargs=_context),
    'affine_coupling_glow_net': Case(lambda: AffineCoupling(GlowCouplingNet(4, hidden=8)),
                                     jac=jax.jacrev),
    'channel_swap': Case(ChannelSwap),
    'channel_swap_odd_channels': Case(ChannelSwap, shape=(2, 4, 4, 5)),
    'squeeze': Case(Squeeze, shape=(2, 4, 6, 3)),
    'unsqueeze': Case(Unsqueeze, shape=(2, 2, 3, 8)),
    'shift_scale': Case(lambda: ShiftScale(shift=-0.5, scale=1.7)),
    'sigmoid': Case(Sigmoid),
    'logit': Case(Logit, unit_interval=True),
    'chain': Case(lambda: Chain([ActNorm(), Conv1x1(), AffineCoupling(SmallConditioner(4)),
                                 ChannelSwap(), Squeeze()])),
}


@pytest.fixture(scope='module', params=sorted(BIJECTIONS))
def bijection(request):
  case = BIJECTIONS[request.param]
  return (case,) + case.setup()


def test_inverse_of_forward_is_identity(bijection):
  case, module, variables, x, kw = bijection
  y, ld = module.apply(variables, x, method='forward', **kw)
  x_back, ld_inv = module.apply(variables, y, method='inverse', **kw)
  assert ld.shape == (x.shape[0],) and ld_inv.shape == (x.shape[0],)
  assert x_back.shape == x.shape
  assert float(jnp.max(jnp.abs(x_back - x))) < 1e-5
  # Forward and inverse log-dets cancel.
  np.testing.assert_allclose(ld + ld_inv, 0.0, atol=1e-4 * (1 + float(jnp.max(jnp.abs(ld)))))


def test_log_det_matches_brute_force_jacobian(bijection):
  case, module, variables, x, kw = bijection
  fn = lambda xb: module.apply(variables, xb, method='forward', **kw)[0]
  _, ld = module.apply(variables, x, method='forward', **kw)
  assert_log_det_close(ld, per_example_log_det(fn, x, case.jac))
  # And the inverse's log-det against the Jacobian of the inverse map.
  y, _ = module.apply(variables, x, method='forward', **kw)
  inv = lambda yb: module.apply(variables, yb, method='inverse', **kw)[0]
  _, ld_inv = module.apply(variables, y, method='inverse', **kw)
  assert_log_det_close(ld_inv, per_example_log_det(inv, y, case.jac))


def test_log_det_is_nontrivial_after_perturbation():
  """Guards the Jacobian test: the perturbed coupling really transforms its input."""
  module, variables, x, kw = BIJECTIONS['affine_coupling'].setup()
  y, ld = module.apply(variables, x, method='forward')
  assert float(jnp.max(jnp.abs(y - x))) > 1e-2
  assert float(jnp.min(jnp.abs(ld))) > 1e-3


def test_jit_matches_eager(bijection):
  case, module, variables, x, kw = bijection
  fwd = lambda v, xb: module.apply(v, xb, method='forward', **kw)
  inv = lambda v, yb: module.apply(v, yb, method='inverse', **kw)
  y, ld = fwd(variables, x)
  y_jit, ld_jit = jax.jit(fwd)(variables, x)
  np.testing.assert_allclose(y_jit, y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ld_jit, ld, rtol=1e-5, atol=1e-4)
  x_jit, _ = jax.jit(inv)(variables, y)
  np.testing.assert_allclose(x_jit, x, atol=1e-5)


def test_vmap_over_stacked_batches(bijection):
  case, module, variables, x, kw = bijection
  stacked = jnp.stack([case.input(s) for s in (10, 11, 12)])     # (V, N, H, W, C)
  fwd = lambda xb: module.apply(variables, xb, method='forward', **kw)
  ys, lds = jax.vmap(fwd)(stacked)
  assert ys.shape[:2] == (3, x.shape[0]) and lds.shape == (3, x.shape[0])
  for v in range(3):
    y, ld = fwd(stacked[v])
    np.testing.assert_allclose(ys[v], y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lds[v], ld, rtol=1e-5, atol=1e-4)
  xs, _ = jax.vmap(lambda yb: module.apply(variables, yb, method='inverse', **kw))(ys)
  np.testing.assert_allclose(xs, stacked, atol=1e-5)


def test_distrax_style_aliases():
  module, variables, x, _ = BIJECTIONS['conv1x1'].setup()
  y, ld = module.apply(variables, x, method='forward_and_log_det')
  x_back, ld_inv = module.apply(variables, y, method='inverse_and_log_det')
  np.testing.assert_allclose(x_back, x, atol=1e-5)
  np.testing.assert_allclose(ld + ld_inv, 0.0, atol=1e-4)


# ------------------------------------------------------------ Chain order and distrax interop
def _affine_then_sigmoid():
  """`Chain([ShiftScale(1, 2), Sigmoid()])`: y = sigmoid(2 (x + 1)); the order matters."""
  return Chain([ShiftScale(shift=1.0, scale=2.0), Sigmoid()])


def test_chain_applies_its_list_in_order_and_reverses_it_on_inverse():
  x = normal(0, (2, 3, 3, 2))
  chain = _affine_then_sigmoid()
  y, ld = chain.apply({}, x, method='forward')
  x64 = np.asarray(x, np.float64)
  h = 2.0 * (x64 + 1.0)
  np.testing.assert_allclose(y, 1 / (1 + np.exp(-h)), rtol=1e-5)
  expected = 18 * math.log(2.0) + np.sum(-np.logaddexp(0, -h) - np.logaddexp(0, h),
                                         axis=(1, 2, 3))
  np.testing.assert_allclose(ld, expected, rtol=1e-5)
  # The other order is a different map.
  y_rev, _ = Chain([Sigmoid(), ShiftScale(shift=1.0, scale=2.0)]).apply({}, x, method='forward')
  assert float(jnp.max(jnp.abs(y_rev - y))) > 0.1
  # inverse = members' inverses in reverse order: logit first, then undo the affine map.
  x_back, ld_inv = chain.apply({}, y, method='inverse')
  np.testing.assert_allclose(x_back, x, atol=1e-4)
  np.testing.assert_allclose(ld_inv, -expected, rtol=1e-4)


@pytest.fixture(scope='module')
def distrax():
  return pytest.importorskip('distrax')


def test_chain_order_matches_distrax(distrax):
  """Ours `Chain([a, b])` (data -> latent, list order) == `distrax.Chain([B, A])`."""
  x = normal(0, (2, 3, 3, 2))
  y, ld = _affine_then_sigmoid().apply({}, x, method='forward')
  native = distrax.Block(distrax.Chain([distrax.Sigmoid(),
                                        distrax.ScalarAffine(shift=2.0, scale=2.0)]), 3)
  y_d, ld_d = native.forward_and_log_det(x)
  np.testing.assert_allclose(y, y_d, rtol=1e-6)
  np.testing.assert_allclose(ld, ld_d, rtol=1e-5)
  # Member by member through the adapter: reversed list for data -> latent, the same list for
  # latent -> data.
  chain = _affine_then_sigmoid()
  members = [to_distrax(b, {}, direction='data_to_latent') for b in chain.bijectors]
  normalizing = to_distrax(chain, {}, direction='data_to_latent')
  for d_chain in (distrax.Chain(members[::-1]), normalizing):
    y_a, ld_a = d_chain.forward_and_log_det(x)
    np.testing.assert_allclose(y_a, y, rtol=1e-6)
    np.testing.assert_allclose(ld_a, ld, rtol=1e-5)
  generative = to_distrax(chain, {}, direction='latent_to_data')
  same_order = distrax.Chain([to_distrax(b, {}, direction='latent_to_data')
                              for b in chain.bijectors])
  for d_chain in (generative, same_order):
    x_a, ld_a = d_chain.forward_and_log_det(y)          # distrax forward = our inverse
    np.testing.assert_allclose(x_a, x, atol=1e-4)
    np.testing.assert_allclose(ld_a, -ld, rtol=1e-4)
    y_a, ld_inv = d_chain.inverse_and_log_det(x)         # distrax inverse = our forward
    np.testing.assert_allclose(y_a, y, rtol=1e-6)
    np.testing.assert_allclose(ld_inv, ld, rtol=1e-5)


def test_to_distrax_in_a_transformed_distribution(distrax):
  """`distrax.Transformed(base, to_distrax(flow, direction='latent_to_data'))` is the flow's
  density: log p(x) = log N(forward(x)) + forward log-det; sampling runs our inverse."""
  case = BIJECTIONS['chain']
  flow, variables, x, _ = case.setup()
  y, ld = flow.apply(variables, x, method='forward')
  latent_shape = y.shape[1:]
  base = distrax.Independent(distrax.Normal(jnp.zeros(latent_shape), jnp.ones(latent_shape)), 3)
  dist = distrax.Transformed(base, to_distrax(flow, variables, direction='latent_to_data'))
  expected = std_normal_logpdf(y) + np.asarray(ld, np.float64)
  np.testing.assert_allclose(dist.log_prob(x), expected, rtol=1e-5)
  np.testing.assert_allclose(jax.jit(dist.log_prob)(x), expected, rtol=1e-5)
  key = jax.random.key(4)
  samples = dist.sample(seed=key, sample_shape=2)
  z = base.sample(seed=key, sample_shape=2)
  np.testing.assert_allclose(samples, flow.apply(variables, z, method='inverse')[0], atol=1e-5)
  # The members, each wrapped the same way, in the same list order.
  members = [to_distrax(b, {'params': variables['params'][f'bijectors_{i}']}
                        if f'bijectors_{i}' in variables.get('params', {}) else {},
                        direction='latent_to_data')
             for i, b in enumerate(flow.bijectors)]
  by_members = distrax.Transformed(base, distrax.Chain(members))
  np.testing.assert_allclose(by_members.log_prob(x), expected, rtol=1e-5)


def test_to_distrax_batch_axes_and_arguments(distrax):
  flow, variables, x, _ = BIJECTIONS['affine_coupling_context'].setup()
  context = _context()['context']
  wrapped = to_distrax(flow, variables, direction='data_to_latent', context=context)
  y, ld = flow.apply(variables, x, method='forward', context=context)
  y_d, ld_d = wrapped.forward_and_log_det(x)
  np.testing.assert_allclose(y_d, y, rtol=1e-6)
  np.testing.assert_allclose(ld_d, ld, rtol=1e-6)
  np.testing.assert_allclose(wrapped.forward(x), y, rtol=1e-6)           # the value only
  np.testing.assert_allclose(wrapped.inverse(y), x, atol=1e-5)
  # No batch axis (one event) and two batch axes.
  plain = to_distrax(ActNorm(), init(ActNorm(), x), direction='data_to_latent')
  y1, ld1 = plain.forward_and_log_det(x[0])
  assert y1.shape == x.shape[1:] and ld1.shape == ()
  stacked = jnp.stack([x, 2 * x, 3 * x])
  ys, lds = plain.forward_and_log_det(stacked)
  assert ys.shape == stacked.shape and lds.shape == (3, 2)
  np.testing.assert_allclose(ys[1], plain.forward(2 * x), rtol=1e-6)
  with pytest.raises(ValueError, match="direction must be one of .*got 'forward'"):
    to_distrax(ActNorm(), {}, direction='forward')
  with pytest.raises(TypeError):
    to_distrax(ActNorm(), {})                                            # no default direction


# ------------------------------------------------------------------ specific layer behaviour
def test_actnorm_data_dependent_init_uses_unbiased_std():
  x = 3.0 + 2.0 * normal(0, (4, 3, 5, 6))
  variables = ActNorm().init(jax.random.key(0), x)
  xs = np.asarray(x, np.float64).reshape(-1, 6)
  np.testing.assert_allclose(variables['params']['shift'], xs.mean(0), rtol=1e-5)
  np.testing.assert_allclose(variables['params']['log_scale'],
                             np.log(xs.std(0, ddof=1) + 1e-6), rtol=1e-5)
  y, ld = ActNorm().apply(variables, x)
  ys = np.asarray(y).reshape(-1, 6)
  np.testing.assert_allclose(ys.mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(ys.std(0, ddof=1), 1.0, rtol=1e-4)
  np.testing.assert_allclose(ld, -15 * np.sum(np.log(xs.std(0, ddof=1) + 1e-6)), rtol=1e-5)


def test_conv1x1_starts_orthogonal_and_lu_starts_equivalent():
  x = normal(0, (2, 3, 3, 6))
  v = Conv1x1().init(jax.random.key(0), x)
  kernel = np.asarray(v['params']['kernel'])
  np.testing.assert_allclose(kernel @ kernel.T, np.eye(6), atol=1e-5)
  _, ld = Conv1x1().apply(v, x)
  np.testing.assert_allclose(ld, 0.0, atol=1e-4)
  lu = LUConv1x1().init(jax.random.key(0), x)['params']
  rebuilt = (np.asarray(lu['perm']) @ (np.tril(lu['lower'], -1) + np.eye(6))
             @ (np.triu(lu['upper'], 1) + np.diag(lu['sign_s'] * np.exp(lu['log_s']))))
  np.testing.assert_allclose(rebuilt @ rebuilt.T, np.eye(6), atol=1e-5)


def test_affine_coupling_formula_and_interleaving():
  """y2 = t + exp(2 tanh(s/2)) x2 with s, t the even / odd output channels of the net."""
  module, variables, x, kw = BIJECTIONS['affine_coupling_context'].setup()
  y, ld = module.apply(variables, x, method='forward', **kw)
  h = jnp.concatenate([x[..., :2], kw['context']], axis=-1)
  out = SmallConditioner(4).apply({'params': variables['params']['net']}, h)
  s, t = out[..., 0::2], out[..., 1::2]
  log_sigma = 2 * np.tanh(np.asarray(s) / 2)
  np.testing.assert_allclose(y[..., :2], x[..., :2])
  np.testing.assert_allclose(y[..., 2:], t + np.exp(log_sigma) * x[..., 2:], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ld, log_sigma.reshape(2, -1).sum(1), rtol=1e-5)
  # The context matters.
  y2, _ = module.apply(variables, x, method='forward', context=kw['context'] + 1.0)
  assert float(jnp.max(jnp.abs(y2 - y))) > 1e-3


def test_squeeze_order_and_channel_swap_order():
  x = np.arange(2 * 4 * 6 * 3, dtype=np.float32).reshape(2, 4, 6, 3)
  y = np.asarray(squeeze2x2(jnp.asarray(x)))
  assert y.shape == (2, 2, 3, 12)
  for h, w, c, i, j in [(0, 0, 0, 0, 0), (1, 2, 2, 1, 0), (1, 1, 1, 0, 1), (0, 2, 1, 1, 1)]:
    np.testing.assert_array_equal(y[:, h, w, 4 * c + 2 * i + j], x[:, 2 * h + i, 2 * w + j, c])
  swapped, _ = ChannelSwap().apply({}, jnp.asarray(x[..., :2].repeat(2, -1)))
  np.testing.assert_array_equal(swapped[..., :2], x[..., :2].repeat(2, -1)[..., 2:])


# --------------------------------------------------------------------------- squeeze-and-drop
def test_squeeze_and_drop():
  x = normal(0, (2, 4, 6, 3))
  sd = SqueezeAndDrop()
  kept, ld = sd.apply({}, x, method='forward')
  full = np.asarray(squeeze2x2(x))
  np.testing.assert_array_equal(kept, full[..., :6])
  dropped = full[..., 6:]
  np.testing.assert_allclose(ld, std_normal_logpdf(dropped), rtol=1e-5)
  _, dropped_split, ld_split = sd.apply({}, x, method='split')
  np.testing.assert_array_equal(dropped_split, dropped)
  # Given the dropped half back, the inverse is exact and the log-dets cancel.
  x_back, ld_inv = sd.apply({}, kept, method='inverse', dropped=jnp.asarray(dropped))
  np.testing.assert_array_equal(x_back, x)
  np.testing.assert_allclose(ld + ld_inv, 0.0, atol=1e-4)
  # jit and vmap.
  kept_jit, ld_jit = jax.jit(lambda a: sd.apply({}, a, method='forward'))(x)
  np.testing.assert_array_equal(kept_jit, kept)
  stacked = jnp.stack([x, 2 * x])
  kept_v, ld_v = jax.vmap(lambda a: sd.apply({}, a, method='forward'))(stacked)
  np.testing.assert_array_equal(kept_v[1], sd.apply({}, 2 * x, method='forward')[0])
  np.testing.assert_allclose(ld_v[0], ld, rtol=1e-6)


def test_squeeze_and_drop_sampling_is_keyed_and_scaled_by_temperature():
  sd = SqueezeAndDrop()
  kept = normal(0, (2, 2, 3, 6))
  inv = jax.jit(lambda k, t: sd.apply({}, kept, method='inverse', temperature=t,
                                      rngs={'noise': k}))
  a, ld_a = inv(jax.random.key(1), 1.0)
  b, _ = inv(jax.random.key(1), 1.0)
  c, _ = inv(jax.random.key(2), 1.0)
  half, _ = inv(jax.random.key(1), 0.5)
  np.testing.assert_array_equal(a, b)
  assert float(jnp.max(jnp.abs(a - c))) > 1e-3
  dropped = np.asarray(squeeze2x2(a))[..., 6:]
  np.testing.assert_allclose(np.asarray(squeeze2x2(half))[..., 6:], 0.5 * dropped, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(squeeze2x2(a))[..., :6], kept)
  np.testing.assert_allclose(ld_a, -std_normal_logpdf(dropped), rtol=1e-5)


# ---------------------------------------------------------------------- cross-unit coupling
@pytest.fixture(scope='module', params=['preconditioned', 'plain'])
def augmentation(request):
  plain = request.param == 'plain'
  module = CrossUnitCoupling(growth=3, noise_net=None if plain else NoiseNet(3), plain=plain)
  x, cond = normal(0, (2, 4, 4, 4)), normal(1, (2, 4, 4, 6))
  variables = init(module, x, cond=cond)
  if variables:
    variables = perturb(variables, 4, scale=0.3)
  return plain, module, variables, x, cond


def test_cross_unit_coupling_log_det_formula(augmentation):
  plain, module, variables, x, cond = augmentation
  y, ld = module.apply(variables, x, cond=cond, rngs={'noise': jax.random.key(5)})
  assert y.shape == (2, 4, 4, 7)
  np.testing.assert_array_equal(y[..., :4], x)
  if plain:
    mu, log_sigma = np.zeros((2, 4, 4, 3)), np.zeros((2, 4, 4, 3))
  else:
    out = np.asarray(NoiseNet(3).apply({'params': variables['params']['noise_net']}, cond),
                     np.float64)
    mu, log_sigma = out[..., :3], 2 * np.tanh(out[..., 3:] / 2)    # consecutive halves
    assert np.std(log_sigma) > 1e-2                                 # really conditioned
  e = (np.asarray(y[..., 4:], np.float64) - mu) * np.exp(-log_sigma)
  expected = log_sigma.reshape(2, -1).sum(1) - std_normal_logpdf(e)
  np.testing.assert_allclose(ld, expected, rtol=1e-5)
  # An explicit eta gives mu + sigma * eta.
  eta = normal(9, (2, 4, 4, 3))
  y_eta, _ = module.apply(variables, x, cond=cond, eta=eta)
  np.testing.assert_allclose(y_eta[..., 4:], mu + np.exp(log_sigma) * np.asarray(eta),
                             rtol=1e-5, atol=1e-6)


def test_cross_unit_coupling_inverse(augmentation):
  plain, module, variables, x, cond = augmentation
  y, ld = module.apply(variables, x, cond=cond, rngs={'noise': jax.random.key(5)})
  x_back, ld_inv = module.apply(variables, y, inverse=True, cond=cond)
  np.testing.assert_array_equal(x_back, x)            # drops the appended channels
  np.testing.assert_allclose(ld + ld_inv, 0.0, atol=1e-4)
  # Sampling: no cond, the noise net is not evaluated, the channels are dropped.
  if not plain:
    x_sample, ld_sample = module.apply(variables, y, inverse=True)
    np.testing.assert_array_equal(x_sample, x)
    np.testing.assert_array_equal(ld_sample, 0.0)


def test_cross_unit_coupling_noise_is_keyed_and_jit_vmap(augmentation):
  plain, module, variables, x, cond = augmentation
  fwd = lambda xb, key: module.apply(variables, xb, cond=cond, rngs={'noise': key})
  a, ld_a = fwd(x, jax.random.key(5))
  b, _ = jax.jit(fwd)(x, jax.random.key(5))
  c, _ = fwd(x, jax.random.key(6))
  np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
  assert float(jnp.max(jnp.abs(a - c))) > 1e-3
  stacked = jnp.stack([x, x + 1.0])
  ys, lds = jax.vmap(lambda xb: fwd(xb, jax.random.key(5)))(stacked)
  np.testing.assert_allclose(ys[0], a, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ys[1], fwd(x + 1.0, jax.random.key(5))[0], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(lds[0], ld_a, rtol=1e-5)


# ------------------------------------------------------------------------------ dequantization
def test_uniform_dequantization():
  x = int_images(0, (2, 4, 4, 3))
  deq = UniformDequantization(num_bits=8)
  fwd = jax.jit(lambda xb, key: deq.apply({}, xb, rngs={'noise': key}))
  y, ld = fwd(x, jax.random.key(0))
  np.testing.assert_array_equal(np.floor(np.asarray(y) * 256).astype(np.int64), x)
  assert float(jnp.min(y)) >= 0 and float(jnp.max(y)) < 1
  d = 4 * 4 * 3
  np.testing.assert_allclose(ld, -d * np.float32(8 * math.log(2)), rtol=1e-6)
  x_back, ld_inv = deq.apply({}, y, inverse=True)
  assert x_back.dtype == jnp.int32
  np.testing.assert_array_equal(x_back, x)
  np.testing.assert_allclose(ld + ld_inv, 0.0, atol=1e-3)
  # Keyed noise; explicit u.
  np.testing.assert_array_equal(fwd(x, jax.random.key(0))[0], y)
  assert float(jnp.max(jnp.abs(fwd(x, jax.random.key(1))[0] - y))) > 1e-4
  u = jnp.full(x.shape, 0.5)
  np.testing.assert_allclose(deq.apply({}, x, u=u)[0], (x + 0.5) / 256, rtol=1e-6)
  ys, _ = jax.vmap(lambda xb: deq.apply({}, xb, rngs={'noise': jax.random.key(0)}))(
      jnp.stack([x, x]))
  np.testing.assert_allclose(ys[0], y, rtol=1e-6)


@pytest.fixture(scope='module')
def variational():
  """A perturbed VariationalDequantization (2 steps), its jitted directions, an image batch.

  `sample_u` / `with_eps` return `(y, log_det)` of `forward` and `(u, log q(u|x))` of
  `sample_u_and_log_q`, with the same key or `eps` for both.
  """
  deq = VariationalDequantization(num_bits=8, steps=2, context_channels=8)
  x = int_images(0, (2, 4, 4, 3))
  variables = perturb(init(deq, x), 2, scale=0.05)

  def forward_and_u(xb, key=None, eps=None):
    rngs = None if key is None else {'noise': key}
    y, ld = deq.apply(variables, xb, eps=eps, rngs=rngs, method='forward')
    u_log_q = deq.apply(variables, xb, eps=eps, rngs=rngs, method='sample_u_and_log_q')
    return y, ld, u_log_q

  fns = dict(
      sample_u=jax.jit(lambda xb, key: forward_and_u(xb, key=key)),
      with_eps=jax.jit(lambda xb, e: forward_and_u(xb, eps=e)),
      inverse=jax.jit(lambda y, xi: deq.apply(variables, y, inverse=True, x_int=xi)),
      floor=jax.jit(lambda y: deq.apply(variables, y, inverse=True)))
  return deq, variables, x, fns


def test_variational_dequantization_round_trip_and_log_dets(variational):
  deq, variables, x, fns = variational
  y, ld, (u, log_q) = fns['sample_u'](x, jax.random.key(3))
  assert y.shape == x.shape and ld.shape == (2,)
  assert u.shape == x.shape and log_q.shape == (2,)
  assert float(jnp.min(u)) > 0 and float(jnp.max(u)) < 1
  # sample_u_and_log_q returns the u that forward used (same key).
  np.testing.assert_allclose(y, (x + np.asarray(u)) / 256, rtol=1e-6)
  # floor(2^bits y) recovers the integer image exactly.
  np.testing.assert_array_equal(np.floor(np.asarray(y) * 256).astype(np.int64), x)
  x_back, ld_floor = fns['floor'](y)
  np.testing.assert_array_equal(x_back, x)
  np.testing.assert_array_equal(ld_floor, 0.0)
  # ld = -D ln 256 - log q(u|x).
  d = 4 * 4 * 3
  np.testing.assert_allclose(ld, -d * np.float32(8 * math.log(2)) - np.asarray(log_q), rtol=1e-5)
  # Evaluating q at the same u (inverse with x_int) cancels the forward log-det.
  x_back, ld_inv = fns['inverse'](y, x)
  np.testing.assert_array_equal(x_back, x)
  np.testing.assert_allclose(ld + ld_inv, 0.0, atol=2e-3)
  # Keyed noise.
  np.testing.assert_array_equal(fns['sample_u'](x, jax.random.key(3))[0], y)
  assert float(jnp.max(jnp.abs(fns['sample_u'](x, jax.random.key(4))[0] - y))) > 1e-4


def test_variational_dequantization_log_q_matches_jacobian(variational):
  """log q(u|x) = log N(eps) - log|det du/deps| (brute force, reverse mode: conv3x3 inside)."""
  deq, variables, x, fns = variational
  eps = normal(6, (2, 2, 2, 12))

  def u_of(e, xi):   # one example: eps (2, 2, 12) -> u (4, 4, 3), flattened
    u, _ = deq.apply(variables, xi[None], eps=e[None], method='sample_u_and_log_q')
    return u[0].reshape(-1)

  jac = jax.jit(jax.vmap(jax.jacrev(u_of)))(eps, x).reshape(2, 48, 48)
  sign, log_det = np.linalg.slogdet(np.asarray(jac, np.float64))
  assert np.all(sign != 0) and np.all(np.abs(log_det) > 1.0)     # a non-trivial map
  _, _, (_, log_q) = fns['with_eps'](x, eps)
  assert_log_det_close(log_q, std_normal_logpdf(eps) - log_det)


def test_variational_dequantization_jit_and_vmap(variational):
  deq, variables, x, fns = variational
  eps = normal(8, (2, 2, 2, 12))
  y, ld, _ = fns['with_eps'](x, eps)
  fwd = lambda xb: deq.apply(variables, xb, eps=eps)
  ys, lds = jax.jit(jax.vmap(fwd))(jnp.stack([x, x[::-1]]))
  np.testing.assert_allclose(ys[0], y, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(lds[0], ld, rtol=1e-5)
  np.testing.assert_allclose(ys[1], fns['with_eps'](x[::-1], eps)[0], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------- bad input
def _raises(fn, *fragments):
  with pytest.raises(ValueError) as info:
    fn()
  message = str(info.value)
  for fragment in fragments:
    assert fragment in message, (fragment, message)


RANK_CHECKED = {
    'ActNorm': ActNorm, 'Conv1x1': Conv1x1, 'LUConv1x1': LUConv1x1,
    'AffineCoupling': lambda: AffineCoupling(SmallConditioner(2)),
    'ChannelSwap': ChannelSwap, 'squeeze': Squeeze, 'unsqueeze': Unsqueeze,
    'SqueezeAndDrop': SqueezeAndDrop,
    'CrossUnitCoupling': lambda: CrossUnitCoupling(2, plain=True),
}


@pytest.mark.parametrize('name', sorted(RANK_CHECKED))
def test_wrong_rank_is_rejected(name):
  x = jnp.zeros((4, 4, 4))
  module = RANK_CHECKED[name]()
  _raises(lambda: module.init({'params': jax.random.key(0), 'noise': jax.random.key(0)}, x),
          name, 'rank-4', '(4, 4, 4)')


@pytest.mark.parametrize('name', ['UniformDequantization', 'VariationalDequantization'])
def test_dequantization_rejects_wrong_rank_and_float_data(name):
  module = {'UniformDequantization': UniformDequantization,
            'VariationalDequantization': VariationalDequantization}[name]()
  rngs = {'params': jax.random.key(0), 'noise': jax.random.key(0)}
  _raises(lambda: module.init(rngs, np.zeros((4, 4, 3), np.uint8)), name, 'rank-4',
          '(4, 4, 3)')
  _raises(lambda: module.init(rngs, np.zeros((2, 4, 4, 3), np.float32)), name, 'integer',
          'float32')


@pytest.mark.parametrize('module', [ShiftScale(), Sigmoid(), Logit()])
def test_elementwise_needs_a_batch_axis(module):
  _raises(lambda: module.apply({}, jnp.asarray(0.5)), 'batch', '()')


def test_coupling_needs_two_channels():
  coupling = AffineCoupling(SmallConditioner(2))
  _raises(lambda: coupling.init(jax.random.key(0), jnp.zeros((2, 4, 4, 1))),
          'at least 2 channels', '(2, 4, 4, 1)')


def test_coupling_context_must_match_the_input():
  coupling = AffineCoupling(SmallConditioner(4))
  x = jnp.zeros((2, 4, 4, 4))
  _raises(lambda: coupling.init(jax.random.key(0), x, context=jnp.zeros((2, 2, 2, 3))),
          'context', '(2, 2, 2, 3)', '(2, 4, 4')


@pytest.mark.parametrize('module', [Squeeze(), SqueezeAndDrop(), VariationalDequantization()])
def test_odd_spatial_size_is_rejected(module):
  x = np.zeros((2, 3, 4, 2), np.uint8 if isinstance(module, VariationalDequantization)
               else np.float32)
  _raises(lambda: module.init({'params': jax.random.key(0), 'noise': jax.random.key(0)}, x),
          'even', '(2, 3, 4, 2)')


def test_unsqueeze_needs_channels_divisible_by_four():
  _raises(lambda: Unsqueeze().apply({}, jnp.zeros((2, 2, 2, 6))), 'divisible by 4',
          '(2, 2, 2, 6)')


def test_dequantization_hyperparameters_are_keyword_only():
  with pytest.raises(TypeError):
    VariationalDequantization(8, 4, 64)
  deq = VariationalDequantization(num_bits=5, steps=1, context_channels=4)
  assert (deq.num_bits, deq.steps, deq.context_channels) == (5, 1, 4)


def test_bad_noise_shapes_are_rejected():
  x = np.zeros((2, 4, 4, 3), np.uint8)
  _raises(lambda: UniformDequantization().apply({}, x, u=jnp.zeros((1, 4, 4, 3))),
          'u has shape', '(1, 4, 4, 3)', '(2, 4, 4, 3)')
  deq = VariationalDequantization(steps=1, context_channels=4)
  _raises(lambda: deq.init(jax.random.key(0), x, eps=jnp.zeros((2, 4, 4, 3))),
          'eps has shape', '(2, 4, 4, 3)', '(2, 2, 2, 12)')
  aug = CrossUnitCoupling(2, plain=True)
  _raises(lambda: aug.apply({}, jnp.zeros((2, 4, 4, 4)), eta=jnp.zeros((2, 4, 4, 3))),
          'eta has shape', '(2, 4, 4, 3)', '(2, 4, 4, 2)')
  _raises(lambda: SqueezeAndDrop().apply({}, jnp.zeros((2, 2, 2, 4)), inverse=True,
                                         dropped=jnp.zeros((2, 2, 2, 3))),
          'dropped', '(2, 2, 2, 3)', '(2, 2, 2, 4)')


def test_preconditioned_augmentation_needs_cond():
  aug = CrossUnitCoupling(2, noise_net=NoiseNet(2))
  _raises(lambda: aug.init({'params': jax.random.key(0), 'noise': jax.random.key(0)},
                           jnp.zeros((2, 4, 4, 4))), 'cond', 'None')
