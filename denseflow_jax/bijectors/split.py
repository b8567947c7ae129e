"""Squeeze-and-drop transition between DenseFlow blocks."""
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp

from denseflow_jax.bijectors.base import (Array, Bijector, check_image, std_normal_log_prob,
                                          sum_except_batch)
from denseflow_jax.bijectors.squeeze import squeeze2x2, unsqueeze2x2


class SqueezeAndDrop(Bijector):
  """Squeeze `(N, H, W, C) -> (N, H/2, W/2, 4C)`, keep the first `2C` channels, drop the rest.

  Forward returns the kept half and, as `log_det`, the log-density of the dropped half under a
  fixed standard normal (a multi-scale "factor out" with a N(0, I) prior, as published).
  `split(x)` also returns the dropped half (for `encode`). Inverse: given `dropped` it rebuilds
  the input exactly; otherwise it draws the dropped half from `N(0, T^2 I)` with the `noise` rng
  (temperature `T`, default 1) and returns `-log N(dropped; 0, I)`, so forward and inverse
  log-dets sum to 0 for the same dropped half.
  """

  def split(self, x: Array) -> Tuple[Array, Array, Array]:
    """`(kept, dropped, log N(dropped))` for an input `(N, H, W, C)`."""
    check_image(x, 'SqueezeAndDrop')
    y = squeeze2x2(x)
    c = y.shape[-1] // 2
    kept, dropped = y[..., :c], y[..., c:]
    return kept, dropped, sum_except_batch(std_normal_log_prob(dropped))

  def __call__(self, x: Array, inverse: bool = False, *, dropped: Optional[Array] = None,
               temperature: float = 1.0, **unused: Any) -> Tuple[Array, Array]:
    if not inverse:
      kept, _, ld = self.split(x)
      return kept, ld
    check_image(x, 'SqueezeAndDrop.inverse')
    if dropped is None:
      eps = jax.random.normal(self.make_rng('noise'), x.shape, x.dtype)
      dropped = temperature * eps
    elif dropped.shape != x.shape:
      raise ValueError(f'SqueezeAndDrop.inverse: dropped has shape {dropped.shape}, expected '
                       f'{x.shape} (the shape of the kept half)')
    ld = -sum_except_batch(std_normal_log_prob(dropped))
    return unsqueeze2x2(jnp.concatenate([x, dropped.astype(x.dtype)], axis=-1)), ld
