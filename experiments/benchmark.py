"""Speed and memory benchmark of DenseFlow's train step, evaluation and sampling.

  python experiments/benchmark.py --config=configs/tiny.py --batch_sizes=8,64 --xla_flags \
      --out=/tmp/bench_tiny.json --markdown=BENCHMARKS.md
  python experiments/benchmark.py --config=configs/denseflow_74_10.py --batch_sizes=8 \
      --jobs=train,sample --xla_flags --markdown=BENCHMARKS.md
  python experiments/benchmark.py --config=configs/denseflow_74_10.py --image_size=64 ...

Every measurement runs in a fresh subprocess (one per train batch size, one for evaluation,
one for sampling), so the peak host memory (`ru_maxrss`) of a row belongs to that row only.
The parent process never initialises a JAX backend; it collects the children's results, writes
them as JSON (`--out`) and inserts Markdown rows into the tables of `--markdown`
(BENCHMARKS.md), next to the published PyTorch reference rows.

What is measured (synthetic uint8 images, fixed seeds):
- train step: forward, backward and an optax adamax update in one jitted function with the
  state donated. Trace + lower and XLA compile are timed separately from the first run; the
  step time is the median of `--steps` calls after `--warmup` calls.
- eval: `log_prob` in evaluation mode (no gradient) at `--eval_batch`.
- sampling: `sample(n)` for each n in `--sample_sizes`, compiled once each, timed after warm-up.
- the machine's single-precision matmul peak in the same process, right before the timings:
  median over `--peak_reps` calls of an `(n, n) @ (n, n)` f32 product (`--peak_n`),
  `2 n^3 / t`, with the output written into a donated buffer so that page faults of fresh
  buffers are not timed.
- FLOPs: (a) matmul + convolution FLOPs counted from the jaxpr (`2 * MACs`, scan bodies times
  their length, zero padding included: the same convention as PyTorch's flop counter, which
  produced the published GFLOP/img); (b) XLA's `cost_analysis()` of the lowered (unoptimised)
  module and of the compiled one. XLA's numbers are reported but not trusted for the fraction
  of peak: it counts a while loop's body once (so `nn.scan` over modules is undercounted), it
  leaves out the zero padding of convolutions, and after oneDNN rewrites (`--xla_flags`) the
  compiled module reports no FLOPs at all. `xla_cost_checks` in the JSON shows all three on
  small examples.
- peak host memory (`ru_maxrss`, includes compilation), resident memory after the timed calls
  (psutil), device memory statistics where the backend has them (GPU), the 1-minute load
  average before and after each job (other processes on the machine disturb the timings).

`--xla_flags` puts the XLA:CPU flags of the performance notes into `XLA_FLAGS` (before JAX is
imported in the children); whether they were on is recorded with every row.
"""
import datetime
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

from absl import app, flags, logging
import ml_collections
from ml_collections import config_flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PERF_XLA_FLAGS = ('--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true '
                  '--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_prefer_vector_width=512')
GIB = 2.0 ** 30
# glibc malloc settings that keep freed memory between calls, so XLA's per-call buffers do not
# page-fault again on every call: no mmap for large blocks (glibc caps the mmap threshold at
# 32 MiB), one arena (other threads' arenas would mmap their large blocks), no trimming, a padded
# heap top. Measured on tiny: the faults go to zero, but the step gets slower (BENCHMARKS.md).
# Process environment: set for the children only.
MALLOC_TUNING = {'MALLOC_ARENA_MAX': '1', 'MALLOC_MMAP_MAX_': '0',
                 'MALLOC_TRIM_THRESHOLD_': str(16 * 2 ** 30),
                 'MALLOC_TOP_PAD_': str(512 * 2 ** 20)}

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', os.path.join(REPO_ROOT, 'configs', 'tiny.py'),
                                'Experiment config (model fields are used).')
flags.DEFINE_list('batch_sizes', ['8', '64'], 'Train-step batch sizes (one row each).')
flags.DEFINE_integer('image_size', 0, 'Overrides config.model.image_size when > 0.')
flags.DEFINE_list('jobs', ['train', 'eval', 'sample'], 'Which measurements to run.')
flags.DEFINE_integer('steps', 7, 'Timed calls per measurement (the median is reported).')
flags.DEFINE_integer('warmup', 2, 'Untimed calls after the first call, before the timed ones.')
flags.DEFINE_integer('eval_batch', 64, 'Batch size of the eval (log_prob) measurement.')
flags.DEFINE_list('sample_sizes', ['16', '128'], 'Numbers of images to sample.')
flags.DEFINE_integer('sample_steps', 5, 'Timed sampling calls per size.')
flags.DEFINE_integer('peak_n', 4096, 'Matrix size of the matmul peak measurement.')
flags.DEFINE_integer('peak_reps', 7, 'Timed matmuls of the peak measurement.')
flags.DEFINE_bool('cost_checks', True, 'Compare XLA\'s FLOP counts with analytic ones on '
                  'small programs (in the first train job).')
flags.DEFINE_bool('xla_flags', False, f'Add {PERF_XLA_FLAGS!r} to XLA_FLAGS.')
flags.DEFINE_bool('malloc_tuning', False, f'Run the measurements with {MALLOC_TUNING} in the '
                  'environment (glibc malloc keeps its memory; fewer page faults per call).')
flags.DEFINE_string('label', '', 'Config name in the rows (default: derived from the config).')
flags.DEFINE_string('out', '', 'JSON output path ("" = none).')
flags.DEFINE_string('markdown', '', 'Markdown file to insert rows into ("" = none), e.g. '
                    'BENCHMARKS.md; created with empty tables if missing.')
flags.DEFINE_string('note', '', 'Free text recorded with the rows (e.g. about machine load).')
flags.DEFINE_integer('seed', 0, 'Seed of the synthetic images, parameters and noise.')
flags.DEFINE_integer('job_timeout', 3600, 'Seconds before a child measurement is abandoned.')
# Internal: a child process runs one job and writes its result to --job_out.
flags.DEFINE_string('job', '', 'Internal: run one job (train | eval | sample) in this process.')
flags.DEFINE_integer('job_batch', 0, 'Internal: batch size of a train job.')
flags.DEFINE_string('job_out', '', 'Internal: where a child writes its JSON result.')

# Published PyTorch code on this machine class (PyTorch 2.13 CPU, default environment,
# 2 threads; FLOPs forward + backward by PyTorch's flop counter; fraction of a ~450 GFLOP/s
# matmul peak).
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
# Issue targets: train-step fraction of peak >= 1.3x the published fraction; eval at batch 64
# >= 70% of peak; sampling >= 1.3x the published images/s; peak memory <= published;
# 74-10 train-step compile < 2 min.
TARGET_RATIO = 1.3
TARGET_EVAL_FRAC = 0.70
TARGET_COMPILE_S = 120.0


# ------------------------------------------------------------------------------------ helpers
def published_key(model_cfg) -> Optional[str]:
  """Which published configuration (if any) a model config is: same shapes, 32x32 RGB."""
  sig = (tuple(model_cfg.block_conf), tuple(model_cfg.layers_conf),
         tuple(model_cfg.mid_channels), int(model_cfg.growth_rate))
  table = {
      ((2, 2, 1), (1, 1, 2), (16, 16, 16), 4): 'tiny',
      ((5, 3, 1), (3, 5, 15), (48, 48, 48), 6): 'denseflow_45_6',
      ((6, 4, 1), (5, 6, 20), (48, 48, 48), 10): 'denseflow_74_10',
  }
  key = table.get(sig)
  defaults = dict(image_size=32, num_channels=3, num_bits=8, coupling='denseflow', augment=True,
                  noise='preconditioned', dense_depth=7, dense_growth=64, num_landmarks=4,
                  pinv_iterations=6, dequantization='variational', deq_context_channels=64,
                  deq_steps=4)
  if key is None or any(model_cfg.get(k) != v for k, v in defaults.items()):
    return None
  return key


def config_label(model_cfg) -> str:
  key = published_key(model_cfg)
  if key is not None:
    return PUBLISHED[key]['name']
  m = model_cfg
  at_size = published_key(ml_collections.ConfigDict({**m.to_dict(), 'image_size': 32}))
  if at_size is not None:  # a published shape at another resolution (74-10 at 64x64)
    return f"{PUBLISHED[at_size]['name']}, {m.image_size}x{m.image_size}"
  return (f"blocks {tuple(m.block_conf)} modules {tuple(m.layers_conf)} mid "
          f"{tuple(m.mid_channels)} growth {m.growth_rate}, {m.image_size}x{m.image_size}")


def git_info() -> Dict[str, str]:
  def run(*args):
    try:
      return subprocess.run(['git', *args], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
      return ''
  return {'commit': run('rev-parse', 'HEAD'),
          # Rows appended to BENCHMARKS.md by an earlier run do not make the code dirty.
          'dirty': bool(run('status', '--porcelain', '--untracked-files=no', '--', '.',
                            ':(exclude)BENCHMARKS.md'))}


def load_avg() -> float:
  try:
    return os.getloadavg()[0]
  except OSError:
    return float('nan')


def peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # KiB on Linux


def current_rss_gib() -> float:
  try:
    import psutil
    return psutil.Process().memory_info().rss / GIB
  except ImportError:
    return float('nan')


class RssSampler:
  """Samples this process's resident memory every `interval` s in a thread; `.peak_gib`."""

  def __init__(self, interval: float = 0.01):
    import threading
    self.interval = interval
    self.peak_gib = current_rss_gib()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self._stop.is_set():
      self.peak_gib = max(self.peak_gib, current_rss_gib())
      self._stop.wait(self.interval)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()


def median_time(fn, steps: int) -> Dict[str, Any]:
  times = []
  for _ in range(max(steps, 1)):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return {'median_s': statistics.median(times), 'min_s': min(times), 'max_s': max(times),
          'times_s': times}


# ------------------------------------------------------------------------- FLOPs from a jaxpr
def _sub_jaxprs(params: Dict[str, Any]):
  import jax
  for value in params.values():
    items = value if isinstance(value, (tuple, list)) else (value,)
    for item in items:
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


def matmul_flops(jaxpr) -> Dict[str, float]:
  """`2 * MACs` of every dot_general and conv_general_dilated in a jaxpr (recursively).

  Scan bodies count `length` times, `cond` its most expensive branch, while loops once (and are
  reported in `while_loops`). Convolutions count the full kernel at every output position
  (zero padding included), as PyTorch's flop counter does.
  """
  out = {'dot': 0.0, 'conv': 0.0, 'while_loops': 0}
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      (lhs_contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      k = math.prod(lhs[d] for d in lhs_contract)
      out['dot'] += 2.0 * math.prod(eqn.outvars[0].aval.shape) * k
      continue
    if name == 'conv_general_dilated':
      rhs = eqn.invars[1].aval.shape
      rhs_spec = eqn.params['dimension_numbers'].rhs_spec
      k = rhs[rhs_spec[1]] * math.prod(rhs[d] for d in rhs_spec[2:])
      out['conv'] += 2.0 * math.prod(eqn.outvars[0].aval.shape) * k
      continue
    subs = list(_sub_jaxprs(eqn.params))
    if not subs:
      continue
    counts = [matmul_flops(s) for s in subs]
    if name == 'cond':
      best = max(counts, key=lambda c: c['dot'] + c['conv'])
      counts = [best]
    mult = float(eqn.params.get('length', 1)) if name == 'scan' else 1.0
    if name == 'while':
      out['while_loops'] += 1
    for c in counts:
      out['dot'] += mult * c['dot']
      out['conv'] += mult * c['conv']
      out['while_loops'] += c['while_loops']
  return out


def count_flops(closed_jaxpr) -> Dict[str, float]:
  """`matmul_flops` after dead-code elimination (XLA removes unused work, e.g. the primal
  output that `jax.vjp` recomputes inside a custom VJP's backward rule)."""
  jaxpr = closed_jaxpr.jaxpr
  try:
    from jax._src.interpreters import partial_eval as pe  # no public DCE entry point
    jaxpr, _ = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('jaxpr DCE failed (%s); counting without it', e)
  return matmul_flops(jaxpr)


def xla_flops(cost: Any) -> Optional[float]:
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost:
    return None
  value = cost.get('flops')
  return None if value is None else float(value)


# ---------------------------------------------------------------------------- child: shared
def _model_config():
  cfg = FLAGS.config.model
  if FLAGS.image_size > 0:
    cfg.image_size = FLAGS.image_size
  return cfg


def _images(model_cfg, n: int, seed: int):
  import numpy as np
  s, c = int(model_cfg.image_size), int(model_cfg.num_channels)
  top = 2 ** int(model_cfg.num_bits)
  dtype = np.uint8 if model_cfg.num_bits <= 8 else np.int32
  return np.random.default_rng(seed).integers(0, top, (n, s, s, c)).astype(dtype)


def measure_matmul_peak(n: int, reps: int) -> Dict[str, Any]:
  """Median time of an f32 `(n, n) @ (n, n)` written into a donated buffer; `2 n^3 / t`."""
  import jax
  import jax.numpy as jnp
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.float32)
  b = jax.random.normal(kb, (n, n), jnp.float32)
  out = jnp.zeros((n, n), jnp.float32)
  # Donating `out` lets XLA write the product into the same buffer every call.
  fn = jax.jit(lambda a, b, out: jnp.dot(a, b),
               donate_argnums=(2,))
  compiled = fn.lower(a, b, out).compile()
  holder = [out]

  def call():
    holder[0] = compiled(a, b, holder[0])
    holder[0].block_until_ready()

  for _ in range(2):
    call()
  t = median_time(call, reps)
  flops = 2.0 * n ** 3
  return {'n': n, 'reps': reps, 'median_s': t['median_s'], 'gflop_s': flops / t['median_s'] / 1e9,
          'best_gflop_s': flops / t['min_s'] / 1e9}


def xla_cost_checks() -> Dict[str, Any]:
  """XLA's FLOP count against the analytic count on small programs (see the module doc)."""
  import jax
  import jax.numpy as jnp
  from denseflow_jax.nets.layers import conv3x3

  def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  x = jnp.ones((8, 16, 16, 400), jnp.float32)
  w = jnp.ones((3, 3, 400, 64), jnp.float32)
  conv_analytic = 2.0 * 8 * 16 * 16 * 64 * 9 * 400
  a = jnp.ones((2048, 400), jnp.float32)
  b = jnp.ones((400, 400), jnp.float32)
  dot_analytic = 2.0 * 2048 * 400 * 400

  def scan5(a, b):
    return jax.lax.scan(lambda c, _: (jnp.tanh(c @ b), None), a, None, length=5)[0]

  grad_custom = jax.grad(lambda x, w: conv3x3(x, w).sum(), (0, 1))
  cases = {
      'conv3x3_forward': (conv, (x, w), conv_analytic),
      # input gradient (a conv) + weight gradient (one matmul) of the custom-VJP conv
      'conv3x3_custom_vjp_grads': (grad_custom, (x, w), 2 * conv_analytic),
      'dot_2048x400x400': (lambda a, b: a @ b, (a, b), dot_analytic),
      'scan_5_dots': (scan5, (a, b), 5 * dot_analytic),
  }
  result = {}
  for name, (fn, args, analytic) in cases.items():
    lowered = jax.jit(fn).lower(*args)
    compiled = lowered.compile()
    result[name] = {'analytic_flops': analytic,
                    'xla_lowered_flops': xla_flops(lowered.cost_analysis()),
                    'xla_compiled_flops': xla_flops(compiled.cost_analysis())}
  return result


def _device_info() -> Dict[str, Any]:
  import jax
  import jaxlib
  devs = jax.devices()
  return {'platform': devs[0].platform, 'device_kind': devs[0].device_kind,
          'device_count': len(devs), 'jax': jax.__version__, 'jaxlib': jaxlib.__version__}


def _device_memory() -> Optional[Dict[str, Any]]:
  import jax
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  if not stats:
    return None
  keep = ('peak_bytes_in_use', 'bytes_in_use', 'bytes_limit')
  return {k: int(stats[k]) for k in keep if k in stats}


def _init(model, model_cfg, batch: int):
  import jax
  import jax.numpy as jnp
  from denseflow_jax.model import init_variables
  x = jnp.asarray(_images(model_cfg, batch, FLAGS.seed))
  t0 = time.perf_counter()
  variables = init_variables(model, jax.random.key(FLAGS.seed), x)
  jax.block_until_ready(variables)
  return x, variables, time.perf_counter() - t0


def _block(tree):
  import jax
  return jax.block_until_ready(tree)


# ------------------------------------------------------------------------------ child: jobs
def job_train(batch: int) -> Dict[str, Any]:
  import jax
  import jax.numpy as jnp
  import optax
  from denseflow_jax.model import DenseFlow

  model_cfg = _model_config()
  model = DenseFlow(model_cfg)
  x, variables, init_s = _init(model, model_cfg, batch)
  tcfg = FLAGS.config.train
  tx = optax.adamax(float(tcfg.lr), b1=float(tcfg.b1), b2=float(tcfg.b2))
  params = variables['params']
  state = {'params': params, 'batch_stats': variables.get('batch_stats', {}),
           'opt_state': tx.init(params), 'step': jnp.zeros((), jnp.int32)}
  noise_key = jax.random.key(FLAGS.seed + 1)

  def train_step(state, images):
    rng = jax.random.fold_in(noise_key, state['step'])

    def loss_fn(p):
      bpd, mutated = model.apply({'params': p, 'batch_stats': state['batch_stats']}, images,
                                 train=True, rngs={'noise': rng}, mutable=['batch_stats'],
                                 method=DenseFlow.bits_per_dim)
      return jnp.mean(bpd), mutated['batch_stats']

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    new_state = {'params': optax.apply_updates(state['params'], updates),
                 'batch_stats': batch_stats, 'opt_state': opt_state, 'step': state['step'] + 1}
    return new_state, loss

  jitted = jax.jit(train_step, donate_argnums=(0,))
  t0 = time.perf_counter()
  traced = jitted.trace(state, x)
  t1 = time.perf_counter()
  lowered = traced.lower()
  t2 = time.perf_counter()
  compiled = lowered.compile()
  t3 = time.perf_counter()
  counted = count_flops(traced.jaxpr)

  peak = measure_matmul_peak(FLAGS.peak_n, FLAGS.peak_reps)
  load_before = load_avg()
  holder = {'state': state}

  def call():
    new_state, loss = compiled(holder['state'], x)
    holder['state'] = new_state
    holder['loss'] = loss
    _block((new_state, loss))

  rss_before_run = peak_rss_gib()
  with RssSampler() as sampler:
    t4 = time.perf_counter()
    call()
    first_s = time.perf_counter() - t4
    for _ in range(FLAGS.warmup):
      call()
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    timing = median_time(call, FLAGS.steps)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / max(FLAGS.steps, 1)
  load_after = load_avg()
  loss = float(holder['loss'])

  step_s = timing['median_s']
  flops_counted = counted['dot'] + counted['conv']
  xla_lowered = xla_flops(lowered.cost_analysis())
  xla_compiled = xla_flops(compiled.cost_analysis())
  return {
      'job': 'train', 'batch': batch, 'init_s': init_s,
      'trace_s': t1 - t0, 'lower_s': t2 - t1, 'compile_s': t3 - t2,
      'compile_total_s': t3 - t0, 'first_call_s': first_s,
      'step': timing, 'step_s': step_s, 'img_s': batch / step_s, 'loss_bpd': loss,
      'minor_faults_per_step': faults,
      'flops_per_img': {'counted_matmul_conv': flops_counted / batch,
                        'counted_dot': counted['dot'] / batch,
                        'counted_conv': counted['conv'] / batch,
                        'counted_while_loops': counted['while_loops'],
                        'xla_lowered': None if xla_lowered is None else xla_lowered / batch,
                        'xla_compiled': None if xla_compiled is None else xla_compiled / batch},
      'matmul_peak': peak,
      'load_before': load_before, 'load_after': load_after,
      'peak_rss_gib': peak_rss_gib(), 'peak_rss_before_run_gib': rss_before_run,
      'peak_rss_run_gib': sampler.peak_gib, 'rss_after_gib': current_rss_gib(),
      'device_memory': _device_memory(),
  }


def job_eval() -> Dict[str, Any]:
  import jax
  from denseflow_jax.model import DenseFlow

  model_cfg = _model_config()
  model = DenseFlow(model_cfg)
  batch = FLAGS.eval_batch
  x, variables, init_s = _init(model, model_cfg, batch)
  key = jax.random.key(FLAGS.seed + 2)

  def eval_fn(variables, images):
    return model.apply(variables, images, rngs={'noise': key}, method=DenseFlow.log_prob)

  jitted = jax.jit(eval_fn)
  t0 = time.perf_counter()
  traced = jitted.trace(variables, x)
  lowered = traced.lower()
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  counted = count_flops(traced.jaxpr)
  peak = measure_matmul_peak(FLAGS.peak_n, FLAGS.peak_reps)
  load_before = load_avg()
  call = lambda: _block(compiled(variables, x))
  with RssSampler() as sampler:
    t3 = time.perf_counter()
    call()
    first_s = time.perf_counter() - t3
    for _ in range(FLAGS.warmup):
      call()
    timing = median_time(call, FLAGS.steps)
  load_after = load_avg()
  step_s = timing['median_s']
  flops_counted = counted['dot'] + counted['conv']
  xla_lowered = xla_flops(lowered.cost_analysis())
  return {
      'job': 'eval', 'batch': batch, 'init_s': init_s, 'trace_lower_s': t1 - t0,
      'compile_s': t2 - t1, 'first_call_s': first_s, 'step': timing, 'step_s': step_s,
      'img_s': batch / step_s,
      'flops_per_img': {'counted_matmul_conv': flops_counted / batch,
                        'xla_lowered': None if xla_lowered is None else xla_lowered / batch},
      'frac_of_peak_counted': flops_counted / step_s / 1e9 / peak['gflop_s'],
      'matmul_peak': peak, 'load_before': load_before, 'load_after': load_after,
      'peak_rss_gib': peak_rss_gib(), 'peak_rss_run_gib': sampler.peak_gib,
      'device_memory': _device_memory(),
  }


def job_sample() -> Dict[str, Any]:
  import jax
  from denseflow_jax.model import DenseFlow

  model_cfg = _model_config()
  model = DenseFlow(model_cfg)
  _, variables, init_s = _init(model, model_cfg, 8)
  key = jax.random.key(FLAGS.seed + 3)
  load_before = load_avg()
  rows = []
  for n in [int(s) for s in FLAGS.sample_sizes]:
    fn = jax.jit(lambda v, n=n: model.apply(v, n, rngs={'noise': key}, method=DenseFlow.sample))
    t0 = time.perf_counter()
    compiled = fn.lower(variables).compile()
    t1 = time.perf_counter()
    call = lambda: _block(compiled(variables))
    call()
    timing = median_time(call, FLAGS.sample_steps)
    rows.append({'n': n, 'compile_s': t1 - t0, 'time': timing, 'time_s': timing['median_s'],
                 'img_s': n / timing['median_s']})
  return {'job': 'sample', 'init_s': init_s, 'sizes': rows, 'load_before': load_before,
          'load_after': load_avg(), 'peak_rss_gib': peak_rss_gib(),
          'device_memory': _device_memory()}


def run_child_job() -> None:
  import jax
  jax.config.update('jax_enable_compilation_cache', False)  # compile times must be real
  info = {'device': _device_info(), 'xla_flags_env': os.environ.get('XLA_FLAGS', '')}
  if FLAGS.job == 'train':
    result = job_train(FLAGS.job_batch)
    if FLAGS.cost_checks:
      result['xla_cost_checks'] = xla_cost_checks()  # after the peak RSS was read
  elif FLAGS.job == 'eval':
    result = job_eval()
  elif FLAGS.job == 'sample':
    result = job_sample()
  else:
    raise ValueError(f'unknown --job={FLAGS.job!r}')
  result.update(info)
  with open(FLAGS.job_out, 'w') as f:
    json.dump(result, f, indent=1)


# ------------------------------------------------------------------------------ parent side
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


def summarize_train(row: Dict[str, Any], pub: Optional[Dict[str, Any]]) -> Dict[str, Any]:
  """Achieved FLOP/s and fractions of the measured matmul peak (published, counted, XLA)."""
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
  text = open(path).read() if os.path.exists(path) else markdown_skeleton()
  for kind, marker in TABLE_MARKERS.items():
    if not rows[kind]:
      continue
    if marker not in text:
      text = text.rstrip('\n') + '\n\n' + f'{TABLE_HEADERS[kind]}\n{marker}\n'
    text = text.replace(marker, '\n'.join(rows[kind]) + '\n' + marker, 1)
  with open(path, 'w') as f:
    f.write(text)


def run_parent(argv: Sequence[str]) -> Dict[str, Any]:
  model_cfg = _model_config()
  key = published_key(model_cfg)
  pub = PUBLISHED.get(key) if key else None
  env = dict(os.environ)
  if FLAGS.xla_flags:
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' ' + PERF_XLA_FLAGS).strip()
  if FLAGS.malloc_tuning:
    env.update(MALLOC_TUNING)
  import jax
  import jaxlib
  from denseflow_jax import artifacts
  meta = {
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'git': git_info(), 'machine': artifacts.machine_info(), 'jax': jax.__version__,
      'jaxlib': jaxlib.__version__, 'xla_flags': FLAGS.xla_flags,
      'XLA_FLAGS': env.get('XLA_FLAGS', ''), 'malloc_tuning': FLAGS.malloc_tuning,
      'malloc_env': {k: env[k] for k in sorted(env) if k.startswith('MALLOC_')},
      'label': FLAGS.label or config_label(model_cfg),
      'published_key': key, 'model_config': model_cfg.to_dict(), 'argv': list(argv),
      'steps': FLAGS.steps, 'warmup': FLAGS.warmup, 'note': FLAGS.note,
      'load_at_start': list(os.getloadavg()),
  }
  report: Dict[str, Any] = {'meta': meta, 'train': [], 'eval': None, 'sample': None,
                            'published': pub, 'published_peak_gflop_s': PUBLISHED_PEAK}
  jobs = [j.strip() for j in FLAGS.jobs]
  if 'train' in jobs:
    for i, b in enumerate(int(s) for s in FLAGS.batch_sizes):
      row = spawn('train', argv, env, batch=b, extra=['--nocost_checks'] if i else [])
      if 'xla_cost_checks' in row:
        report['xla_cost_checks'] = row.pop('xla_cost_checks')
      row['summary'] = summarize_train(row, pub['train'].get(b) if pub else None)
      if key == 'denseflow_74_10':
        row['summary']['compile_within_target'] = row['compile_total_s'] < TARGET_COMPILE_S
      report['train'].append(row)
      logging.info('train batch %d: %.3f s/step, %s', b, row['step_s'], row['summary'])
  if 'eval' in jobs:
    report['eval'] = spawn('eval', argv, env)
    report['eval']['meets_target'] = report['eval']['frac_of_peak_counted'] >= TARGET_EVAL_FRAC
  if 'sample' in jobs:
    report['sample'] = spawn('sample', argv, env)
    for s in report['sample']['sizes']:
      pub_s = pub['sample_s'].get(s['n']) if pub else None
      if pub_s:
        s['published_s'] = pub_s
        s['speedup'] = pub_s / s['time_s']
        s['meets_target'] = s['speedup'] >= TARGET_RATIO
  first = report['train'] or [r for r in (report['eval'], report['sample']) if r]
  if first:
    meta['device'] = (first[0] if isinstance(first, list) else first)['device']
  meta['load_at_end'] = list(os.getloadavg())
  if FLAGS.out:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, 'w') as f:
      json.dump(report, f, indent=1)
  if FLAGS.markdown:
    insert_markdown(FLAGS.markdown, markdown_rows(report))
  return report


def main(argv: Sequence[str]) -> None:
  if FLAGS.job:
    if FLAGS.xla_flags and PERF_XLA_FLAGS not in os.environ.get('XLA_FLAGS', ''):
      os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + PERF_XLA_FLAGS).strip()
    run_child_job()
    return
  report = run_parent(sys.argv)
  for r in report['train']:
    print(json.dumps({'batch': r['batch'], 'step_s': r['step_s'], 'img_s': r['img_s'],
                      'compile_total_s': r['compile_total_s'], 'peak_rss_gib': r['peak_rss_gib'],
                      **r['summary']}))
  for kind in ('eval', 'sample'):
    if report[kind]:
      r = dict(report[kind])
      r.pop('device', None)
      print(kind, json.dumps({k: v for k, v in r.items() if k not in ('step',)})[:2000])


if __name__ == '__main__':
  app.run(main)
