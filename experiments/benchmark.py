r"""Speed and memory of what users run: the library's train step, the training loop, evaluation
and sampling, each row against the published code in the matmul unit, with its validity.

Usage: python experiments/benchmark.py --config=configs/tiny.py [--out=bench.json]
         [--jobs=step,loop,eval,sample] [--batch_sizes=8,64] [--markdown=BENCHMARKS.md]

  python experiments/benchmark.py --config=configs/denseflow_45_6.py
  python experiments/benchmark.py --config=configs/denseflow_74_10.py --jobs=step,loop,sample

Rows (each measured in a fresh subprocess, so its peak RSS is that process's alone):
- `step`: `denseflow_jax.train.make_train_step`, built as `train._train_locked` builds it
  (`parallel.make_mesh()`, `optim.make_optimizer(config)`, `optim.learning_rate_schedule`,
  the state from `train.make_init_fn`: the real init), on synthetic uint8 images; the median
  of `--steps` calls after `--warmup`.
- `loop`: the real training loop, `train.train_and_evaluate`, for `--loop_steps` steps on the
  offline data in a temporary workdir (the CIFAR-10 training subset in ../shared/data when the
  model takes 32x32x3 8-bit images, the embedded digits when it takes 8x8x1 5-bit ones, or the
  config's own npz / digits data; `--loop_data` chooses). Its process does what
  experiments/train.py --cpu_tuning does (`cpu_tuning.apply()`, a persistent compilation cache, here an
  empty one: a cold start) and reports: the step time (1 / median `steps_per_sec` of
  metrics.jsonl, written by the loop at every log point), the time to the first finished step
  (from just before the process was started to the loop's 'first train step done' log line,
  less the time of the matmul peak measured before training), the peak RSS of the whole process
  and the train bits/dim curve. `--loop_warm_start` runs it again on the filled
  cache (a warm start).
- `eval`: `evaluation.make_eval_step` at `--eval_batch`, with its fraction of the matmul peak
  (target >= 85%).
- `sample`: `parallel.ShardedModel.sample` of `--sample_sizes` images.

Peak RSS: the row process's own high-water mark (`VmHWM`, read when its rows are done; the
`ru_maxrss` of `os.wait4`, which Linux raises to the parent's size at the fork, is kept too).

Every row records the 1-minute load average when its process started and the time of one
f32 4096^3 `jnp.dot` (`measure.matmul_peak`) in that process just before and just after its
timed calls; a row whose starting load exceeds 0.5 or whose two peaks differ by more than 10%
is NOT VALID (`denseflow_jax.benchmarking.report.validity`). Each row prints seconds, the
matmul unit (seconds / one such dot), the published reference in the same unit and the speed
ratio (published units / ours: > 1 is faster), the target (1.3x faster than published), the
peak RSS against the published one, the load and both peaks. The rows go to the JSON file of
`--out` (rewritten after every row; by default in <tmp>/denseflow_benchmark/);
`--markdown=BENCHMARKS.md` inserts the valid rows above the table marker there.

Accelerator mode (`--mode=auto` picks it when `jax.default_backend()` is a GPU or TPU): the
train step at batch `--accel_batch` (64) of every config in `--accel_configs` (tiny, 45-6,
74-10) in float32 and bfloat16 (`config.model.compute_dtype`; skipped with a message where
the config has no such field), 128 samples of 74-10 (the paper: 0.96 s on an RTX 3090), the
matmul peak in both precisions (8192^3 dots) before and after in every process, the fraction
of the matching peak (FLOPs counted from the jaxpr, `benchmarking.flops`), and the device's
peak memory (`memory_stats()['peak_bytes_in_use']`) next to the host RSS.

Inputs are synthetic with fixed seeds (step, eval, sample) or the offline data (loop); the
persistent compilation cache is off in step, eval and sample processes, so compile times are
real. Exit status: 0, or 1 when a row's process failed (the other rows are still written).
"""
import datetime
import json
import logging as logging_std
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

from absl import flags, logging
from ml_collections import config_flags

from denseflow_jax import cli
from denseflow_jax.benchmarking import loop, measure, report

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACCEL_CONFIGS = ('configs/tiny.py', 'configs/denseflow_45_6.py', 'configs/denseflow_74_10.py')
DTYPES = ('float32', 'bfloat16')
# The step row's schedule: only the learning-rate values depend on the steps per epoch.
STEPS_PER_EPOCH = 1000

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', os.path.join(REPO_ROOT, 'configs', 'tiny.py'),
                                'Experiment config (model and train sections are used).')
flags.DEFINE_enum('mode', 'auto', ['auto', 'cpu', 'accelerator'],
                  'auto: accelerator mode when JAX sees a GPU or TPU.')
flags.DEFINE_list('jobs', [], 'Rows to measure: step, loop, eval, sample (default: '
                  'step,loop,eval,sample on CPU; step,sample on an accelerator).')
flags.DEFINE_list('batch_sizes', [], 'Train-step batch sizes (default: the published rows of '
                  'the config, else 8).')
flags.DEFINE_list('loop_batch_sizes', ['8'], 'Batch sizes of the training-loop rows.')
flags.DEFINE_integer('settle_s', 240, 'Before each row, wait up to this many seconds for the '
                     '1-minute load average to fall to the validity limit (the previous row '
                     'counts in it for about a minute); 0 = start at once.')
flags.DEFINE_list('dtypes', [], 'model.compute_dtype of the rows (default: float32 on CPU, '
                  'float32,bfloat16 on an accelerator).')
flags.DEFINE_integer('image_size', 0, 'Overrides config.model.image_size when > 0.')
flags.DEFINE_integer('steps', 7, 'Timed calls per measurement (the median is reported).')
flags.DEFINE_integer('warmup', 2, 'Untimed calls after the first call, before the timed ones.')
flags.DEFINE_integer('eval_batch', 64, 'Batch size of the evaluation row.')
flags.DEFINE_list('sample_sizes', [], 'Numbers of images to sample (default: 16 on CPU, 128 '
                  'on an accelerator).')
flags.DEFINE_integer('sample_steps', 5, 'Timed sampling calls per size.')
flags.DEFINE_integer('peak_n', 0, 'Matrix size of the matmul peaks (default 4096 on CPU, the '
                     "matmul unit's size; 8192 on an accelerator).")
flags.DEFINE_integer('peak_reps', 7, 'Timed matmuls per peak measurement.')
flags.DEFINE_list('accel_configs', list(ACCEL_CONFIGS), 'Accelerator mode: configs of the '
                  'train-step rows.')
flags.DEFINE_integer('accel_batch', 64, 'Accelerator mode: batch of the train-step rows.')
flags.DEFINE_list('accel_sample_configs', ['configs/denseflow_74_10.py'],
                  'Accelerator mode: configs of the sampling rows.')
flags.DEFINE_integer('loop_steps', 40, 'Training steps of a loop row.')
flags.DEFINE_integer('loop_log_every', 10, 'train.log_every of a loop row (steps/s is written '
                     'at every log point).')
flags.DEFINE_string('loop_data', '', "Loop rows' data: '' = automatic (see the module doc), "
                    "'digits', or the path of an npz file with an 'images' array.")
flags.DEFINE_bool('loop_warm_start', False, 'Run each loop row a second time on the '
                  'compilation cache the first run filled (warm start-up).')
flags.DEFINE_bool('cpu_tuning', True, 'Apply denseflow_jax.cpu_tuning in every row process, as '
                  'experiments/train.py --cpu_tuning does (XLA:CPU flags, glibc malloc).')
flags.DEFINE_bool('cost_checks', False, "Add XLA's FLOP counts of small programs against "
                  'analytic ones (in the first step row).')
flags.DEFINE_string('label', '', 'Config name in the rows (default: derived from the config).')
flags.DEFINE_string('out', '', 'JSON output path (default: '
                    '<tmp>/denseflow_benchmark/<config>_<UTC time>.json).')
flags.DEFINE_string('markdown', '', 'Markdown file whose table gets the valid rows ("" = none).')
flags.DEFINE_bool('markdown_invalid', False, 'Also insert NOT VALID rows into --markdown.')
flags.DEFINE_string('note', '', 'Free text recorded with the rows.')
flags.DEFINE_integer('seed', 0, 'Seed of the synthetic images, and config.train.seed.')
flags.DEFINE_integer('job_timeout', 3600, 'Seconds before a row process is killed.')
flags.DEFINE_integer('deadline_s', 0, 'Skip the rows that would start after this many seconds '
                     '(0 = no deadline); a running row is cut at the deadline.')
# Internal: a child process measures one row (or one process's rows) and writes --job_out.
flags.DEFINE_string('job', '', 'Internal: step | loop | eval | sample.')
flags.DEFINE_integer('job_batch', 0, 'Internal: batch size.')
flags.DEFINE_string('job_dtype', 'float32', 'Internal: model.compute_dtype.')
flags.DEFINE_list('job_peak_dtypes', ['float32'], 'Internal: matmul peak precisions.')
flags.DEFINE_string('job_out', '', 'Internal: where the child writes its JSON result.')
flags.DEFINE_float('job_spawn_time', 0.0, 'Internal: time.time() just before the child started.')
flags.DEFINE_string('job_workdir', '', 'Internal: workdir of a loop row.')
flags.DEFINE_string('job_cache_dir', '', 'Internal: compilation cache of a loop row.')

_LOAD_AT_IMPORT = measure.load_avg()  # a row's load: when its process started


# ---------------------------------------------------------------------------- configs


def _config():
  config = measure.benchmark_config(FLAGS.config, FLAGS.image_size, FLAGS.seed)
  if not loop.set_compute_dtype(config, FLAGS.job_dtype):
    raise ValueError(f'config.model has no compute_dtype field: cannot run {FLAGS.job_dtype}')
  return config


# ---------------------------------------------------------------------------- child side


def qualified_name(jitted) -> str:
  """`module.qualname` of the Python function under a `jax.jit` object."""
  fn = getattr(jitted, '__wrapped__', jitted)
  return f'{fn.__module__}.{fn.__qualname__}'


def _peaks() -> Dict[str, Dict[str, Any]]:
  return {dt: measure.matmul_peak(FLAGS.peak_n, FLAGS.peak_reps, dt)
          for dt in FLAGS.job_peak_dtypes}


def _training_setup(batch: int, before_init=None):
  """What `train._train_locked` builds: mesh, model, optimizer, the initial state on `batch`.

  `before_init(model, tx, config, mesh, abstract_state, images)`, if given, runs before the
  init program (the loop compiles its train step there); freed memory is handed back to the
  kernel after it and after the init, as the loop does. Returns its result last.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from denseflow_jax import cpu_tuning, optim, parallel, train  # pylint: disable=g-import-not-at-top
  from denseflow_jax.model import DenseFlow  # pylint: disable=g-import-not-at-top
  config = _config()
  mesh = parallel.make_mesh()
  model = DenseFlow(config.model)
  tx = optim.make_optimizer(config)
  images = parallel.shard_batch(measure.synthetic_images(config.model, batch, FLAGS.seed), mesh)
  init_fn = train.make_init_fn(model, tx, config, mesh)
  before = None
  if before_init is not None:
    rep = parallel.replicated_sharding(mesh)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                            init_fn.abstract(images))
    before = before_init(model, tx, config, mesh, abstract, images)
    cpu_tuning.release_free_memory()
  t0 = time.perf_counter()
  state = jax.block_until_ready(init_fn(images))
  init_s = time.perf_counter() - t0
  cpu_tuning.release_free_memory()
  return config, mesh, model, tx, images, state, init_s, before


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


def _counted_flops(aot: Dict[str, Any]) -> float:
  from denseflow_jax.benchmarking import flops  # pylint: disable=g-import-not-at-top
  return flops.total(flops.count_flops(aot['traced'].jaxpr))


def _timed(call, steps: int) -> Dict[str, Any]:
  """First call, `--warmup` calls, the peaks, `steps` timed calls, the peaks again."""
  t0 = time.perf_counter()
  call()
  first_s = time.perf_counter() - t0
  for _ in range(FLAGS.warmup):
    call()
  before = _peaks()
  with measure.ResourceSampler() as sampler:
    faults0 = measure.minor_faults()
    timing = measure.median_time(call, steps)
    faults = (measure.minor_faults() - faults0) / max(steps, 1)
  after = _peaks()
  return {'first_call_s': first_s, 'times_s': timing['times_s'], 'seconds': timing['median_s'],
          'minor_faults_per_call': faults, 'peak_rss_timed_gib': sampler.peak_rss_gib,
          'load_during': sampler.load_summary(), 'matmul_before': before,
          'matmul_after': after}


def job_step(batch: int) -> List[Dict[str, Any]]:
  """`train.make_train_step` with the loop's optimizer, schedule, mesh, donation and init."""
  import jax  # pylint: disable=g-import-not-at-top
  from denseflow_jax import optim, train  # pylint: disable=g-import-not-at-top

  def compile_step(model, tx, config, mesh, abstract, images):  # as the loop: before the init
    step_fn = train.make_train_step(model, tx, optim.learning_rate_schedule(
        config, STEPS_PER_EPOCH), mesh)
    return step_fn, _aot(step_fn, abstract, images)

  _, _, _, _, images, state, init_s, (train_step, aot) = _training_setup(batch, compile_step)
  donated = [a.donated for a in jax.tree.leaves(aot['lowered'].args_info)]
  n_state = len(jax.tree.leaves(state))
  compiled = aot['compiled']
  holder = {'state': state}

  def call():
    holder['state'], holder['metrics'] = jax.block_until_ready(compiled(holder['state'], images))

  run = _timed(call, FLAGS.steps)
  metrics = jax.device_get(holder['metrics'])
  return [{
      'kind': 'step', 'batch': batch, 'step_fn': qualified_name(train_step),
      'donated_state': all(donated[:n_state]), 'donated_batch': any(donated[n_state:]),
      'batch_sharding': str(compiled.input_shardings[0][1]), 'init_s': init_s,
      'trace_s': aot['trace_s'], 'lower_s': aot['lower_s'], 'compile_s': aot['compile_s'],
      **run, 'img_s': batch / run['seconds'], 'loss_bpd': float(metrics['loss']),
      'finite': bool(metrics['finite']), 'flops': _counted_flops(aot),
  }]


def job_eval() -> List[Dict[str, Any]]:
  """`evaluation.make_eval_step` (what `evaluation.evaluate_bpd` calls per batch)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from denseflow_jax import evaluation, parallel  # pylint: disable=g-import-not-at-top
  batch = FLAGS.eval_batch
  config, mesh, model, _, images, state, init_s, _ = _training_setup(batch)
  eval_step = evaluation.make_eval_step(model, config, mesh)
  variables = state.variables()
  mask = parallel.shard_batch(np.ones((batch,), bool), mesh)
  index = parallel.replicate(np.int32(0), mesh)
  aot = _aot(eval_step, variables, images, mask, index)
  compiled = aot['compiled']
  run = _timed(lambda: jax.block_until_ready(compiled(variables, images, mask, index)),
               FLAGS.steps)
  return [{'kind': 'eval', 'batch': batch, 'step_fn': qualified_name(eval_step),
           'init_s': init_s, 'trace_s': aot['trace_s'], 'lower_s': aot['lower_s'],
           'compile_s': aot['compile_s'], **run, 'img_s': batch / run['seconds'],
           'flops': _counted_flops(aot)}]


_COMPILE_EVENTS = ('/jax/core/compile/jaxpr_trace_duration',
                   '/jax/core/compile/jaxpr_to_mlir_module_duration',
                   '/jax/core/compile/backend_compile_duration')


def job_sample(sizes: Sequence[int]) -> List[Dict[str, Any]]:
  """`parallel.ShardedModel.sample` (what the loop's evaluation and sample.py call) per size;
  one process for all sizes: the peaks are measured before the first and after the last."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from denseflow_jax import parallel  # pylint: disable=g-import-not-at-top
  config, mesh, model, _, _, state, init_s, _ = _training_setup(8)
  sampler = parallel.ShardedModel(model, mesh)
  variables = state.variables()
  key = np.asarray(jax.random.PRNGKey(FLAGS.seed + 3))
  temperature = float(config.eval.temperature)
  durations = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, seconds, **kw: durations.append(seconds) if event in _COMPILE_EVENTS
      else None)
  calls, rows = {}, []
  for n in sizes:  # compile and warm up every size first
    calls[n] = lambda n=n: jax.block_until_ready(sampler.sample(variables, key, n, temperature))
    durations.clear()
    t0 = time.perf_counter()
    calls[n]()
    rows.append({'kind': 'sample', 'n': n, 'first_call_s': time.perf_counter() - t0,
                 'compile_s': sum(durations), 'init_s': init_s,
                 'step_fn': f'{type(sampler).__module__}.ShardedModel.sample'})
    for _ in range(FLAGS.warmup):
      calls[n]()
  before = _peaks()
  for row in rows:
    timing = measure.median_time(calls[row['n']], FLAGS.sample_steps)
    row.update(times_s=timing['times_s'], seconds=timing['median_s'],
               img_s=row['n'] / timing['median_s'])
  after = _peaks()
  for row in rows:
    row.update(matmul_before=before, matmul_after=after)
  return rows


def job_loop() -> List[Dict[str, Any]]:
  """`train.train_and_evaluate` as experiments/train.py runs it, with the peaks around it."""
  cache_warm = bool(os.path.isdir(FLAGS.job_cache_dir) and os.listdir(FLAGS.job_cache_dir))
  from denseflow_jax import artifacts, checkpoint  # pylint: disable=g-import-not-at-top
  from denseflow_jax.model import enable_compilation_cache  # pylint: disable=g-import-not-at-top
  config = _config()
  data = loop.loop_data(config, FLAGS.loop_data)
  config = loop.loop_config(config, FLAGS.job_batch, FLAGS.loop_steps, FLAGS.loop_log_every,
                            data)
  checkpoint.quiet_orbax_logs()
  enable_compilation_cache(FLAGS.job_cache_dir)
  t0 = time.time()
  before = _peaks()
  peak_s = time.time() - t0
  clock = loop.FirstStepClock()
  logging_std.getLogger('absl').addHandler(clock)
  from denseflow_jax import train  # pylint: disable=g-import-not-at-top
  t_train = time.time()
  train.train_and_evaluate(config, FLAGS.job_workdir)
  train_s = time.time() - t_train
  after = _peaks()
  metric_rows = artifacts.read_metrics(FLAGS.job_workdir)
  first = None
  if clock.time is not None and FLAGS.job_spawn_time:
    first = clock.time - FLAGS.job_spawn_time - peak_s
  # Phase lengths of the start-up; `before_compile` counts from the train_and_evaluate call.
  phases = clock.phases(t_train)
  curve = [[r['step'], r['train_bpd']] for r in metric_rows if 'train_bpd' in r]
  return [{
      'kind': 'loop', 'batch': FLAGS.job_batch, 'steps': FLAGS.loop_steps,
      'log_every': FLAGS.loop_log_every, 'seconds': loop.steady_step_seconds(metric_rows),
      'steps_per_sec': [r['steps_per_sec'] for r in metric_rows if 'steps_per_sec' in r],
      'first_step_s': first, 'startup_phases_s': phases, 'peak_before_s': peak_s,
      'train_and_evaluate_s': train_s,
      'train_bpd_curve': curve, 'data': data['description'], 'matmul_before': before,
      'matmul_after': after, 'cache': 'warm' if cache_warm else 'cold'}]


def run_child_job() -> None:
  """Measures the rows of `--job` in this process and writes them to `--job_out`."""
  from denseflow_jax import cpu_tuning  # pylint: disable=g-import-not-at-top
  # What cli.run set for every entry point (idempotent: this reads it back).
  settings = {'blas_threads': cpu_tuning.single_thread_blas(),
              'malloc_huge_pages': cpu_tuning.huge_pages_state()}
  tuning = None
  if FLAGS.cpu_tuning:  # before JAX starts a backend, as experiments/train.py --cpu_tuning
    tuning = cpu_tuning.apply()
  import jax  # pylint: disable=g-import-not-at-top
  if FLAGS.job != 'loop':
    jax.config.update('jax_enable_compilation_cache', False)  # compile times must be real
  if FLAGS.job == 'step':
    rows = job_step(FLAGS.job_batch)
  elif FLAGS.job == 'eval':
    rows = job_eval()
  elif FLAGS.job == 'sample':
    rows = job_sample([int(s) for s in _sample_sizes()])
  elif FLAGS.job == 'loop':
    rows = job_loop()
  else:
    raise ValueError(f'unknown --job={FLAGS.job!r}')
  shared = {'load_at_start': _LOAD_AT_IMPORT, 'platform': jax.default_backend(),
            'device': measure.device_info(), 'device_memory': measure.device_memory(),
            'hwm_rss_gib': measure.hwm_rss_gib(), 'cpu_tuning': tuning,
            'process_settings': settings,
            'xla_flags_env': os.environ.get('XLA_FLAGS', ''), 'dtype': FLAGS.job_dtype}
  extra = {}
  if FLAGS.cost_checks and FLAGS.job == 'step':
    from denseflow_jax.benchmarking import flops  # pylint: disable=g-import-not-at-top
    extra['xla_cost_checks'] = flops.xla_cost_checks()  # after the peak RSS was read
  with open(FLAGS.job_out, 'w') as f:
    json.dump({'rows': [{**shared, **r} for r in rows], **extra}, f, indent=1)


# ---------------------------------------------------------------------------- parent side


def detect_mode(env: Dict[str, str]) -> str:
  """'accelerator' when JAX in a fresh process sees a GPU or TPU, else 'cpu'. Without an
  accelerator plugin installed (and JAX_PLATFORMS unset or cpu) no process is started."""
  from denseflow_jax import cpu_tuning  # pylint: disable=g-import-not-at-top
  platforms = env.get('JAX_PLATFORMS', '')
  if not cpu_tuning._accelerator_plugin() and platforms.split(',')[0] in ('', 'cpu'):  # pylint: disable=protected-access
    return 'cpu'
  proc = subprocess.run([sys.executable, '-c', 'import jax; print(jax.default_backend())'],
                        env=env, capture_output=True, text=True, timeout=600)
  backend = (proc.stdout.strip().splitlines() or ['cpu'])[-1]
  return 'cpu' if backend == 'cpu' else 'accelerator'


def _sample_sizes() -> List[str]:
  return FLAGS.sample_sizes or (['128'] if FLAGS.mode == 'accelerator' else ['16'])


class Runner:
  """Spawns the row processes, collects and summarizes their rows, writes the JSON."""

  def __init__(self, argv: Sequence[str], meta: Dict[str, Any], env: Dict[str, str]):
    self.argv, self.env = list(argv), env
    self.t0 = time.monotonic()
    self.result: Dict[str, Any] = {'meta': meta, 'reference': report.REFERENCE,
                                   'published': report.PUBLISHED, 'rows': [], 'skipped': []}
    self.failed = False

  def skip(self, what: str, reason: str) -> None:
    logging.warning('skipped %s: %s', what, reason)
    print(f'skipped {what}: {reason}', flush=True)
    self.result['skipped'].append({'row': what, 'reason': reason})
    self.write()

  def remaining(self) -> Optional[float]:
    if not FLAGS.deadline_s:
      return None
    return FLAGS.deadline_s - (time.monotonic() - self.t0)

  def spawn(self, what: str, job: str, config_path: Optional[str], batch: int = 0,
            dtype: str = 'float32', workdir: str = '', cache_dir: str = '',
            extra: Sequence[str] = ()) -> List[Dict]:
    """Runs one row process; its rows (summarized), or [] (recorded as skipped) on failure."""
    left = self.remaining()
    if left is not None and left < 30:
      self.skip(what, f'--deadline_s={FLAGS.deadline_s} reached')
      return []
    timeout = FLAGS.job_timeout if left is None else min(FLAGS.job_timeout, left)
    self.settle()
    accel = FLAGS.mode == 'accelerator'
    peak_dtypes = DTYPES if accel else sorted({'float32', dtype})
    with tempfile.TemporaryDirectory() as tmp:
      out, log = os.path.join(tmp, 'result.json'), os.path.join(tmp, 'log.txt')
      parent_rss = measure.current_rss_gib()
      spawn_time = time.time()
      argv = measure.child_argv(self.argv, config_path, REPO_ROOT, drop=('mode', 'loop_data'))
      cmd = [sys.executable, os.path.abspath(__file__), *argv,
             f'--mode={FLAGS.mode}', f'--job={job}', f'--job_batch={batch}',
             f'--job_dtype={dtype}', f'--job_peak_dtypes={",".join(peak_dtypes)}',
             f'--job_out={out}', f'--job_spawn_time={spawn_time!r}',
             f'--job_workdir={workdir}', f'--job_cache_dir={cache_dir}',
             f'--peak_n={FLAGS.peak_n}', *extra]
      logging.info('running %s', what)
      print(f'running {what} ...', flush=True)
      with open(log, 'w') as logf:
        proc = subprocess.Popen(cmd, env=self.env, cwd=REPO_ROOT, stdout=logf,
                                stderr=subprocess.STDOUT)
        usage = measure.wait_with_rusage(proc, timeout)
      wall_s = time.time() - spawn_time
      if usage['returncode'] != 0 or not os.path.exists(out):
        with open(log) as f:
          tail = f.read()[-6000:]
        why = 'timed out' if usage['timed_out'] else f"exit status {usage['returncode']}"
        print(tail, file=sys.stderr)
        self.failed = True
        self.skip(what, f'{why}; last output: ' + ' '.join(tail[-600:].split()))
        return []
      with open(out) as f:
        result = json.load(f)
    if 'xla_cost_checks' in result:
      self.result['xla_cost_checks'] = result['xla_cost_checks']
    rows = []
    for row in result['rows']:
      # The process's own high-water mark (VmHWM, read as it finished its rows); wait4's
      # ru_maxrss also holds the parent's RSS at the fork (`parent_rss_gib`).
      row.update(label=self.labels[config_path], published_key=self.keys[config_path],
                 config_path=config_path or 'the --config',
                 peak_rss_gib=row.get('hwm_rss_gib') or usage['peak_rss_gib'],
                 ru_maxrss_gib=usage['peak_rss_gib'], parent_rss_gib=parent_rss,
                 process_wall_s=wall_s, process_cpu_s=usage['user_s'] + usage['sys_s'])
      row = report.summarize(row)
      rows.append(row)
      self.result['rows'].append(row)
    self.write()
    print(report.format_rows(rows), flush=True)
    return rows

  def settle(self) -> None:
    """Waits (up to --settle_s) until the 1-minute load average is below the validity limit."""
    limit, waited = 0.8 * report.LOAD_LIMIT, 0.0  # a margin: the new process adds some
    if FLAGS.mode == 'accelerator' or measure.load_avg() <= limit:
      return
    print(f'waiting for the load average ({measure.load_avg():.2f}) to fall to {limit} ...',
          flush=True)
    while waited < FLAGS.settle_s and measure.load_avg() > limit:
      time.sleep(5)
      waited += 5
    print(f'  load {measure.load_avg():.2f} after {waited:.0f} s', flush=True)

  def write(self) -> None:
    if FLAGS.out:
      os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
      with open(FLAGS.out, 'w') as f:
        json.dump(self.result, f, indent=1)


def _load_config(config_path: Optional[str]):
  if config_path is None:
    return measure.benchmark_config(FLAGS.config, FLAGS.image_size, FLAGS.seed)
  import importlib.util  # pylint: disable=g-import-not-at-top
  path = os.path.join(REPO_ROOT, config_path)
  if not os.path.isfile(path):
    raise cli.UsageError(f'no such config file {path!r}')
  spec = importlib.util.spec_from_file_location('benchmark_config_file', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return measure.benchmark_config(module.get_config(), FLAGS.image_size, FLAGS.seed)


def run_parent(argv: Sequence[str]) -> Dict[str, Any]:
  """Plans the rows of this mode, runs them and returns the report."""
  env = dict(os.environ)
  if FLAGS.mode == 'auto':
    FLAGS.mode = detect_mode(env)
  accel = FLAGS.mode == 'accelerator'
  if not FLAGS.peak_n:
    FLAGS.peak_n = 8192 if accel else report.UNIT_N
  jobs = [j.strip() for j in FLAGS.jobs] or (['step', 'sample'] if accel else
                                             ['step', 'loop', 'eval', 'sample'])
  unknown = sorted(set(jobs) - {'step', 'loop', 'eval', 'sample'})
  if unknown:
    raise cli.UsageError(f'--jobs: unknown {unknown}; expected step, loop, eval, sample')
  dtypes = [d.strip() for d in FLAGS.dtypes] or (list(DTYPES) if accel else ['float32'])
  if set(dtypes) - set(DTYPES):
    raise cli.UsageError(f'--dtypes={",".join(dtypes)}: expected float32 and/or bfloat16')
  config = _load_config(None)
  key = report.published_key(config.model)
  batch_sizes = [int(b) for b in FLAGS.batch_sizes] or (
      sorted(report.PUBLISHED[key]['train']) if key else [8])
  machine = measure.machine_info()
  meta = {
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'git': measure.git_info(REPO_ROOT, ignore=('BENCHMARKS.md',)), 'machine': machine,
      'mode': FLAGS.mode, 'jobs': jobs, 'dtypes': dtypes, 'cpu_tuning': FLAGS.cpu_tuning,
      'peak_n': FLAGS.peak_n, 'label': FLAGS.label or report.config_label(config.model),
      'published_key': key, 'model_config': config.model.to_dict(),
      'train_config': config.train.to_dict(), 'argv': list(argv), 'steps': FLAGS.steps,
      'warmup': FLAGS.warmup, 'note': FLAGS.note, 'load_at_start': measure.load_avg(),
      'validity_rule': {'load_limit': report.LOAD_LIMIT,
                        'peak_tolerance': report.PEAK_TOLERANCE},
  }
  runner = Runner(argv, meta, env)
  runner.labels, runner.keys = {None: meta['label']}, {None: key}

  def has_dtype(cfg, dtype):
    return dtype == 'float32' or 'compute_dtype' in cfg.model

  def rows_for(config_path: Optional[str], kinds: Sequence[str], batches: Sequence[int]):
    cfg = _load_config(config_path)
    if config_path is not None:
      runner.labels[config_path] = report.config_label(cfg.model)
      runner.keys[config_path] = report.published_key(cfg.model)
    name = runner.labels[config_path]
    for dtype in dtypes:
      if not has_dtype(cfg, dtype):
        runner.skip(f'{name} {dtype} rows', 'config.model has no compute_dtype field '
                    '(mixed precision is not in this version)')
        continue
      for kind in kinds:
        if kind == 'step':
          for b in batches:
            runner.spawn(f'{name} step b{b} {dtype}', 'step', config_path, b, dtype)
        elif kind == 'eval':
          runner.spawn(f'{name} eval b{FLAGS.eval_batch} {dtype}', 'eval', config_path, 0,
                       dtype)
        elif kind == 'sample':
          runner.spawn(f'{name} sample {",".join(_sample_sizes())} {dtype}', 'sample',
                       config_path, 0, dtype)
        elif kind == 'loop':
          try:
            data = loop.loop_data(cfg, FLAGS.loop_data)
          except ValueError as e:
            runner.skip(f'{name} loop rows', str(e))
            continue
          for b in [int(s) for s in FLAGS.loop_batch_sizes]:
            with tempfile.TemporaryDirectory(prefix='denseflow_bench_') as tmp:
              cache = os.path.join(tmp, 'xla_cache')
              os.makedirs(cache)
              starts = ['cold', 'warm'] if FLAGS.loop_warm_start else ['cold']
              for start in starts:
                runner.spawn(f'{name} loop b{b} {dtype} ({start} start, {data["description"]})',
                             'loop', config_path, b, dtype,
                             workdir=os.path.join(tmp, f'workdir_{start}'), cache_dir=cache,
                             extra=[f"--loop_data={data['train_npz'] or 'digits'}"])

  if accel:  # config by config (in --accel_configs order), its sampling rows after its steps
    sample_configs = list(FLAGS.accel_sample_configs)
    for path in FLAGS.accel_configs:
      kinds = [k for k in ('step', 'sample') if k in jobs and (
          k == 'step' or path in sample_configs)]
      if kinds:
        rows_for(path, kinds, [FLAGS.accel_batch])
    for path in sample_configs:
      if 'sample' in jobs and path not in FLAGS.accel_configs:
        rows_for(path, ['sample'], [])
    rest = [k for k in jobs if k in ('loop', 'eval')]
    if rest:
      rows_for(None, rest, batch_sizes)
  else:
    rows_for(None, [k for k in ('step', 'loop', 'eval', 'sample') if k in jobs], batch_sizes)
  meta['load_at_end'] = measure.load_avg()
  runner.write()
  rows = runner.result['rows']
  what = 'accelerator rows' if accel else meta['label']
  print(report.format_rows(rows, title=f"\n{what} ({FLAGS.mode}); reference: "
                                       f"{report.REFERENCE['date']}, "
                                       f"{report.REFERENCE['machine']}; unit: "
                                       'matmul unit = seconds / one f32 4096^3 jnp.dot'))
  for row in rows:
    phases = row.get('startup_phases_s') or {}
    if any(v is not None for v in phases.values()):
      print(f"start-up of {row['label']} {row['kind']} b{row['batch']}: " + ', '.join(
          f"{name.replace('_', ' ')} {'?' if v is None else f'{v:.1f} s'}"
          for name, v in phases.items()))
  for s in runner.result['skipped']:
    print(f"skipped {s['row']}: {s['reason']}")
  if FLAGS.markdown:
    report.insert_markdown(FLAGS.markdown,
                           report.markdown_rows(runner.result, FLAGS.markdown_invalid))
  runner.result['failed'] = runner.failed
  return runner.result


def main(argv: Sequence[str]) -> None:
  del argv  # checked by cli.run
  if FLAGS.job:
    run_child_job()
    return
  if not FLAGS.out:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%dT%H%M%SZ')
    name = os.path.splitext(os.path.basename(FLAGS['config'].config_filename or 'config'))[0]
    FLAGS.out = os.path.join(tempfile.gettempdir(), 'denseflow_benchmark', f'{name}_{stamp}.json')
    os.makedirs(os.path.dirname(FLAGS.out), exist_ok=True)
  cli.check_output_file('--out', FLAGS.out)
  result = run_parent(sys.argv)
  print(f'rows written to {FLAGS.out}')
  if result['failed']:
    sys.exit(1)


if __name__ == '__main__':
  cli.run(main)
