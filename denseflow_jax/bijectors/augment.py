"""Cross-unit coupling: incremental augmentation of the latent with conditioned noise."""
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from denseflow_jax.bijectors.base import (Array, Bijector, check_image, std_normal_log_prob,
                                          sum_except_batch, zeros_log_det)
from denseflow_jax.bijectors.coupling import bounded_log_scale


class CrossUnitCoupling(Bijector):
  """Appends `growth` channels `mu + sigma * e` to the latent (DenseFlow's augmentation).

  `(mu, s) = noise_net(cond)` split into consecutive halves (mu first, **not** interleaved),
  `log sigma = 2 tanh(s / 2)`, `e ~ N(0, I)` of shape `(N, H, W, growth)` drawn from the `noise`
  rng (or passed as `eta`). Forward output `[x, mu + sigma * e]` with `log_det` holding the
  variational lower-bound term `sum(log sigma) - sum(log N(e; 0, I))`.

  `plain=True` (ablation): white noise, `mu = 0`, `sigma = 1`, no network.

  Inverse drops the last `growth` channels. Its `log_det` is the negated forward term when
  `cond` is given (so the two sum to 0); without `cond` (sampling, where the noise net is never
  evaluated) it is 0.
  """
  growth: int
  noise_net: Optional[nn.Module] = None
  plain: bool = False

  def _mu_log_sigma(self, cond: Optional[Array], like: Array) -> Tuple[Array, Array]:
    shape = like.shape[:-1] + (self.growth,)
    if self.plain:
      z = jnp.zeros(shape, like.dtype)
      return z, z
    if cond is None:
      raise ValueError('CrossUnitCoupling: pre-conditioned noise needs `cond` (the tensor the '
                       'noise net sees); got None')
    check_image(cond, 'CrossUnitCoupling cond')
    out = self.noise_net(cond)
    if out.shape[:-1] != shape[:-1] or out.shape[-1] != 2 * self.growth:
      raise ValueError(f'CrossUnitCoupling: noise net returned shape {out.shape}, expected '
                       f'{shape[:-1] + (2 * self.growth,)}')
    return out[..., :self.growth], bounded_log_scale(out[..., self.growth:])

  @nn.compact
  def __call__(self, x: Array, inverse: bool = False, *, cond: Optional[Array] = None,
               eta: Optional[Array] = None, **unused: Any) -> Tuple[Array, Array]:
    check_image(x, 'CrossUnitCoupling')
    if inverse:
      if x.shape[-1] <= self.growth:
        raise ValueError(f'CrossUnitCoupling.inverse: input has {x.shape[-1]} channels, needs '
                         f'more than growth={self.growth}')
      base, extra = x[..., :-self.growth], x[..., -self.growth:]
      if cond is None and not self.plain:
        return base, zeros_log_det(x)
      mu, log_sigma = self._mu_log_sigma(cond, base)
      e = (extra - mu) * jnp.exp(-log_sigma)
      return base, -(sum_except_batch(log_sigma) - sum_except_batch(std_normal_log_prob(e)))
    mu, log_sigma = self._mu_log_sigma(cond, x)
    if eta is None:
      eta = jax.random.normal(self.make_rng('noise'), mu.shape, x.dtype)
    elif eta.shape != mu.shape:
      raise ValueError(f'CrossUnitCoupling: eta has shape {eta.shape}, expected {mu.shape}')
    eta = eta.astype(x.dtype)
    extra = mu + jnp.exp(log_sigma) * eta
    ld = sum_except_batch(log_sigma) - sum_except_batch(std_normal_log_prob(eta))
    return jnp.concatenate([x, extra], axis=-1), ld
