"""Process settings that make XLA:CPU training faster: XLA flags and glibc malloc options.

`apply()` must run before JAX starts a backend (before the first `jax.devices()`, array or
jit call), which is why the entry points call it at the top of `main`. It changes nothing
when the settings do not apply:

- XLA flags (`XLA_FLAGS`): oneDNN matmuls and convolutions and 512-bit vectors for XLA:CPU
  (see /BENCHMARKS.md). They are experimental XLA options, so they are added only for the
  jaxlib versions they were measured on (`TESTED_JAXLIB`), never when a GPU or TPU plugin is
  installed (an accelerator run needs none of them, and an unknown name in `XLA_FLAGS` aborts
  the process), and never when `XLA_FLAGS` already sets any of them.
- glibc malloc (`mallopt`): no mmap for large blocks, no trimming of the heap top, so the
  buffers XLA frees after one step are reused by the next instead of being returned to the
  kernel and page-faulted in again (the same settings as `MALLOC_MMAP_MAX_=0`
  `MALLOC_TRIM_THRESHOLD_=...` in the environment). Only on Linux with glibc, and not when
  the environment already sets a `MALLOC_*` option. The number of arenas is left alone: with
  one arena (`M_ARENA_MAX=1`) the oneDNN kernels' threads contend for the malloc lock: the 8x8
  quickstart ran at 7.8 steps/s with the XLA flags and one arena, 14.3 with the flags alone.

With the XLA flags on, XLA:CPU cannot serialise the compiled programs (the persistent
compilation cache logs "Error writing persistent compilation cache entry ... std::bad_alloc"
for every program, jaxlib 0.12), so every start compiles from scratch.

One more setting is on by default and needs no flag: `single_thread_blas()` runs the BLAS
libraries of the process (OpenBLAS behind numpy and scipy) on one thread. JAX's CPU
linear-algebra kernels call scipy's LAPACK from inside a running XLA program: the LU of
`slogdet` and `inv` in the invertible 1x1 convolutions, and the triangular solves of their
gradients. With OpenBLAS's default of one thread per core, each call wakes OpenBLAS's worker
threads. They then busy-wait for the next call and take a core from XLA's own threads (15%
of all CPU samples of tiny's train step on 2 cores were OpenBLAS's `blas_thread_server`). In
one process that switched between the two settings every 7 steps, the tiny config's train
step took 0.53-0.61 s with 2 BLAS threads and 0.46-0.50 s with one (same bits). Every entry
point (`cli.run`) and the training loop call it.

One malloc arena (`M_ARENA_MAX=1`) with the malloc settings above was tried as a default
and is not one. It stops the page faults of XLA's per-step buffers: the other threads'
arenas map blocks of more than 64 MiB afresh even with mmap off, 95 k fresh pages per step
on tiny. Then tiny's step took 0.27-0.34 s in processes that loaded their program from the
cache, against 0.36-0.47 s. But in a process that compiled the step itself, the compiler's
freed memory fragments the one heap: 18% of the samples were `_int_malloc`, and the step took
0.44-0.54 s. On DenseFlow-74-10 the loop's peak RSS rose from 5.6-5.8 to 11.8-15.3 GiB, and
its step from 5.6-6.2 s to 6.5-9.7 s.

Every entry point also starts with glibc malloc's transparent huge pages
(`restart_with_huge_pages`, called by `cli.run`): the process restarts itself once, at once,
with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` added to its environment (glibc reads its tunables
only when a process starts), so that malloc advises the kernel to back its large blocks with
2 MiB pages. XLA:CPU allocates a step's large buffers afresh at every step (glibc maps blocks
of more than 32-64 MiB and unmaps them when freed), and the kernel faults each page in again:
96 k minor faults (0.16-0.20 s of system time) per train step of tiny, 830 k (1.6-1.8 s) of
DenseFlow-74-10, against 1 k and 3 k with huge pages (2026-12-04, an idle 2-core AMD EPYC, one
4096^3 `jnp.dot` 0.70-0.78 s: the loop's step 0.601 -> 0.560 s on tiny, 6.220 -> 5.572 s on
74-10; BENCHMARKS.md). It applies on Linux with glibc >= 2.35 where the kernel's transparent
huge pages are in `madvise` mode (in `always` mode every process has them already); not where
`GLIBC_TUNABLES` already sets `glibc.malloc.hugetlb` or `DENSEFLOW_HUGE_PAGES=0` turns it off.
A library user who calls `train.train_and_evaluate` from their own program gets it by starting
Python with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`. It changes no result.

These settings change the order of floating-point operations of some kernels (oneDNN), so a
run with them and a run without them differ in the last bits; a resumed run applies the same
settings as the first one (`experiments/train.py --cpu_tuning`) and stays bitwise equal.
"""
import ctypes
import ctypes.util
import gc
import importlib.metadata
import logging
import os
import re
import sys
from typing import Any, Dict, Mapping, Optional, Tuple

# oneDNN matmuls and convolutions, 512-bit vectors (flags measured with these jaxlib releases).
XLA_FLAGS = ('--xla_cpu_use_onednn=true', '--xla_cpu_experimental_onednn_custom_call=true',
             '--xla_cpu_experimental_ynn_fusion_type=', '--xla_cpu_prefer_vector_width=512')
TESTED_JAXLIB = ('0.12.',)
_ACCELERATOR_PACKAGES = ('jax-cuda12-plugin', 'jax-cuda13-plugin', 'jax-rocm60-plugin',
                         'jax-rocm7-plugin', 'libtpu', 'libtpu-nightly')

# mallopt parameters (glibc malloc.h) and the values used.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_MALLOPT = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 2 ** 31 - 1, _M_TOP_PAD: 512 * 2 ** 20}


def _version(name: str) -> str:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return ''


def _accelerator_plugin() -> str:
  for name in _ACCELERATOR_PACKAGES:
    if _version(name):
      return name
  return ''


def xla_flags_reason() -> str:
  """Why the XLA:CPU flags are not added ('' when they are)."""
  jaxlib = _version('jaxlib')
  plugin = _accelerator_plugin()
  if plugin:
    return f'{plugin} is installed (accelerator run)'
  if os.environ.get('JAX_PLATFORMS', 'cpu').split(',')[0] not in ('', 'cpu'):
    return f'JAX_PLATFORMS={os.environ["JAX_PLATFORMS"]}'
  if not jaxlib.startswith(TESTED_JAXLIB):
    return f'jaxlib {jaxlib or "(not found)"} is not one they were measured on ({TESTED_JAXLIB})'
  existing = os.environ.get('XLA_FLAGS', '')
  if any(flag.split('=')[0] in existing for flag in XLA_FLAGS):
    return 'XLA_FLAGS already sets one of them'
  return ''


def _libc_function(name: str):
  """glibc's `name` (a ctypes function), or None where there is no such function."""
  try:
    return getattr(ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6'), name)
  except (OSError, AttributeError):
    return None


def release_free_memory() -> bool:
  """Returns the heap memory malloc holds free to the kernel (glibc `malloc_trim(0)`).

  XLA's compiler frees most of what it allocated when a compile ends, but glibc keeps those
  pages in its arenas, so without this a process keeps the high-water mark of every compile
  (tiny config: 2.59 GiB of RSS while training against 1.31 GiB after a trim). The training loop
  calls it after compiling the train step and after the initial state is ready; it returns no
  memory that is still in use, and changes no result. Python's garbage is collected first (a
  compiled program can be held by a reference cycle). False where there is no glibc.
  """
  gc.collect()
  if not sys.platform.startswith('linux'):
    return False
  trim = _libc_function('malloc_trim')
  if trim is None:
    return False
  trim.argtypes, trim.restype = (ctypes.c_size_t,), ctypes.c_int
  trim(0)
  return True


def single_thread_blas() -> Dict[str, int]:
  """Sets every BLAS library loaded in the process to one thread; returns {library: before}.

  Loads scipy's LAPACK first (as JAX does at its first CPU linear-algebra call), so that the
  library JAX's kernels will call is among them. Changes no result (the matrices are small),
  and can be called any number of times. `{}` where threadpoolctl or scipy is missing
  (nothing is changed then).
  """
  try:
    import scipy.linalg.cython_lapack  # pylint: disable=g-import-not-at-top,unused-import
    import threadpoolctl  # pylint: disable=g-import-not-at-top
  except ImportError:
    return {}
  before = {}
  for lib in threadpoolctl.ThreadpoolController().select(user_api='blas').lib_controllers:
    before[os.path.basename(lib.filepath)] = lib.num_threads
    if lib.num_threads != 1:
      lib.set_num_threads(1)
  return before


# glibc's malloc tunable for transparent huge pages (glibc >= 2.35) and the variable that
# turns the restart off.
HUGE_PAGES_TUNABLE = 'glibc.malloc.hugetlb=1'
HUGE_PAGES_ENV = 'DENSEFLOW_HUGE_PAGES'
_THP_ENABLED = '/sys/kernel/mm/transparent_hugepage/enabled'


def transparent_huge_pages_mode(path: str = _THP_ENABLED) -> str:
  """The kernel's transparent huge page mode ('always', 'madvise', 'never'); '' if unknown."""
  try:
    with open(path) as f:
      match = re.search(r'\[(\w+)\]', f.read())
  except OSError:
    return ''
  return match.group(1) if match else ''


def glibc_version() -> Optional[Tuple[int, int]]:
  """(major, minor) of the process's glibc; None without glibc."""
  try:
    name, version = os.confstr('CS_GNU_LIBC_VERSION').split()
    major, minor = version.split('.')[:2]
    return (int(major), int(minor)) if name == 'glibc' else None
  except (AttributeError, OSError, ValueError):
    return None


_THIS_PROCESS = object()


def huge_pages_reason(environ: Optional[Mapping[str, str]] = None, platform: Optional[str] = None,
                      glibc: Any = _THIS_PROCESS, thp_mode: Optional[str] = None) -> str:
  """Why `restart_with_huge_pages` would not restart this process; '' where it would.

  The arguments default to this process's environment, platform, glibc ((major, minor) or
  None) and kernel mode.
  """
  environ = os.environ if environ is None else environ
  platform = sys.platform if platform is None else platform
  glibc = glibc_version() if glibc is _THIS_PROCESS else glibc
  thp_mode = transparent_huge_pages_mode() if thp_mode is None else thp_mode
  if environ.get(HUGE_PAGES_ENV, '') == '0':
    return f'{HUGE_PAGES_ENV}=0'
  if 'glibc.malloc.hugetlb' in environ.get('GLIBC_TUNABLES', ''):
    return 'GLIBC_TUNABLES sets glibc.malloc.hugetlb'
  if not platform.startswith('linux'):
    return f'not Linux ({platform})'
  if glibc is None or glibc < (2, 35):
    return 'no glibc >= 2.35' if glibc is None else f'glibc {glibc[0]}.{glibc[1]} < 2.35'
  if thp_mode != 'madvise':
    return f'transparent huge pages: {thp_mode or "unknown"} (not madvise)'
  return ''


def huge_pages_state() -> str:
  """'on' where this process's malloc uses transparent huge pages, else 'off: <why>'."""
  if 'glibc.malloc.hugetlb=1' in os.environ.get('GLIBC_TUNABLES', '').split(':'):
    return 'on (GLIBC_TUNABLES glibc.malloc.hugetlb=1)'
  if transparent_huge_pages_mode() == 'always':
    return 'on (transparent huge pages: always)'
  return 'off: ' + (huge_pages_reason() or 'not restarted')


def restart_with_huge_pages() -> str:
  """Restarts this process with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (module doc).

  `os.execv` of the same interpreter with the same arguments (`sys.orig_argv`) and process
  id; it does not return where it applies. Returns why not where it does not (including an
  exec that failed, which leaves the process as it was). Call it before any other work: the
  restarted process runs the program again from the start.
  """
  reason = huge_pages_reason()
  if reason:
    return reason
  before = os.environ.get('GLIBC_TUNABLES')
  os.environ['GLIBC_TUNABLES'] = ':'.join(t for t in (before, HUGE_PAGES_TUNABLE) if t)
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
  except OSError as e:
    if before is None:
      del os.environ['GLIBC_TUNABLES']
    else:
      os.environ['GLIBC_TUNABLES'] = before
    return f'restart failed: {e}'
  return ''  # not reached


def _set_mallopt() -> str:
  """Applies `_MALLOPT`; '' on success, else why not."""
  if not sys.platform.startswith('linux'):
    return f'not Linux ({sys.platform})'
  if any(k.startswith('MALLOC_') for k in os.environ):
    return 'the environment sets MALLOC_* options'
  mallopt = _libc_function('mallopt')
  if mallopt is None:
    return 'no glibc mallopt'
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  for param, value in _MALLOPT.items():
    if mallopt(param, value) != 1:
      return f'mallopt({param}, {value}) failed'
  return ''


def apply(xla: bool = True, malloc: bool = True) -> Dict[str, str]:
  """Applies the settings that apply here (see the module doc); returns what was done.

  `{'xla_flags': 'added ...' or 'not added: <reason>', 'malloc': ...}`; logged at INFO.
  Call before JAX starts a backend: XLA reads `XLA_FLAGS` once, at backend start.
  """
  done = {}
  if xla:
    reason = xla_flags_reason()
    if reason:
      done['xla_flags'] = f'not added: {reason}'
    else:
      os.environ['XLA_FLAGS'] = ' '.join([os.environ.get('XLA_FLAGS', '').strip(), *XLA_FLAGS]
                                         ).strip()
      done['xla_flags'] = 'added ' + ' '.join(XLA_FLAGS)
  if malloc:
    reason = _set_mallopt()
    done['malloc'] = f'not tuned: {reason}' if reason else 'mallopt: no mmap, no trim'
  logging.getLogger(__name__).info('CPU tuning: %s', '; '.join(f'{k} {v}' for k, v in
                                                              done.items()))
  return done
