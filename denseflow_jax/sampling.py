"""Samples of a trained model in batches: the generator shared by the sample-quality tools."""
from typing import Iterator

import jax
import numpy as np

from denseflow_jax import parallel


def sample_batches(sharded: 'parallel.ShardedModel', variables, num: int, *,
                   temperature: float = 1.0, seed: int = 0, batch: int = 64,
                   ) -> Iterator[np.ndarray]:
  """Yields `num` samples as host integer arrays (B, H, W, C) in [0, 2^num_bits - 1].

  Batch `i` (starting at image `i`) draws with `fold_in(key(seed), i)`, so the images do not
  depend on how many are asked for; `batch` is rounded up to a multiple of the device count.
  """
  if num < 1:
    raise ValueError(f'num={num}: expected at least one sample')
  devices = sharded.mesh.devices.size
  batch = -(-max(1, int(batch)) // devices) * devices
  key = jax.random.key(int(seed))
  for i in range(0, num, batch):
    images = parallel.to_host(sharded.sample(
        variables, jax.random.key_data(jax.random.fold_in(key, i)), batch, float(temperature)))
    yield np.asarray(images[:min(batch, num - i)])
