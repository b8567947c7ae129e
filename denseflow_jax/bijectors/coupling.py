"""Affine coupling (RealNVP / Glow) with an arbitrary conditioner network."""
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp

from denseflow_jax.bijectors.base import Array, Bijector, check_image, sum_except_batch


def bounded_log_scale(s: Array) -> Array:
  """`2 * tanh(s / 2)`: the published soft bound of the log-scale to (-2, 2)."""
  return 2.0 * jnp.tanh(0.5 * s)


class AffineCoupling(Bijector):
  """Affine coupling on the channel axis.

  Split `x = [x1, x2]` with `x1` the first `ceil(C/2)` channels (passed unchanged) and `x2` the
  last `floor(C/2)`. The conditioner `net` sees `x1` (concatenated with `context` on the channel
  axis when one is given: conditional coupling) and returns `2 * floor(C/2)` channels
  **interleaved** per channel: output channel `2i` is the unconstrained scale `s_i`, `2i+1` the
  shift `t_i`. With `log_sigma = 2 tanh(s / 2)`:

    forward: `y2 = t + exp(log_sigma) * x2`, log-det `+sum(log_sigma)`;
    inverse: `x2 = (y2 - t) * exp(-log_sigma)`, log-det `-sum(log_sigma)`.

  `net` is any linen module called as `net(h, train=train)` with `h` channels-last.
  """
  net: nn.Module

  @nn.compact
  def __call__(self, x: Array, inverse: bool = False, *, context: Optional[Array] = None,
               train: bool = False, **unused: Any) -> Tuple[Array, Array]:
    check_image(x, 'AffineCoupling')
    c = x.shape[-1]
    if c < 2:
      raise ValueError(f'AffineCoupling: needs at least 2 channels to split, got shape {x.shape}')
    c1 = c - c // 2
    x1, x2 = x[..., :c1], x[..., c1:]
    if context is not None and (getattr(context, 'ndim', 0) != 4
                                or context.shape[:-1] != x.shape[:-1]):
      raise ValueError(f'AffineCoupling: context must be (N, H, W, C_ctx) with (N, H, W) = '
                       f'{x.shape[:-1]} like the input, got context shape '
                       f'{getattr(context, "shape", None)}')
    h = x1 if context is None else jnp.concatenate([x1, context.astype(x1.dtype)], axis=-1)
    out = self.net(h, train=train)
    if out.shape[-1] != 2 * x2.shape[-1]:
      raise ValueError(f'AffineCoupling: conditioner returned {out.shape[-1]} channels, '
                       f'expected 2 * {x2.shape[-1]} (interleaved scale, shift)')
    s, t = out[..., 0::2], out[..., 1::2]
    log_sigma = bounded_log_scale(s)
    if inverse:
      y2 = (x2 - t) * jnp.exp(-log_sigma)
      ld = -sum_except_batch(log_sigma)
    else:
      y2 = t + jnp.exp(log_sigma) * x2
      ld = sum_except_batch(log_sigma)
    return jnp.concatenate([x1, y2], axis=-1), ld
