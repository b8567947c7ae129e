"""Workdir artifacts written by process 0: metrics history, sample grids, the bpd curve.

  <workdir>/metrics.jsonl          one JSON object per scalar write: {"step": s, "<name>": v}
                                   (written by `metric_writer.JsonlWriter`, read here)
  <workdir>/samples/step_<s>.png   sample grid at each evaluation
  <workdir>/bpd_curve.png          train and test bits/dim against the step
"""
import hashlib
import json
import math
import os
import platform
from typing import Dict, List, Optional

import numpy as np

METRICS_FILE = 'metrics.jsonl'
CURVE_FILE = 'bpd_curve.png'
SAMPLES_DIR = 'samples'


def machine_info() -> Dict[str, object]:
  """CPU model (from /proc/cpuinfo where there is one), logical CPUs, AVX-512, platform, Python."""
  cpu, cpu_flags = '', ''
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name') and not cpu:
          cpu = line.split(':', 1)[1].strip()
        elif line.startswith('flags') and not cpu_flags:
          cpu_flags = line
        if cpu and cpu_flags:
          break
  except OSError:
    pass
  return {'cpu_model': cpu or platform.processor() or 'unknown', 'logical_cpus': os.cpu_count(),
          'avx512f': ' avx512f' in cpu_flags, 'platform': platform.platform(),
          'python': platform.python_version()}


def file_sha256(path: str) -> str:
  """Hex SHA-256 of a file (read in 1 MiB blocks)."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def to_uint8(images: np.ndarray, num_bits: int) -> np.ndarray:
  """Integer images in [0, 2^num_bits - 1] -> uint8 in [0, 255] (same shape)."""
  images = np.asarray(images).astype(np.float64)
  top = 2 ** num_bits - 1
  return np.clip(np.round(images * (255.0 / top)), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, num_bits: int = 8, columns: int = 0,
               padding: int = 1) -> np.ndarray:
  """(N, H, W, C) integer images -> one uint8 (rows*(H+p)+p, cols*(W+p)+p, C) grid image."""
  images = to_uint8(images, num_bits)
  if images.ndim != 4:
    raise ValueError(f'image_grid expects (N, H, W, C), got shape {images.shape}')
  n, h, w, c = images.shape
  columns = columns or max(1, int(math.ceil(math.sqrt(n))))
  rows = int(math.ceil(n / columns))
  grid = np.full((rows * (h + padding) + padding, columns * (w + padding) + padding, c), 255,
                 np.uint8)
  for i in range(n):
    r, col = divmod(i, columns)
    top, left = padding + r * (h + padding), padding + col * (w + padding)
    grid[top:top + h, left:left + w] = images[i]
  return grid


def save_png(path: str, image: np.ndarray) -> None:
  """Writes uint8 (H, W, C) with C in {1, 3} as a PNG (atomically)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  image = image[..., 0] if image.shape[-1] == 1 else image
  tmp = f'{path}.tmp{os.getpid()}.png'
  Image.fromarray(image).save(tmp)
  os.replace(tmp, path)


def enlarge(image: np.ndarray, min_long_side: int = 256) -> np.ndarray:
  """(H, W, C) -> the same image repeated by an integer factor (nearest neighbour) so that its
  long side is at least `min_long_side` pixels; unchanged if it already is."""
  factor = max(1, -(-int(min_long_side) // max(image.shape[:2])))
  return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1) if factor > 1 else image


def save_sample_grid(path: str, images: np.ndarray, num_bits: int, columns: int = 0) -> None:
  """Integer samples (N, H, W, C) -> PNG grid at `path`, enlarged to >= 256 px (`enlarge`)."""
  save_png(path, enlarge(image_grid(images, num_bits, columns)))


def read_metrics(workdir: str) -> List[Dict[str, float]]:
  """All rows of `<workdir>/metrics.jsonl` (empty if absent; a torn last line is skipped)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.isfile(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return rows


def metric_curve(rows: List[Dict[str, float]], name: str) -> Dict[int, float]:
  """step -> value of `name`; after a resume the newest row for a step wins."""
  return {int(r['step']): float(r[name]) for r in rows if name in r}


def plot_bpd_curve(workdir: str, path: Optional[str] = None) -> Optional[str]:
  """Plots train and test bits/dim from the metrics history; returns the PNG path (or None)."""
  rows = read_metrics(workdir)
  curves = {'train bpd': metric_curve(rows, 'train_bpd'), 'test bpd': metric_curve(
      rows, 'test_bpd')}
  if not any(curves.values()):
    return None
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, curve in curves.items():
    if curve:
      steps = sorted(curve)
      ax.plot(steps, [curve[s] for s in steps], marker='o' if label == 'test bpd' else None,
              markersize=3, label=label)
  ax.set_xlabel('step')
  ax.set_ylabel('bits/dim')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  path = path or os.path.join(workdir, CURVE_FILE)
  tmp = f'{path}.tmp{os.getpid()}.png'
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, path)
  return path
