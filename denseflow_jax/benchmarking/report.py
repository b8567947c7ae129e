"""The published PyTorch reference, fractions of peak derived from a benchmark row, and the
Markdown rows that `experiments/benchmark.py --markdown` inserts into BENCHMARKS.md.

A report is the benchmark's JSON: `meta` (date, git, label, flags), `train` (one row per
batch size, each with a `summary` from `summarize_train`), `eval` and `sample`. The tables
of BENCHMARKS.md end in a marker line (`TABLE_MARKERS`); `insert_markdown` puts the new rows
right above it, so the file's other text is never touched.
"""
import math
import os
from typing import Any, Dict, List, Optional

# The published PyTorch code on the reference machine class (PyTorch CPU, default environment,
# 2 threads; GFLOP/img forward + backward by PyTorch's flop counter; `frac` of a ~450 GFLOP/s
# matmul peak). The same numbers are in BENCHMARKS.md, "Published reference".
PUBLISHED_PEAK = 450.0
PUBLISHED = {
    'tiny': {
        'name': 'tiny (2,2,1)/(1,1,2)/mid 16/growth 4',
        'train': {8: dict(step_s=0.31, img_s=25.8, gflop_img=9.0, gflop_s=232, frac=0.52,
                          rss_gib=0.7),
                  64: dict(step_s=2.05, img_s=31.2, gflop_img=9.0, gflop_s=281, frac=0.62,
                           rss_gib=2.5)},
        'sample_s': {16: 0.09},
    },
    'denseflow_45_6': {
        'name': 'DenseFlow-45-6',
        'train': {8: dict(step_s=2.10, img_s=3.8, gflop_img=52.1, gflop_s=198, frac=0.44,
                          rss_gib=2.3)},
        'sample_s': {},
    },
    'denseflow_74_10': {
        'name': 'DenseFlow-74-10',
        'train': {8: dict(step_s=4.01, img_s=2.0, gflop_img=98.6, gflop_s=197, frac=0.44,
                          rss_gib=3.9)},
        'sample_s': {16: 1.75},
    },
}
# Targets (BENCHMARKS.md): train-step fraction of peak >= 1.3x the published fraction; eval at
# batch 64 >= 70% of peak; sampling >= 1.3x the published images/s; 74-10 compile < 2 min.
TARGET_RATIO = 1.3
TARGET_EVAL_FRAC = 0.70
TARGET_COMPILE_S = 120.0

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


def summarize_train(row: Dict[str, Any], pub: Optional[Dict[str, Any]]) -> Dict[str, Any]:
  """Achieved GFLOP/s and fractions of the row's matmul peak (counted, XLA and, given the
  published row `pub`, with the published FLOP count), and the comparison with `pub`."""
  peak = row['matmul_peak']['gflop_s']
  step_s, batch = row['step_s'], row['batch']
  fpi = row['flops_per_img']
  s = {'peak_gflop_s': peak}
  counted_gflop = fpi['counted_matmul_conv'] / 1e9
  s['gflop_img_counted'] = counted_gflop
  s['gflop_s_counted'] = counted_gflop * batch / step_s
  s['frac_counted'] = s['gflop_s_counted'] / peak
  if fpi.get('xla_lowered'):
    s['gflop_img_xla'] = fpi['xla_lowered'] / 1e9
    s['gflop_s_xla'] = s['gflop_img_xla'] * batch / step_s
    s['frac_xla'] = s['gflop_s_xla'] / peak
  if pub is not None:
    s['gflop_img_published'] = pub['gflop_img']
    s['gflop_s_published_count'] = pub['gflop_img'] * batch / step_s
    s['frac_published_count'] = s['gflop_s_published_count'] / peak
    s['published_frac'] = pub['frac']
    s['ratio_of_fractions'] = s['frac_published_count'] / pub['frac']
    s['counted_vs_published'] = counted_gflop / pub['gflop_img'] - 1.0
    s['meets_target'] = s['ratio_of_fractions'] >= TARGET_RATIO
    s['published_step_s'] = pub['step_s']
    s['speedup_vs_published'] = pub['step_s'] / step_s
    s['published_rss_gib'] = pub['rss_gib']
    s['rss_within_published'] = row['peak_rss_gib'] <= pub['rss_gib']
  return s


TABLE_MARKERS = {
    'train': '<!-- benchmark.py: train rows above -->',
    'eval': '<!-- benchmark.py: eval rows above -->',
    'sample': '<!-- benchmark.py: sampling rows above -->',
}
TABLE_HEADERS = {
    'train': ('| date | commit | config | batch | XLA flags (+ malloc tuning) | load (1 min) | compile (trace+lower / '
              'compile) | train step | img/s | GFLOP/img (published / counted / XLA) | GFLOP/s '
              '(published count) | % of measured peak (peak) | published % | ours / published | '
              'peak RSS: process / steps (published) |\n'
              '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|'),
    'eval': ('| date | commit | config | batch | XLA flags (+ malloc tuning) | load (1 min) | compile | eval step | '
             'img/s | GFLOP/img (counted / XLA) | % of measured peak (peak) | peak RSS: process / '
             'steps |\n'
             '|---|---|---|---|---|---|---|---|---|---|---|---|'),
    'sample': ('| date | commit | config | images | XLA flags (+ malloc tuning) | load (1 min) | compile | time | '
               'img/s | published time | speed-up | peak RSS |\n'
               '|---|---|---|---|---|---|---|---|---|---|---|---|'),
}


def markdown_skeleton() -> str:
  """A BENCHMARKS.md with empty tables (for a `--markdown` file that does not exist yet)."""
  parts = ['# Benchmarks\n',
           'Rows are inserted by `experiments/benchmark.py --markdown=BENCHMARKS.md`.\n']
  for kind, title in (('train', 'Train step'), ('eval', 'Evaluation (log_prob)'),
                      ('sample', 'Sampling')):
    parts.append(f'## {title}\n\n{TABLE_HEADERS[kind]}\n{TABLE_MARKERS[kind]}\n')
  return '\n'.join(parts)


def _fmt(v, spec='.2f', none='-'):
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return none
  return format(v, spec)


def markdown_rows(report: Dict[str, Any]) -> Dict[str, List[str]]:
  """{'train', 'eval', 'sample'}: the table rows of a report, in the tables' column order."""
  meta = report['meta']
  date = meta['date'][:10]
  commit = meta['git']['commit'][:8] + ('+' if meta['git']['dirty'] else '')
  label = meta['label']
  fl = ('on' if meta['xla_flags'] else 'off') + (' + malloc' if meta['malloc_tuning'] else '')
  rows = {'train': [], 'eval': [], 'sample': []}
  for r in report['train']:
    s = r['summary']
    load = f"{_fmt(r['load_before'], '.1f')}-{_fmt(r['load_after'], '.1f')}"
    pub_g = _fmt(s.get('gflop_img_published'), '.1f')
    gflop = f"{pub_g} / {s['gflop_img_counted']:.1f} / {_fmt(s.get('gflop_img_xla'), '.1f')}"
    if 'frac_published_count' in s:
      gflops = f"{s['gflop_s_published_count']:.0f}"
      frac = f"{100 * s['frac_published_count']:.0f}% ({s['peak_gflop_s']:.0f})"
      pub_frac = f"{100 * s['published_frac']:.0f}%"
      ratio = f"{s['ratio_of_fractions']:.2f}x"
      rss = f"{r['peak_rss_gib']:.1f} / {r['peak_rss_run_gib']:.1f} GiB ({s['published_rss_gib']:.1f})"
    else:
      gflops = f"{s['gflop_s_counted']:.0f} (counted)"
      frac = f"{100 * s['frac_counted']:.0f}% counted ({s['peak_gflop_s']:.0f})"
      pub_frac, ratio = '-', '-'
      rss = f"{r['peak_rss_gib']:.1f} / {r['peak_rss_run_gib']:.1f} GiB"
    comp = f"{r['trace_s'] + r['lower_s']:.1f} / {r['compile_s']:.1f} s"
    rows['train'].append(
        f"| {date} | {commit} | {label} | {r['batch']} | {fl} | {load} | {comp} | "
        f"{r['step_s']:.3f} s | {r['img_s']:.1f} | {gflop} | {gflops} | {frac} | {pub_frac} | "
        f"{ratio} | {rss} |")
  if report.get('eval'):
    r = report['eval']
    load = f"{_fmt(r['load_before'], '.1f')}-{_fmt(r['load_after'], '.1f')}"
    fpi = r['flops_per_img']
    xla = None if fpi.get('xla_lowered') is None else fpi['xla_lowered'] / 1e9
    rows['eval'].append(
        f"| {date} | {commit} | {label} | {r['batch']} | {fl} | {load} | {r['compile_s']:.1f} s | "
        f"{r['step_s']:.3f} s | {r['img_s']:.1f} | {fpi['counted_matmul_conv'] / 1e9:.2f} / "
        f"{_fmt(xla)} | {100 * r['frac_of_peak_counted']:.0f}% "
        f"({r['matmul_peak']['gflop_s']:.0f}) | {r['peak_rss_gib']:.1f} / "
        f"{r['peak_rss_run_gib']:.1f} GiB |")
  if report.get('sample'):
    r = report['sample']
    load = f"{_fmt(r['load_before'], '.1f')}-{_fmt(r['load_after'], '.1f')}"
    for s in r['sizes']:
      pub = s.get('published_s')
      rows['sample'].append(
          f"| {date} | {commit} | {label} | {s['n']} | {fl} | {load} | {s['compile_s']:.1f} s | "
          f"{s['time_s']:.3f} s | {s['img_s']:.1f} | {_fmt(pub, '.2f')}"
          f"{' s' if pub else ''} | {_fmt(s.get('speedup'), '.2f')}{'x' if pub else ''} | "
          f"{r['peak_rss_gib']:.1f} GiB |")
  return rows


def insert_markdown(path: str, rows: Dict[str, List[str]]) -> None:
  """Inserts `rows` above each table's marker in `path` (created from the skeleton if missing;
  a table whose marker is missing is appended)."""
  text = open(path).read() if os.path.exists(path) else markdown_skeleton()
  for kind, marker in TABLE_MARKERS.items():
    if not rows[kind]:
      continue
    if marker not in text:
      text = text.rstrip('\n') + '\n\n' + f'{TABLE_HEADERS[kind]}\n{marker}\n'
    text = text.replace(marker, '\n'.join(rows[kind]) + '\n' + marker, 1)
  with open(path, 'w') as f:
    f.write(text)
