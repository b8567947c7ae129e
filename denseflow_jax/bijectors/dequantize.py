"""Dequantization: integer images -> continuous values in [0, 1)."""
import dataclasses
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from denseflow_jax.bijectors.base import (Array, Bijector, check_image, std_normal_log_prob,
                                          sum_except_batch)
from denseflow_jax.bijectors.conv1x1 import Conv1x1
from denseflow_jax.bijectors.coupling import AffineCoupling
from denseflow_jax.bijectors.elementwise import _sigmoid_fn
from denseflow_jax.bijectors.squeeze import squeeze2x2, unsqueeze2x2
from denseflow_jax.nets.coupling_nets import ConditionalCouplingNet, ContextNet


def log_bin_width(num_bits: int) -> float:
  """`-num_bits * ln 2` rounded to float32, as the published model stores it (a float32 buffer)."""
  return float(np.float32(-num_bits * np.log(2.0)))


def check_integer_images(x: Array, name: str) -> None:
  """ValueError unless `x` is a rank-4 integer array."""
  check_image(x, name)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f'{name}: expected integer images (e.g. uint8), got dtype {x.dtype}')


def floor_to_bins(y: Array, num_bits: int) -> Array:
  """`floor(y * 2^bits)` clipped to `[0, 2^bits - 1]`, as int32."""
  bins = 2 ** num_bits
  return jnp.clip(jnp.floor(y * bins), 0, bins - 1).astype(jnp.int32)


class UniformDequantization(Bijector):
  """`y = (x + u) / 2^bits` with `u ~ U(0, 1)^D` (`noise` rng, or `u` passed in).

  Forward `log_det = -D ln(2^bits)` (the lower-bound term with `q(u|x) = 1`). Inverse floors and
  clips to `[0, 2^bits - 1]` (int32) and returns `+D ln(2^bits)`.
  """
  num_bits: int = 8

  @nn.compact
  def __call__(self, x: Array, inverse: bool = False, *, u: Optional[Array] = None,
               dtype=jnp.float32, **unused: Any) -> Tuple[Array, Array]:
    d = int(np.prod(x.shape[1:]))
    ldj = log_bin_width(self.num_bits)
    if inverse:
      check_image(x, 'UniformDequantization.inverse')
      return floor_to_bins(x, self.num_bits), jnp.full((x.shape[0],), -d * ldj, x.dtype)
    check_integer_images(x, 'UniformDequantization')
    if u is None:
      u = jax.random.uniform(self.make_rng('noise'), x.shape, dtype)
    elif u.shape != x.shape:
      raise ValueError(f'UniformDequantization: u has shape {u.shape}, expected {x.shape}')
    y = (x.astype(dtype) + u.astype(dtype)) / (2 ** self.num_bits)
    return y, jnp.full((x.shape[0],), d * ldj, dtype)


class VariationalDequantization(Bijector):
  """Flow++-style variational dequantization `y = (x + u) / 2^bits`, `u ~ q(u | x)`.

  `q(u|x)` is a conditional flow on the squeezed shape `(H/2, W/2, 4C)`: a per-channel Gaussian
  base (learned `base_loc`, `base_log_scale`), `steps` x [1x1 conv, conditional affine coupling
  whose net sees `concat(z1, context(x))`], a final 1x1 conv, unsqueeze and a sigmoid.
  Forward: `(y, log_det)` with `log_det = D * ln_bin - log q(u|x)`, `ln_bin = -bits ln 2`
  rounded to float32 (as published). `eps` (the base's standard-normal draw,
  `(N, H/2, W/2, 4C)`) comes from the `noise` rng or is passed in. `sample_u_and_log_q` returns
  the draw itself, `(u, log q(u|x))`, for the same `eps`.
  Inverse floors and clips to `[0, 2^bits - 1]`; given the integer image as `x_int` it also
  evaluates `log q(u|x)` exactly (by inverting q) and returns the negated forward log-det.
  The fields are keyword-only. `compute_dtype` (None or `jnp.bfloat16`) is the dtype the
  context and coupling nets compute in (see `denseflow_jax.nets.coupling_nets`); q's own
  arithmetic (base, 1x1 convs, affine steps, sigmoid, log q) stays in the input's float dtype.
  """
  _: dataclasses.KW_ONLY
  num_bits: int = 8
  steps: int = 4
  context_channels: int = 64
  compute_dtype: Optional[Any] = None

  @nn.compact
  def _q(self, channels: int) -> Dict[str, Any]:
    """The parts of q on `channels` (= 4C) squeezed channels: nets, base parameters, steps."""
    return dict(
        context_net=ContextNet(self.num_bits, self.context_channels,
                               compute_dtype=self.compute_dtype, name='context_net'),
        loc=self.param('base_loc', nn.initializers.zeros, (channels,)),
        log_scale=self.param('base_log_scale', nn.initializers.zeros, (channels,)),
        mixers=[Conv1x1(name=f'mix_{k}') for k in range(self.steps + 1)],
        couplings=[AffineCoupling(ConditionalCouplingNet(2 * (channels // 2),
                                                         compute_dtype=self.compute_dtype),
                                  name=f'coupling_{k}') for k in range(self.steps)])

  def __call__(self, x: Array, inverse: bool = False, *, eps: Optional[Array] = None,
               x_int: Optional[Array] = None, dtype=jnp.float32,
               **unused: Any) -> Tuple[Array, Array]:
    if inverse:
      check_image(x, 'VariationalDequantization.inverse')
      parts = self._q(4 * x.shape[-1])
      x_out = floor_to_bins(x, self.num_bits)
      d = int(np.prod(x.shape[1:]))
      if x_int is None:
        return x_out, jnp.zeros((x.shape[0],), x.dtype)
      u = x * (2 ** self.num_bits) - x_int.astype(x.dtype)
      _, log_q = _run_q(parts, x_int, u=u, dtype=x.dtype)
      return x_out, -(d * log_bin_width(self.num_bits) - log_q)
    u, log_q = self.sample_u_and_log_q(x, eps=eps, dtype=dtype)
    y = (x.astype(dtype) + u) / (2 ** self.num_bits)
    d = int(np.prod(x.shape[1:]))
    return y, d * log_bin_width(self.num_bits) - log_q

  def sample_u_and_log_q(self, x: Array, *, eps: Optional[Array] = None,
                         dtype=jnp.float32) -> Tuple[Array, Array]:
    """Draws the dequantization noise: integer images `x` -> `(u, log q(u|x))`.

    `u` in (0, 1) has the shape of `x`; `log q(u|x)` is `(N,)`. `eps` as in `forward`. This is
    the draw `forward` uses: `forward(x, eps=eps)[0] == (x + u) / 2^bits`.
    """
    check_integer_images(x, 'VariationalDequantization')
    n, h, w, c = x.shape
    if h % 2 or w % 2:
      raise ValueError(f'VariationalDequantization: height and width must be even, got shape '
                       f'{x.shape}')
    parts = self._q(4 * c)
    base_shape = (n, h // 2, w // 2, 4 * c)
    if eps is None:
      eps = jax.random.normal(self.make_rng('noise'), base_shape, dtype)
    elif eps.shape != base_shape:
      raise ValueError(f'VariationalDequantization: eps has shape {eps.shape}, expected '
                       f'{base_shape}')
    step_lds = []
    u, log_q = _run_q(parts, x, eps=eps.astype(dtype), dtype=dtype, trace=step_lds)
    # Diagnostics (no-ops unless 'intermediates' is mutable): per-step log|det| of q in the
    # sampling direction eps -> u, index k = the published `encoder.transforms.k`
    # (1x1 conv and coupling alternately, final 1x1 conv, unsqueeze (0), sigmoid).
    self.sow('intermediates', 'step_log_dets', jnp.stack(step_lds))
    self.sow('intermediates', 'u', u)
    self.sow('intermediates', 'log_q', log_q)
    return u, log_q


def _run_q(parts: dict, x_int: Array, eps: Optional[Array] = None, u: Optional[Array] = None,
         dtype=jnp.float32, trace: Optional[list] = None) -> Tuple[Array, Array]:
  """q in the sampling direction (eps -> `(u, log q)`) or, given u, `(eps, log q(u|x))`.

  In the sampling direction, `trace` (a list) receives each step's log|det| `(N,)` in order.
  """
  trace = [] if trace is None else trace
  n, h, w, c = x_int.shape
  context = parts['context_net'](x_int, dtype)
  loc = parts['loc'].astype(dtype)
  log_scale = parts['log_scale'].astype(dtype)
  hw = (h // 2) * (w // 2)
  base_ld = hw * jnp.sum(log_scale)
  mixers, couplings = parts['mixers'], parts['couplings']
  steps = len(couplings)
  if u is None:  # sampling direction: eps -> z -> u
    z = loc + jnp.exp(log_scale) * eps
    log_q = sum_except_batch(std_normal_log_prob(eps)) - base_ld
    for k in range(steps):
      z, ld = mixers[k](z)
      log_q -= ld
      trace.append(ld)
      z, ld = couplings[k](z, context=context)
      log_q -= ld
      trace.append(ld)
    z, ld = mixers[steps](z)
    log_q -= ld
    trace.append(ld)
    u, ld = _sigmoid_fn(unsqueeze2x2(z), inverse=False)
    trace.extend([jnp.zeros_like(ld), ld])
    return u, log_q - ld
  z, ld_sig = _sigmoid_fn(u, inverse=True)          # logit
  z = squeeze2x2(z)
  log_q = ld_sig                                    # log|d logit(u) / du|
  z, ld = mixers[steps](z, inverse=True)
  log_q += ld
  for k in reversed(range(steps)):
    z, ld = couplings[k](z, inverse=True, context=context)
    log_q += ld
    z, ld = mixers[k](z, inverse=True)
    log_q += ld
  eps = (z - loc) * jnp.exp(-log_scale)
  log_q += sum_except_batch(std_normal_log_prob(eps)) - base_ld
  return eps, log_q
