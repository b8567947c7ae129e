"""Convolution layers, with a 3x3 convolution gradient tuned for XLA:CPU (README "Speed").

These are plain (non-invertible) network layers. `PointwiseConv` is the 1x1 convolution layer
of the conditioner networks; the invertible 1x1 convolution of the flow is the bijector
`denseflow_jax.bijectors.Conv1x1`.

1x1 convolutions are 2-D matmuls on `(N*H*W, C)` views. The 3x3 convolution keeps `lax.conv`
for the forward pass; its backward pass is chosen per platform when the program is lowered
(`conv3x3`): on CPU the weight gradient is one matmul over the 9 shifted output gradients and
the small-map input gradient another (`conv3x3_tuned`), which XLA:CPU runs much faster than its
default lowering; on GPU and TPU it is XLA's own convolution gradient (`conv3x3_xla`, plain
`lax.conv_general_dilated` differentiated by JAX). `conv_backward_mode` (the model config's
`model.conv_backward`) forces either path.
Initialisation follows PyTorch's defaults for `nn.Conv2d` (uniform in +-1/sqrt(fan_in) for
weights and biases), so training starts from the same distribution as the published model.
"""
import contextlib
import contextvars
import dataclasses
from typing import Callable, Iterator, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from denseflow_jax import param_init
from denseflow_jax.config_check import check_conv_backward

Array = jax.Array


def torch_uniform(fan_in: int) -> Callable[..., Array]:
  """PyTorch's default conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

  Drawn with the other random parameters by `param_init.initial_variables` (`drawn_as`).
  """
  bound = 1.0 / (fan_in ** 0.5)
  @param_init.drawn_as('uniform', bound)
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def matmul_channels(x: Array, kernel: Array) -> Array:
  """`y[..., o] = sum_i x[..., i] kernel[i, o]` via a 2-D `(prod(batch dims), C)` matmul."""
  shape = x.shape
  y = x.reshape(-1, shape[-1]) @ kernel
  return y.reshape(shape[:-1] + (kernel.shape[-1],))


class PointwiseConv(nn.Module):
  """1x1 convolution layer on channels-last input: `y = x @ kernel + bias`, kernel `(C_in, C_out)`.

  Not invertible (any `C_out`); the invertible 1x1 convolution is `bijectors.Conv1x1`.
  """
  features: int
  _: dataclasses.KW_ONLY
  use_bias: bool = True
  zero_init: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    w_init = nn.initializers.zeros if self.zero_init else torch_uniform(c)
    kernel = self.param('kernel', w_init, (c, self.features)).astype(x.dtype)
    y = matmul_channels(x, kernel)
    if self.use_bias:
      b_init = nn.initializers.zeros if self.zero_init else torch_uniform(c)
      y = y + self.param('bias', b_init, (self.features,)).astype(x.dtype)
    return y


def _conv_same(x: Array, w: Array) -> Array:
  return jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def conv3x3_xla(x: Array, w: Array) -> Array:
  """3x3 'SAME' convolution (NHWC, HWIO, stride 1, no bias) with JAX's own gradient."""
  return _conv_same(x, w)


@jax.custom_vjp
def conv3x3_tuned(x: Array, w: Array) -> Array:
  """`conv3x3_xla` with the backward pass tuned for XLA:CPU on every platform (`_tuned_bwd`)."""
  return _conv_same(x, w)


@jax.custom_vjp
def conv3x3(x: Array, w: Array) -> Array:
  """3x3 'SAME' convolution, NHWC input, HWIO kernel, stride 1, no bias.

  The forward pass is `lax.conv_general_dilated`. The backward pass is chosen when the program
  is lowered (`jax.lax.platform_dependent`): `conv3x3_tuned`'s on CPU, XLA's convolution
  gradient (the same operations as differentiating `conv3x3_xla`) on every other platform.
  Reverse mode only (a custom VJP).
  """
  return _conv_same(x, w)


def _conv3x3_fwd(x, w):
  return _conv_same(x, w), (x, w)


# Below this many output rows (N * H * W) the input gradient is one matmul with the stacked,
# shifted output gradient that the weight gradient builds anyway; above it a forward conv is
# faster (measured on XLA:CPU with the oneDNN flags: 8x8 and 4x4 maps at batch 8 gain 15-37%,
# 16x16 at batch 8 and 8x8 at batch 64 are even or slower).
_DX_MATMUL_MAX_ROWS = 1024


def _shifted_grads(g: Array) -> Array:
  """`(N*H*W, 9*O)`: column block `(i, j)` holds `g[n, h - i + 1, w - j + 1, :]` (zero outside)."""
  n, h, wd, o = g.shape
  gp = jnp.pad(g, ((0, 0), (1, 1), (1, 1), (0, 0)))
  shifted = [gp[:, 2 - i:2 - i + h, 2 - j:2 - j + wd, :] for i in range(3) for j in range(3)]
  return jnp.stack(shifted, axis=3).reshape(n * h * wd, 9 * o)


def _tuned_bwd(x, w, g):
  """(dx, dw) of the 3x3 'SAME' conv, written for XLA:CPU's fast paths."""
  n, h, wd, o = g.shape
  c = x.shape[-1]
  # dW[i, j, c, o] = sum_{n,h,w} x[n, h, w, c] * g[n, h - i + 1, w - j + 1, o]: the 9 shifted
  # copies of the zero-padded gradient, contracted with the input over pixels in one matmul.
  gs = _shifted_grads(g)
  dw = x.reshape(n * h * wd, c).T @ gs                      # (C, 9 * O)
  dw = dw.reshape(c, 3, 3, o).transpose(1, 2, 0, 3)
  # dx[p, c] = sum_{i,j,o} gs[p, (i, j, o)] * w[i, j, c, o].
  if n * h * wd <= _DX_MATMUL_MAX_ROWS:
    dx = (gs @ w.transpose(0, 1, 3, 2).reshape(9 * o, c)).reshape(x.shape)
  else:
    # The 'SAME' conv of g with the spatially flipped, in/out-transposed kernel, written as a
    # plain forward conv rather than through jax.vjp of the forward: inside a while loop
    # (`nn.scan` over modules) XLA:CPU runs the transposed-conv form that jax.vjp emits on a
    # slow path (~40x slower at 16x16, c=400), while a forward conv keeps its fast one.
    dx = _conv_same(g, jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2))
  return dx.astype(x.dtype), dw.astype(w.dtype)


def _xla_bwd(x, w, g):
  """(dx, dw) as JAX differentiates `lax.conv_general_dilated`: XLA's convolution gradient."""
  return jax.vjp(_conv_same, x, w)[1](g)


def _conv3x3_tuned_bwd(res, g):
  return _tuned_bwd(*res, g)


def _conv3x3_bwd(res, g):
  return jax.lax.platform_dependent(*res, g, cpu=_tuned_bwd, default=_xla_bwd)


conv3x3_tuned.defvjp(_conv3x3_fwd, _conv3x3_tuned_bwd)
conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)

#: Values of `model.conv_backward` (`config_check.CONV_BACKWARD_MODES`): the 3x3 convolution each
#: one uses.
CONV_BACKWARD = {'auto': conv3x3, 'tuned': conv3x3_tuned, 'xla': conv3x3_xla}
_CONV_BACKWARD_MODE: contextvars.ContextVar[str] = contextvars.ContextVar(
    'denseflow_conv_backward', default='auto')


@contextlib.contextmanager
def conv_backward_mode(mode: str) -> Iterator[None]:
  """Within the block, `Conv3x3` layers without their own `conv_backward` use `mode`.

  `'auto'` (the default outside any block): `conv3x3`, tuned on CPU and XLA's gradient
  elsewhere; `'tuned'`: `conv3x3_tuned` on every platform; `'xla'`: `conv3x3_xla` everywhere.
  Read when a layer is traced, so it must enclose the tracing (`jit`, `lower`, `export`), not
  the execution. `DenseFlow` enters it with its config's `model.conv_backward`.
  """
  token = _CONV_BACKWARD_MODE.set(check_conv_backward(mode))
  try:
    yield
  finally:
    _CONV_BACKWARD_MODE.reset(token)


class Conv3x3(nn.Module):
  """3x3 convolution, padding 1, stride 1, kernel HWIO `(3, 3, C_in, C_out)`.

  `conv_backward` (keyword-only): `'auto'`, `'tuned'` or `'xla'` (see `conv_backward_mode`);
  None (the default) takes the enclosing `conv_backward_mode`. It selects the gradient's
  implementation only: parameters and forward values do not depend on it.
  """
  features: int
  _: dataclasses.KW_ONLY
  use_bias: bool = True
  zero_init: bool = False
  conv_backward: Optional[str] = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    mode = self.conv_backward or _CONV_BACKWARD_MODE.get()
    conv = CONV_BACKWARD[check_conv_backward(mode)]
    w_init = nn.initializers.zeros if self.zero_init else torch_uniform(9 * c)
    kernel = self.param('kernel', w_init, (3, 3, c, self.features)).astype(x.dtype)
    y = conv(x, kernel)
    if self.use_bias:
      b_init = nn.initializers.zeros if self.zero_init else torch_uniform(9 * c)
      y = y + self.param('bias', b_init, (self.features,)).astype(x.dtype)
    return y


class Conv2x2Stride2(nn.Module):
  """2x2 convolution with stride 2 (halves H and W), kernel HWIO `(2, 2, C_in, C_out)`."""
  features: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    kernel = self.param('kernel', torch_uniform(4 * c), (2, 2, c, self.features)).astype(x.dtype)
    bias = self.param('bias', torch_uniform(4 * c), (self.features,)).astype(x.dtype)
    y = jax.lax.conv_general_dilated(x, kernel, (2, 2), 'VALID',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return y + bias


class BatchNorm(nn.Module):
  """BatchNorm over (N, H, W) per channel with PyTorch's semantics.

  `train=True`: normalise with the batch mean and biased variance and update the running
  averages (`batch_stats` collection: `mean`, `var`) as PyTorch does, including the unbiased
  running variance: `running = momentum * running + (1 - momentum) * batch` (flax convention:
  momentum 0.9 is PyTorch's 0.1). `train=False`: normalise with the running averages, a
  deterministic function of the input. Under `jax.jit` with a sharded batch the statistics are
  those of the global batch. Parameters `scale` (init 1) and `bias` (init 0). `momentum` and
  `epsilon` are keyword-only. A bfloat16 input is normalised in float32 (statistics included)
  and the result cast back to bfloat16; float32 and float64 inputs stay in their own dtype.
  """
  _: dataclasses.KW_ONLY
  momentum: float = 0.9
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    c = x.shape[-1]
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
    in_dtype = x.dtype
    x = x.astype(jnp.promote_types(in_dtype, jnp.float32))  # bfloat16 -> float32, else as is
    scale = self.param('scale', nn.initializers.ones, (c,)).astype(x.dtype)
    bias = self.param('bias', nn.initializers.zeros, (c,)).astype(x.dtype)
    if train:
      flat = x.reshape(-1, c)
      mean = jnp.mean(flat, axis=0)
      var = jnp.mean(jnp.square(flat - mean), axis=0)
      if not self.is_initializing():
        n = flat.shape[0]
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * jax.lax.stop_gradient(mean).astype(
            ra_mean.value.dtype)
        unbiased = jax.lax.stop_gradient(var) * (n / max(n - 1, 1))
        ra_var.value = m * ra_var.value + (1 - m) * unbiased.astype(ra_var.value.dtype)
    else:
      mean, var = ra_mean.value.astype(x.dtype), ra_var.value.astype(x.dtype)
    return ((x - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias).astype(in_dtype)
