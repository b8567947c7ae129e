"""The Table-4 ablation's outputs: the per-variant summary, the differences between rows, the
Markdown table and the plot, from the results that experiments/ablation.py collects.

`write_outputs(out_dir, results, config)` (re)writes, in `out_dir`:
  ablation.json   `results` with the per-variant summary (`summarise`) added
  ablation.md     the Markdown table (with the paper's DenseFlow-45-6 numbers beside ours)
  ablation.png    bar plot of test bits/dim (error bars: seed standard deviation, dots: seeds)
                  and the training curves

`results` = {'runs': {key: run record}, 'hardware': {...}, ...}; a done run record has
variant, seed, status, test_bpd, test_bpd_stderr, params, steps, train/eval wall times,
step_s, load_avg, train_bpd_final and train_curve (see experiments/ablation.py).
"""
import json
import math
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from denseflow_jax import defaults

# Table-4 rows in the paper's order: name -> (coupling, augment, noise, row label, paper bpd).
VARIANTS = defaults.TABLE4
COUPLING_LABEL = {'glow': 'Glow', 'denseflow': 'DenseFlow'}
RESULTS_JSON, TABLE_MD, PLOT_PNG = 'ablation.json', 'ablation.md', 'ablation.png'


def write_json(path: str, value: Any) -> None:
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=1, sort_keys=False, allow_nan=True)
  os.replace(tmp, path)


def _std(values: Sequence[float]) -> Optional[float]:
  if len(values) < 2:
    return None
  mean = sum(values) / len(values)
  return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarise(results: Dict[str, Any]) -> List[Dict[str, Any]]:
  """One row per variant (Table-4 order) over its done runs: mean, seed std, min/max."""
  rows = []
  for number, (variant, (coupling, augment, noise, label, paper)) in enumerate(
      VARIANTS.items(), start=1):
    runs = [r for r in results['runs'].values()
            if r.get('variant') == variant and r.get('status') == 'done']
    runs.sort(key=lambda r: r['seed'])
    row = {'row': number, 'variant': variant, 'coupling': coupling, 'augment': augment,
           'noise': noise if augment else None, 'augmentation': label, 'paper_bpd': paper,
           'seeds': [r['seed'] for r in runs], 'n': len(runs)}
    failed = [r['seed'] for r in results['runs'].values()
              if r.get('variant') == variant and r.get('status') == 'failed']
    if failed:
      row['failed_seeds'] = sorted(failed)
    if runs:
      bpd = [r['test_bpd'] for r in runs]
      step = [r['step_s'] for r in runs if r.get('step_s')]
      row.update(
          test_bpd=bpd, mean=sum(bpd) / len(bpd), std=_std(bpd), min=min(bpd), max=max(bpd),
          stderr_test=runs[0]['test_bpd_stderr'], params=runs[0]['params'],
          steps=runs[0]['steps'],
          train_wall_s=sum(r['train_wall_s'] for r in runs) / len(runs),
          step_s=sum(step) / len(step) if step else None,
          train_bpd_final=sum(r['train_bpd_final'] for r in runs) / len(runs)
          if all(r.get('train_bpd_final') is not None for r in runs) else None)
    rows.append(row)
  return rows


def fmt(value: Optional[float], digits: int = 3) -> str:
  return '—' if value is None else f'{value:.{digits}f}'


def paired_differences(results: Dict[str, Any], first: str, second: str
                       ) -> List[Tuple[int, float]]:
  """(seed, test bpd of `second` minus `first`) for every seed both variants finished."""
  done = {(r['variant'], r['seed']): r['test_bpd'] for r in results['runs'].values()
          if r.get('status') == 'done'}
  seeds = sorted(s for v, s in done if v == first and (second, s) in done)
  return [(s, done[(second, s)] - done[(first, s)]) for s in seeds]


def comparisons(rows: List[Dict[str, Any]], results: Dict[str, Any]) -> List[str]:
  """Plain-language differences between rows (computed, not interpreted)."""
  by = {r['variant']: r for r in rows if 'mean' in r}
  lines = []

  def on_shared_seeds(first: str, second: str, what: str) -> None:
    # Mean over the seeds both rows ran, so a 3-seed row is not compared with one seed.
    pairs = paired_differences(results, first, second)
    if pairs:
      diff = sum(d for _, d in pairs) / len(pairs)
      seeds = ','.join(str(s) for s, _ in pairs)
      paper = VARIANTS[second][4] - VARIANTS[first][4]
      plural = 's' if len(pairs) > 1 else ''
      lines.append(f'- {what} = {diff:+.3f} bpd (seed{plural} {seeds}; paper {paper:+.2f})')

  for aug in ('noaug', 'aug', 'aug_precond'):
    label = VARIANTS[f'glow_{aug}'][3]
    on_shared_seeds(f'glow_{aug}', f'denseflow_{aug}',
                    f'{label}: DenseFlow minus Glow coupling')
  for c in ('glow', 'denseflow'):
    for aug in ('aug', 'aug_precond'):
      on_shared_seeds(f'{c}_noaug', f'{c}_{aug}',
                      f'{COUPLING_LABEL[c]}: {VARIANTS[f"{c}_{aug}"][3]} minus no augmentation')
  first, last = by.get('glow_noaug'), by.get('denseflow_aug_precond')
  if first and last:
    diff = last['mean'] - first['mean']
    spread = [s for s in (first['std'], last['std']) if s is not None]
    paper = last['paper_bpd'] - first['paper_bpd']
    text = (f'- row 6 minus row 1 = {diff:+.3f} bpd (paper {paper:+.2f}); '
            f'seed std row 1 = {fmt(first["std"])} (n={first["n"]}), row 6 = '
            f'{fmt(last["std"])} (n={last["n"]})')
    if len(spread) == 2 and first['n'] > 1 and last['n'] > 1:
      se = math.sqrt(first['std'] ** 2 / first['n'] + last['std'] ** 2 / last['n'])
      text += (f'; |difference| / (larger seed std) = '
               f'{abs(diff) / max(max(spread), 1e-12):.1f}, / (standard error of the difference '
               f'of means) = {abs(diff) / max(se, 1e-12):.1f}')
    lines.append(text)
  pairs = paired_differences(results, 'glow_noaug', 'denseflow_aug_precond')
  if len(pairs) > 1:
    diffs = [d for _, d in pairs]
    mean, std = sum(diffs) / len(diffs), _std(diffs)
    t_stat = mean / (std / math.sqrt(len(diffs))) if std else float('nan')
    per_seed = ', '.join(f'seed {s}: {d:+.3f}' for s, d in pairs)
    lines.append(f'- row 6 minus row 1 paired by seed (a seed fixes the initialisation key, '
                 f'data order and augmentation of both runs): {per_seed}; mean {mean:+.3f}, '
                 f'std {std:.3f}, mean / (std / sqrt(n)) = {t_stat:.2f} (t with '
                 f'{len(diffs) - 1} degrees of freedom)')
  return lines


def write_table(path: str, rows: List[Dict[str, Any]], results: Dict[str, Any], config) -> None:
  m, t, e = config.model, config.train, config.eval
  hw = results.get('hardware', {})
  k = e.iwbo_k
  lines = [
      '# Table-4 ablation at small scale',
      '',
      f'Test bits/dim by the importance-weighted bound (k = {k}) on the held-out images, '
      'after identical training of every variant. Mean over seeds; ± is the sample standard '
      'deviation over seeds (rows with one seed have none). "s.e. (test)" is the standard '
      'error of one run\'s mean over the test images. Paper column: DenseFlow-45-6 on full '
      'CIFAR-10 after 300 epochs, not comparable in absolute value.',
      '',
      f'| # | coupling | augmentation | seeds | test bpd (IWBO k={k}) | s.e. (test) | '
      'train bpd (end) | params | train wall / run (s) | step (s) | paper bpd |',
      '|---|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    if 'mean' not in r:
      status = 'failed' if r.get('failed_seeds') else 'not run'
      lines.append(f'| {r["row"]} | {COUPLING_LABEL[r["coupling"]]} | {r["augmentation"]} | '
                   f'— | {status} | — | — | — | — | — | {r["paper_bpd"]:.2f} |')
      continue
    value = f'{r["mean"]:.3f}' + (f' ± {r["std"]:.3f}' if r['std'] is not None else '')
    seeds = ','.join(str(s) for s in r['seeds'])
    lines.append(
        f'| {r["row"]} | {COUPLING_LABEL[r["coupling"]]} | {r["augmentation"]} | {seeds} | '
        f'{value} | {r["stderr_test"]:.3f} | {fmt(r["train_bpd_final"])} | '
        f'{r["params"]:,} | {r["train_wall_s"]:.0f} | {fmt(r["step_s"], 2)} | '
        f'{r["paper_bpd"]:.2f} |')
  runs = [r for r in results['runs'].values() if r.get('status') == 'done']
  total = sum(r['train_wall_s'] + r['eval_wall_s'] for r in runs)
  loads = [r['load_avg']['mean'] for r in runs if r.get('load_avg')]
  modules = sum(b * l for b, l in zip(m.block_conf, m.layers_conf))
  lines += [
      '',
      '## Differences',
      '',
      *comparisons(rows, results),
      '',
      '## Setup',
      '',
      f'- model: blocks {tuple(m.block_conf)}, modules per unit {tuple(m.layers_conf)} '
      f'({modules} glow-like modules in every variant), coupling width {tuple(m.mid_channels)}, '
      f'growth {m.growth_rate}, dense blocks depth {m.dense_depth} growth {m.dense_growth}, '
      f'Glow hidden width {m.glow_hidden}, {m.dequantization} dequantization',
      f'- data: {config.data.dataset} {config.data.train_npz or ""} '
      f'(holdout {config.data.holdout}, test {config.data.test_npz or "-"}), flip '
      f'{config.data.hflip}, translate {config.data.translate}',
      f'- training: adamax lr {t.lr} (b1 {t.b1}, b2 {t.b2}), warm-up {t.warmup_steps} steps, '
      f'decay {t.decay_rate}/epoch, batch {t.batch_size}, {t.num_steps} steps, seed '
      f'{t.seed} (+ seeds of repeated rows)',
      f'- evaluation: IWBO k = {k} (chunk {e.iwbo_chunk}), eval seed '
      f'{config.ablation.eval_seed}',
      f'- hardware: {hw.get("cpu_model", "?")}, {hw.get("cpu_cores", "?")} cores, jax '
      f'{hw.get("jax", "?")}; mean 1-min load average during the runs '
      f'{(sum(loads) / len(loads)) if loads else float("nan"):.1f} (shared machine)',
      f'- {len(runs)} runs, {total / 60:.1f} min of wall time (training incl. compilation + '
      'IWBO evaluation); "step" is the median steady-state training step time',
      '']
  with open(path + '.tmp', 'w') as f:
    f.write('\n'.join(lines))
  os.replace(path + '.tmp', path)


def write_plot(path: str, rows: List[Dict[str, Any]], results: Dict[str, Any], config) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  colors = {'glow': '#8c8c8c', 'denseflow': '#2b6cb0'}
  hatches = {'none': '', 'plain noise': '//', 'pre-conditioned noise': 'xx'}
  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={'width_ratios': [1.2, 1]})
  done = [r for r in rows if 'mean' in r]
  for i, r in enumerate(rows):
    if 'mean' not in r:
      continue
    ax.bar(i, r['mean'], color=colors[r['coupling']], hatch=hatches[r['augmentation']],
           edgecolor='black', linewidth=0.6,
           yerr=r['std'] if r['std'] is not None else None, capsize=5)
    if r['n'] > 1:
      ax.scatter([i] * r['n'], r['test_bpd'], color='black', s=10, zorder=3)
    top = max(r['max'], r['mean'] + (r['std'] or 0.0))
    ax.text(i, top, f'{r["mean"]:.3f}\n', ha='center', va='bottom', fontsize=8)
  ax.set_xticks(range(len(rows)))
  short = {'none': 'no augm.', 'plain noise': '+ plain\nnoise', 'pre-conditioned noise':
           '+ pre-cond.\nnoise'}
  ax.set_xticklabels([f'{r["row"]}. {COUPLING_LABEL[r["coupling"]]}\n{short[r["augmentation"]]}'
                      for r in rows], fontsize=8)
  if done:
    lo = min(r['min'] for r in done)
    hi = max(r['max'] for r in done)
    pad = max(0.15 * (hi - lo), 0.01)
    ax.set_ylim(lo - 3 * pad, hi + 2 * pad)
  ax.set_ylabel(f'test bits/dim (IWBO, k={config.eval.iwbo_k}); y axis does not start at 0')
  ax.set_title('Table-4 ablation, small scale (error bars: seed std; dots: seeds)', fontsize=9)
  styles = {'none': '-', 'plain noise': '--', 'pre-conditioned noise': ':'}
  for run in sorted(results['runs'].values(),
                    key=lambda r: (r.get('variant', ''), r.get('seed', 0))):
    curve = run.get('train_curve') or []
    if run.get('status') != 'done' or not curve:
      continue
    coupling, _, _, label, _ = VARIANTS[run['variant']]
    style = styles[label]
    ax2.plot([s for s, _ in curve], [v for _, v in curve], style, color=colors[coupling],
             linewidth=1.0, label=f'{run["variant"]} s{run["seed"]}')
  ax2.set_xlabel('step')
  ax2.set_ylabel('train bits/dim (mean over log window)')
  ax2.set_title('training curves', fontsize=9)
  curves = [v for r in results['runs'].values() for _, v in (r.get('train_curve') or [])]
  if curves:
    ends = [r['train_bpd_final'] for r in results['runs'].values()
            if r.get('train_bpd_final') is not None]
    ax2.set_ylim(min(curves) - 0.1, max(ends) + 1.0)
  ax2.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  fig.savefig(path + '.tmp.png', dpi=110)
  plt.close(fig)
  os.replace(path + '.tmp.png', path)


def write_outputs(out_dir: str, results: Dict[str, Any], config) -> None:
  rows = summarise(results)
  results['summary'] = rows
  results['updated'] = time.strftime('%Y-%m-%d %H:%M:%S')
  write_json(os.path.join(out_dir, RESULTS_JSON), results)
  write_table(os.path.join(out_dir, TABLE_MD), rows, results, config)
  write_plot(os.path.join(out_dir, PLOT_PNG), rows, results, config)
