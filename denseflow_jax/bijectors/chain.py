"""Composition of bijectors."""
from typing import Any, Sequence, Tuple

import flax.linen as nn

from denseflow_jax.bijectors.base import Array, Bijector, zeros_log_det


class Chain(Bijector):
  """Applies `bijectors` in list order on `forward` and in reverse order on `inverse`.

  `Chain([a, b]).forward(x)` is `b.forward(a.forward(x))`: the list is in data -> latent
  order. `distrax.Chain` applies its list in reverse (`distrax.Chain([f, g]).forward(x) =
  f(g(x))`), so our list read in the latent -> data direction is the distrax list: with
  `to_distrax(..., direction='latent_to_data')`, `Chain([a, b])` equals
  `distrax.Chain([A, B])`. The log-det is the sum of the members' log-dets. Keyword arguments
  (`context`, `train`, ...) are passed to every member; members ignore the ones they do not use.
  """
  bijectors: Sequence[nn.Module]

  def __call__(self, x: Array, inverse: bool = False, **kwargs: Any) -> Tuple[Array, Array]:
    total = zeros_log_det(x)
    order = reversed(self.bijectors) if inverse else self.bijectors
    for b in order:
      x, ld = b(x, inverse=inverse, **kwargs)
      total = total + ld
    return x, total
