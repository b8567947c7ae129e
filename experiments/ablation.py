r"""The Table-4 ablation: Glow vs DenseFlow coupling x {no augmentation, plain noise,
pre-conditioned noise}, trained under identical settings and scored by test bits/dim (IWBO).

`python experiments/ablation.py --config configs/ablation_small.py \
   --config.ablation.output_dir=/tmp/ablation_run/out [--config.train.num_steps=300 ...]`

Every variant gets the same model config apart from `model.coupling`, `model.augment` and
`model.noise` (so the same number of glow-like modules), the same optimizer and schedule, the
same number of steps, batch and seed. The rows named in `ablation.repeat` are trained again
with `ablation.num_seeds - 1` further seeds. Each run is an ordinary training workdir
(`denseflow_jax.train.train_and_evaluate`) under `<output_dir>/runs/<variant>_seed<s>/`; its
final parameters are scored on the test split by the importance-weighted bound with
`eval.iwbo_k` draws per image (`DenseFlow.iwbo`, the same noise seed for every run).

Outputs in `<output_dir>`, rewritten after every finished run:
  ablation.json   config, hardware, and per run: test bits/dim (mean and standard error over
                  test images), parameter count, wall/CPU times, steady step time, load
                  average, train curve; plus the per-variant summary (mean and seed spread)
  ablation.md     the Markdown table (with the paper's DenseFlow-45-6 numbers beside ours)
  ablation.png    bar plot of test bits/dim (error bars: seed standard deviation, dots: seeds)
                  and the training curves

Restarting the same command skips runs recorded as done in ablation.json and resumes an
unfinished run from its newest checkpoint, so a crash loses at most the steps since that
checkpoint. A done run whose config differs from the current one is an error (use a new
output_dir). Relative data paths resolve against the repository root. Exit status: 0 done,
2 invalid config, 130 interrupted (SIGINT/SIGTERM; finished runs are kept).
"""
import hashlib
import json
import math
import os
import re
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import app, flags, logging
from ml_collections import config_flags

from denseflow_jax import defaults
from denseflow_jax.benchmarking import measure

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Ablation config file '
                                          '(e.g. configs/ablation_small.py).', lock_config=True)
flags.mark_flags_as_required(['config'])

# Table-4 rows in the paper's order: name -> (coupling, augment, noise, row label, paper bpd).
VARIANTS = defaults.TABLE4
COUPLING_LABEL = {'glow': 'Glow', 'denseflow': 'DenseFlow'}
RESULTS_JSON, TABLE_MD, PLOT_PNG = 'ablation.json', 'ablation.md', 'ablation.png'
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------- plan and configs


def _names(text: str, what: str) -> List[str]:
  names = [n.strip() for n in str(text).split(',') if n.strip()]
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    raise ValueError(f'ablation.{what}: unknown variants {unknown}; expected names from '
                     f'{list(VARIANTS)}')
  return names


def run_plan(config) -> List[Tuple[str, int]]:
  """(variant, seed) pairs in run order: every variant with train.seed (in Table-4 order),
  then the further seeds of the repeated rows."""
  a = config.ablation
  variants = _names(a.variants, 'variants')
  if not variants:
    raise ValueError('ablation.variants is empty')
  repeat = _names(a.repeat, 'repeat')
  if int(a.num_seeds) < 1:
    raise ValueError(f'ablation.num_seeds={a.num_seeds} must be >= 1')
  base = int(config.train.seed)
  ordered = [v for v in VARIANTS if v in variants]
  plan = [(v, base) for v in ordered]
  for i in range(1, int(a.num_seeds)):
    plan += [(v, base + i) for v in ordered if v in repeat]
  return plan


def run_key(variant: str, seed: int) -> str:
  return f'{variant}_seed{seed}'


def run_config(config, variant: str, seed: int):
  """The plain experiment config of one run: no `ablation` section, the variant's model
  switches and the seed set."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  values = config.to_dict()
  values.pop('ablation', None)
  cfg = ml_collections.ConfigDict(values)
  defaults.set_table4_variant(cfg, variant)
  cfg.train.seed = int(seed)
  return cfg


def fingerprint(cfg) -> str:
  """sha256 (16 hex digits) of a config's JSON (sorted keys)."""
  text = cfg.to_json(sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def resolve_paths(cfg) -> None:
  """Relative npz paths -> absolute paths under the repository root (in place)."""
  for field in ('train_npz', 'test_npz'):
    path = cfg.data.get(field, '')
    if path and not os.path.isabs(path):
      cfg.data[field] = os.path.normpath(os.path.join(REPO_ROOT, os.path.expanduser(path)))


# ----------------------------------------------------------------------------- measurements


class _StepRateCapture:
  """Collects the `steps_per_sec=` values that the training loop's progress reporter logs.

  clu's ReportProgress measures each interval between two log points after the first step, so
  the values exclude compilation; their median is the steady-state step rate.
  """

  _PATTERN = re.compile(r'steps_per_sec=([0-9.eE+-]+)')

  def __init__(self):
    import logging as logging_std  # pylint: disable=g-import-not-at-top
    self.values: List[float] = []
    capture = self

    class Handler(logging_std.Handler):

      def emit(self, record):
        match = capture._PATTERN.search(record.getMessage())
        if match:
          capture.values.append(float(match.group(1)))

    self._handler = Handler()

  def __enter__(self):
    logging.get_absl_logger().addHandler(self._handler)
    return self

  def __exit__(self, *exc):
    logging.get_absl_logger().removeHandler(self._handler)
    return False

  def step_seconds(self) -> Optional[float]:
    rates = sorted(v for v in self.values if v > 0)
    if not rates:
      return None
    mid = len(rates) // 2
    median = rates[mid] if len(rates) % 2 else 0.5 * (rates[mid - 1] + rates[mid])
    return 1.0 / median


# ----------------------------------------------------------------------------- one run


def evaluate_iwbo(cfg, model, variables, mesh, eval_seed: int) -> Dict[str, Any]:
  """Test bits/dim by the IWBO (`eval.iwbo_k` draws, `eval.iwbo_chunk` at a time)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from denseflow_jax import data as data_lib, parallel  # pylint: disable=g-import-not-at-top
  from denseflow_jax.config_check import plan_model  # pylint: disable=g-import-not-at-top
  dataset = data_lib.make_data(cfg, jax.process_index(), jax.process_count())
  if dataset.test is None:
    raise ValueError('the config has no test split (set data.holdout or data.test_npz)')
  k, chunk = int(cfg.eval.iwbo_k), int(cfg.eval.iwbo_chunk)
  chunk = min(chunk, k) if chunk > 0 else k
  sharded = parallel.ShardedModel(model, mesh)
  base_key = jax.random.PRNGKey(int(eval_seed))
  values = []
  for i, batch in enumerate(dataset.eval_batches(int(cfg.eval.max_examples))):
    key = np.asarray(jax.random.fold_in(base_key, i))
    lower = parallel.to_host(sharded.iwbo(variables, batch.images, key, k, chunk))
    mask = parallel.to_host(parallel.shard_batch(batch.mask, mesh))
    values.append(np.asarray(lower, np.float64)[np.asarray(mask, bool)])
  lower = np.concatenate(values)
  bpd = -lower / (plan_model(cfg.model).num_dims * math.log(2.0))
  n = int(bpd.size)
  return {'test_bpd': float(bpd.mean()),
          'test_bpd_stderr': float(bpd.std(ddof=1) / math.sqrt(n)) if n > 1 else float('nan'),
          'test_examples': n, 'iwbo_k': k, 'iwbo_chunk': chunk, 'eval_seed': int(eval_seed),
          'test_split': dataset.test.split, 'all_finite': bool(np.all(np.isfinite(bpd)))}


def train_one(cfg, workdir: str, eval_seed: int) -> Dict[str, Any]:
  """Trains (or resumes) one run with `train_and_evaluate`, then scores it by the IWBO."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from denseflow_jax import artifacts, checkpoint, parallel  # pylint: disable=g-import-not-at-top
  from denseflow_jax import train  # pylint: disable=g-import-not-at-top
  from denseflow_jax.model import DenseFlow  # pylint: disable=g-import-not-at-top
  ckpt_dir = checkpoint.checkpoint_dir(workdir)
  resumed = os.path.isdir(ckpt_dir) and bool(os.listdir(ckpt_dir))
  record: Dict[str, Any] = {'resumed': resumed}
  t0, c0 = time.time(), time.process_time()
  with _StepRateCapture() as rates, measure.ResourceSampler(interval=15.0) as load:
    state = train.train_and_evaluate(cfg, workdir)
    jax.block_until_ready(state.params)
    t1, c1 = time.time(), time.process_time()
    mesh = parallel.make_mesh()
    model = DenseFlow(cfg.model)
    record.update(evaluate_iwbo(cfg, model, state.variables(), mesh, eval_seed))
    t2, c2 = time.time(), time.process_time()
  params = parallel.to_host(state.params)
  curve = [(int(r['step']), float(r['train_bpd'])) for r in artifacts.read_metrics(workdir)
           if 'train_bpd' in r]
  record.update(
      steps=int(parallel.to_host(state.step)),
      params=int(sum(np.size(x) for x in jax.tree.leaves(params))),
      train_wall_s=t1 - t0, train_cpu_s=c1 - c0, eval_wall_s=t2 - t1, eval_cpu_s=c2 - c1,
      step_s=rates.step_seconds(), load_avg=load.load_summary(),
      train_bpd_final=curve[-1][1] if curve else None, train_curve=curve)
  return record


# ----------------------------------------------------------------------------- results


def load_results(path: str) -> Dict[str, Any]:
  if not os.path.isfile(path):
    return {'format_version': FORMAT_VERSION, 'runs': {}, 'invocations': []}
  with open(path) as f:
    results = json.load(f)
  if results.get('format_version') != FORMAT_VERSION:
    raise ValueError(f'{path} has format_version {results.get("format_version")}, expected '
                     f'{FORMAT_VERSION}; use a new ablation.output_dir')
  return results


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


def _fmt(value: Optional[float], digits: int = 3) -> str:
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
            f'seed std row 1 = {_fmt(first["std"])} (n={first["n"]}), row 6 = '
            f'{_fmt(last["std"])} (n={last["n"]})')
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
        f'{value} | {r["stderr_test"]:.3f} | {_fmt(r["train_bpd_final"])} | '
        f'{r["params"]:,} | {r["train_wall_s"]:.0f} | {_fmt(r["step_s"], 2)} | '
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
      f'- hardware: {hw.get("cpu_model", "?")}, {hw.get("logical_cpus", hw.get("cpu_cores", "?"))} cores, jax '
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


# ----------------------------------------------------------------------------- main


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  logging.set_verbosity(logging.INFO)
  try:
    if 'ablation' not in config:
      raise ValueError('the config has no `ablation` section (use configs/ablation_small.py)')
    plan = run_plan(config)
    out_dir = os.path.abspath(os.path.expanduser(config.ablation.output_dir))
    if not config.ablation.output_dir:
      raise ValueError('ablation.output_dir is empty')
    from denseflow_jax import data as data_lib, train  # pylint: disable=g-import-not-at-top
    first = run_config(config, *plan[0])  # checks shared by all runs, before any compile
    resolve_paths(first)
    train.validate_config(first)
    if data_lib.make_data(first).test is None:
      raise ValueError('the config has no test split (set data.holdout or data.test_npz)')
    os.makedirs(out_dir, exist_ok=True)
    results = load_results(os.path.join(out_dir, RESULTS_JSON))
  except (ValueError, FileNotFoundError, KeyError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)

  from denseflow_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from denseflow_jax.model import enable_compilation_cache  # pylint: disable=g-import-not-at-top
  checkpoint.quiet_orbax_logs()
  if config.ablation.compilation_cache:
    logging.info('compilation cache: %s', enable_compilation_cache())
  results['hardware'] = measure.machine_info(devices=True)
  results['config'] = json.loads(config.to_json(sort_keys=True))
  results['invocations'].append({'command': ' '.join(sys.argv),
                                 'started': time.strftime('%Y-%m-%d %H:%M:%S'),
                                 'load_avg_at_start': list(os.getloadavg())})
  # Refuse to mix results of different configs before anything is trained.
  for variant, seed in plan:
    done = results['runs'].get(run_key(variant, seed))
    if done and done.get('status') == 'done' and done['fingerprint'] != fingerprint(
        run_config(config, variant, seed)):
      print(f'error: {out_dir}/{RESULTS_JSON} holds run {run_key(variant, seed)} with a '
            'different config; use a new ablation.output_dir', file=sys.stderr)
      sys.exit(2)

  start = time.time()
  for index, (variant, seed) in enumerate(plan, start=1):
    key = run_key(variant, seed)
    if results['runs'].get(key, {}).get('status') == 'done':
      logging.info('[%d/%d] %s: done earlier (test bpd %.4f), skipping', index, len(plan), key,
                   results['runs'][key]['test_bpd'])
      print(f'[{index}/{len(plan)}] {key}: done earlier, skipped', flush=True)
      continue
    cfg = run_config(config, variant, seed)
    fp = fingerprint(cfg)
    resolve_paths(cfg)
    workdir = os.path.join(out_dir, 'runs', key)
    print(f'[{index}/{len(plan)}] {key}: training {cfg.train.num_steps} steps in {workdir}',
          flush=True)
    record = {'variant': variant, 'seed': int(seed), 'fingerprint': fp, 'workdir': workdir,
              'started': time.strftime('%Y-%m-%d %H:%M:%S')}
    try:
      record.update(train_one(cfg, workdir, int(config.ablation.eval_seed)))
      record['status'] = 'done'
    except train.NonFiniteError as e:
      record.update(status='failed', error=str(e))
      logging.error('%s: %s', key, e)
    except train.TrainingInterrupted as e:
      print(f'{key}: {e}; finished runs are in {out_dir}/{RESULTS_JSON}', file=sys.stderr)
      write_outputs(out_dir, results, config)
      sys.exit(130)
    record['finished'] = time.strftime('%Y-%m-%d %H:%M:%S')
    results['runs'][key] = record
    write_outputs(out_dir, results, config)
    if record['status'] == 'done':
      print(f'[{index}/{len(plan)}] {key}: test bpd {record["test_bpd"]:.4f} '
            f'(IWBO k={record["iwbo_k"]}), {record["params"]:,} params, train '
            f'{record["train_wall_s"]:.0f}s (step {_fmt(record["step_s"], 2)}s), eval '
            f'{record["eval_wall_s"]:.0f}s, load {record["load_avg"]["mean"]:.1f}', flush=True)
    else:
      print(f'[{index}/{len(plan)}] {key}: FAILED: {record["error"]}', flush=True)
  results['invocations'][-1]['wall_s'] = time.time() - start
  results['invocations'][-1]['load_avg_at_end'] = list(os.getloadavg())
  write_outputs(out_dir, results, config)
  print(f'wrote {out_dir}/{RESULTS_JSON}, {TABLE_MD}, {PLOT_PNG} '
        f'({time.time() - start:.0f}s)', flush=True)
  print(open(os.path.join(out_dir, TABLE_MD)).read(), flush=True)


if __name__ == '__main__':
  app.run(main)
