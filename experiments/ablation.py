r"""The Table-4 ablation: Glow vs DenseFlow coupling x {no augmentation, plain noise,
pre-conditioned noise}, trained under identical settings and scored by test bits/dim (IWBO).

Usage: python experiments/ablation.py --config=configs/ablation_small.py [--config.FIELD=VALUE]

`python experiments/ablation.py --config configs/ablation_small.py \
   --config.ablation.output_dir=/tmp/ablation_run/out [--config.train.num_steps=300 ...]`

Every variant gets the same model config apart from `model.coupling`, `model.augment` and
`model.noise` (so the same number of glow-like modules), the same optimizer and schedule, the
same number of steps, batch and seed. The rows named in `ablation.repeat` are trained again
with `ablation.num_seeds - 1` further seeds. Each run is an ordinary training workdir
(`denseflow_jax.train.train_and_evaluate`) under `<output_dir>/runs/<variant>_seed<s>/`; its
final parameters are scored on the test split by the importance-weighted bound with
`eval.iwbo_k` draws per image (`denseflow_jax.evaluation.iwbo_bpd`, the same noise seed for
every run); the steady step time is read from the run's metrics.jsonl (`steps_per_sec`).

Outputs in `<output_dir>`, rewritten after every finished run (experiments/ablation_report.py):
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
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import app, flags, logging
from ml_collections import config_flags

from ablation_report import PLOT_PNG, RESULTS_JSON, TABLE_MD, VARIANTS, fmt, write_outputs
from denseflow_jax import cli, defaults
from denseflow_jax.benchmarking import measure

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Ablation config file '
                                          '(e.g. configs/ablation_small.py).', lock_config=True)
flags.mark_flags_as_required(['config'])

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


# ----------------------------------------------------------------------------- one run


def evaluate_iwbo(cfg, model, variables, mesh, eval_seed: int) -> Dict[str, Any]:
  """Test bits/dim by the IWBO (`eval.iwbo_k` draws, `eval.iwbo_chunk` at a time)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from denseflow_jax import data as data_lib, evaluation  # pylint: disable=g-import-not-at-top
  dataset = data_lib.make_data(cfg, jax.process_index(), jax.process_count())
  if dataset.test is None:
    raise ValueError('the config has no test split (set data.holdout or data.test_npz)')
  iwbo = evaluation.iwbo_bpd(model, variables, dataset, mesh, int(cfg.eval.iwbo_k),
                             int(cfg.eval.iwbo_chunk), seed=int(eval_seed),
                             max_examples=int(cfg.eval.max_examples))
  return {'test_bpd': iwbo.mean, 'test_bpd_stderr': iwbo.stderr,
          'test_examples': iwbo.num_examples, 'iwbo_k': iwbo.k, 'iwbo_chunk': iwbo.chunk,
          'eval_seed': int(eval_seed), 'test_split': dataset.test.split,
          'all_finite': bool(np.all(np.isfinite(iwbo.bpd)))}


def step_seconds(rows: Sequence[Dict[str, float]]) -> Optional[float]:
  """1 / median of the `steps_per_sec` values in metrics rows (None if there are none).

  clu's ReportProgress measures each interval between two log points after the first step,
  so the values exclude compilation; their median is the steady-state step rate.
  """
  rates = sorted(r['steps_per_sec'] for r in rows if r.get('steps_per_sec', 0) > 0)
  if not rates:
    return None
  mid = len(rates) // 2
  median = rates[mid] if len(rates) % 2 else 0.5 * (rates[mid - 1] + rates[mid])
  return 1.0 / median


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
  earlier_rows = len(artifacts.read_metrics(workdir))  # rows of previous invocations
  t0, c0 = time.time(), time.process_time()
  with measure.ResourceSampler(interval=15.0) as load:
    state = train.train_and_evaluate(cfg, workdir)
    jax.block_until_ready(state.params)
    t1, c1 = time.time(), time.process_time()
    mesh = parallel.make_mesh()
    model = DenseFlow(cfg.model)
    record.update(evaluate_iwbo(cfg, model, state.variables(), mesh, eval_seed))
    t2, c2 = time.time(), time.process_time()
  params = parallel.to_host(state.params)
  rows = artifacts.read_metrics(workdir)
  curve = [(int(r['step']), float(r['train_bpd'])) for r in rows if 'train_bpd' in r]
  record.update(
      steps=int(parallel.to_host(state.step)),
      params=int(sum(np.size(x) for x in jax.tree.leaves(params))),
      train_wall_s=t1 - t0, train_cpu_s=c1 - c0, eval_wall_s=t2 - t1, eval_cpu_s=c2 - c1,
      step_s=step_seconds(rows[earlier_rows:]), load_avg=load.load_summary(),
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
            f'{record["train_wall_s"]:.0f}s (step {fmt(record["step_s"], 2)}s), eval '
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
  app.run(main, flags_parser=cli.parse_flags)  # --help exits 0; bad flags are one line
