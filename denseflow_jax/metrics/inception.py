"""Inception-v3 of FID (pytorch-fid's variant) in Flax, loaded from pytorch-fid's weights file.

FID scores are comparable across papers only when computed with the same network: the
TensorFlow Inception graph of 2015-12-05, which pytorch-fid ships as the PyTorch state_dict
`pt_inception-2015-12-05-6726825d.pth`. `FIDInception` is that network in NHWC:

- torchvision's Inception-v3 stem (`Conv2d_1a_3x3` .. `Conv2d_4a_3x3`, two 3x3 stride-2 max
  pools without padding) and `Mixed_5b` .. `Mixed_7c`, each conv followed by BatchNorm
  (eps 1e-3) and ReLU, but with the FID graph's differences: the average pools inside the
  Mixed blocks do not count the zero padding, and the last block (`Mixed_7c`) pools its
  pooling branch with a 3x3 *max* pool;
- preprocessing as pytorch-fid: uint8 images divided by 255 in float32, resized to 299x299
  bilinearly with half-pixel centres (`align_corners=False`), then mapped to [-1, 1];
- outputs: the four blocks' activations (after the 73x73 max pool, the 35x35 max pool,
  `Mixed_6e`, and the global average pool); the last, 2048 features per image, is what FID
  uses ("pool3"). The 1008-way classifier in the file is not used.

BatchNorm is folded into the preceding conv when the weights are loaded (in float64), so every
conv is one `lax.conv_general_dilated` with a bias; convolutions and the resize run at
`Precision.HIGHEST` so that GPUs and TPUs give float32 results too.

`load_fid_inception(path)` reads the state_dict with the torch-free reader (zip or legacy
format) and returns `(module, variables)`; `InceptionFeatures` wraps them as a jitted,
device-sharded feature extractor (`denseflow_jax.metrics.FeatureNetwork`).
"""
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from denseflow_jax import torch_reader

INPUT_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3
WEIGHTS_FILE = 'pt_inception-2015-12-05-6726825d.pth'
WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
               + WEIGHTS_FILE)
WEIGHTS_ENV = 'DENSEFLOW_JAX_INCEPTION'
HIGHEST = jax.lax.Precision.HIGHEST


class BasicConv(nn.Module):
  """Conv (BatchNorm folded in: kernel and bias) + ReLU, NHWC; kernel (kh, kw, in, out)."""
  features: int
  kernel: Tuple[int, int]
  stride: int = 1
  padding: Tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_features = x.shape[-1]
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (*self.kernel, in_features, self.features), x.dtype)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), x.dtype)
    (ph, pw) = self.padding
    y = jax.lax.conv_general_dilated(
        x, kernel.astype(x.dtype), (self.stride, self.stride), ((ph, ph), (pw, pw)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=HIGHEST)
    return jax.nn.relu(y + bias.astype(x.dtype))


def max_pool(x: jax.Array, stride: int, pad: int = 0) -> jax.Array:
  """3x3 max pool; padding (if any) never wins (-inf), as torch's MaxPool2d."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1),
                               ((0, 0), (pad, pad), (pad, pad), (0, 0)))


def avg_pool_exclude_pad(x: jax.Array) -> jax.Array:
  """3x3 stride-1 average pool with padding 1 that divides by the number of real pixels."""
  window, strides, pads = (1, 3, 3, 1), (1, 1, 1, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pads)
  ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
  count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, pads)
  return total / count


class InceptionA(nn.Module):
  """Mixed_5b/5c/5d: 1x1, 5x5, double 3x3 and (padding-excluding) avg-pool branches."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, (1, 1), name='branch1x1')(x)
    b5 = BasicConv(48, (1, 1), name='branch5x5_1')(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name='branch5x5_2')(b5)
    b3 = BasicConv(64, (1, 1), name='branch3x3dbl_1')(x)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(b3)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(b3)
    bp = BasicConv(self.pool_features, (1, 1), name='branch_pool')(avg_pool_exclude_pad(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: grid reduction 35 -> 17 (stride-2 3x3, double 3x3, max pool)."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), stride=2, name='branch3x3')(x)
    bd = BasicConv(64, (1, 1), name='branch3x3dbl_1')(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = BasicConv(96, (3, 3), stride=2, name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, max_pool(x, 2)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b..6e: factorised 7x7 branches with `channels_7x7` inner width."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c = self.channels_7x7
    b1 = BasicConv(192, (1, 1), name='branch1x1')(x)
    b7 = BasicConv(c, (1, 1), name='branch7x7_1')(x)
    b7 = BasicConv(c, (1, 7), padding=(0, 3), name='branch7x7_2')(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name='branch7x7_3')(b7)
    bd = BasicConv(c, (1, 1), name='branch7x7dbl_1')(x)
    bd = BasicConv(c, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(bd)
    bd = BasicConv(c, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(bd)
    bd = BasicConv(c, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(bd)
    bp = BasicConv(192, (1, 1), name='branch_pool')(avg_pool_exclude_pad(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a: grid reduction 17 -> 8."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, (1, 1), name='branch3x3_1')(x)
    b3 = BasicConv(320, (3, 3), stride=2, name='branch3x3_2')(b3)
    b7 = BasicConv(192, (1, 1), name='branch7x7x3_1')(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = BasicConv(192, (3, 3), stride=2, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, max_pool(x, 2)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b (avg pool excluding padding) and Mixed_7c (`max_pool_branch`: 3x3 max pool)."""
  max_pool_branch: bool

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, (1, 1), name='branch1x1')(x)
    b3 = BasicConv(384, (1, 1), name='branch3x3_1')(x)
    b3 = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(b3),
                          BasicConv(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(b3)], -1)
    bd = BasicConv(448, (1, 1), name='branch3x3dbl_1')(x)
    bd = BasicConv(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(bd),
                          BasicConv(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(bd)],
                         -1)
    pooled = max_pool(x, 1, pad=1) if self.max_pool_branch else avg_pool_exclude_pad(x)
    bp = BasicConv(192, (1, 1), name='branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) float64 weights of 1-D linear interpolation with half-pixel centres.

  The same sampling as torch's `interpolate(mode='bilinear', align_corners=False)`: output
  pixel i reads input position (i + 0.5) * in / out - 0.5, clamped to [0, in - 1].
  """
  pos = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
  pos = np.clip(pos, 0.0, in_size - 1)
  lo = np.floor(pos).astype(np.int64)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = pos - lo
  weights = np.zeros((out_size, in_size), np.float64)
  np.add.at(weights, (np.arange(out_size), lo), 1.0 - frac)
  np.add.at(weights, (np.arange(out_size), hi), frac)
  return weights


def preprocess(images: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
  """(N, H, W, C) uint8 in [0, 255] (or floats in [0, 1]) -> (N, 299, 299, 3) in [-1, 1].

  One-channel images are repeated to three, as FID tools do for grey-scale data sets.
  """
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'expected images (N, H, W, 1 or 3), got shape {images.shape}')
  if jnp.issubdtype(images.dtype, jnp.integer):
    # As pytorch-fid's loader (torchvision's ToTensor): x / 255 in float32, whatever the model's
    # precision (a float64 model sees the float32 quotient).
    # A table of the correctly rounded quotients: XLA would turn the division into a
    # multiplication by 1/255, which rounds differently.
    quotients = np.arange(256, dtype=np.float32) / np.float32(255.0)
    x = jnp.asarray(quotients)[images.astype(jnp.int32)].astype(dtype)
  else:
    x = images.astype(dtype)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  h, w = x.shape[1:3]
  if (h, w) != (INPUT_SIZE, INPUT_SIZE):
    rows = jnp.asarray(resize_matrix(h, INPUT_SIZE), dtype)
    cols = jnp.asarray(resize_matrix(w, INPUT_SIZE), dtype)
    x = jnp.einsum('ih,nhwc,jw->nijc', rows, x, cols, precision=HIGHEST)
  return 2.0 * x - 1.0


class FIDInception(nn.Module):
  """pytorch-fid's FID Inception-v3, NHWC. `__call__(images)` -> the four blocks' outputs.

  `images`: (N, H, W, 1 or 3), uint8 in [0, 255] or floats in [0, 1]; the computation runs in
  `dtype` (float32, or float64 under `jax.enable_x64`). Returns a tuple of (N, 73, 73, 64),
  (N, 35, 35, 192), (N, 17, 17, 768) and (N, 2048) (the pool3 features of FID).
  """
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> Tuple[jax.Array, ...]:
    x = preprocess(images, self.dtype)
    x = BasicConv(32, (3, 3), stride=2, name='Conv2d_1a_3x3')(x)
    x = BasicConv(32, (3, 3), name='Conv2d_2a_3x3')(x)
    x = BasicConv(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x)
    block0 = max_pool(x, 2)
    x = BasicConv(80, (1, 1), name='Conv2d_3b_1x1')(block0)
    x = BasicConv(192, (3, 3), name='Conv2d_4a_3x3')(x)
    block1 = max_pool(x, 2)
    x = InceptionA(32, name='Mixed_5b')(block1)
    x = InceptionA(64, name='Mixed_5c')(x)
    x = InceptionA(64, name='Mixed_5d')(x)
    x = InceptionB(name='Mixed_6a')(x)
    x = InceptionC(128, name='Mixed_6b')(x)
    x = InceptionC(160, name='Mixed_6c')(x)
    x = InceptionC(160, name='Mixed_6d')(x)
    block2 = InceptionC(192, name='Mixed_6e')(x)
    x = InceptionD(name='Mixed_7a')(block2)
    x = InceptionE(False, name='Mixed_7b')(x)
    x = InceptionE(True, name='Mixed_7c')(x)
    block3 = jnp.mean(x, axis=(1, 2))
    return block0, block1, block2, block3


def params_from_state_dict(state_dict: Mapping[str, np.ndarray],
                           source: str = 'state_dict') -> Dict[str, Any]:
  """pytorch-fid state_dict (numpy arrays) -> Flax params of `FIDInception` (float64 numpy).

  Every `<path>.conv.weight` (O, I, kh, kw) with its `<path>.bn.{weight, bias, running_mean,
  running_var}` becomes `{'kernel': (kh, kw, I, O), 'bias': (O,)}` at `<path>` with the
  BatchNorm folded in. The classifier (`fc.*`) and `num_batches_tracked` are ignored; every
  conv the module needs must be present (a `ValueError` names the first missing key).
  """
  expected = jax.eval_shape(FIDInception().init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))
  kernels = {tuple(k.key for k in path[:-1]): leaf.shape for path, leaf in
             jax.tree_util.tree_flatten_with_path(expected['params'])[0]
             if path[-1].key == 'kernel'}
  params: Dict[str, Any] = {}
  for conv, kernel_shape in sorted(kernels.items()):
    prefix = '.'.join(conv)
    arrays = {}
    for name in ('conv.weight', 'bn.weight', 'bn.bias', 'bn.running_mean', 'bn.running_var'):
      key = f'{prefix}.{name}'
      if key not in state_dict:
        raise ValueError(f'{source}: no entry {key!r}: not a pytorch-fid Inception state_dict')
      arrays[name] = np.asarray(state_dict[key], np.float64)
    kernel = np.transpose(arrays['conv.weight'], (2, 3, 1, 0))  # (O, I, kh, kw) -> HWIO
    if kernel.shape != kernel_shape or any(arrays[n].shape != kernel_shape[-1:] for n in arrays
                                           if n.startswith('bn.')):
      raise ValueError(f'{source}: {prefix} has conv weight {arrays["conv.weight"].shape}, '
                       f'expected (O, I, kh, kw) = {kernel_shape[::-1][:2] + kernel_shape[:2]}')
    scale = arrays['bn.weight'] / np.sqrt(arrays['bn.running_var'] + BN_EPS)
    node = params
    for part in conv[:-1]:
      node = node.setdefault(part, {})
    node[conv[-1]] = {'kernel': kernel * scale,
                      'bias': arrays['bn.bias'] - arrays['bn.running_mean'] * scale}
  return params


def find_weights(path: Optional[str] = None) -> str:
  """The weights file: `path`, else `$DENSEFLOW_JAX_INCEPTION`; a clear error if neither exists."""
  path = path or os.environ.get(WEIGHTS_ENV, '')
  if not path:
    raise FileNotFoundError(
        f'no Inception weights given: pass --inception PATH or set {WEIGHTS_ENV}; download '
        f'{WEIGHTS_FILE} (pytorch-fid\'s FID weights) once from {WEIGHTS_URL}')
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'{path}: no such Inception weights file; download {WEIGHTS_FILE} (pytorch-fid\'s FID '
        f'weights) once from {WEIGHTS_URL}')
  return path


def load_fid_inception(path: Optional[str] = None, dtype: Any = jnp.float32
                       ) -> Tuple[FIDInception, Dict[str, Any]]:
  """Reads pytorch-fid's weights file -> `(FIDInception(dtype), {'params': ...})`.

  `path` defaults to `$DENSEFLOW_JAX_INCEPTION`. Parameters are cast to `dtype` (float64 needs
  `jax.enable_x64`).
  """
  path = find_weights(path)
  state_dict = torch_reader.read_torch_checkpoint(path)
  if not isinstance(state_dict, Mapping):
    raise ValueError(f'{path}: expected a state_dict (a mapping of tensors), got '
                     f'{type(state_dict).__name__}')
  params = params_from_state_dict(state_dict, path)
  params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
  return FIDInception(dtype=dtype), {'params': params}
