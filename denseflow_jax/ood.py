"""Likelihood scores as an out-of-distribution detector: AUROC and score histograms.

A flow trained on one data set gives its images low bits/dim; `auroc(in_scores, out_scores)`
is the probability that a random out-of-distribution image scores higher (more bits/dim) than
a random in-distribution one, ties counting one half (the Mann-Whitney statistic): 1.0 = the
score separates the sets perfectly, 0.5 = chance, below 0.5 = the out-of-distribution images
look *more* likely (the known failure of likelihood-based OOD detection).
"""
import os
from typing import Mapping, Optional

import numpy as np


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
  """Area under the ROC curve of `score > threshold` as the test for out-of-distribution."""
  a = np.asarray(in_scores, np.float64).reshape(-1)
  b = np.asarray(out_scores, np.float64).reshape(-1)
  if not len(a) or not len(b):
    raise ValueError(f'auroc needs scores of both sets (got {len(a)} and {len(b)})')
  if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
    raise ValueError('auroc: scores must be finite')
  both = np.concatenate([a, b])
  order = np.argsort(both, kind='stable')
  ranks = np.empty(len(both), np.float64)
  ranks[order] = np.arange(1, len(both) + 1)
  values, first, counts = np.unique(both[order], return_index=True, return_counts=True)
  del values
  for start, count in zip(first, counts):  # tied scores share their mean rank
    if count > 1:
      ranks[order[start:start + count]] = start + (count + 1) / 2.0
  u = ranks[len(a):].sum() - len(b) * (len(b) + 1) / 2.0
  return float(u / (len(a) * len(b)))


def plot_histograms(path: str, scores: Mapping[str, np.ndarray], *, xlabel: str = 'bits/dim',
                    title: Optional[str] = None, bins: int = 40) -> str:
  """One PNG with a histogram per named score set (shared bins, densities); returns `path`."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  values = [np.asarray(v, np.float64).reshape(-1) for v in scores.values()]
  edges = np.histogram_bin_edges(np.concatenate(values), bins=bins)
  fig, ax = plt.subplots(figsize=(6, 4))
  for (name, _), v in zip(scores.items(), values):
    ax.hist(v, bins=edges, density=True, alpha=0.5, label=f'{name} (n={len(v)}, '
            f'median {np.median(v):.3f})')
  ax.set_xlabel(xlabel)
  ax.set_ylabel('density')
  if title:
    ax.set_title(title)
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}.png'
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, path)
  return path
