"""Nystrom self-attention (the global branch of DenseFlow's coupling network)."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from denseflow_jax.nets.layers import Array, PointwiseConv


def iterative_pinv(k: Array, iterations: int = 6) -> Array:
  """Approximate Moore-Penrose inverse of a batch of square matrices `(N, l, l)`.

  Exactly `iterations` steps of `V <- V (13 I - KV (15 I - KV (7 I - KV))) / 4` with `KV = K V`,
  from `V0 = K^T / (max column sum of |K| * max row sum of |K|)`, both maxima per example.
  The published model depends on the iteration count (it is not an exact pseudo-inverse).
  """
  a = jnp.abs(k)
  col = jnp.max(jnp.sum(a, axis=-2), axis=-1)
  row = jnp.max(jnp.sum(a, axis=-1), axis=-1)
  v = jnp.swapaxes(k, -1, -2) / (col * row)[:, None, None]
  eye = jnp.eye(k.shape[-1], dtype=k.dtype)
  for _ in range(iterations):
    kv = k @ v
    v = 0.25 * (v @ (13 * eye - kv @ (15 * eye - kv @ (7 * eye - kv))))
  return v


def nystrom_kernel(q: Array, k: Array, v: Array, *, num_landmarks: int, iterations: int) -> Array:
  """Nystrom attention on sequences `(N, L, E)`; returns `K1 K2^+ (K3 v) + v`, `(N, L, E)`.

  No `1/sqrt(E)` scaling. Landmarks: means over `num_landmarks` contiguous blocks of rows,
  divided by `sqrt(L)`. Every softmax is over the second-to-last axis (published choice).
  """
  n, length, e = q.shape
  scale = jnp.sqrt(jnp.asarray(length, q.dtype))
  q_lm = q.reshape(n, num_landmarks, length // num_landmarks, e).mean(axis=2) / scale
  k_lm = k.reshape(n, num_landmarks, length // num_landmarks, e).mean(axis=2) / scale
  k1 = jax.nn.softmax(q @ jnp.swapaxes(k_lm, 1, 2), axis=-2)      # (N, L, l)
  k2 = jax.nn.softmax(q_lm @ jnp.swapaxes(k_lm, 1, 2), axis=-2)   # (N, l, l)
  k3 = jax.nn.softmax(q_lm @ jnp.swapaxes(k, 1, 2), axis=-2)      # (N, l, L)
  k2_pinv = iterative_pinv(k2, iterations)
  return (k1 @ k2_pinv) @ (k3 @ v) + v


class NystromAttention(nn.Module):
  """Single-head Nystrom attention of width `E = features // 2` on an `(N, H, W, features)` map.

  `qkv`: 1x1 conv `features -> 3E`; `out_transform`: 1x1 conv `E -> features`.
  `layout='published'` reproduces the published memory order: the channels-first `(3E, H, W)`
  tensor is *reshaped* (not transposed) to `(H*W, 3E)`, so a sequence row mixes channels and
  pixels, and the `(H*W, E)` result is reshaped back to `(E, H, W)` the same way. This is what
  the published weights expect. `layout='tokens'` treats each pixel as a token.
  Requires `H * W` divisible by `num_landmarks`. Every field but `features` is keyword-only.
  """
  features: int
  _: dataclasses.KW_ONLY
  num_landmarks: int = 4
  iterations: int = 6
  layout: str = 'published'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n, h, w, _ = x.shape
    e = self.features // 2
    length = h * w
    if length % self.num_landmarks:
      raise ValueError(f'NystromAttention: H*W = {h}*{w} = {length} is not divisible by '
                       f'num_landmarks={self.num_landmarks}')
    qkv = PointwiseConv(3 * e, name='qkv')(x)
    if self.layout == 'published':
      seq = qkv.transpose(0, 3, 1, 2).reshape(n, length, 3 * e)
    elif self.layout == 'tokens':
      seq = qkv.reshape(n, length, 3 * e)
    else:
      raise ValueError(f"NystromAttention: layout must be 'published' or 'tokens', got "
                       f'{self.layout!r}')
    q, k, v = seq[..., :e], seq[..., e:2 * e], seq[..., 2 * e:]
    out = nystrom_kernel(q, k, v, num_landmarks=self.num_landmarks, iterations=self.iterations)
    if self.layout == 'published':
      out = out.reshape(n, e, h, w).transpose(0, 2, 3, 1)
    else:
      out = out.reshape(n, h, w, e)
    return PointwiseConv(self.features, name='out_transform')(out)
