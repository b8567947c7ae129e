"""DenseFlow: the assembled multi-scale flow (SPEC sections 1-2).

Data -> latent: variational dequantization -> shift to [-0.5, 0.5] -> initial 2x2 squeeze ->
blocks of units of glow-like modules with cross-unit coupling, a squeeze-and-drop transition
between blocks -> per-channel Gaussian base. Every method works on channels-last integer images
`(N, H, W, C)`; log-likelihoods are in nats per example (lower bounds, because dequantization
and cross-unit coupling are variational).

BatchNorm (coupling-net fusion only): `train=True` uses batch statistics and updates the
`batch_stats` collection (pass `mutable=['batch_stats']`); `train=False` (the default, and always
when sampling) uses the running averages, so `log_prob` in eval mode is a deterministic function
of the input and the `noise` rng.

Precision: `config.compute_dtype` ('float32' or 'bfloat16', `net_compute_dtype`) is the dtype
the non-invertible nets compute in (coupling nets, noise nets, the dequantizer's context and
coupling nets); parameters, BatchNorm statistics and everything that enters a log-determinant
or an inverse (ActNorm, 1x1 convs, the affine arithmetic, the base density) stay float32.
`encode` and `decode` compute the nets in float32 whatever the setting (`float32_nets`), so
that `decode(encode(x)) == x` holds for a bfloat16 model too.

Random draws: the public methods are traced with `jax.threefry_partitionable(False)` unless
the caller chose a value (see `fast_rng`). PRNG keys may be typed (`jax.random.key`) or raw
`uint32[2]` (`jax.random.PRNGKey`).
"""
import contextlib
import dataclasses
import functools
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from denseflow_jax.bijectors.actnorm import ActNorm
from denseflow_jax.bijectors.augment import CrossUnitCoupling
from denseflow_jax.bijectors.base import (Array, std_normal_log_prob,
                                          sum_except_batch)
from denseflow_jax.bijectors.conv1x1 import Conv1x1, LUConv1x1
from denseflow_jax.bijectors.coupling import AffineCoupling
from denseflow_jax.bijectors.dequantize import (UniformDequantization, VariationalDequantization,
                                                check_integer_images)
from denseflow_jax.bijectors.split import SqueezeAndDrop
from denseflow_jax.bijectors.squeeze import ChannelSwap, squeeze2x2, unsqueeze2x2
from denseflow_jax.nets.coupling_nets import (DenseFlowCouplingNet, GlowCouplingNet, NoiseNet,
                                              float32_nets)
from denseflow_jax.nets.layers import conv_backward_mode
from denseflow_jax import param_init
from denseflow_jax.config_check import ModelPlan, plan_model, remat_policy

Latents = Dict[str, Any]


_THREEFRY_ENV = 'JAX_THREEFRY_PARTITIONABLE'
try:  # private: the only way to see an enclosing `with jax.threefry_partitionable(...)`
  from jax._src import config as _jax_config
  _THREEFRY_STATE, _UNSET = _jax_config.threefry_partitionable, _jax_config.config_ext.unset
except (ImportError, AttributeError):
  _THREEFRY_STATE = _UNSET = None


def threefry_mode_chosen() -> bool:
  """Whether the caller chose a `jax_threefry_partitionable` value that `fast_rng` can see.

  True inside a `with jax.threefry_partitionable(...)` block (either value), after a global
  `jax.config.update('jax_threefry_partitionable', False)`, or when the environment variable
  `JAX_THREEFRY_PARTITIONABLE` is set. A global update to `True` is JAX's default value and
  cannot be told apart from it: use the context manager to ask for partitionable draws.
  """
  if _THREEFRY_ENV in os.environ:
    return True
  if _THREEFRY_STATE is not None and _THREEFRY_STATE.get_local() is not _UNSET:
    return True
  return not jax.config.jax_threefry_partitionable


def rng_mode():
  """The context `fast_rng` traces under: `jax.threefry_partitionable(False)`, or nothing when
  `threefry_mode_chosen()`."""
  if threefry_mode_chosen():
    return contextlib.nullcontext()
  return jax.threefry_partitionable(False)


def fast_rng(method):
  """Traces `method` with non-partitionable threefry unless the caller chose a mode.

  By default the wrapped method runs under `jax.threefry_partitionable(False)`: with jax 0.12
  on XLA:CPU the partitionable threefry lowering of `jax.random.normal` / `uniform` compiles
  much more slowly, which made the tiny model's `init` compile take minutes. When the caller
  chose a value (`threefry_mode_chosen`, e.g. `with jax.threefry_partitionable(True): ...`),
  that value is kept. The flag only changes how random bits are derived from a key: draws
  stay deterministic per key and independent of the device count, but the two modes give
  different draws for the same key.
  """
  @functools.wraps(method)
  def wrapped(*args, **kwargs):
    with rng_mode():
      return method(*args, **kwargs)
  return wrapped


def net_compute_dtype(cfg: ml_collections.ConfigDict) -> Optional[Any]:
  """The `compute_dtype` the nets get from `cfg.compute_dtype`: None for 'float32' (compute in
  the model's float dtype; a config without the field counts as 'float32'), `jnp.bfloat16`
  for 'bfloat16'. ValueError for anything else."""
  name = cfg.get('compute_dtype', 'float32')
  if name == 'float32':
    return None
  if name == 'bfloat16':
    return jnp.bfloat16
  raise ValueError(f"model.compute_dtype = {name!r}; expected 'float32' or 'bfloat16'")


def with_conv_backward(method):
  """Traces a `DenseFlow` method inside `conv_backward_mode(config.conv_backward)`.

  The mode (`model.conv_backward`: 'auto', 'tuned' or 'xla') picks the 3x3 convolutions'
  gradient when the layers are traced; it is not a parameter and changes no forward value.
  """
  @functools.wraps(method)
  def wrapped(self, *args, **kwargs):
    with conv_backward_mode(self.config.get('conv_backward', 'auto')):
      return method(self, *args, **kwargs)
  return wrapped


def remat_module(module_cls, remat: Any):
  """`module_cls` rematerialised in the backward pass as `model.remat` says.

  'none' (or legacy False): `module_cls` itself; 'full' (or legacy True): everything
  recomputed; any other `config_check.REMAT_POLICIES` name: `jax.checkpoint_policies.<name>`
  decides what is saved. `prevent_cse=False`, as the modules run inside `nn.scan`.
  """
  name = remat_policy(remat)
  if name == 'none':
    return module_cls
  policy = getattr(jax.checkpoint_policies, 'nothing_saveable' if name == 'full' else name)
  return nn.remat(module_cls, policy=policy, prevent_cse=False)


class GlowModule(nn.Module):
  """One glow-like module: ActNorm -> invertible 1x1 conv -> affine coupling -> channel swap.

  Written as an `nn.scan` body: `carry = (h, log_det)`; returns the per-step log-dets of the
  ActNorm, 1x1 conv and coupling as the scanned output `(3, N)`.
  """
  cfg: ml_collections.ConfigDict
  _: dataclasses.KW_ONLY
  mid_channels: int
  inverse: bool = False
  train: bool = False

  @nn.compact
  def __call__(self, carry: Tuple[Array, Array], _: Any = None):
    h, total = carry
    cfg = self.cfg
    c = h.shape[-1]
    c2 = c // 2
    if cfg.coupling == 'denseflow':
      net = DenseFlowCouplingNet(
          2 * c2, self.mid_channels, dense_depth=cfg.dense_depth, dense_growth=cfg.dense_growth,
          num_landmarks=cfg.num_landmarks, pinv_iterations=cfg.pinv_iterations,
          attention_layout=cfg.attention_layout, bn_momentum=cfg.bn_momentum,
          bn_epsilon=cfg.bn_epsilon, compute_dtype=net_compute_dtype(cfg), name='coupling_net')
    else:
      net = GlowCouplingNet(2 * c2, hidden=cfg.glow_hidden, compute_dtype=net_compute_dtype(cfg),
                            name='coupling_net')
    conv_cls = LUConv1x1 if cfg.conv1x1 == 'lu' else Conv1x1
    actnorm, conv, coupling = ActNorm(name='actnorm'), conv_cls(name='conv1x1'), AffineCoupling(
        net, name='coupling')
    swap = ChannelSwap()
    if not self.inverse:
      h, ld0 = actnorm(h)
      h, ld1 = conv(h)
      h, ld2 = coupling(h, train=self.train)
      h, _ = swap(h)
    else:
      h, _ = swap(h, inverse=True)
      h, ld2 = coupling(h, inverse=True, train=False)
      h, ld1 = conv(h, inverse=True)
      h, ld0 = actnorm(h, inverse=True)
    lds = jnp.stack([ld0, ld1, ld2])
    return (h, total + ld0 + ld1 + ld2), lds


class Unit(nn.Module):
  """`num_modules` glow-like modules with identical shapes, stacked with `nn.scan`.

  Parameters carry a leading axis of length `num_modules` (module order = data -> latent).
  `cfg.remat` rematerialises each module in the backward pass (memory for compute), with the
  policy it names (`remat_module`).
  `num_modules` and `mid_channels` are keyword-only.
  """
  cfg: ml_collections.ConfigDict
  _: dataclasses.KW_ONLY
  num_modules: int
  mid_channels: int

  @nn.compact
  def __call__(self, h: Array, inverse: bool = False, train: bool = False):
    body = remat_module(GlowModule, self.cfg.get('remat', 'none'))
    scan = nn.scan(body, variable_axes={'params': 0, 'batch_stats': 0},
                   split_rngs={'params': True}, length=self.num_modules, reverse=inverse)
    total = jnp.zeros((h.shape[0],), h.dtype)
    (h, total), per_module = scan(self.cfg, mid_channels=self.mid_channels, inverse=inverse,
                                  train=train and not inverse, name='modules')((h, total), None)
    self.sow('intermediates', 'module_log_dets', per_module)
    return h, total


class FlowBlock(nn.Module):
  """A DenseFlow block: units with cross-unit coupling before every unit but the first.

  Before unit j >= 1 the output of unit j-1 gets `growth_rate` appended noise channels whose
  (mu, sigma) come from noise net g_j over concat(block input, outputs of units 0..j-2).
  """
  cfg: ml_collections.ConfigDict
  block_index: int

  def _unit(self, j: int) -> Unit:
    b = self.block_index
    return Unit(self.cfg, num_modules=self.cfg.layers_conf[b],
                mid_channels=self.cfg.mid_channels[b], name=f'unit_{j}')

  def _augment(self, j: int) -> CrossUnitCoupling:
    cfg = self.cfg
    plain = cfg.noise == 'plain'
    net = None if plain else NoiseNet(cfg.growth_rate, compute_dtype=net_compute_dtype(cfg),
                                      name=f'noise_net_{j}')
    return CrossUnitCoupling(cfg.growth_rate, net, plain=plain, name=f'augment_{j}')

  @nn.compact
  def __call__(self, x: Array, inverse: bool = False, train: bool = False,
               etas: Optional[Sequence[Optional[Array]]] = None):
    num_units = self.cfg.block_conf[self.block_index]
    total = jnp.zeros((x.shape[0],), x.dtype)
    if inverse:
      h = x
      for j in reversed(range(num_units)):
        h, ld = self._unit(j)(h, inverse=True)
        total = total + ld
        if j >= 1 and self.cfg.augment:
          h, _ = self._augment(j)(h, inverse=True)
      return h, total
    outputs: List[Array] = []
    h = x
    for j in range(num_units):
      if j >= 1 and self.cfg.augment:
        cond = jnp.concatenate([x] + outputs[:j - 1], axis=-1)
        eta = None if etas is None else etas[j]
        h, ld = self._augment(j)(h, cond=cond, eta=eta)
        total = total + ld
        self.sow('intermediates', f'augment_{j}_log_det', ld)
      h, ld = self._unit(j)(h, train=train)
      self.sow('intermediates', f'unit_{j}_log_det', ld)
      self.sow('intermediates', f'unit_{j}_z', h)
      total = total + ld
      outputs.append(h)
    return h, total


class DenseFlow(nn.Module):
  """The DenseFlow normalizing flow. `config` is the model config (`configs/default.py`).

  Methods (apply with `method=`): `log_prob`, `bits_per_dim`, `iwbo`, `sample`, `encode`,
  `decode`. `__call__` is `log_prob`. Stochastic methods need a `noise` rng.
  """
  config: ml_collections.ConfigDict

  def setup(self):
    self.plan: ModelPlan = plan_model(self.config)
    cfg = self.config
    if cfg.dequantization == 'variational':
      self.dequantizer = VariationalDequantization(num_bits=cfg.num_bits, steps=cfg.deq_steps,
                                                   context_channels=cfg.deq_context_channels,
                                                   compute_dtype=net_compute_dtype(cfg))
    else:
      self.dequantizer = UniformDequantization(cfg.num_bits)
    self.blocks = [FlowBlock(cfg, b) for b in range(len(cfg.block_conf))]
    self.transitions = [SqueezeAndDrop() for _ in range(len(cfg.block_conf) - 1)]
    c = self.plan.latent_shape[-1]
    self.base_loc = self.param('base_loc', nn.initializers.zeros, (c,))
    self.base_log_scale = self.param('base_log_scale', nn.initializers.zeros, (c,))

  # ----------------------------------------------------------------------------------- helpers
  def _float_dtype(self):
    return self.base_loc.dtype

  def _check_input(self, x: Array, name: str) -> None:
    check_integer_images(x, f'DenseFlow.{name}')
    expected = self.plan.image_shape
    if tuple(x.shape[1:]) != expected:
      raise ValueError(f'DenseFlow.{name}: expected images of shape (N, {expected[0]}, '
                       f'{expected[1]}, {expected[2]}), got {tuple(x.shape)}')
    if not isinstance(x, jax.core.Tracer):  # concrete input: check the values too
      xv = np.asarray(x)
      lo, hi = int(xv.min()), int(xv.max())
      top = 2 ** self.config.num_bits - 1
      if lo < 0 or hi > top:
        raise ValueError(f'DenseFlow.{name}: pixel values must be in [0, {top}] for '
                         f'num_bits={self.config.num_bits}, got min {lo} max {hi}')

  def _base_log_prob(self, z: Array) -> Array:
    loc, log_scale = self.base_loc.astype(z.dtype), self.base_log_scale.astype(z.dtype)
    e = (z - loc) * jnp.exp(-log_scale)
    return sum_except_batch(std_normal_log_prob(e) - log_scale)

  def _forward(self, x: Array, train: bool, noise: Optional[Dict[str, Array]]):
    """Data -> (final latent, dropped halves, log-det sum, per-stage log-dets)."""
    dtype = self._float_dtype()
    noise = noise or {}
    if self.config.dequantization == 'variational':
      y, ld_deq = self.dequantizer(x, eps=noise.get('dequantization'), dtype=dtype)
    else:
      y, ld_deq = self.dequantizer(x, u=noise.get('dequantization'), dtype=dtype)
    z, dropped, ld, stages = self.flow_forward(y, train=train, noise=noise)
    return z, dropped, ld_deq + ld, {'dequantization': ld_deq, **stages}

  @with_conv_backward
  def flow_forward(self, y: Array, train: bool = False,
                   noise: Optional[Dict[str, Array]] = None):
    """The continuous flow after dequantization: `y` in [0, 1) `(N, H, W, C)` ->
    `(z, dropped halves, log-det sum (N,), per-stage log-dets)`."""
    noise = noise or {}
    h = squeeze2x2(y - 0.5)
    stages = {}
    total = jnp.zeros((y.shape[0],), y.dtype)
    dropped = []
    for b, block in enumerate(self.blocks):
      etas = [noise.get(f'block{b}_unit{j}') for j in range(self.config.block_conf[b])]
      h, ld = block(h, train=train, etas=etas)
      stages[f'block{b}'] = ld
      total = total + ld
      if b < len(self.transitions):
        h, d, ld = self.transitions[b].split(h)
        stages[f'transition{b}'] = ld
        total = total + ld
        dropped.append(d)
    return h, dropped, total, stages

  # ------------------------------------------------------------------------------ public API
  def __call__(self, x: Array, train: bool = False,
               noise: Optional[Dict[str, Array]] = None) -> Array:
    """Same as `log_prob`."""
    return self.log_prob(x, train=train, noise=noise)

  @fast_rng
  @with_conv_backward
  def log_prob(self, x: Array, train: bool = False,
               noise: Optional[Dict[str, Array]] = None) -> Array:
    """Lower bound on log p(x) in nats, one noise draw, `(N,)`. `x`: integer `(N, H, W, C)`.

    `noise` (optional) supplies the draws instead of the `noise` rng (common random numbers):
    `'dequantization'` the dequantizer's standard-normal base draw `(N, H/2, W/2, 4C)` (or the
    uniform `u` for uniform dequantization) and `'block{b}_unit{j}'` the cross-unit draw before
    unit j of block b, `(N, H_b, W_b, growth_rate)`. Missing entries are drawn from the rng.
    """
    self._check_input(x, 'log_prob')
    z, _, total, stages = self._forward(x, train, noise)
    base = self._base_log_prob(z)
    self.sow('intermediates', 'stage_log_dets', stages)
    self.sow('intermediates', 'base_log_prob', base)
    return total + base

  @fast_rng
  @with_conv_backward
  def bits_per_dim(self, x: Array, train: bool = False,
                   noise: Optional[Dict[str, Array]] = None) -> Array:
    """`-log_prob / (D ln 2)` per example, `(N,)` (D = H * W * C)."""
    return -self.log_prob(x, train=train, noise=noise) / (self.plan.num_dims * math.log(2.0))

  @fast_rng
  @with_conv_backward
  def iwbo(self, x: Array, k: int, chunk: int = 0) -> Array:
    """Importance-weighted bound `logsumexp_i log p(x, noise_i) - log k` in nats, `(N,)`.

    The k draws are evaluated `chunk` at a time (the batch grows to `N * chunk`), inside one
    `lax.scan`, so memory stays bounded by the chunk. `chunk=0` means all k at once.
    """
    self._check_input(x, 'iwbo')
    if k < 1:
      raise ValueError(f'DenseFlow.iwbo: k must be a positive number of draws, got k={k}')
    chunk = k if chunk <= 0 else chunk
    if k % chunk:
      raise ValueError(f'DenseFlow.iwbo: k={k} must be divisible by chunk={chunk}')
    n = x.shape[0]
    xs = jnp.tile(x, (chunk, 1, 1, 1))

    def body(mdl, acc, _):
      lp = mdl._forward_log_prob(xs).reshape(chunk, n)
      return jnp.logaddexp(acc, jax.nn.logsumexp(lp, axis=0)), None

    scan = nn.scan(body, variable_broadcast=['params', 'batch_stats'],
                   split_rngs={'noise': True}, length=k // chunk)
    acc0 = jnp.full((n,), -jnp.inf, self._float_dtype())
    acc, _ = scan(self, acc0, None)
    return acc - math.log(k)

  def _forward_log_prob(self, x: Array) -> Array:
    z, _, total, _ = self._forward(x, False, None)
    return total + self._base_log_prob(z)

  @fast_rng
  @with_conv_backward
  def encode(self, x: Array, noise: Optional[Dict[str, Array]] = None) -> Latents:
    """Images -> latents `{'z': final latent, 'dropped': [dropped half of each transition]}`.

    Uses evaluation-mode BatchNorm and one noise draw; `decode(encode(x)) == x`. The nets
    compute in float32 even with `compute_dtype='bfloat16'` (see the module docstring).
    """
    self._check_input(x, 'encode')
    with float32_nets():
      z, dropped, _, _ = self._forward(x, False, noise)
    return {'z': z, 'dropped': dropped}

  @with_conv_backward
  def flow_inverse(self, z: Array, dropped: Sequence[Optional[Array]],
                   temperature: float = 1.0) -> Array:
    """Inverse of `flow_forward`: latent (+ dropped halves, drawn when None) -> `y` (float)."""
    h = z
    for b in reversed(range(len(self.blocks))):
      if b < len(self.transitions):
        h, _ = self.transitions[b](h, inverse=True, dropped=dropped[b], temperature=temperature)
      h, _ = self.blocks[b](h, inverse=True)
    return unsqueeze2x2(h) + 0.5

  def _inverse(self, z: Array, dropped: Sequence[Optional[Array]], temperature: float) -> Array:
    y = self.flow_inverse(z, dropped, temperature)
    x, _ = self.dequantizer(y, inverse=True)
    return x.astype(jnp.uint8) if self.config.num_bits <= 8 else x

  @fast_rng
  @with_conv_backward
  def decode(self, latents: Latents) -> Array:
    """Latents (as returned by `encode`) -> integer images `(N, H, W, C)` (uint8 for <= 8 bits).

    The nets compute in float32 whatever `compute_dtype` says, like `encode`."""
    z = latents['z']
    expected = self.plan.latent_shape
    if tuple(z.shape[1:]) != expected:
      raise ValueError(f'DenseFlow.decode: expected z of shape (N,) + {expected}, got '
                       f'{tuple(z.shape)}')
    dropped = list(latents.get('dropped', [None] * len(self.transitions)))
    with float32_nets():
      return self._inverse(z, dropped, 1.0)

  @fast_rng
  @with_conv_backward
  def sample(self, num: int, temperature: float = 1.0) -> Array:
    """Draws `num` images `(num, H, W, C)` uint8 in one inverse pass.

    `temperature` T scales every Gaussian draw (the base latent and each dropped half):
    z = loc + exp(log_scale) * T * eps. T = 1 samples the model itself.
    """
    if num <= 0:
      raise ValueError(f'DenseFlow.sample: num must be positive, got {num}')
    dtype = self._float_dtype()
    shape = (num,) + self.plan.latent_shape
    eps = jax.random.normal(self.make_rng('noise'), shape, dtype)
    z = self.base_loc.astype(dtype) + jnp.exp(self.base_log_scale.astype(dtype)) * (
        temperature * eps)
    return self._inverse(z, [None] * len(self.transitions), temperature)


def init_variables(model: DenseFlow, rng: jax.Array, x: Array) -> Dict[str, Any]:
  """The model's initial variables `{'params', 'batch_stats'}` for the batch `x`, compiled fast.

  `param_init.initial_variables` (every random parameter from one uniform and one normal
  draw, then `model.init`'s data-dependent ActNorm init on `x`), compiled once with XLA's
  backend optimisation level 0: the tiny model's init program compiles in ~4 s instead of the
  ~23 s of a plain `jax.jit(model.init)` on XLA:CPU. `rng` is split into the `params` and
  `noise` streams; it may be a typed (`jax.random.key`) or raw key, and random bits follow
  `fast_rng`'s rule. Same structure and distributions as `model.init({'params': k1, 'noise':
  k2}, x)`, not the same draws.
  """
  k_params, k_noise = jax.random.split(rng)
  rngs = {'params': k_params, 'noise': k_noise}
  init = functools.partial(param_init.initial_variables, model)
  with rng_mode():
    lowered = jax.jit(init).lower(rngs, x)
  compiled = lowered.compile(compiler_options={'xla_backend_optimization_level': 0})
  return dict(compiled(rngs, x))


def enable_compilation_cache(path: Optional[str] = None) -> str:
  """Turns on JAX's persistent compilation cache (default `~/.cache/denseflow_jax/xla`).

  DenseFlow's programs take tens of seconds to compile on CPU; with the cache a second run
  (or a second process, e.g. a restarted training job) loads them from disk.
  """
  import os
  path = path or os.environ.get('DENSEFLOW_JAX_CACHE',
                                os.path.expanduser('~/.cache/denseflow_jax/xla'))
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  return path
