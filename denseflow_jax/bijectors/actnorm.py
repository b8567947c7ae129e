"""ActNorm: per-channel affine normalisation with data-dependent initialisation."""
from typing import Any, Tuple

import flax.linen as nn
import jax.numpy as jnp

from denseflow_jax.bijectors.base import Array, Bijector, check_image


class ActNorm(Bijector):
  """Per-channel `y = (x - shift) * exp(-log_scale)` (Glow's ActNorm, published convention).

  Forward log-det: `-H * W * sum_c log_scale_c`; inverse `x = y * exp(log_scale) + shift`
  with the opposite sign. Parameters `shift`, `log_scale` have shape `(C,)`.

  Data-dependent init: when the module is initialised (`model.init(rngs, x)`), `shift` is the
  per-channel mean of the init batch and `log_scale = log(std + 1e-6)` with the unbiased
  (n - 1) standard deviation over batch and space, so the output starts with zero mean and unit
  variance per channel. There is no "initialized" flag: init happens once, at `init` time.
  Under `jax.jit` with a sharded batch the statistics are over the global batch.
  """
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x: Array, inverse: bool = False, **unused: Any) -> Tuple[Array, Array]:
    check_image(x, 'ActNorm')
    c = x.shape[-1]

    def init_shift(_, shape):
      if inverse:
        return jnp.zeros(shape, x.dtype)
      return jnp.mean(x, axis=(0, 1, 2))

    def init_log_scale(_, shape):
      if inverse:
        return jnp.zeros(shape, x.dtype)
      return jnp.log(jnp.std(x, axis=(0, 1, 2), ddof=1) + self.eps)

    shift = self.param('shift', init_shift, (c,))
    log_scale = self.param('log_scale', init_log_scale, (c,))
    shift, log_scale = shift.astype(x.dtype), log_scale.astype(x.dtype)
    hw = x.shape[1] * x.shape[2]
    ld = hw * jnp.sum(log_scale)
    if inverse:
      y = x * jnp.exp(log_scale) + shift
    else:
      y = (x - shift) * jnp.exp(-log_scale)
      ld = -ld
    return y, jnp.broadcast_to(ld, (x.shape[0],))
