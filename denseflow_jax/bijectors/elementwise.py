"""Elementwise bijectors: shift/scale, sigmoid, logit."""
from typing import Any, Tuple

import jax
import jax.numpy as jnp

from denseflow_jax.bijectors.base import Array, Bijector, sum_except_batch


class ShiftScale(Bijector):
  """`y = (x + shift) * scale` with fixed scalars. Log-det `D * log|scale|` (D = dims per example).

  The model's "shift to [-0.5, 0.5]" is `ShiftScale(shift=-0.5, scale=1.0)`.
  """
  shift: float = 0.0
  scale: float = 1.0

  def __call__(self, x: Array, inverse: bool = False, **unused: Any) -> Tuple[Array, Array]:
    if self.scale == 0:
      raise ValueError('ShiftScale: scale must be non-zero, got 0')
    _check_batched(x, 'ShiftScale')
    d = 1
    for s in x.shape[1:]:
      d *= s
    ld = jnp.full((x.shape[0],), d * jnp.log(jnp.abs(jnp.asarray(self.scale, x.dtype))), x.dtype)
    if inverse:
      return x / self.scale - self.shift, -ld
    return (x + self.shift) * self.scale, ld


def _check_batched(x: Array, name: str) -> None:
  """ValueError unless `x` has a leading batch axis (log-dets are per example)."""
  shape = getattr(x, 'shape', None)
  if shape is None or len(shape) < 1:
    raise ValueError(f'{name}: expected an array with a leading batch axis (N, ...), got shape '
                     f'{shape}')


def _log_sigmoid_jacobian(x: Array) -> Array:
  """log sigmoid'(x) = log sigmoid(x) + log sigmoid(-x) = -softplus(-x) - softplus(x)."""
  return -jax.nn.softplus(-x) - jax.nn.softplus(x)


def _sigmoid_fn(x: Array, inverse: bool) -> Tuple[Array, Array]:
  if inverse:
    z = jnp.log(x) - jnp.log1p(-x)
    return z, -sum_except_batch(_log_sigmoid_jacobian(z))
  return jax.nn.sigmoid(x), sum_except_batch(_log_sigmoid_jacobian(x))


class Sigmoid(Bijector):
  """`y = sigmoid(x)` elementwise, R -> (0, 1). Forward log-det `sum log sigmoid'(x)`."""

  def __call__(self, x: Array, inverse: bool = False, **unused: Any) -> Tuple[Array, Array]:
    _check_batched(x, 'Sigmoid')
    return _sigmoid_fn(x, inverse)


class Logit(Bijector):
  """`y = log(x / (1 - x))` elementwise, (0, 1) -> R; the inverse of `Sigmoid`."""

  def __call__(self, x: Array, inverse: bool = False, **unused: Any) -> Tuple[Array, Array]:
    _check_batched(x, 'Logit')
    return _sigmoid_fn(x, not inverse)
