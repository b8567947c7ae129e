"""Tests for `param_init`: the model's init with every random parameter from two draws."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from denseflow_jax import DenseFlow, param_init
from denseflow_jax.bijectors import ActNorm, Conv1x1
from denseflow_jax.model import init_variables, rng_mode
from denseflow_jax.nets.layers import Conv3x3, PointwiseConv, torch_uniform
from test_model import images, small_config

O0 = {'xla_backend_optimization_level': 0}


def _rngs(seed=0):
  return {'params': jax.random.key(seed), 'noise': jax.random.key(seed + 100)}


def _fast(model, rngs, x):
  with rng_mode():
    lowered = jax.jit(lambda r, xb: param_init.initial_variables(model, r, xb)).lower(rngs, x)
  return jax.device_get(lowered.compile(compiler_options=O0)(rngs, x))


def _reference(model, rngs, x):
  with rng_mode():
    lowered = jax.jit(model.init).lower(rngs, x)
  return jax.device_get(dict(lowered.compile(compiler_options=O0)(rngs, x)))


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _count(jaxpr, name):
  """How many `name` primitives `jaxpr` holds, nested jaxprs (jit, scan, cond, remat) included."""
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == name
    for p in eqn.params.values():
      for inner in (p if isinstance(p, (tuple, list)) else (p,)):
        inner = getattr(inner, 'jaxpr', inner)
        if hasattr(inner, 'eqns'):
          n += _count(inner, name)
  return n


def _planned(model, x, kind):
  """`{path: RandomInit}` of the parameters that `initial_variables` draws as `kind`."""
  planned = param_init.plan(model, _rngs(), jnp.asarray(x))
  flat = jax.tree_util.tree_flatten_with_path(
      planned, is_leaf=lambda v: isinstance(v, param_init.RandomInit))[0]
  return {"['params']" + jax.tree_util.keystr(p): v for p, v in flat
          if isinstance(v, param_init.RandomInit) and v.kind == kind}


@pytest.fixture(scope='module', params=['full', 'lu'])
def both_inits(request):
  """(conv1x1 kind, config, model, images, initial_variables' and model.init's variables); the
  LU model's modules are also rematerialised (`nn.remat` inside `nn.scan`)."""
  extra = {'remat': 'full'} if request.param == 'lu' else {}
  cfg = small_config(conv1x1=request.param, **extra)
  model = DenseFlow(cfg)
  x = images(cfg, 4)
  rngs = _rngs()
  return request.param, cfg, model, x, _flat(_fast(model, rngs, x)), _flat(_reference(model, rngs, x))


def test_same_variables_as_model_init_up_to_the_random_draws(both_inits):
  """Structure, shapes and dtypes are `model.init`'s; deterministic leaves (zeros, ones, batch
  statistics) are equal; uniform leaves keep PyTorch's bound and spread."""
  _, _, model, x, fast, ref = both_inits
  assert sorted(fast) == sorted(ref)
  uniform = _planned(model, x, 'uniform')
  assert len(uniform) > 10
  for name, r in ref.items():
    f = fast[name]
    assert (f.shape, f.dtype) == (r.shape, r.dtype), name
    if name in uniform:
      # PyTorch's conv init U(-b, b), drawn anew: model.init's draw is within the same b.
      bound = uniform[name].scale
      assert np.abs(r).max() <= bound and np.abs(f).max() <= bound * (1 + 1e-6), name
      assert not np.array_equal(f, r), name
      if f.size >= 256:
        assert np.std(f) == pytest.approx(bound / np.sqrt(3), rel=0.15), name
        assert np.abs(f).max() >= 0.9 * bound, name
    elif np.all(r == 0) or np.all(r == 1) or 'batch_stats' in name:
      np.testing.assert_array_equal(f, r, err_msg=name)


def test_invertible_1x1_kernels_are_orthogonal_and_lu_parts_rebuild_them(both_inits):
  kind, _, model, x, fast, _ = both_inits
  if kind == 'full':
    kernels = [fast[k] for k in _planned(model, x, 'orthogonal')]
  else:
    kernels = []
    for name in _planned(model, x, 'lu_perm'):
      g = name[:-len("['perm']")]
      kernels.append(_rebuild(fast, g))
  assert kernels
  for k in kernels:
    eye = np.eye(k.shape[-1])
    np.testing.assert_allclose(np.swapaxes(k, -1, -2) @ k, np.broadcast_to(eye, k.shape),
                               atol=2e-5)


def _rebuild(lu, g):
  """The LU module `g`'s kernel P (L + I) (U + diag(sign * exp(log_s)))."""
  perm = lu[g + "['perm']"]
  eye = np.eye(perm.shape[-1], dtype=perm.dtype)
  diag = (lu[g + "['sign_s']"] * np.exp(lu[g + "['log_s']"]))[..., None, :] * eye
  return perm @ (np.tril(lu[g + "['lower']"], -1) + eye) @ (np.triu(lu[g + "['upper']"], 1) + diag)


def test_lu_kernels_are_the_full_kernels_of_the_same_key():
  """Both 1x1 parameterisations take their matrix from the same place in the normal draw."""
  x = images(small_config(), 4)
  full = _flat(_fast(DenseFlow(small_config(conv1x1='full')), _rngs(), x))
  lu = _flat(_fast(DenseFlow(small_config(conv1x1='lu')), _rngs(), x))
  groups = [k[:-len("['perm']")] for k in lu if k.endswith("['perm']")]
  assert groups
  for g in groups:
    np.testing.assert_allclose(_rebuild(lu, g), full[g + "['kernel']"], atol=2e-5)


def test_draws_follow_the_params_key_only():
  cfg = small_config()
  model = DenseFlow(cfg)
  x = images(cfg, 4)
  a = _flat(init_variables(model, jax.random.key(3), x))
  b = _flat(init_variables(model, jax.random.key(3), x))
  c = _flat(init_variables(model, jax.random.key(4), x))
  assert all(np.array_equal(a[k], b[k]) for k in a)
  kernels = [k for k in a if k.endswith("['kernel']") and np.any(a[k] != 0)]
  assert kernels and all(not np.array_equal(a[k], c[k]) for k in kernels)


def test_two_random_draws_replace_one_per_parameter():
  """The init program draws random bits twice more than the model's forward pass (which draws
  the noise): once for every uniform parameter, once for every orthogonal matrix."""
  cfg = small_config()
  model = DenseFlow(cfg)
  x = jnp.asarray(images(cfg, 4))
  rngs = _rngs()
  with rng_mode():
    fast = jax.make_jaxpr(lambda r, xb: param_init.initial_variables(model, r, xb))(rngs, x)
    plain = jax.make_jaxpr(model.init)(rngs, x)
    shapes = jax.eval_shape(model.init, rngs, x)
    forward = jax.make_jaxpr(lambda v, xb, k: model.apply(v, xb, rngs={'noise': k}))(
        shapes, x, rngs['noise'])
  n_fast, n_plain = _count(fast.jaxpr, 'random_bits'), _count(plain.jaxpr, 'random_bits')
  n_noise = _count(forward.jaxpr, 'random_bits')
  assert n_fast == n_noise + 2
  assert n_plain > n_fast + 20


class _ConvThenActNorm(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = Conv3x3(6, name='conv')(x)
    h = PointwiseConv(6, name='pw')(h)
    y, _ = ActNorm(name='actnorm')(h)
    z, _ = Conv1x1(name='mix')(y)
    return z


def test_data_dependent_init_sees_the_drawn_parameters():
  """ActNorm is initialised on its input as computed with the drawn conv weights."""
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  module = _ConvThenActNorm()
  v = jax.jit(lambda r, xb: param_init.initial_variables(module, r, xb))(_rngs(), x)
  p = v['params']
  h = Conv3x3(6).apply({'params': p['conv']}, x)
  h = PointwiseConv(6).apply({'params': p['pw']}, h)
  np.testing.assert_allclose(p['actnorm']['shift'], h.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(p['actnorm']['log_scale'],
                             np.log(np.std(np.asarray(h), axis=(0, 1, 2), ddof=1) + 1e-6),
                             rtol=1e-4, atol=1e-5)
  k = np.asarray(p['mix']['kernel'])
  np.testing.assert_allclose(k.T @ k, np.eye(6), atol=1e-5)


def test_initialisers_are_plain_outside_the_planning_pass():
  init = torch_uniform(16)
  x = jax.jit(lambda k: param_init.initial_variables(_ConvThenActNorm(), _rngs(), k))(
      jnp.ones((2, 4, 4, 3)))
  del x
  value = init(jax.random.key(0), (16, 4))
  assert isinstance(value, jax.Array) and value.shape == (16, 4)
  assert float(jnp.abs(value).max()) <= 0.25
  with pytest.raises(ValueError, match='kind'):
    param_init.drawn_as('gaussian')


class _ScanBody(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    y, _ = ActNorm(name='actnorm')(Conv3x3(3, name='conv')(h))
    return y, None


class _ScannedStack(nn.Module):
  @nn.compact
  def __call__(self, x):
    scan = nn.scan(_ScanBody, variable_axes={'params': 0}, split_rngs={'params': True}, length=3)
    return scan(name='stack')(x, None)[0]


def test_data_dependent_init_inside_a_scan_sees_each_layers_drawn_weights():
  """As the model's module stacks: every scanned ActNorm is initialised on the activations of
  its own layer's drawn conv weights (and of the layers before it)."""
  x = jax.random.normal(jax.random.key(0), (4, 6, 6, 3))
  p = jax.jit(lambda r, xb: param_init.initial_variables(_ScannedStack(), r, xb))(
      _rngs(), x)['params']['stack']
  h = x
  for i in range(3):
    layer = jax.tree.map(lambda a: a[i], p)  # pylint: disable=cell-var-from-loop
    a = Conv3x3(3).apply({'params': layer['conv']}, h)
    np.testing.assert_allclose(layer['actnorm']['shift'], a.mean(axis=(0, 1, 2)), atol=1e-6)
    h, _ = ActNorm().apply({'params': layer['actnorm']}, a)
    np.testing.assert_allclose(h.std(axis=(0, 1, 2), ddof=1), 1.0, atol=1e-4)
