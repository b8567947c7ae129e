"""denseflow_jax.cpu_tuning: which settings apply where, and that they take effect."""
import os
import subprocess
import sys

import pytest

from denseflow_jax import cpu_tuning

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flags_are_added_only_where_they_were_measured(monkeypatch):
  versions = {'jaxlib': '0.12.0.1'}
  monkeypatch.setattr(cpu_tuning, '_version', lambda name: versions.get(name, ''))
  monkeypatch.delenv('JAX_PLATFORMS', raising=False)
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
  assert cpu_tuning.xla_flags_reason() == ''
  versions['jaxlib'] = '0.11.2'
  assert 'jaxlib 0.11.2 is not one' in cpu_tuning.xla_flags_reason()
  versions.update(jaxlib='0.12.0.1', **{'jax-cuda13-plugin': '0.12.0'})
  assert 'jax-cuda13-plugin is installed' in cpu_tuning.xla_flags_reason()
  del versions['jax-cuda13-plugin']
  monkeypatch.setenv('JAX_PLATFORMS', 'tpu')
  assert 'JAX_PLATFORMS=tpu' in cpu_tuning.xla_flags_reason()
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_use_onednn=false')
  assert 'already sets' in cpu_tuning.xla_flags_reason()


def _run(code, env):
  env = dict(env, PYTHONPATH=REPO_ROOT)
  return subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                        timeout=120, check=True).stdout


def test_apply_sets_xla_flags_before_the_backend_and_tunes_malloc():
  env = {k: v for k, v in os.environ.items() if not k.startswith('MALLOC_')}
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
  env['JAX_PLATFORMS'] = 'cpu'
  out = _run('import os\nfrom denseflow_jax import cpu_tuning\ndone = cpu_tuning.apply()\n'
             'import jax\nprint(len(jax.devices()), done["malloc"], "|", os.environ["XLA_FLAGS"])\n'
             'print(float(jax.numpy.ones((64, 64)).sum()))', env)
  first, second = out.strip().splitlines()
  # The XLA flags this jaxlib was measured with are added, the caller's flags kept and honoured.
  assert first.startswith('2 ')
  if cpu_tuning._version('jaxlib').startswith(cpu_tuning.TESTED_JAXLIB):
    assert all(flag in first for flag in cpu_tuning.XLA_FLAGS)
  assert '--xla_force_host_platform_device_count=2' in first
  assert 'mallopt: no mmap, no trim' in first or 'not tuned' in first
  if sys.platform.startswith('linux'):
    assert 'mallopt: no mmap, no trim' in first
  assert second == '4096.0'
  # An explicit MALLOC_* setting wins: nothing is changed then.
  out = _run('from denseflow_jax import cpu_tuning\nprint(cpu_tuning.apply(xla=False))',
             dict(env, MALLOC_ARENA_MAX='2'))
  assert 'the environment sets MALLOC_' in out and 'xla_flags' not in out


_FREED_BUT_HELD = '''
import ctypes, sys
from denseflow_jax import cpu_tuning
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
def rss_mib():
  return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024
# 256 MiB in 64 KiB blocks (below the mmap threshold: on the heap), written, then all freed
# but one small block after them, which keeps glibc from trimming the heap top by itself.
blocks = [libc.malloc(64 * 1024) for _ in range(4096)]
for b in blocks:
  ctypes.memset(b, 1, 64 * 1024)
pin = libc.malloc(64 * 1024)   # as large as the blocks: from the heap top, after them
for b in blocks:
  libc.free(b)
held = rss_mib()
released = cpu_tuning.release_free_memory()
print(held, rss_mib(), released)
'''


def test_release_free_memory_hands_freed_heap_pages_back():
  if not sys.platform.startswith('linux'):
    pytest.skip('glibc malloc: Linux only')
  env = {k: v for k, v in os.environ.items() if not k.startswith('MALLOC_')}
  held, after, released = _run(_FREED_BUT_HELD, env).split()
  assert released == 'True'
  assert int(held) - int(after) > 200, (held, after)  # of the 256 MiB freed


def test_single_thread_blas_sets_scipys_lapack_library_to_one_thread():
  """The OpenBLAS that JAX's CPU LAPACK kernels call (scipy's) ends on one thread, in a fresh
  process where it was not loaded yet and where numpy's was set to two threads first."""
  code = '''
import json, threadpoolctl
threadpoolctl.threadpool_limits(2, user_api='blas')
from denseflow_jax import cpu_tuning
before = cpu_tuning.single_thread_blas()
import jax, jax.numpy as jnp
jnp.linalg.slogdet(jnp.eye(3) * 2.0)[1].block_until_ready()   # JAX's LAPACK, now initialised
after = {i['filepath']: i['num_threads'] for i in threadpoolctl.threadpool_info()
         if i['user_api'] == 'blas'}
print(json.dumps({'before': before, 'after': after}))
'''
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                       env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  result = __import__('json').loads(out.stdout.strip().splitlines()[-1])
  assert any('scipy' in path and 'numpy' not in path for path in result['after']), result
  assert result['after'] and set(result['after'].values()) == {1}, result
  assert len(result['before']) == len(result['after'])



# ----------------------------------------------------------------------------- huge pages


@pytest.mark.parametrize('environ, platform, glibc, mode, expected', [
    ({}, 'linux', (2, 36), 'madvise', ''),
    ({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, 'linux', (2, 35), 'madvise', ''),
    ({cpu_tuning.HUGE_PAGES_ENV: '0'}, 'linux', (2, 36), 'madvise', 'DENSEFLOW_HUGE_PAGES=0'),
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, 'linux', (2, 36), 'madvise',
     'GLIBC_TUNABLES sets glibc.malloc.hugetlb'),
    ({}, 'darwin', None, '', 'not Linux (darwin)'),
    ({}, 'linux', None, 'madvise', 'no glibc >= 2.35'),
    ({}, 'linux', (2, 31), 'madvise', 'glibc 2.31 < 2.35'),
    ({}, 'linux', (2, 36), 'always', 'transparent huge pages: always (not madvise)'),
    ({}, 'linux', (2, 36), 'never', 'transparent huge pages: never (not madvise)'),
    ({}, 'linux', (2, 36), '', 'transparent huge pages: unknown (not madvise)'),
])
def test_huge_pages_apply_only_where_they_change_something(environ, platform, glibc, mode,
                                                           expected):
  assert cpu_tuning.huge_pages_reason(environ, platform, glibc, mode) == expected


def test_transparent_huge_pages_mode_reads_the_bracketed_choice(tmp_path):
  path = tmp_path / 'enabled'
  path.write_text('always [madvise] never\n')
  assert cpu_tuning.transparent_huge_pages_mode(str(path)) == 'madvise'
  path.write_text('[always] madvise never\n')
  assert cpu_tuning.transparent_huge_pages_mode(str(path)) == 'always'
  assert cpu_tuning.transparent_huge_pages_mode(str(tmp_path / 'missing')) == ''


_SCRIPT = '''
import os, sys
from absl import flags
from denseflow_jax import cli, cpu_tuning
flags.DEFINE_integer('x', 0, 'a flag')
def main(argv):
  print('main', os.getpid(), flags.FLAGS.x, sys.flags.utf8_mode, os.environ.get('GLIBC_TUNABLES'),
        cpu_tuning.huge_pages_state(), flush=True)
if __name__ == '__main__':
  print('start', os.getpid(), flush=True)
  cli.run(main)
'''


def test_a_script_restarts_once_with_huge_pages_and_keeps_its_arguments(tmp_path):
  script = tmp_path / 'script.py'
  script.write_text(_SCRIPT)
  env = {k: v for k, v in os.environ.items()
         if k not in ('GLIBC_TUNABLES', cpu_tuning.HUGE_PAGES_ENV)}
  env['PYTHONPATH'] = REPO_ROOT
  applies = cpu_tuning.huge_pages_reason(env) == ''

  def run(extra):
    out = subprocess.run([sys.executable, '-X', 'utf8', str(script), '--x=7'],
                         env=dict(env, **extra), capture_output=True, text=True, timeout=120,
                         check=True).stdout
    return [line.split(' ', 5) for line in out.strip().splitlines()]

  lines = run({})
  starts = [l for l in lines if l[0] == 'start']
  (main,) = [l for l in lines if l[0] == 'main']
  assert all(l[1] == main[1] for l in starts)  # one process id: exec, not a child
  assert main[2:4] == ['7', '1']  # flags and interpreter options survive the restart
  if applies:
    assert len(starts) == 2
    assert main[4] == cpu_tuning.HUGE_PAGES_TUNABLE and main[5].startswith('on')
  else:
    assert len(starts) == 1 and main[4] == 'None' and main[5].startswith('off')
  # The caller's tunables are kept beside the added one.
  lines = run({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=8'})
  (main,) = [l for l in lines if l[0] == 'main']
  assert main[4] == ('glibc.malloc.arena_max=8:' + cpu_tuning.HUGE_PAGES_TUNABLE if applies
                     else 'glibc.malloc.arena_max=8')
  # Turned off: no restart.
  lines = run({cpu_tuning.HUGE_PAGES_ENV: '0'})
  assert [l[0] for l in lines] == ['start', 'main'] and lines[1][4] == 'None'
  assert lines[1][5] == f'off: {cpu_tuning.HUGE_PAGES_ENV}=0'
