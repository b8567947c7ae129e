"""Timers, the matmul peak, load and memory sampling, machine and git information.

Speeds are compared as fractions of the matmul peak measured in the same process
(`matmul_peak`: the median time of one f32 `(n, n) @ (n, n)` `jnp.dot`, n = 4096 by default,
and `2 n^3` divided by it), because the absolute speed of a shared machine varies between
processes. `ResourceSampler` is the one background sampler: the 1-minute load average (other
processes on the machine slow the timings) and this process's resident memory.

JAX is imported inside the functions that need it; `machine_info()` never starts a backend,
`device_info()` and `matmul_peak()` do.
"""
import os
import resource
import statistics
import subprocess
import threading
import time
from typing import Any, Callable, Dict, Optional, Sequence

from denseflow_jax import cpu_tuning

GIB = 2.0 ** 30
# The XLA:CPU flags that `experiments/train.py` applies (`denseflow_jax.cpu_tuning`), as one
# `XLA_FLAGS` value.
PERF_XLA_FLAGS = ' '.join(cpu_tuning.XLA_FLAGS)


def with_perf_xla_flags(xla_flags: str) -> str:
  """`xla_flags` (an `XLA_FLAGS` value) with `PERF_XLA_FLAGS` appended unless already there."""
  if PERF_XLA_FLAGS in xla_flags:
    return xla_flags
  return (xla_flags + ' ' + PERF_XLA_FLAGS).strip()


def median_time(fn: Callable[[], Any], steps: int) -> Dict[str, Any]:
  """Calls `fn` `steps` times (at least once); median, min, max and every time in seconds.

  `fn` must block until its work is done (`jax.block_until_ready`).
  """
  times = []
  for _ in range(max(int(steps), 1)):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return {'median_s': statistics.median(times), 'min_s': min(times), 'max_s': max(times),
          'times_s': times}


def benchmark_config(config, image_size: int, seed: int):
  """The benchmark scripts' config: `config` with `image_size` (> 0 overrides) and the seed."""
  if image_size > 0:
    config.model.image_size = image_size
  config.train.seed = seed
  return config


def matmul_peak(n: int = 4096, reps: int = 7, dtype: str = 'float32') -> Dict[str, Any]:
  """The matmul peak of this process: `median_s`, the median time of one `(n, n) @ (n, n)`
  `jnp.dot` in `dtype` ('float32' or 'bfloat16', default precision) over `reps` calls after
  two warm-up calls, and `gflop_s = 2 n^3 / median_s` (`best_gflop_s` from the fastest call).

  The product is written into a donated buffer, so page faults of fresh output buffers are not
  timed. Measure it right before (and after) the timings it scales, in the same process.
  On GPUs the default precision of a float32 dot may use TF32 (as the model's own dots do).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  if dtype not in ('float32', 'bfloat16'):
    raise ValueError(f"matmul_peak dtype={dtype!r}; expected 'float32' or 'bfloat16'")
  dt = jnp.dtype(dtype)
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.float32).astype(dt)
  b = jax.random.normal(kb, (n, n), jnp.float32).astype(dt)
  out = jnp.zeros((n, n), dt)
  compiled = jax.jit(lambda a, b, out: jnp.dot(a, b), donate_argnums=(2,)).lower(
      a, b, out).compile()
  holder = [out]

  def call():
    holder[0] = compiled(a, b, holder[0])
    holder[0].block_until_ready()

  for _ in range(2):
    call()
  t = median_time(call, reps)
  del holder[0]
  flops = 2.0 * n ** 3
  return {'n': n, 'reps': reps, 'dtype': dtype, 'median_s': t['median_s'],
          'gflop_s': flops / t['median_s'] / 1e9, 'best_gflop_s': flops / t['min_s'] / 1e9}


def synthetic_images(model_cfg, n: int, seed: int):
  """`n` uniformly random images (n, H, W, C) uint8 in [0, 2^num_bits) for a model config."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  s, c = int(model_cfg.image_size), int(model_cfg.num_channels)
  top = 2 ** int(model_cfg.num_bits)
  return np.random.default_rng(seed).integers(0, top, (n, s, s, c)).astype(np.uint8)


# ----------------------------------------------------------------------------- load and memory


def load_avg() -> float:
  """The machine's 1-minute load average (NaN where the OS has none)."""
  try:
    return os.getloadavg()[0]
  except OSError:
    return float('nan')


def peak_rss_gib() -> float:
  """Peak resident memory of this process so far (`ru_maxrss`, includes compilation), GiB."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # KiB on Linux


def hwm_rss_gib() -> float:
  """Peak resident memory of this process's own address space so far (`VmHWM`, GiB): unlike
  `ru_maxrss`, not raised by the resident size of the parent that started it. Falls back to
  `peak_rss_gib()` where /proc is missing."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) * 1024 / GIB
  except (OSError, ValueError, IndexError):
    pass
  return peak_rss_gib()


def minor_faults() -> int:
  """Minor page faults of this process so far."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def current_rss_gib() -> float:
  """Resident memory of this process now, GiB (NaN where it cannot be read)."""
  try:
    with open('/proc/self/statm') as f:
      return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / GIB
  except (OSError, ValueError, IndexError):
    pass
  try:
    import psutil  # pylint: disable=g-import-not-at-top
    return psutil.Process().memory_info().rss / GIB
  except ImportError:
    return float('nan')


class ResourceSampler:
  """Samples the 1-minute load average and this process's resident memory in a daemon thread.

  One sample when entered, then every `interval` seconds, and one on exit. Use as a context
  manager around the work to watch; afterwards `peak_rss_gib` is the largest resident memory
  seen and `load_summary()` the load average's mean, max and sample count.
  """

  def __init__(self, interval: float = 0.01):
    self.interval = float(interval)
    self.peak_rss_gib = float('nan')
    self._load_sum, self._load_max, self._load_n = 0.0, float('-inf'), 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def sample(self) -> None:
    """Takes one sample now."""
    rss = current_rss_gib()
    if not rss <= self.peak_rss_gib:  # also replaces the initial NaN
      self.peak_rss_gib = rss
    load = load_avg()
    if load == load:  # not NaN
      self._load_sum += load
      self._load_max = max(self._load_max, load)
      self._load_n += 1

  def _run(self):
    while not self._stop.wait(self.interval):
      self.sample()

  def __enter__(self):
    self.sample()
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.sample()
    return False

  def load_summary(self) -> Dict[str, float]:
    """{'mean', 'max', 'samples'} of the 1-minute load average over the samples taken."""
    if not self._load_n:
      load = load_avg()
      return {'mean': load, 'max': load, 'samples': 0}
    return {'mean': self._load_sum / self._load_n, 'max': self._load_max,
            'samples': self._load_n}


# ----------------------------------------------------------------------------- machine


def machine_info(devices: bool = False) -> Dict[str, Any]:
  """CPU model, logical CPUs, AVX-512, OS platform, Python, jax and jaxlib versions; with
  `devices=True` also the JAX devices (this starts a backend)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  from denseflow_jax.artifacts import machine_info as host_info  # pylint: disable=g-import-not-at-top
  info = dict(host_info(), jax=jax.__version__, jaxlib=jaxlib.__version__)
  if devices:
    info['devices'] = [str(d) for d in jax.devices()]
  return info


def device_info() -> Dict[str, Any]:
  """The JAX backend of this process: platform, device kind and count, jax/jaxlib versions."""
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  devs = jax.devices()
  return {'platform': devs[0].platform, 'device_kind': devs[0].device_kind,
          'device_count': len(devs), 'jax': jax.__version__, 'jaxlib': jaxlib.__version__}


def device_memory() -> Optional[Dict[str, int]]:
  """Peak / current / limit bytes of the first device where the backend reports them (GPU)."""
  import jax  # pylint: disable=g-import-not-at-top
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  if not stats:
    return None
  keep = ('peak_bytes_in_use', 'bytes_in_use', 'bytes_limit')
  return {k: int(stats[k]) for k in keep if k in stats}


def git_info(repo_root: str, ignore: Sequence[str] = ()) -> Dict[str, Any]:
  """{'commit', 'dirty'} of the checkout at `repo_root` ('' / False where git is missing).

  Changes to tracked files in `ignore` (e.g. BENCHMARKS.md, which earlier runs append rows to)
  do not make the checkout dirty.
  """
  def run(*args):
    try:
      return subprocess.run(['git', *args], cwd=repo_root, capture_output=True, text=True,
                            timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
      return ''
  excludes = [f':(exclude){path}' for path in ignore]
  return {'commit': run('rev-parse', 'HEAD'),
          'dirty': bool(run('status', '--porcelain', '--untracked-files=no', '--', '.',
                            *excludes))}


# ----------------------------------------------------------------------------- child processes


def wait_with_rusage(proc, timeout: Optional[float] = None) -> Dict[str, Any]:
  """Waits for the `subprocess.Popen` child `proc` and returns its own resource usage.

  `{'returncode', 'peak_rss_gib', 'user_s', 'sys_s', 'timed_out'}`: the peak resident memory
  of that one process (`os.wait4`; `RUSAGE_CHILDREN` would be the maximum over every child
  waited for so far). Linux carries the parent's resident size at the fork into the child's
  `ru_maxrss`, so this is at least the parent's RSS when it started the child; the child's
  own `hwm_rss_gib()` does not include it. After `timeout` seconds the child is killed and
  `timed_out` is True.
  """
  deadline = None if timeout is None else time.monotonic() + float(timeout)
  timed_out = False
  while True:
    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
    if pid == proc.pid:
      break
    if deadline is not None and time.monotonic() > deadline:
      proc.kill()
      timed_out = True
      _, status, usage = os.wait4(proc.pid, 0)
      break
    time.sleep(0.05)
  proc.returncode = os.waitstatus_to_exitcode(status)
  return {'returncode': proc.returncode, 'peak_rss_gib': usage.ru_maxrss * 1024 / GIB,
          'user_s': usage.ru_utime, 'sys_s': usage.ru_stime, 'timed_out': timed_out}


def child_argv(argv: Sequence[str], config_path: Optional[str], repo_root: str,
               drop: Sequence[str] = ()) -> list:
  """A script's command-line flags (`argv[1:]`) for a child process that runs in `repo_root`.

  `--config` paths become absolute; with `config_path` (relative to `repo_root`) that config
  replaces `--config` and its `--config.*` overrides; flags named in `drop` are left out.
  """
  args, i, argv = [], 0, list(argv[1:])
  while i < len(argv):
    a = argv[i]
    i += 1
    name = a.split('=', 1)[0]
    two_part = '=' not in a and (a == '--config' or a.startswith('--config.'))
    value = argv[i] if two_part and i < len(argv) else None
    if two_part:
      i += 1
    if name.lstrip('-') in drop:
      continue
    if a == '--config' or a.startswith('--config=') or a.startswith('--config.'):
      if config_path is not None:
        continue
      if name == '--config':
        path, sep, variant = (value if value is not None else a.split('=', 1)[1]).partition(':')
        a, value = f'--config={os.path.abspath(path)}{sep}{variant}', None
    args.append(a if value is None else f'{a}={value}')
  if config_path is not None:
    args.insert(0, f'--config={os.path.join(repo_root, config_path)}')
  return args
