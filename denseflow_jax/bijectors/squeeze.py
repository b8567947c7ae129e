"""Volume-preserving reshapes: 2x2 squeeze / unsqueeze and the channel swap."""
from typing import Any, Tuple

import jax.numpy as jnp

from denseflow_jax.bijectors.base import Array, Bijector, check_image, zeros_log_det


def squeeze2x2(x: Array) -> Array:
  """Space-to-depth `(N, H, W, C) -> (N, H/2, W/2, 4C)`.

  Pixel order (the published one): `out[n, h, w, 4c + 2i + j] = x[n, 2h + i, 2w + j, c]`,
  so the four sub-pixels of an input channel stay together.
  """
  check_image(x, 'squeeze')
  n, h, w, c = x.shape
  if h % 2 or w % 2:
    raise ValueError(f'squeeze: height and width must be even, got shape {x.shape}')
  x = x.reshape(n, h // 2, 2, w // 2, 2, c)
  return x.transpose(0, 1, 3, 5, 2, 4).reshape(n, h // 2, w // 2, 4 * c)


def unsqueeze2x2(x: Array) -> Array:
  """Depth-to-space `(N, H, W, 4C) -> (N, 2H, 2W, C)`, the exact inverse of `squeeze2x2`."""
  check_image(x, 'unsqueeze')
  n, h, w, c4 = x.shape
  if c4 % 4:
    raise ValueError(f'unsqueeze: channels must be divisible by 4, got shape {x.shape}')
  c = c4 // 4
  x = x.reshape(n, h, w, c, 2, 2)
  return x.transpose(0, 1, 4, 2, 5, 3).reshape(n, 2 * h, 2 * w, c)


class Squeeze(Bijector):
  """2x2 space-to-depth (see `squeeze2x2` for the order); inverse is `unsqueeze2x2`. Log-det 0."""

  def __call__(self, x: Array, inverse: bool = False, **unused: Any) -> Tuple[Array, Array]:
    y = unsqueeze2x2(x) if inverse else squeeze2x2(x)
    return y, zeros_log_det(x)


class Unsqueeze(Bijector):
  """2x2 depth-to-space, the inverse of `Squeeze` (forward is `unsqueeze2x2`). Log-det 0."""

  def __call__(self, x: Array, inverse: bool = False, **unused: Any) -> Tuple[Array, Array]:
    y = squeeze2x2(x) if inverse else unsqueeze2x2(x)
    return y, zeros_log_det(x)


class ChannelSwap(Bijector):
  """Exchanges the channel halves: forward `y = [x[C//2:], x[:C//2]]` (second half first).

  For even C this is the published swap; for odd C the inverse splits at the matching point,
  so it is an exact permutation for every C. Log-det 0.
  """

  def __call__(self, x: Array, inverse: bool = False, **unused: Any) -> Tuple[Array, Array]:
    check_image(x, 'ChannelSwap')
    c = x.shape[-1]
    h = c // 2 if not inverse else c - c // 2
    return jnp.concatenate([x[..., h:], x[..., :h]], axis=-1), zeros_log_det(x)
