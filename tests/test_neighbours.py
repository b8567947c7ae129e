"""Nearest neighbours (experiments/neighbours.py's search) against brute force, and enlarge."""
import numpy as np
import pytest

from denseflow_jax import artifacts
from denseflow_jax.neighbours import centre_crop, nearest_neighbours


def brute_force(queries, references, k):
  q = queries.reshape(len(queries), 1, -1).astype(np.int64)
  r = references.reshape(1, len(references), -1).astype(np.int64)
  d2 = ((q - r) ** 2).sum(-1)
  index = np.argsort(d2, axis=1, kind='stable')[:, :k]  # ties: the lower index first
  return index, np.sqrt(np.take_along_axis(d2, index, axis=1))


@pytest.mark.parametrize('chunks,batch', [((300,), 1024), ((50,) * 6, 64), ((7, 130, 1, 162), 32)])
def test_matches_brute_force_with_ties_and_any_chunking(chunks, batch):
  rng = np.random.default_rng(0)
  queries = rng.integers(0, 256, (7, 8, 8, 3), dtype=np.uint8)
  refs = rng.integers(0, 256, (300, 8, 8, 3), dtype=np.uint8)
  refs[[17, 200]] = queries[2]            # two exact copies: distance 0, lower index first
  refs[5] = refs[6] = refs[299] = queries[4] // 2  # three equidistant neighbours of query 4
  bounds = np.cumsum((0,) + chunks)
  index, dist = nearest_neighbours(queries, (refs[a:b] for a, b in zip(bounds, bounds[1:])),
                                   k=5, batch=batch)
  want_index, want_dist = brute_force(queries, refs, 5)
  np.testing.assert_array_equal(index, want_index)
  np.testing.assert_array_equal(dist, want_dist)  # exact: integer distances
  assert list(index[2, :2]) == [17, 200] and list(dist[2, :2]) == [0, 0]
  assert list(index[4, :3]) == [5, 6, 299]


def test_centre_crop_and_errors():
  images = np.arange(2 * 6 * 4 * 1).reshape(2, 6, 4, 1)
  np.testing.assert_array_equal(centre_crop(images, 2), images[:, 2:4, 1:3])
  assert centre_crop(images, 0) is images
  with pytest.raises(ValueError, match='crop=5 must be in 1..4'):
    centre_crop(images, 5)
  q = np.zeros((1, 4, 4, 1), np.uint8)
  with pytest.raises(ValueError, match='only 2 reference images'):
    nearest_neighbours(q, [np.zeros((2, 4, 4, 1), np.uint8)], k=3)
  with pytest.raises(ValueError, match='reference images have 4 values, queries 16'):
    nearest_neighbours(q, [np.zeros((2, 2, 2, 1), np.uint8)], k=1)


def test_enlarge_to_at_least_256_pixels():
  grid = artifacts.image_grid(np.zeros((4, 8, 8, 1), np.uint8), num_bits=5)  # 19 x 19
  big = artifacts.enlarge(grid)
  assert big.shape == (19 * 14, 19 * 14, 1) and max(big.shape[:2]) >= 256
  np.testing.assert_array_equal(big[::14, ::14], grid)  # nearest neighbour: pixel blocks
  assert artifacts.enlarge(np.zeros((300, 10, 3), np.uint8)).shape == (300, 10, 3)
