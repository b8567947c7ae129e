"""The published reference, row validity, the matmul unit, and the rows benchmark.py prints.

The unit: a time divided by the time of one float32 4096x4096 `jnp.dot` measured in the same
process (`measure.matmul_peak`), the **matmul unit**. It cancels most of the difference between
machines, not the load of a shared one, so every row carries its own validity:

- the 1-minute load average when its process started must be <= `LOAD_LIMIT` (0.5), and
- the matmul peaks measured in that process just before and just after its timed calls must
  differ by at most `PEAK_TOLERANCE` (10%, relative to the faster one), in every precision
  measured.

A row that fails either is NOT VALID: another process shared the cores and the row says
nothing about the code. `validity` implements the rule, `summarize` adds units, the published
comparison and the targets to a row, `format_rows` prints them, and `markdown_rows` /
`insert_markdown` put valid rows into BENCHMARKS.md (above its marker line).
"""
import math
import os
from typing import Any, Dict, List, Optional, Sequence

# The side-by-side reference (BENCHMARKS.md, "Reference"): the published PyTorch code
# (PyTorch 2.13 CPU, default environment, 2 threads) on an idle 2-core AMD EPYC with AVX-512,
# 2026-12-01. An f32 4096^3 jnp.dot took ~0.336 s there (median ~409 GFLOP/s).
REFERENCE = {
    'date': '2026-12-01',
    'machine': '2-core AMD EPYC (AVX-512), idle',
    'code': 'published PyTorch code, PyTorch 2.13 CPU, default environment, 2 threads',
    'unit': 'seconds / time of one f32 4096^3 jnp.dot in the same process',
    'dot_s': 0.336,
    'dot_gflop_s': 409.0,
}
# Per published configuration: train rows by batch, sampling rows by number of images.
# seconds, matmul units, peak RSS (GiB), GFLOP/img (forward + backward, PyTorch's flop
# counter), fraction of the jnp.dot peak, and the target in matmul units (1.3x faster).
PUBLISHED = {
    'tiny': {
        'name': 'tiny (2,2,1)/(1,1,2)/mid 16/growth 4',
        'train': {8: dict(seconds=0.295, units=0.88, rss_gib=0.72, gflop_img=9.0, frac=0.58,
                          target_units=0.68),
                  64: dict(seconds=1.944, units=5.79, rss_gib=2.50, gflop_img=9.0, frac=0.71,
                           target_units=4.45)},
        'sample': {16: dict(seconds=0.087, units=0.26, target_units=0.20)},
    },
    'denseflow_45_6': {
        'name': 'DenseFlow-45-6',
        'train': {8: dict(seconds=1.860, units=5.54, rss_gib=2.36, gflop_img=52.1, frac=0.53,
                          target_units=4.26)},
        'sample': {},
    },
    'denseflow_74_10': {
        'name': 'DenseFlow-74-10',
        'train': {8: dict(seconds=3.510, units=10.45, rss_gib=3.91, gflop_img=98.6, frac=0.54,
                          target_units=8.04)},
        'sample': {16: dict(seconds=1.791, units=5.33, target_units=4.10)},
    },
}
TARGET_RATIO = 1.3          # train steps and sampling: 1.3x faster than the published code
TARGET_EVAL_FRAC = 0.85     # evaluation: >= 85% of the f32 matmul peak
LOAD_LIMIT = 0.5            # 1-minute load average at the start of a row's process
PEAK_TOLERANCE = 0.10       # matmul peak before vs after the timed calls
UNIT_N = 4096               # the matmul unit's matrix size
# The paper (Grcic et al. 2021): 128 samples of DenseFlow-74-10 in 0.96 s on an RTX 3090.
PAPER_GPU_SAMPLE_S = {('denseflow_74_10', 128): 0.96}

_PUBLISHED_SHAPES = {
    ((2, 2, 1), (1, 1, 2), (16, 16, 16), 4): 'tiny',
    ((5, 3, 1), (3, 5, 15), (48, 48, 48), 6): 'denseflow_45_6',
    ((6, 4, 1), (5, 6, 20), (48, 48, 48), 10): 'denseflow_74_10',
}
_PUBLISHED_DEFAULTS = dict(
    image_size=32, num_channels=3, num_bits=8, coupling='denseflow', augment=True,
    noise='preconditioned', dense_depth=7, dense_growth=64, num_landmarks=4, pinv_iterations=6,
    dequantization='variational', deq_context_channels=64, deq_steps=4)


def published_key(model_cfg, **overrides) -> Optional[str]:
  """Which published configuration (a key of PUBLISHED) a model config is, or None: same
  shapes, 32x32 RGB, 8 bits. `overrides` replace fields of `model_cfg` for the check."""
  get = lambda k: overrides[k] if k in overrides else model_cfg.get(k)
  sig = (tuple(get('block_conf')), tuple(get('layers_conf')), tuple(get('mid_channels')),
         int(get('growth_rate')))
  key = _PUBLISHED_SHAPES.get(sig)
  if key is None or any(get(k) != v for k, v in _PUBLISHED_DEFAULTS.items()):
    return None
  return key


def config_label(model_cfg) -> str:
  """The `config` column: the published name, the name at another resolution, or the shapes."""
  m = model_cfg
  key = published_key(m)
  if key is not None:
    return PUBLISHED[key]['name']
  at_32 = published_key(m, image_size=32)
  if at_32 is not None:  # a published shape at another resolution (74-10 at 64x64)
    return f"{PUBLISHED[at_32]['name']}, {m.image_size}x{m.image_size}"
  return (f"blocks {tuple(m.block_conf)} modules {tuple(m.layers_conf)} mid "
          f"{tuple(m.mid_channels)} growth {m.growth_rate}, {m.image_size}x{m.image_size}")


# ----------------------------------------------------------------------------- validity


def peak_difference(before_s: float, after_s: float) -> float:
  """Relative difference of two matmul times, |a - b| / min(a, b) (inf if one is missing)."""
  if not (before_s and after_s) or before_s != before_s or after_s != after_s:
    return math.inf
  return abs(before_s - after_s) / min(before_s, after_s)


def validity(load_at_start: float, peaks_before: Dict[str, float],
             peaks_after: Dict[str, float]) -> Dict[str, Any]:
  """{'valid', 'reasons'}: the rule of the module docstring.

  `peaks_before` / `peaks_after`: dtype -> median time of one matmul (seconds), measured in
  the row's process just before and just after its timed calls. A dtype measured only once
  makes the row not valid too (nothing to compare).
  """
  reasons = []
  if not load_at_start <= LOAD_LIMIT:  # NaN (no load average) is not valid either
    reasons.append(f'load {load_at_start:.2f} at process start > {LOAD_LIMIT}')
  if not peaks_before:
    reasons.append('no matmul peak measured')
  for dtype in sorted(set(peaks_before) | set(peaks_after)):
    diff = peak_difference(peaks_before.get(dtype), peaks_after.get(dtype))
    if diff > PEAK_TOLERANCE:
      reasons.append(f'{dtype} matmul peak before/after differ by '
                     f'{"?" if math.isinf(diff) else f"{100 * diff:.1f}%"} > '
                     f'{100 * PEAK_TOLERANCE:.0f}%')
  return {'valid': not reasons, 'reasons': reasons}


# ----------------------------------------------------------------------------- rows


def _peak_times(peaks: Dict[str, Dict[str, Any]]) -> Dict[str, float]:
  return {dtype: p['median_s'] for dtype, p in (peaks or {}).items()}


def published_row(row: Dict[str, Any]) -> Optional[Dict[str, Any]]:
  """The published reference for a row (train step and loop: same batch; sampling: same
  number of images), or None."""
  key = row.get('published_key')
  if key not in PUBLISHED or row.get('dtype', 'float32') != 'float32':
    return None
  if row['kind'] in ('step', 'loop'):
    return PUBLISHED[key]['train'].get(row.get('batch'))
  if row['kind'] == 'sample':
    return PUBLISHED[key]['sample'].get(row.get('n'))
  return None


def summarize(row: Dict[str, Any]) -> Dict[str, Any]:
  """`row` with its validity, matmul units, fractions of peak and comparisons added.

  Reads: kind, seconds, load_at_start, matmul_before / matmul_after (dtype -> matmul_peak
  result), platform, published_key, batch or n, dtype, peak_rss_gib, flops (counted FLOPs
  of one timed call, optional). Adds: valid, invalid_reasons, dot_s (mean f32 time of the
  before and after peaks), units, frac_of_peak, and, where a published row exists and the
  unit is the published one (CPU, n = 4096), published_*, speed_ratio (published units /
  ours, > 1 = faster), target_units, meets_target, rss_ratio.
  """
  out = dict(row)
  before, after = _peak_times(row.get('matmul_before')), _peak_times(row.get('matmul_after'))
  v = validity(row.get('load_at_start', float('nan')), before, after)
  out['valid'], out['invalid_reasons'] = v['valid'], v['reasons']
  seconds = row.get('seconds')
  f32 = [t for t in (before.get('float32'), after.get('float32')) if t]
  out['dot_s'] = sum(f32) / len(f32) if f32 else None
  peaks = row.get('matmul_before') or {}
  out['unit_n'] = peaks['float32']['n'] if 'float32' in peaks else None
  out['units'] = seconds / out['dot_s'] if seconds and out['dot_s'] else None
  flops = row.get('flops')
  if flops and seconds:
    fracs = {}
    for dtype in before:
      times = [t for t in (before.get(dtype), after.get(dtype)) if t]
      n = peaks[dtype]['n']
      gflop_s = 2.0 * n ** 3 / (sum(times) / len(times)) / 1e9
      fracs[dtype] = flops / seconds / 1e9 / gflop_s
    out['frac_of_peak'] = fracs
    match = row.get('dtype', 'float32')
    out['frac_of_matching_peak'] = fracs.get(match)
  if row['kind'] == 'eval' and out.get('frac_of_peak'):
    out['target_frac'] = TARGET_EVAL_FRAC
    out['meets_target'] = out['frac_of_peak'].get('float32', 0.0) >= TARGET_EVAL_FRAC
  comparable = row.get('platform', 'cpu') == 'cpu' and out['unit_n'] == UNIT_N
  pub = published_row(row)
  if pub is not None and comparable and out['units']:
    out['published_seconds'] = pub['seconds']
    out['published_units'] = pub['units']
    out['speed_ratio'] = pub['units'] / out['units']
    out['target_units'] = pub['target_units']
    out['meets_target'] = out['units'] <= pub['target_units']
    if 'rss_gib' in pub and row.get('peak_rss_gib'):
      out['published_rss_gib'] = pub['rss_gib']
      out['rss_ratio'] = row['peak_rss_gib'] / pub['rss_gib']
  elif pub is not None:
    out['published_note'] = ('published units are for CPU and the f32 4096^3 unit; this row '
                             f"ran on {row.get('platform')} with n = {out['unit_n']}")
  paper = PAPER_GPU_SAMPLE_S.get((row.get('published_key'), row.get('n')))
  if row['kind'] == 'sample' and paper and row.get('platform', 'cpu') != 'cpu' and seconds:
    out['paper_gpu_seconds'] = paper
    out['paper_gpu_speed_ratio'] = paper / seconds
  return out


def _fmt(v, spec='.2f', none='-'):
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return none
  return format(v, spec)


def row_name(row: Dict[str, Any]) -> str:
  """'step b8', 'loop b8', 'eval b64', 'sample 16' (+ ' bf16' for bfloat16 rows)."""
  size = f"b{row['batch']}" if row['kind'] != 'sample' else str(row['n'])
  dtype = '' if row.get('dtype', 'float32') == 'float32' else ' bf16'
  return f"{row['kind']} {size}{dtype}"


SHORT_NAMES = {'tiny': 'tiny', 'denseflow_45_6': '45-6', 'denseflow_74_10': '74-10'}


def short_label(row: Dict[str, Any]) -> str:
  """'tiny', '45-6', '74-10' for the published configurations, else the row's label."""
  return SHORT_NAMES.get(row.get('published_key')) or row.get('label', '?')


COLUMNS = ('config', 'row', 'seconds', 'matmul units', 'published units', 'speed vs published',
           'target units', 'met', 'peak RSS GiB (published)', 'first step s', 'load',
           'dot before/after s', 'validity')


def table_cells(row: Dict[str, Any]) -> List[str]:
  """The cells of one summarized row, in `COLUMNS` order."""
  rss = _fmt(row.get('peak_rss_gib'))
  if row.get('published_rss_gib'):
    rss += f" ({row['published_rss_gib']:.2f})"
  dm = (row.get('device_memory') or {}).get('peak_bytes_in_use')
  if dm:
    rss += f'; device {dm / 2 ** 30:.2f}'
  peaks = '/'.join(_fmt((row.get(k) or {}).get('float32', {}).get('median_s'), '.3g')
                   for k in ('matmul_before', 'matmul_after'))
  met = row.get('meets_target')
  frac = row.get('frac_of_matching_peak')
  target = _fmt(row.get('target_units'))
  if row['kind'] == 'eval' and 'target_frac' in row:
    target = f">= {100 * row['target_frac']:.0f}% peak ({_fmt(100 * frac if frac else None, '.0f')}%)"
  elif frac is not None and row.get('platform', 'cpu') != 'cpu':
    target = f"{100 * frac:.0f}% of {row.get('dtype', 'float32')} peak"
  speed = _fmt(row.get('speed_ratio'))
  if row.get('paper_gpu_seconds'):
    speed = f"paper GPU {row['paper_gpu_seconds']} s: {row['paper_gpu_speed_ratio']:.2f}x"
  return [short_label(row), row_name(row), _fmt(row.get('seconds'), '.3f'), _fmt(row.get('units')),
          _fmt(row.get('published_units')), speed + ('x' if row.get('speed_ratio') else ''),
          target, '-' if met is None else ('yes' if met else 'no'), rss,
          _fmt(row.get('first_step_s'), '.1f'), _fmt(row.get('load_at_start')), peaks,
          'VALID' if row['valid'] else 'NOT VALID: ' + '; '.join(row['invalid_reasons'])]


def format_rows(rows: Sequence[Dict[str, Any]], title: str = '') -> str:
  """A plain-text table of summarized rows (what benchmark.py prints)."""
  cells = [list(COLUMNS)] + [table_cells(r) for r in rows]
  widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS) - 1)]
  lines = [title] if title else []
  for c in cells:
    lines.append('  '.join(x.ljust(w) for x, w in zip(c, widths)) + '  ' + c[-1])
  return '\n'.join(lines)


# ----------------------------------------------------------------------------- BENCHMARKS.md

TABLE_MARKER = '<!-- benchmark.py: rows above -->'
TABLE_HEADER = ('| date | commit | ' + ' | '.join(COLUMNS[:-1]) + ' |\n'
                '|---|---|' + '---|' * (len(COLUMNS) - 1))


def markdown_rows(report: Dict[str, Any], include_invalid: bool = False) -> List[str]:
  """The Markdown rows of a report's valid rows (all rows with `include_invalid`)."""
  meta = report['meta']
  date = meta['date'][:10]
  commit = meta['git']['commit'][:8] + ('+' if meta['git']['dirty'] else '')
  out = []
  for row in report['rows']:
    if row.get('skipped') or not (row['valid'] or include_invalid):
      continue
    cells = table_cells(row)[:-1]
    if not row['valid']:
      cells[1] += ' (NOT VALID)'
    out.append(f'| {date} | {commit} | ' + ' | '.join(cells) + ' |')
  return out


def insert_markdown(path: str, rows: List[str]) -> None:
  """Inserts `rows` above the marker line of `path` (the table is appended, with its header,
  if the file or the marker is missing)."""
  text = open(path).read() if os.path.exists(path) else '# Benchmarks\n'
  if TABLE_MARKER not in text:
    text = text.rstrip('\n') + '\n\n' + f'{TABLE_HEADER}\n{TABLE_MARKER}\n'
  if rows:
    text = text.replace(TABLE_MARKER, '\n'.join(rows) + '\n' + TABLE_MARKER, 1)
  with open(path, 'w') as f:
    f.write(text)
