"""Tests for the assembled DenseFlow model: sizes, invertibility, sampling, bounds, validation.

Compilation dominates the cost on CPU, so every program is compiled once: the tiny model comes
from the session fixture `tiny_flow` (conftest.py) and everything else uses a much smaller model
on the 8x8 one-channel "digits" shape. Forward-only programs of the tiny model are compiled at
XLA's backend optimisation level 0 (`compile_once`): a third faster to compile, about as fast
to run (backward passes are not: they run several times slower at level 0).
"""
import hashlib
import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default, denseflow_45_6, denseflow_74_10, tiny
from denseflow_jax import DenseFlow
from denseflow_jax.config_check import plan_model
from denseflow_jax.model import fast_rng, init_variables, threefry_mode_chosen

DEQUANTIZER_PARAMS = 2_395_784


def compile_once(fn, *args):
  """`jax.jit(fn)` compiled for `args` at backend optimisation level 0 (fast compile)."""
  with jax.threefry_partitionable(False):
    lowered = jax.jit(fn).lower(*args)
  return lowered.compile(compiler_options={'xla_backend_optimization_level': 0})


def count(tree) -> int:
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


def small_config(**overrides) -> ml_collections.ConfigDict:
  """A cheap model on 5-bit 8x8 grey images (the digits shape): two blocks, narrow nets."""
  cfg = default.get_model_config()
  cfg.update(dict(image_size=8, num_channels=1, num_bits=5, block_conf=(2, 1),
                  layers_conf=(1, 1), mid_channels=(8, 8), growth_rate=2, dense_depth=2,
                  dense_growth=8, deq_steps=1, deq_context_channels=8, glow_hidden=16))
  cfg.update(overrides)
  return cfg


def images(cfg, n: int, seed: int = 0) -> np.ndarray:
  shape = (n, cfg.image_size, cfg.image_size, cfg.num_channels)
  return np.random.RandomState(seed).randint(0, 2 ** cfg.num_bits, shape).astype(np.uint8)


def log_prob_and_round_trip(mdl, x):
  """`(log_prob(x), decode(encode(x)))` in one apply (two independent noise draws)."""
  return mdl.log_prob(x), mdl.decode(mdl.encode(x))


def init_and_run(model, x, method):
  """`model.init_with_output(..., method=method)`, compiled once: `(outputs, variables)`."""
  rngs = {'params': jax.random.key(0, impl='unsafe_rbg'), 'noise': jax.random.key(1)}
  run = compile_once(lambda xb: model.init_with_output(rngs, xb, method=method), x)
  return run(x)


# ------------------------------------------------------------------- sizes (no allocation)
@pytest.mark.parametrize('config_module,size,total,latent', [
    (tiny, 32, 10_148_504, (4, 4, 72)),
    (denseflow_45_6, 32, 75_020_522, (4, 4, 168)),
    (denseflow_74_10, 32, 130_647_294, (4, 4, 308)),
    (denseflow_74_10, 64, 130_647_294, (8, 8, 308)),
])
def test_parameter_counts_and_latent_shapes(config_module, size, total, latent):
  cfg = config_module.get_config().model
  cfg.image_size = size
  model = DenseFlow(cfg)
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.uint8)
  rngs = {'params': jax.random.key(0), 'noise': jax.random.key(1)}
  variables = jax.eval_shape(lambda xb: model.init(rngs, xb), x)
  assert count(variables['params']) == total
  assert count(variables['params']['dequantizer']) == DEQUANTIZER_PARAMS
  assert count(variables['batch_stats']) > 0          # running statistics are state, not params
  assert plan_model(cfg).latent_shape == latent
  latents = jax.eval_shape(
      lambda v, xb: model.apply(v, xb, rngs={'noise': jax.random.key(0)}, method=model.encode),
      variables, x)
  assert latents['z'].shape == (2,) + latent
  # One dropped half per transition; the last block's input is the kept half.
  assert len(latents['dropped']) == 2
  assert latents['dropped'][-1].shape == (2,) + latent[:2] + (plan_model(cfg).blocks[-1].in_channels,)


# ------------------------------------------------------------------------------ tiny model
def test_tiny_decode_encode_is_exact(tiny_flow):
  model, variables, x = tiny_flow.model, tiny_flow.variables, tiny_flow.images

  def round_trip(v, xb, key):
    latents = model.apply(v, xb, rngs={'noise': key}, method=model.encode)
    return latents, model.apply(v, latents, method=model.decode)

  run = compile_once(round_trip, variables, x, jax.random.key(0))
  latents, decoded = run(variables, x, jax.random.key(0))
  assert decoded.dtype == jnp.uint8 and decoded.shape == x.shape
  np.testing.assert_array_equal(decoded, x)
  assert latents['z'].shape == (8, 4, 4, 72)
  # The same key gives the same latents; another key other latents but the same image.
  latents_again, _ = run(variables, x, jax.random.key(0))
  np.testing.assert_array_equal(latents_again['z'], latents['z'])
  latents_other, decoded_other = run(variables, x, jax.random.key(1))
  assert float(jnp.max(jnp.abs(latents_other['z'] - latents['z']))) > 1e-3
  np.testing.assert_array_equal(decoded_other, x)


def test_tiny_samples(tiny_flow):
  model, variables = tiny_flow.model, tiny_flow.variables
  sample = compile_once(
      lambda v, key, t: model.apply(v, num=4, temperature=t, rngs={'noise': key},
                                    method=model.sample),
      variables, jax.random.key(0), jnp.float32(1.0))
  results = {}
  for t in (0.0, 0.5, 0.8, 1.0):
    s = sample(variables, jax.random.key(3), jnp.float32(t))
    assert s.dtype == jnp.uint8 and s.shape == (4, 32, 32, 3)
    results[t] = np.asarray(s, np.float64)
  assert np.std(results[1.0]) > 1.0                               # not a constant image
  np.testing.assert_array_equal(sample(variables, jax.random.key(3), jnp.float32(0.8)),
                                results[0.8])
  assert np.any(sample(variables, jax.random.key(4), jnp.float32(0.8)) != results[0.8])
  # T = 0 zeroes every Gaussian draw (the base latent and each dropped half): the 4 samples are
  # one image, the same for every key.
  s0, s1 = results[0.0], results[1.0]
  assert np.all(s0 == s0[:1])
  np.testing.assert_array_equal(sample(variables, jax.random.key(4), jnp.float32(0.0)), s0)
  # Freshly initialised, every coupling is the identity (zero-initialised last conv), so the
  # inverse pass is affine in the draws and the sample is floor(256 (c + T d)) with the same
  # c, d for one key. Where no pixel is clipped, s_T - s_0 - T (s_1 - s_0) is a sum of floor
  # residues, inside (-1, 1): T scales the draws linearly.
  inside = np.ones(s0.shape, bool)
  for r in results.values():
    inside &= (r > 0) & (r < 255)
  assert inside.mean() > 0.5
  assert np.abs(s1 - s0)[inside].max() > 10                      # the draws matter
  for t in (0.5, 0.8):
    residue = (results[t] - s0 - t * (s1 - s0))[inside]
    assert np.abs(residue).max() < 1.01, (t, np.abs(residue).max())


def test_fresh_tiny_model_on_cifar10_bits_per_dim_and_gradients(tiny_flow, cifar_test_images):
  model, variables = tiny_flow.model, tiny_flow.variables
  x = cifar_test_images

  def loss(params, batch_stats, xb, key):
    bpd, updates = model.apply({'params': params, 'batch_stats': batch_stats}, xb, train=True,
                               rngs={'noise': key}, mutable=['batch_stats'],
                               method=model.bits_per_dim)
    return jnp.mean(bpd), (bpd, updates['batch_stats'])

  # Fully optimised: at optimisation level 0 the backward pass runs ~5x slower than it
  # compiles faster.
  step = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (mean_bpd, (bpd, batch_stats)), grads = step(variables['params'], variables['batch_stats'], x,
                                               jax.random.key(0))
  print(f'\nfresh tiny DenseFlow, 8 CIFAR-10 test images, train mode: {float(mean_bpd):.4f} '
        f'bits/dim (per image {np.round(np.asarray(bpd), 3).tolist()})')
  assert np.all(np.isfinite(bpd))
  assert 4.0 < float(mean_bpd) < 12.0       # 8 would be a uniform model over 256 levels
  leaves = jax.tree.leaves(grads)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert float(sum(jnp.sum(g * g) for g in leaves)) > 0
  assert all(bool(jnp.all(jnp.isfinite(s))) for s in jax.tree.leaves(batch_stats))
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), batch_stats, variables['batch_stats'])
  assert all(jax.tree.leaves(moved))       # training mode updated every running statistic


# The parameter tree of configs/tiny.py: (path, shape, dtype) of every variable. Published
# weights are converted by path (official.state_dict_layout) and checkpoints store paths, so a
# refactor must not change it (e.g. a class rename that changes a flax auto-name).
TINY_TREE = (373, '830fd22b2aee3d76337001a449258cadccc2caa4e2bdcc603d79fee23b89dde9')


def test_tiny_parameter_tree_is_unchanged():
  model = DenseFlow(tiny.get_config().model)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.uint8)
  rngs = {'params': jax.random.key(0), 'noise': jax.random.key(1)}
  flat = flax.traverse_util.flatten_dict(jax.eval_shape(lambda xb: model.init(rngs, xb), x),
                                         sep='/')
  lines = sorted(f'{k} {tuple(a.shape)} {a.dtype}' for k, a in flat.items())
  for path in ('params/dequantizer/mix_0/kernel',
               'params/dequantizer/context_net/dense_in/layer_0/conv1x1/kernel',
               'params/blocks_0/unit_0/modules/conv1x1/kernel',
               'params/blocks_0/unit_0/modules/coupling_net/fusion/attention/qkv/kernel',
               'params/blocks_0/unit_0/modules/coupling_net/fusion/mix/kernel',
               'params/blocks_0/noise_net_1/conv_out/kernel',
               'batch_stats/blocks_0/unit_0/modules/coupling_net/fusion/bn/mean'):
    assert path in flat, path
  assert (len(lines), hashlib.sha256('\n'.join(lines).encode()).hexdigest()) == TINY_TREE


# ----------------------------------------------------------------- small model, digits shape
@pytest.fixture(scope='module')
def digits_flow():
  """The small model on the digits shape, initialised with the project's `init_variables`."""
  cfg = small_config()
  model = DenseFlow(cfg)
  x = images(cfg, 4)
  variables = init_variables(model, jax.random.key(0, impl='unsafe_rbg'), x)
  return cfg, model, variables, x


def test_digits_shape_log_prob_jit_and_determinism(digits_flow):
  cfg, model, variables, x = digits_flow
  assert plan_model(cfg).latent_shape == (2, 2, 12)
  log_prob = jax.jit(lambda v, xb, key: model.apply(v, xb, rngs={'noise': key},
                                                    method=model.log_prob))
  lp = log_prob(variables, x, jax.random.key(5))
  assert lp.shape == (4,) and bool(jnp.all(jnp.isfinite(lp)))
  # Evaluation mode: a deterministic function of the input and the noise key.
  np.testing.assert_array_equal(log_prob(variables, x, jax.random.key(5)), lp)
  assert float(jnp.max(jnp.abs(log_prob(variables, x, jax.random.key(6)) - lp))) > 1e-4


def _noise_dict(cfg, n: int, seed: int):
  plan = plan_model(cfg)
  h = cfg.image_size // 2
  noise = {'dequantization': jax.random.normal(jax.random.key(seed),
                                               (n, h, h, 4 * cfg.num_channels))}
  for b, block in enumerate(plan.blocks):
    for j in range(1, cfg.block_conf[b]):
      noise[f'block{b}_unit{j}'] = jax.random.normal(
          jax.random.key(seed + 100 * b + j), (n, block.size, block.size, cfg.growth_rate))
  return noise


def test_explicit_noise_replaces_the_rng_and_round_trip(digits_flow):
  """With every draw passed as `noise=`, results ignore the rng; decode(encode(x)) == x."""
  cfg, model, variables, x = digits_flow
  noise = _noise_dict(cfg, 4, 0)
  assert sorted(noise) == ['block0_unit1', 'dequantization']

  def everything(m, a, nz):
    return (m.log_prob(a, noise=nz), m.bits_per_dim(a, noise=nz),
            m.decode(m.encode(a, noise=nz)))

  run = jax.jit(lambda v, xb, nz, key: model.apply(v, xb, nz, rngs={'noise': key},
                                                   method=everything))
  lp, bpd, decoded = run(variables, x, noise, jax.random.key(0))
  assert decoded.dtype == jnp.uint8
  np.testing.assert_array_equal(decoded, x)
  lp_other_key, _, _ = run(variables, x, noise, jax.random.key(1))
  np.testing.assert_array_equal(lp_other_key, lp)        # every draw came from `noise`
  np.testing.assert_allclose(bpd, -lp / (8 * 8 * 1 * math.log(2)), rtol=1e-6)
  for name in noise:                                       # and every entry is used
    changed = dict(noise, **{name: noise[name] + 0.5})
    lp_changed, _, decoded_changed = run(variables, x, changed, jax.random.key(0))
    assert float(jnp.max(jnp.abs(lp_changed - lp))) > 1e-4, name
    np.testing.assert_array_equal(decoded_changed, x)


def test_digits_samples_jit(digits_flow):
  cfg, model, variables, _ = digits_flow
  sample = jax.jit(lambda v, key, t: model.apply(v, num=6, temperature=t, rngs={'noise': key},
                                                 method=model.sample))
  for t in (0.5, 0.8, 1.0):
    s = sample(variables, jax.random.key(1), t)
    assert s.dtype == jnp.uint8 and s.shape == (6, 8, 8, 1)
    assert int(s.max()) <= 31                               # 5-bit range
  np.testing.assert_array_equal(sample(variables, jax.random.key(1), 1.0), s)


def _iwbo_draws(mdl, x, k, chunk):
  """The `k` log p(x, noise_i) that `DenseFlow.iwbo` combines, with the same scan and rngs."""
  xs = jnp.tile(x, (chunk, 1, 1, 1))

  def body(m, carry, _):
    return carry, m._forward_log_prob(xs)

  scan = nn.scan(body, variable_broadcast=['params', 'batch_stats'],
                 split_rngs={'noise': True}, length=k // chunk)
  return scan(mdl, jnp.zeros(()), None)[1]                  # (k // chunk, chunk * N)


def test_iwbo_is_the_logsumexp_of_its_draws(digits_flow):
  cfg, model, variables, x = digits_flow
  k, chunk, n = 6, 3, x.shape[0]
  key = jax.random.key(11)
  with jax.threefry_partitionable(False):       # as inside the model's public methods
    iwbo = jax.jit(lambda v, xb: model.apply(v, xb, k, chunk, rngs={'noise': key},
                                             method=model.iwbo))(variables, x)
    draws = jax.jit(lambda v, xb: model.apply(v, xb, k, chunk, rngs={'noise': key},
                                              method=_iwbo_draws))(variables, x)
  draws = np.asarray(draws, np.float64)
  # Row r of chunk c is image r % N: gather the k draws of each image by hand.
  per_image = np.stack([np.concatenate([draws[c, i::n] for c in range(k // chunk)])
                        for i in range(n)])              # (N, k)
  assert per_image.shape == (n, k)
  assert np.all(np.std(per_image, axis=1) > 1e-3)        # k different noise draws
  top = per_image.max(axis=1)
  expected = top + np.log(np.mean(np.exp(per_image - top[:, None]), axis=1))
  np.testing.assert_allclose(iwbo, expected, rtol=1e-5, atol=1e-3)
  # The bound lies between the mean (the ELBO estimate) and the best draw.
  assert np.all(per_image.mean(axis=1) <= np.asarray(iwbo) + 1e-4)
  assert np.all(np.asarray(iwbo) <= top + 1e-4)


def test_iwbo_arguments_are_checked(digits_flow):
  cfg, model, variables, x = digits_flow
  with pytest.raises(ValueError, match='k=6 must be divisible by chunk=4'):
    model.apply(variables, x, 6, 4, rngs={'noise': jax.random.key(0)}, method=model.iwbo)
  with pytest.raises(ValueError, match='positive number of draws, got k=0'):
    model.apply(variables, x, 0, rngs={'noise': jax.random.key(0)}, method=model.iwbo)


# ---------------------------------------------------------------------------- random bits
@fast_rng
def _draw(key):
  return jax.random.normal(key, (16,)), jax.config.jax_threefry_partitionable


def test_fast_rng_respects_a_callers_threefry_choice(monkeypatch):
  """Non-partitionable threefry by default; a choice the caller made is kept."""
  monkeypatch.delenv('JAX_THREEFRY_PARTITIONABLE', raising=False)
  key = jax.random.key(0)
  with jax.threefry_partitionable(False):
    non_partitionable = np.asarray(jax.random.normal(key, (16,)))
  with jax.threefry_partitionable(True):
    partitionable = np.asarray(jax.random.normal(key, (16,)))
  assert np.any(non_partitionable != partitionable)      # the modes differ for this key
  previous = jax.config.jax_threefry_partitionable
  jax.config.update('jax_threefry_partitionable', True)   # JAX's default
  try:
    assert not threefry_mode_chosen()
    draws, mode = _draw(key)
    assert mode is False
    np.testing.assert_array_equal(draws, non_partitionable)
    for explicit, expected in ((True, partitionable), (False, non_partitionable)):
      with jax.threefry_partitionable(explicit):
        assert threefry_mode_chosen()
        draws, mode = _draw(key)
        assert mode is explicit
        np.testing.assert_array_equal(draws, expected)
        np.testing.assert_array_equal(jax.jit(lambda k: _draw(k)[0])(key), expected)
    monkeypatch.setenv('JAX_THREEFRY_PARTITIONABLE', '1')   # set in the environment
    assert threefry_mode_chosen()
    np.testing.assert_array_equal(_draw(key)[0], partitionable)
    monkeypatch.delenv('JAX_THREEFRY_PARTITIONABLE')
    jax.config.update('jax_threefry_partitionable', False)  # a global choice
    assert threefry_mode_chosen()
    np.testing.assert_array_equal(_draw(key)[0], non_partitionable)
  finally:
    jax.config.update('jax_threefry_partitionable', previous)


def test_model_methods_keep_a_callers_threefry_choice(digits_flow, monkeypatch):
  monkeypatch.delenv('JAX_THREEFRY_PARTITIONABLE', raising=False)
  cfg, model, variables, _ = digits_flow

  def samples():
    return np.asarray(jax.jit(lambda v, k: model.apply(v, 2, rngs={'noise': k},
                                                       method=model.sample))(
        variables, jax.random.key(2)))

  default = samples()
  with jax.threefry_partitionable(False):
    np.testing.assert_array_equal(samples(), default)
  with jax.threefry_partitionable(True):
    partitionable = samples()
  assert np.any(partitionable != default)


# ----------------------------------------------------------------- other shapes and ablations
def test_64x64_rgb_model():
  """Three blocks at 64x64 (attention over 32*32 positions in the first block). Uniform
  dequantization keeps the compile short; the variational dequantizer's shapes at 64x64 are
  covered by `test_parameter_counts_and_latent_shapes`."""
  cfg = small_config(image_size=64, num_channels=3, num_bits=8, block_conf=(1, 1, 1),
                     layers_conf=(1, 1, 1), mid_channels=(8, 8, 8), dequantization='uniform')
  model = DenseFlow(cfg)
  x = images(cfg, 2)
  (lp, decoded), variables = init_and_run(model, x, log_prob_and_round_trip)
  assert plan_model(cfg).latent_shape == (8, 8, 48)
  assert variables['params']['base_loc'].shape == (48,)
  assert lp.shape == (2,) and bool(jnp.all(jnp.isfinite(lp)))
  np.testing.assert_array_equal(decoded, x)


@pytest.mark.parametrize('overrides', [
    dict(coupling='glow'),
    dict(augment=False, conv1x1='lu'),
    dict(noise='plain', attention_layout='tokens'),
], ids=['glow_coupling', 'no_augmentation', 'plain_noise'])
def test_ablation_configs(overrides):
  """Table-4 switches (with uniform dequantization, which compiles much faster)."""
  cfg = small_config(dequantization='uniform', **overrides)
  model = DenseFlow(cfg)
  x = images(cfg, 2)
  (lp, decoded), variables = init_and_run(model, x, log_prob_and_round_trip)
  assert bool(jnp.all(jnp.isfinite(lp)))
  np.testing.assert_array_equal(decoded, x)
  params = variables['params']
  names = {str(getattr(p, 'key', p))
           for path, _ in jax.tree_util.tree_flatten_with_path(params)[0] for p in path}
  if cfg.coupling == 'glow':
    assert 'conv_mid' in names and 'fusion' not in names
  else:
    assert 'fusion' in names and 'conv_mid' not in names
  if not cfg.augment:
    assert plan_model(cfg).latent_shape == (2, 2, 8)          # no appended channels
    assert not any(n.startswith('augment_') for n in names)
    assert 'perm' in names                                    # LU-parameterised 1x1 convs
  if cfg.noise == 'plain':
    assert not any(n.startswith('noise_net') for n in names)
    assert plan_model(cfg).latent_shape == (2, 2, 12)


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize('overrides,fragments', [
    (dict(image_size=36, num_channels=3, num_bits=8, block_conf=(1, 1, 1),
          layers_conf=(1, 1, 1), mid_channels=(8, 8, 8)),
     ['image_size = 36', 'not divisible by 2^3 = 8']),
    (dict(block_conf=(1, 1, 1), layers_conf=(1, 1, 1), mid_channels=(8, 8, 8)),
     ['block 2 works at 1x1', 'H*W = 1', 'num_landmarks = 4']),
    (dict(growth_rate=3), ['block 0 unit 1 has 7 channels', 'growth_rate = 3']),
    (dict(layers_conf=(1,)), ['same length', '2, 1, 2']),
    (dict(block_conf=(2, 1, 1)), ['same length', '3, 2, 2']),
    (dict(coupling='realnvp'), ["model.coupling = 'realnvp'", "'denseflow', 'glow'"]),
    (dict(noise='white'), ["model.noise = 'white'"]),
    (dict(mid_channels=(8, 7)), ['mid_channels = (8, 7)', 'got 7']),
    (dict(num_landmarks=0), ['num_landmarks = 0']),
    (dict(num_bits=0), ['num_bits = 0']),
])
def test_unworkable_configs_are_rejected(overrides, fragments):
  cfg = small_config(**overrides)
  for check in (lambda: plan_model(cfg),
                lambda: jax.eval_shape(lambda: DenseFlow(cfg).init(
                    jax.random.key(0), jnp.zeros((1, cfg.image_size, cfg.image_size,
                                                  cfg.num_channels), jnp.uint8)))):
    with pytest.raises(ValueError) as info:
      check()
    for fragment in fragments:
      assert fragment in str(info.value), (fragment, str(info.value))


def test_bad_images_are_rejected(digits_flow):
  cfg, model, variables, x = digits_flow
  rngs = {'noise': jax.random.key(0)}
  cases = [
      (x.astype(np.float32), ['integer images', 'float32']),
      (x[:, :4, :4], ['expected images of shape (N, 8, 8, 1)', 'got (4, 4, 4, 1)']),
      (np.concatenate([x, x], axis=-1), ['(N, 8, 8, 1)', 'got (4, 8, 8, 2)']),
      (np.full_like(x, 40), ['must be in [0, 31] for num_bits=5', 'max 40']),
  ]
  for bad, fragments in cases:
    for method in (model.log_prob, model.encode, model.bits_per_dim):
      with pytest.raises(ValueError) as info:
        model.apply(variables, bad, rngs=rngs, method=method)
      for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
  with pytest.raises(ValueError, match=r'expected z of shape \(N,\) \+ \(2, 2, 12\), got '
                                       r'\(4, 2, 2, 8\)'):
    model.apply(variables, {'z': jnp.zeros((4, 2, 2, 8))}, method=model.decode)
  with pytest.raises(ValueError, match='num must be positive, got 0'):
    model.apply(variables, num=0, rngs=rngs, method=model.sample)
