"""Densely connected blocks (the local branch of DenseFlow's coupling network)."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from denseflow_jax.nets.layers import Array, Conv3x3, PointwiseConv


class DenseLayer(nn.Module):
  """`x -> concat(x, relu(conv3x3(relu(conv1x1(x)))))`: 1x1 (c -> c), 3x3 (c -> growth)."""
  growth: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    h = nn.relu(PointwiseConv(c, name='conv1x1')(x))
    h = nn.relu(Conv3x3(self.growth, name='conv3x3')(h))
    return jnp.concatenate([x, h], axis=-1)


class GatedConv1x1(nn.Module):
  """1x1 conv to `3 * features` channels split in thirds `(a, b, c)`: `a + b * sigmoid(c)`."""
  features: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = PointwiseConv(3 * self.features, name='conv')(x)
    a, b, c = jnp.split(h, 3, axis=-1)
    return a + b * jax.nn.sigmoid(c)


class DenseBlock(nn.Module):
  """`depth` dense layers (channels `c, c + g, ..., c + depth * g`), then a gated 1x1 conv.

  Input `(N, H, W, C_in)`, output `(N, H, W, out_channels)`. With `residual=True` the block
  returns `x + block(x)` (needs `out_channels == C_in`), as in the dequantizer's conditional
  coupling net; DenseFlow's coupling nets and the context net use no residual. `residual` is
  keyword-only.
  """
  out_channels: int
  depth: int
  growth: int
  _: dataclasses.KW_ONLY
  residual: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = x
    for i in range(self.depth):
      h = DenseLayer(self.growth, name=f'layer_{i}')(h)
    out = GatedConv1x1(self.out_channels, name='gate')(h)
    if self.residual:
      if x.shape[-1] != self.out_channels:
        raise ValueError(f'DenseBlock: residual needs out_channels == input channels, got '
                         f'{self.out_channels} and input shape {x.shape}')
      out = x + out
    return out
