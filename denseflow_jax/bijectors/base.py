"""The bijector contract shared by every invertible layer.

A bijector is a Flax linen module whose `__call__(x, inverse=False, **kwargs)` returns
`(y, log_det)`. `forward(x)` maps data to latent and returns `log|det dy/dx|` per example;
`inverse(y)` maps latent to data and returns `log|det dx/dy|` per example, so for an exact
bijection `forward` and `inverse` log-dets sum to zero. Arrays are channels-last
`(N, H, W, C)`; `log_det` has shape `(N,)`.

Bijectors accept and ignore conditioning keywords they do not use (`context`, `train`,
`temperature`, ...), so a `Chain` can hand the same keywords to every member.

Differences from distrax: our `forward` / `inverse` return `(value, log_det)` (distrax's
return the value only; `forward_and_log_det` / `inverse_and_log_det` have the same meaning in
both), and our `forward` is the normalizing direction, data -> latent, while
`distrax.Transformed` pushes latents through its bijector's `forward`.
`denseflow_jax.bijectors.to_distrax` wraps a bijector as a `distrax.Bijector` with the
direction stated explicitly.
"""
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


class Bijector(nn.Module):
  """Base class: subclasses implement `__call__(x, inverse=False, **kwargs)`."""

  def forward(self, x: Array, **kwargs: Any) -> Tuple[Array, Array]:
    """Data -> latent. Returns `(y, log|det dy/dx|)` with `log_det` of shape `(N,)`."""
    return self(x, inverse=False, **kwargs)

  def inverse(self, y: Array, **kwargs: Any) -> Tuple[Array, Array]:
    """Latent -> data. Returns `(x, log|det dx/dy|)` with `log_det` of shape `(N,)`."""
    return self(y, inverse=True, **kwargs)

  # distrax / TFP style names.
  def forward_and_log_det(self, x: Array, **kwargs: Any) -> Tuple[Array, Array]:
    """Alias of `forward`."""
    return self.forward(x, **kwargs)

  def inverse_and_log_det(self, y: Array, **kwargs: Any) -> Tuple[Array, Array]:
    """Alias of `inverse`."""
    return self.inverse(y, **kwargs)


def check_image(x: Array, name: str, *, channels: int | None = None) -> None:
  """Raises ValueError unless `x` is a rank-4 `(N, H, W, C)` array (optionally with C channels)."""
  shape = getattr(x, 'shape', None)
  if shape is None or len(shape) != 4:
    raise ValueError(f'{name}: expected a rank-4 (N, H, W, C) array, got shape {shape}')
  if channels is not None and shape[-1] != channels:
    raise ValueError(f'{name}: expected {channels} channels (last axis), got shape {shape}')


def zeros_log_det(x: Array) -> Array:
  """A `(N,)` zero log-det in the float dtype of `x`."""
  dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
  return jnp.zeros((x.shape[0],), dtype)


def sum_except_batch(x: Array) -> Array:
  """Sums every axis but the first: `(N, ...) -> (N,)`."""
  return jnp.sum(x.reshape(x.shape[0], -1), axis=1)


def std_normal_log_prob(x: Array) -> Array:
  """Elementwise log N(x; 0, 1)."""
  return -0.5 * (x * x) - 0.5 * jnp.log(2.0 * jnp.pi).astype(x.dtype)
