"""Feature networks for sample-quality metrics, and batched, device-sharded feature extraction.

A feature network is any object with `name` (str, part of cache keys), `dim` (int) and
`__call__(images) -> np.ndarray (N, dim)` float64 features for uint8 `(N, H, W, C)` images in
[0, 255]. `InceptionFeatures` is the FID network (pytorch-fid's Inception-v3, pool3 features);
other data sets can plug in their own network with the same three members and reuse
`frechet.feature_stats` / `frechet_distance` unchanged.
"""
from typing import Any, Iterable, Optional, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from denseflow_jax import artifacts, parallel
from denseflow_jax.metrics import inception
from denseflow_jax.metrics.progress import Progress


class FeatureNetwork(Protocol):
  """What the metrics need of a feature network."""
  name: str
  dim: int

  def __call__(self, images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C) in [0, 255] -> (N, dim) features."""




class InceptionFeatures:
  """pytorch-fid's pool3 features (2048 per image), jitted and sharded over the mesh's devices.

  `weights`: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (default:
  `$DENSEFLOW_JAX_INCEPTION`). Each call splits the images into batches of `batch_size`
  (rounded up to a multiple of the device count; the last batch padded), so one program is
  compiled. In a multi-process run every process passes the same images and gets all features.
  """
  dim = inception.FEATURE_DIM

  def __init__(self, weights: Optional[str] = None, batch_size: int = 64, mesh=None,
               dtype: Any = jnp.float32):
    path = inception.find_weights(weights)
    self.module, variables = inception.load_fid_inception(path, dtype)
    self.name = f'inception-pool3-{artifacts.file_sha256(path)[:12]}'
    self.mesh = mesh if mesh is not None else parallel.make_mesh()
    devices = self.mesh.devices.size
    if batch_size < 1:
      raise ValueError(f'batch_size={batch_size} must be >= 1')
    self.batch_size = -(-batch_size // devices) * devices
    self._variables = parallel.replicate(variables, self.mesh)
    self._apply = jax.jit(lambda v, x: self.module.apply(v, x)[-1],
                          in_shardings=(parallel.replicated_sharding(self.mesh),
                                        parallel.batch_sharding(self.mesh)),
                          out_shardings=parallel.replicated_sharding(self.mesh))

  def __call__(self, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise ValueError(f'expected uint8 images (N, H, W, 1 or 3), got {images.dtype} '
                       f'{images.shape}')
    out = []
    per_process = self.batch_size // jax.process_count()
    start = jax.process_index() * per_process
    for i in range(0, len(images), self.batch_size):
      batch = images[i:i + self.batch_size]
      n = len(batch)
      if n < self.batch_size:
        batch = np.concatenate([batch, np.repeat(batch[-1:], self.batch_size - n, 0)])
      local = batch[start:start + per_process]
      features = self._apply(self._variables, parallel.shard_batch(local, self.mesh))
      out.append(np.asarray(parallel.to_host(features), np.float64)[:n])
    return np.concatenate(out) if out else np.zeros((0, self.dim))


def extract(network: FeatureNetwork, batches: Iterable[np.ndarray], total: int,
            what: str = 'images', log=print) -> np.ndarray:
  """Features of every batch of uint8 images, with a progress line (count, rate, ETA) per batch."""
  progress = Progress(total, what, log)
  out = []
  for batch in batches:
    out.append(network(batch))
    progress.update(len(batch))
  progress.done()
  return np.concatenate(out) if out else np.zeros((0, network.dim))
