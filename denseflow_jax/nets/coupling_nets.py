"""Conditioner networks for the affine couplings and the cross-unit noise nets.

Hyperparameters after the channel counts are keyword-only (`DenseFlowCouplingNet(out, mid,
num_landmarks=4, pinv_iterations=6)`), so two integers cannot be swapped silently.

Precision: every net here takes a keyword-only `compute_dtype` (None = compute in the input's
dtype, the default; `jnp.bfloat16` for mixed precision). The input is cast to it at the net's
entry, the parameters (stored in float32) are cast at use by the layers, BatchNorm keeps its
statistics in float32 (`layers.BatchNorm`), and the output is cast back to the input's dtype,
so whatever the net feeds (a coupling's scale and shift, a log-det) is computed in float32.
Inside `with float32_nets():` every net ignores its `compute_dtype` and computes in the input's
dtype (what `DenseFlow.encode` / `decode` use, so that a bfloat16 model still inverts exactly).
"""
import contextlib
import contextvars
import dataclasses
from typing import Any, Iterator, Optional

import flax.linen as nn
import jax.numpy as jnp

from denseflow_jax.nets.attention import NystromAttention
from denseflow_jax.nets.dense_block import DenseBlock
from denseflow_jax.nets.layers import Array, BatchNorm, Conv2x2Stride2, Conv3x3, PointwiseConv


_FLOAT32_NETS = contextvars.ContextVar('denseflow_jax_float32_nets', default=False)


@contextlib.contextmanager
def float32_nets() -> Iterator[None]:
  """Within the block, nets built with a `compute_dtype` compute in their input's dtype instead.

  Read when a net is traced, so enter it inside the traced function (as `DenseFlow.encode` and
  `decode` do): a function jitted outside the block keeps the choice it was traced with.
  Reduced precision makes a net a discontinuous function of its input (rounding to bfloat16),
  so the inverse pass would not see bit for bit the net outputs of the forward pass; with
  float32 nets the flow inverts to float32 round-off, which the final floor to integers absorbs.
  """
  token = _FLOAT32_NETS.set(True)
  try:
    yield
  finally:
    _FLOAT32_NETS.reset(token)


def to_compute(x: Array, compute_dtype: Optional[Any]) -> Array:
  """`x` cast to `compute_dtype`; `x` itself when `compute_dtype` is None or inside
  `float32_nets()`."""
  if compute_dtype is None or _FLOAT32_NETS.get():
    return x
  return x.astype(compute_dtype)


class DenseAttentionFusion(nn.Module):
  """Dense block || Nystrom attention on the same `m`-channel map, fused.

  `concat(attention(h), dense(h))` -> BatchNorm -> ReLU -> 1x1 conv `2m -> m` (no bias).
  """
  mid_channels: int
  _: dataclasses.KW_ONLY
  dense_depth: int = 7
  dense_growth: int = 64
  num_landmarks: int = 4
  pinv_iterations: int = 6
  attention_layout: str = 'published'
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, h: Array, train: bool = False) -> Array:
    m = self.mid_channels
    att = NystromAttention(m, num_landmarks=self.num_landmarks, iterations=self.pinv_iterations,
                           layout=self.attention_layout, name='attention')(h)
    dense = DenseBlock(m, depth=self.dense_depth, growth=self.dense_growth, name='dense')(h)
    fused = jnp.concatenate([att, dense], axis=-1)
    bn = BatchNorm(momentum=self.bn_momentum, epsilon=self.bn_epsilon, name='bn')
    fused = nn.relu(bn(fused, train=train))
    return PointwiseConv(m, use_bias=False, name='mix')(fused)


class DenseFlowCouplingNet(nn.Module):
  """DenseFlow's coupling network: 1x1 `c_in -> m`, dense||attention fusion, zero-init 1x1.

  Input `(N, H, W, c_in)`; output `(N, H, W, out_channels)` (interleaved scale, shift). The last
  conv is zero-initialised so every coupling starts as the identity.
  """
  out_channels: int
  mid_channels: int
  _: dataclasses.KW_ONLY
  dense_depth: int = 7
  dense_growth: int = 64
  num_landmarks: int = 4
  pinv_iterations: int = 6
  attention_layout: str = 'published'
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  compute_dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    h = PointwiseConv(self.mid_channels, name='proj')(to_compute(x, self.compute_dtype))
    h = DenseAttentionFusion(
        self.mid_channels, dense_depth=self.dense_depth, dense_growth=self.dense_growth,
        num_landmarks=self.num_landmarks, pinv_iterations=self.pinv_iterations,
        attention_layout=self.attention_layout, bn_momentum=self.bn_momentum,
        bn_epsilon=self.bn_epsilon, name='fusion')(h, train=train)
    return PointwiseConv(self.out_channels, zero_init=True, name='out')(h).astype(x.dtype)


class GlowCouplingNet(nn.Module):
  """Glow's coupling network (ablation): 3x3 -> ReLU -> 1x1 -> ReLU -> zero-init 3x3."""
  out_channels: int
  _: dataclasses.KW_ONLY
  hidden: int = 512
  compute_dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    h = nn.relu(Conv3x3(self.hidden, name='conv_in')(to_compute(x, self.compute_dtype)))
    h = nn.relu(PointwiseConv(self.hidden, name='conv_mid')(h))
    return Conv3x3(self.out_channels, zero_init=True, name='conv_out')(h).astype(x.dtype)


class NoiseNet(nn.Module):
  """Cross-unit noise net g: 3x3 conv `c -> 4c` (bias) -> ReLU -> zero-init 1x1 `4c -> 2k`.

  Output channels `[mu (k), s (k)]` as consecutive halves. No BatchNorm.
  """
  growth: int
  _: dataclasses.KW_ONLY
  compute_dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    h = nn.relu(Conv3x3(4 * x.shape[-1], name='conv_in')(to_compute(x, self.compute_dtype)))
    return PointwiseConv(2 * self.growth, zero_init=True, name='conv_out')(h).astype(x.dtype)


class ContextNet(nn.Module):
  """Dequantizer context net on integer images `(N, H, W, C)` -> `(N, H/2, W/2, channels)`.

  `2x / (2^bits - 1) - 1`, dense block `C -> channels` (depth 4, growth 16, gated),
  2x2 stride-2 conv, dense block `channels -> channels` (same pattern). No residuals.
  """
  num_bits: int = 8
  channels: int = 64
  _: dataclasses.KW_ONLY
  depth: int = 4
  growth: int = 16
  compute_dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: Array, dtype=jnp.float32) -> Array:
    """Output in `dtype` (the scaling `2x / (2^bits - 1) - 1` is done in `dtype` too)."""
    h = 2.0 * x.astype(dtype) / (2 ** self.num_bits - 1) - 1.0
    h = to_compute(h, self.compute_dtype)
    h = DenseBlock(self.channels, depth=self.depth, growth=self.growth, name='dense_in')(h)
    h = Conv2x2Stride2(self.channels, name='down')(h)
    return DenseBlock(self.channels, depth=self.depth, growth=self.growth,
                      name='dense_out')(h).astype(dtype)


class ConditionalCouplingNet(nn.Module):
  """Dequantizer coupling net: 1x1 `-> 64`, residual dense block (depth 4, growth 64), zero 1x1."""
  out_channels: int
  _: dataclasses.KW_ONLY
  mid_channels: int = 64
  depth: int = 4
  growth: int = 64
  compute_dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    h = PointwiseConv(self.mid_channels, name='proj')(to_compute(x, self.compute_dtype))
    h = DenseBlock(self.mid_channels, depth=self.depth, growth=self.growth, residual=True,
                   name='dense')(h)
    return PointwiseConv(self.out_channels, zero_init=True, name='out')(h).astype(x.dtype)
