"""Nearest training neighbours of generated images by L2 distance (the memorisation check of
the paper's Appendix E), exact and batched on device.

Squared distances `|q|^2 + |r|^2 - 2 q.r` are computed in int32 from the integer pixel values,
so they are exact (no float rounding) and ties go to the lower training index, as a stable
brute-force sort would give.
"""
from typing import Iterable, Tuple

import jax
import jax.numpy as jnp
import numpy as np

_INT32_MAX = np.iinfo(np.int32).max


def centre_crop(images: np.ndarray, size: int) -> np.ndarray:
  """The central `size` x `size` window of (N, H, W, C) images (`size` 0 = the whole image)."""
  if not size:
    return images
  h, w = images.shape[1:3]
  if not 0 < size <= min(h, w):
    raise ValueError(f'crop={size} must be in 1..{min(h, w)} for {h}x{w} images')
  top, left = (h - size) // 2, (w - size) // 2
  return images[:, top:top + size, left:left + size]


def _flat(images: np.ndarray) -> np.ndarray:
  return np.asarray(images).reshape(len(images), -1).astype(np.int32)


@jax.jit
def _merge(best_d, best_i, queries, refs, ref_index):
  """Merges a chunk of references into the running (Q, k) best squared distances."""
  q2 = jnp.sum(queries * queries, axis=1)[:, None]
  r2 = jnp.sum(refs * refs, axis=1)[None, :]
  dot = jnp.dot(queries, refs.T, preferred_element_type=jnp.int32)
  d = q2 + r2 - 2 * dot
  d = jnp.where(ref_index[None, :] >= 0, d, _INT32_MAX)  # padding rows never win
  all_d = jnp.concatenate([best_d, d], axis=1)           # running best first: ties keep them
  all_i = jnp.concatenate([best_i, jnp.broadcast_to(ref_index, d.shape)], axis=1)
  neg, pos = jax.lax.top_k(-all_d, best_d.shape[1])
  return -neg, jnp.take_along_axis(all_i, pos, axis=1)


def nearest_neighbours(queries: np.ndarray, references: Iterable[np.ndarray], k: int = 5,
                       batch: int = 1024) -> Tuple[np.ndarray, np.ndarray]:
  """Indices (Q, k) and L2 distances (Q, k) of the `k` nearest references of each query.

  `queries` is an integer array (Q, ...); `references` yields integer arrays (B, ...) of the
  same image shape, in index order (e.g. batches of a training set), so the reference set need
  not fit in memory; they are compared `batch` at a time on device. Distances are in units of
  the given integers, nearest first.
  """
  queries = _flat(queries)
  dim = queries.shape[1]
  if 2 * dim * 255 ** 2 > _INT32_MAX:
    raise ValueError(f'images of {dim} values are too large for exact int32 distances; '
                     'use a centre crop')
  if k < 1 or batch < 1:
    raise ValueError(f'k={k} and batch={batch} must be >= 1')
  best_d = jnp.full((len(queries), k), _INT32_MAX, jnp.int32)
  best_i = jnp.full((len(queries), k), -1, jnp.int32)
  q = jnp.asarray(queries)
  done = 0

  def merge(chunk):
    nonlocal best_d, best_i, done
    n = len(chunk)
    index = np.full(batch, -1, np.int32)
    index[:n] = np.arange(done, done + n)
    padded = np.zeros((batch, dim), np.int32)
    padded[:n] = chunk
    best_d, best_i = _merge(best_d, best_i, q, jnp.asarray(padded), jnp.asarray(index))
    done += n

  pending = np.zeros((0, dim), np.int32)
  for chunk in references:
    chunk = _flat(chunk)
    if chunk.shape[1] != dim:
      raise ValueError(f'reference images have {chunk.shape[1]} values, queries {dim}')
    pending = np.concatenate([pending, chunk])
    while len(pending) >= batch:
      merge(pending[:batch])
      pending = pending[batch:]
  if len(pending):
    merge(pending)
  if done < k:
    raise ValueError(f'k={k} neighbours asked for but only {done} reference images given')
  return np.asarray(best_i), np.sqrt(np.asarray(best_d, np.float64))
