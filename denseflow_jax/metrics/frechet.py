"""Fréchet distance between Gaussians fitted to features (FID when the features are Inception's).

`FeatureStats` holds the mean and covariance of a set of feature vectors (float64, as
pytorch-fid: `mean` over rows, `np.cov(rowvar=False)`); `save_stats` / `load_stats` read and
write them as `.npz` with arrays `mu` and `sigma`, the layout of pytorch-fid's `--save-stats`
files, so statistics computed by either tool can be used by the other.

`frechet_distance(a, b)` = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)).
The last trace is the sum of the principal square roots of the eigenvalues of S_a S_b, which
is what pytorch-fid's `scipy.linalg.sqrtm(S_a @ S_b)` followed by the trace of its real part
computes (the trace of a matrix is the trace of its Schur form, whose diagonal holds the
eigenvalues), without forming the square root.

Conditioning: with fewer feature vectors than dimensions (e.g. 64 images of 2048 features),
both covariances are singular and S_a S_b has ~2000 eigenvalues that are zero in exact
arithmetic but ~1e-14 after rounding; their square roots (~1e-7 each) shift the distance by
~1e-6 relative, and two BLAS builds that round the product differently disagree by that much.
With the 10k-50k samples of the FID protocol the covariances are full rank and the value is
stable to ~1e-12 relative.
"""
import os
import tempfile
from typing import NamedTuple

import numpy as np


class FeatureStats(NamedTuple):
  """Mean (D,) and covariance (D, D) of `count` feature vectors, float64."""
  mu: np.ndarray
  sigma: np.ndarray
  count: int


def feature_stats(features: np.ndarray) -> FeatureStats:
  """(N, D) features -> their mean and unbiased covariance in float64 (needs N >= 2)."""
  features = np.asarray(features)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f'expected features (N >= 2, D), got shape {features.shape}')
  x = features.astype(np.float64)
  return FeatureStats(x.mean(axis=0), np.cov(x, rowvar=False), int(x.shape[0]))


def _check(stats: FeatureStats, name: str) -> None:
  mu, sigma = np.asarray(stats.mu), np.asarray(stats.sigma)
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f'{name}: mu {mu.shape} and sigma {sigma.shape} are not (D,) and (D, D)')
  if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
    raise ValueError(f'{name}: statistics hold non-finite values')


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
  """Fréchet distance between N(a.mu, a.sigma) and N(b.mu, b.sigma) (pytorch-fid's definition)."""
  _check(a, 'first statistics')
  _check(b, 'second statistics')
  if a.mu.shape != b.mu.shape:
    raise ValueError(f'feature dimensions differ: {a.mu.shape[0]} and {b.mu.shape[0]} (were the '
                     'statistics computed with the same feature network?)')
  mu_a, mu_b = np.asarray(a.mu, np.float64), np.asarray(b.mu, np.float64)
  sigma_a, sigma_b = np.asarray(a.sigma, np.float64), np.asarray(b.sigma, np.float64)
  diff = mu_a - mu_b
  eigenvalues = np.linalg.eigvals(sigma_a @ sigma_b)
  trace_sqrt = float(np.sqrt(eigenvalues.astype(np.complex128)).real.sum())
  return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * trace_sqrt)


def save_stats(path: str, stats: FeatureStats, **extra) -> None:
  """Writes `mu`, `sigma`, `count` (and `extra` arrays) to `path` atomically (pytorch-fid layout)."""
  path = os.path.abspath(os.path.expanduser(path))
  directory = os.path.dirname(path)
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.stats-', suffix='.npz')
  try:
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, mu=stats.mu, sigma=stats.sigma, count=np.int64(stats.count), **extra)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def is_stats_file(path: str) -> bool:
  """True for an existing `.npz` that holds arrays `mu` and `sigma`."""
  if not (path.endswith('.npz') and os.path.isfile(path)):
    return False
  try:
    with np.load(path, allow_pickle=False) as npz:
      return 'mu' in npz.files and 'sigma' in npz.files
  except (OSError, ValueError):
    return False


def load_stats(path: str) -> FeatureStats:
  """Reads `mu`, `sigma` (and `count` if present; else 0) from a `.npz` statistics file."""
  try:
    with np.load(path, allow_pickle=False) as npz:
      missing = {'mu', 'sigma'} - set(npz.files)
      if missing:
        raise ValueError(f'{path}: not a statistics file: no array(s) {sorted(missing)} '
                         f'(arrays: {sorted(npz.files)})')
      stats = FeatureStats(np.asarray(npz['mu'], np.float64), np.asarray(npz['sigma'], np.float64),
                           int(npz['count']) if 'count' in npz.files else 0)
  except FileNotFoundError:
    raise FileNotFoundError(f'{path}: no such statistics file') from None
  except (OSError, EOFError) as e:
    raise ValueError(f'{path}: not a readable .npz statistics file ({e})') from None
  _check(stats, path)
  return stats
