"""Speed and memory of the library's train step, evaluation step and sampling.

  python experiments/benchmark.py --config=configs/tiny.py --batch_sizes=8,64 --xla_flags \
      --out=/tmp/bench_tiny.json --markdown=BENCHMARKS.md
  python experiments/benchmark.py --config=configs/denseflow_74_10.py --batch_sizes=8 \
      --jobs=train,sample --xla_flags --markdown=BENCHMARKS.md

What is timed is what the training loop (`denseflow_jax.train.train_and_evaluate`) runs, built
the same way: the state from `train.make_init_fn`, the step from `train.make_train_step`
(state donated, replicated; batch sharded on the device mesh), the optimizer and schedule of
the config's `train` section; evaluation by `evaluation.make_eval_step`; sampling by
`parallel.ShardedModel.sample`. Inputs are synthetic uint8 images with fixed seeds.

Each measurement runs in a fresh subprocess (one per train batch size, one for evaluation, one
for sampling), so a row's peak host memory is that row's alone. The parent never starts a JAX
backend; it writes the children's results as JSON (`--out`) and inserts rows into the tables of
`--markdown` (BENCHMARKS.md, see `denseflow_jax.benchmarking.report`).

Per job: trace + lower and XLA compile are timed apart from the first call; the reported time
is the median of `--steps` calls after `--warmup`; the matmul peak (`measure.matmul_peak`) is
measured in the same process right before; FLOPs are counted from the jaxpr and read from XLA
(`denseflow_jax.benchmarking.flops`); memory and load average come from
`measure.ResourceSampler`. `--xla_flags` puts `measure.PERF_XLA_FLAGS` into `XLA_FLAGS` of the
children; whether they were on is recorded with every row.
"""
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from denseflow_jax.benchmarking import measure, report

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# glibc malloc settings that keep freed memory between calls (no mmap for large blocks, one
# arena, no trimming, a padded heap top), so XLA's per-call buffers do not page-fault again on
# every call; BENCHMARKS.md has what they change. Set for the children only.
MALLOC_TUNING = {'MALLOC_ARENA_MAX': '1', 'MALLOC_MMAP_MAX_': '0',
                 'MALLOC_TRIM_THRESHOLD_': str(16 * 2 ** 30),
                 'MALLOC_TOP_PAD_': str(512 * 2 ** 20)}
# The schedule's steps per epoch: only the learning-rate values depend on it, not the cost.
STEPS_PER_EPOCH = 1000

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', os.path.join(REPO_ROOT, 'configs', 'tiny.py'),
                                'Experiment config (model and train sections are used).')
flags.DEFINE_list('batch_sizes', ['8', '64'], 'Train-step batch sizes (one row each).')
flags.DEFINE_integer('image_size', 0, 'Overrides config.model.image_size when > 0.')
flags.DEFINE_list('jobs', ['train', 'eval', 'sample'], 'Which measurements to run.')
flags.DEFINE_integer('steps', 7, 'Timed calls per measurement (the median is reported).')
flags.DEFINE_integer('warmup', 2, 'Untimed calls after the first call, before the timed ones.')
flags.DEFINE_integer('eval_batch', 64, 'Batch size of the evaluation measurement.')
flags.DEFINE_list('sample_sizes', ['16', '128'], 'Numbers of images to sample.')
flags.DEFINE_integer('sample_steps', 5, 'Timed sampling calls per size.')
flags.DEFINE_integer('peak_n', 4096, 'Matrix size of the matmul peak measurement.')
flags.DEFINE_integer('peak_reps', 7, 'Timed matmuls of the peak measurement.')
flags.DEFINE_bool('cost_checks', True, 'Compare XLA\'s FLOP counts with analytic ones on '
                  'small programs (in the first train job).')
flags.DEFINE_bool('xla_flags', False, f'Add {measure.PERF_XLA_FLAGS!r} to XLA_FLAGS.')
flags.DEFINE_bool('malloc_tuning', False, f'Run the measurements with {MALLOC_TUNING} in the '
                  'environment (glibc malloc keeps its memory; fewer page faults per call).')
flags.DEFINE_string('label', '', 'Config name in the rows (default: derived from the config).')
flags.DEFINE_string('out', '', 'JSON output path ("" = none).')
flags.DEFINE_string('markdown', '', 'Markdown file to insert rows into ("" = none), e.g. '
                    'BENCHMARKS.md; created with empty tables if missing.')
flags.DEFINE_string('note', '', 'Free text recorded with the rows (e.g. about machine load).')
flags.DEFINE_integer('seed', 0, 'Seed of the synthetic images, and config.train.seed.')
flags.DEFINE_integer('job_timeout', 3600, 'Seconds before a child measurement is abandoned.')
# Internal: a child process runs one job and writes its result to --job_out.
flags.DEFINE_string('job', '', 'Internal: run one job (train | eval | sample) in this process.')
flags.DEFINE_integer('job_batch', 0, 'Internal: batch size of a train job.')
flags.DEFINE_string('job_out', '', 'Internal: where a child writes its JSON result.')


def _config():
  return measure.benchmark_config(FLAGS.config, FLAGS.image_size, FLAGS.seed)


# ---------------------------------------------------------------------------- child side


def qualified_name(jitted) -> str:
  """`module.qualname` of the Python function under a `jax.jit` object."""
  fn = getattr(jitted, '__wrapped__', jitted)
  return f'{fn.__module__}.{fn.__qualname__}'


def _training_setup(batch: int):
  """The training loop's objects (mesh, model, optimizer, initial state) on `batch` images."""
  import jax  # pylint: disable=g-import-not-at-top
  from denseflow_jax import optim, parallel, train  # pylint: disable=g-import-not-at-top
  from denseflow_jax.model import DenseFlow  # pylint: disable=g-import-not-at-top
  config = _config()
  mesh = parallel.make_mesh()
  model = DenseFlow(config.model)
  tx = optim.make_optimizer(config)
  images = parallel.shard_batch(measure.synthetic_images(config.model, batch, FLAGS.seed), mesh)
  t0 = time.perf_counter()
  state = jax.block_until_ready(train.make_init_fn(model, tx, config, mesh)(images))
  return config, mesh, model, tx, images, state, time.perf_counter() - t0


def _aot(jitted, *args) -> Dict[str, Any]:
  """Traces, lowers and compiles `jitted` for `args`, timing each stage."""
  t0 = time.perf_counter()
  traced = jitted.trace(*args)
  t1 = time.perf_counter()
  lowered = traced.lower()
  t2 = time.perf_counter()
  compiled = lowered.compile()
  t3 = time.perf_counter()
  return {'traced': traced, 'lowered': lowered, 'compiled': compiled, 'trace_s': t1 - t0,
          'lower_s': t2 - t1, 'compile_s': t3 - t2}


def _flops_per_img(aot: Dict[str, Any], batch: int, compiled_cost: bool) -> Dict[str, Any]:
  from denseflow_jax.benchmarking import flops  # pylint: disable=g-import-not-at-top
  counted = flops.count_flops(aot['traced'].jaxpr)
  per = lambda v: None if v is None else v / batch
  out = {'counted_matmul_conv': flops.total(counted) / batch,
         'counted_dot': counted['dot'] / batch, 'counted_conv': counted['conv'] / batch,
         'counted_while_loops': counted['while_loops'],
         'xla_lowered': per(flops.xla_flops(aot['lowered'].cost_analysis()))}
  if compiled_cost:
    out['xla_compiled'] = per(flops.xla_flops(aot['compiled'].cost_analysis()))
  return out


def _timed_calls(call, steps: int) -> Dict[str, Any]:
  """First call, `--warmup` calls, then `steps` timed calls, under a ResourceSampler."""
  with measure.ResourceSampler() as sampler:
    t0 = time.perf_counter()
    call()
    first_s = time.perf_counter() - t0
    for _ in range(FLAGS.warmup):
      call()
    faults0 = measure.minor_faults()
    timing = measure.median_time(call, steps)
    faults = (measure.minor_faults() - faults0) / max(steps, 1)
  return {'first_call_s': first_s, 'step': timing, 'step_s': timing['median_s'],
          'minor_faults_per_step': faults, 'peak_rss_run_gib': sampler.peak_rss_gib,
          'load_during': sampler.load_summary()}


def job_train(batch: int) -> Dict[str, Any]:
  """`train.make_train_step`, compiled for the loop's shardings and donation, on `batch`."""
  import jax  # pylint: disable=g-import-not-at-top
  from denseflow_jax import optim, train  # pylint: disable=g-import-not-at-top
  config, mesh, model, tx, images, state, init_s = _training_setup(batch)
  schedule = optim.learning_rate_schedule(config, STEPS_PER_EPOCH)
  train_step = train.make_train_step(model, tx, schedule, mesh)
  aot = _aot(train_step, state, images)
  donated = [a.donated for a in jax.tree.leaves(aot['lowered'].args_info)]
  n_state = len(jax.tree.leaves(state))
  fpi = _flops_per_img(aot, batch, compiled_cost=True)
  peak = measure.matmul_peak(FLAGS.peak_n, FLAGS.peak_reps)
  compiled = aot['compiled']
  holder = {'state': state}

  def call():
    holder['state'], holder['metrics'] = jax.block_until_ready(compiled(holder['state'], images))

  load_before, rss_before_run = measure.load_avg(), measure.peak_rss_gib()
  run = _timed_calls(call, FLAGS.steps)
  load_after = measure.load_avg()
  metrics = jax.device_get(holder['metrics'])
  return {
      'job': 'train', 'batch': batch, 'step_fn': qualified_name(train_step),
      'donated_state': all(donated[:n_state]), 'donated_batch': any(donated[n_state:]),
      'batch_sharding': str(compiled.input_shardings[0][1]),
      'init_s': init_s, 'trace_s': aot['trace_s'], 'lower_s': aot['lower_s'],
      'compile_s': aot['compile_s'],
      'compile_total_s': aot['trace_s'] + aot['lower_s'] + aot['compile_s'],
      **run, 'img_s': batch / run['step_s'], 'loss_bpd': float(metrics['loss']),
      'finite': bool(metrics['finite']), 'flops_per_img': fpi, 'matmul_peak': peak,
      'load_before': load_before, 'load_after': load_after,
      'peak_rss_gib': measure.peak_rss_gib(), 'peak_rss_before_run_gib': rss_before_run,
      'rss_after_gib': measure.current_rss_gib(), 'device_memory': measure.device_memory(),
  }


def job_eval() -> Dict[str, Any]:
  """`evaluation.make_eval_step` (what `evaluation.evaluate_bpd` calls per batch) at `--eval_batch`."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from denseflow_jax import evaluation, parallel  # pylint: disable=g-import-not-at-top
  batch = FLAGS.eval_batch
  config, mesh, model, _, images, state, init_s = _training_setup(batch)
  eval_step = evaluation.make_eval_step(model, config, mesh)
  variables = state.variables()
  mask = parallel.shard_batch(np.ones((batch,), bool), mesh)
  index = parallel.replicate(np.int32(0), mesh)
  aot = _aot(eval_step, variables, images, mask, index)
  fpi = _flops_per_img(aot, batch, compiled_cost=False)
  peak = measure.matmul_peak(FLAGS.peak_n, FLAGS.peak_reps)
  compiled = aot['compiled']
  call = lambda: jax.block_until_ready(compiled(variables, images, mask, index))
  load_before = measure.load_avg()
  run = _timed_calls(call, FLAGS.steps)
  load_after = measure.load_avg()
  return {
      'job': 'eval', 'batch': batch, 'step_fn': qualified_name(eval_step), 'init_s': init_s,
      'trace_lower_s': aot['trace_s'] + aot['lower_s'], 'compile_s': aot['compile_s'],
      **run, 'img_s': batch / run['step_s'], 'flops_per_img': fpi,
      'frac_of_peak_counted': fpi['counted_matmul_conv'] * batch / run['step_s'] / 1e9 /
                              peak['gflop_s'],
      'matmul_peak': peak, 'load_before': load_before, 'load_after': load_after,
      'peak_rss_gib': measure.peak_rss_gib(), 'device_memory': measure.device_memory(),
  }


_COMPILE_EVENTS = ('/jax/core/compile/jaxpr_trace_duration',
                   '/jax/core/compile/jaxpr_to_mlir_module_duration',
                   '/jax/core/compile/backend_compile_duration')


def job_sample() -> Dict[str, Any]:
  """`parallel.ShardedModel.sample` (what the loop's evaluation and sample.py call) per size.

  The compile time is the sum of JAX's trace, lowering and compile durations during the first
  call (`jax.monitoring` events).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from denseflow_jax import parallel  # pylint: disable=g-import-not-at-top
  config, mesh, model, _, _, state, init_s = _training_setup(8)
  sampler = parallel.ShardedModel(model, mesh)
  variables = state.variables()
  key = np.asarray(jax.random.PRNGKey(FLAGS.seed + 3))
  temperature = float(config.eval.temperature)
  durations = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, seconds, **kw: durations.append(seconds) if event in _COMPILE_EVENTS
      else None)
  load_before = measure.load_avg()
  rows = []
  for n in [int(s) for s in FLAGS.sample_sizes]:
    call = lambda n=n: jax.block_until_ready(sampler.sample(variables, key, n, temperature))
    durations.clear()
    t0 = time.perf_counter()
    call()
    first_s = time.perf_counter() - t0
    compile_s = sum(durations)
    timing = measure.median_time(call, FLAGS.sample_steps)
    rows.append({'n': n, 'compile_s': compile_s, 'first_call_s': first_s, 'time': timing,
                 'time_s': timing['median_s'], 'img_s': n / timing['median_s']})
  return {'job': 'sample', 'step_fn': f'{type(sampler).__module__}.ShardedModel.sample',
          'init_s': init_s, 'sizes': rows, 'load_before': load_before,
          'load_after': measure.load_avg(), 'peak_rss_gib': measure.peak_rss_gib(),
          'device_memory': measure.device_memory()}


def run_child_job() -> None:
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_enable_compilation_cache', False)  # compile times must be real
  info = {'device': measure.device_info(), 'xla_flags_env': os.environ.get('XLA_FLAGS', '')}
  if FLAGS.job == 'train':
    result = job_train(FLAGS.job_batch)
    if FLAGS.cost_checks:
      from denseflow_jax.benchmarking import flops  # pylint: disable=g-import-not-at-top
      result['xla_cost_checks'] = flops.xla_cost_checks()  # after the peak RSS was read
  elif FLAGS.job == 'eval':
    result = job_eval()
  elif FLAGS.job == 'sample':
    result = job_sample()
  else:
    raise ValueError(f'unknown --job={FLAGS.job!r}')
  result.update(info)
  with open(FLAGS.job_out, 'w') as f:
    json.dump(result, f, indent=1)


# ---------------------------------------------------------------------------- parent side


def spawn(job: str, argv: Sequence[str], env: Dict[str, str], batch: int = 0,
          extra: Sequence[str] = ()) -> Dict[str, Any]:
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'result.json')
    cmd = [sys.executable, os.path.abspath(__file__), *argv[1:], f'--job={job}',
           f'--job_batch={batch}', f'--job_out={out}', *extra]
    logging.info('running %s (batch %d)', job, batch)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=FLAGS.job_timeout)
    if proc.returncode != 0 or not os.path.exists(out):
      raise RuntimeError(f'benchmark job {job} (batch {batch}) failed with code '
                         f'{proc.returncode}:\n{proc.stderr[-6000:]}')
    with open(out) as f:
      result = json.load(f)
    result['process_wall_s'] = time.perf_counter() - t0
    return result


def run_parent(argv: Sequence[str]) -> Dict[str, Any]:
  config = _config()
  model_cfg = config.model
  key = report.published_key(model_cfg)
  pub = report.PUBLISHED.get(key) if key else None
  env = dict(os.environ)
  if FLAGS.xla_flags:
    env['XLA_FLAGS'] = measure.with_perf_xla_flags(env.get('XLA_FLAGS', ''))
  if FLAGS.malloc_tuning:
    env.update(MALLOC_TUNING)
  machine = measure.machine_info()
  meta = {
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'git': measure.git_info(REPO_ROOT, ignore=('BENCHMARKS.md',)), 'machine': machine,
      'jax': machine['jax'], 'jaxlib': machine['jaxlib'], 'xla_flags': FLAGS.xla_flags,
      'XLA_FLAGS': env.get('XLA_FLAGS', ''), 'malloc_tuning': FLAGS.malloc_tuning,
      'malloc_env': {k: env[k] for k in sorted(env) if k.startswith('MALLOC_')},
      'label': FLAGS.label or report.config_label(model_cfg),
      'published_key': key, 'model_config': model_cfg.to_dict(),
      'train_config': config.train.to_dict(), 'argv': list(argv),
      'steps': FLAGS.steps, 'warmup': FLAGS.warmup, 'note': FLAGS.note,
      'load_at_start': measure.load_avg(),
  }
  result: Dict[str, Any] = {'meta': meta, 'train': [], 'eval': None, 'sample': None,
                            'published': pub, 'published_peak_gflop_s': report.PUBLISHED_PEAK}
  jobs = [j.strip() for j in FLAGS.jobs]
  if 'train' in jobs:
    for i, b in enumerate(int(s) for s in FLAGS.batch_sizes):
      row = spawn('train', argv, env, batch=b, extra=['--nocost_checks'] if i else [])
      if 'xla_cost_checks' in row:
        result['xla_cost_checks'] = row.pop('xla_cost_checks')
      row['summary'] = report.summarize_train(row, pub['train'].get(b) if pub else None)
      if key == 'denseflow_74_10':
        row['summary']['compile_within_target'] = (row['compile_total_s'] <
                                                   report.TARGET_COMPILE_S)
      result['train'].append(row)
      logging.info('train batch %d: %.3f s/step, %s', b, row['step_s'], row['summary'])
  if 'eval' in jobs:
    result['eval'] = spawn('eval', argv, env)
    result['eval']['meets_target'] = (result['eval']['frac_of_peak_counted'] >=
                                      report.TARGET_EVAL_FRAC)
  if 'sample' in jobs:
    result['sample'] = spawn('sample', argv, env)
    for s in result['sample']['sizes']:
      pub_s = pub['sample_s'].get(s['n']) if pub else None
      if pub_s:
        s['published_s'] = pub_s
        s['speedup'] = pub_s / s['time_s']
        s['meets_target'] = s['speedup'] >= report.TARGET_RATIO
  first = result['train'] or [r for r in (result['eval'], result['sample']) if r]
  if first:
    meta['device'] = first[0]['device']
  meta['load_at_end'] = measure.load_avg()
  if FLAGS.out:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, 'w') as f:
      json.dump(result, f, indent=1)
  if FLAGS.markdown:
    report.insert_markdown(FLAGS.markdown, report.markdown_rows(result))
  return result


def main(argv: Sequence[str]) -> None:
  if FLAGS.job:
    if FLAGS.xla_flags:
      os.environ['XLA_FLAGS'] = measure.with_perf_xla_flags(os.environ.get('XLA_FLAGS', ''))
    run_child_job()
    return
  result = run_parent(sys.argv)
  for r in result['train']:
    print(json.dumps({'batch': r['batch'], 'step_s': r['step_s'], 'img_s': r['img_s'],
                      'compile_total_s': r['compile_total_s'], 'peak_rss_gib': r['peak_rss_gib'],
                      **r['summary']}))
  for kind in ('eval', 'sample'):
    if result[kind]:
      r = dict(result[kind])
      r.pop('device', None)
      print(kind, json.dumps({k: v for k, v in r.items() if k not in ('step',)})[:2000])


if __name__ == '__main__':
  app.run(main)
