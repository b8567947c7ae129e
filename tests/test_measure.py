"""The benchmarking helpers shared by the experiment scripts: sampler, matmul peak, FLOPs,
child processes' own peak memory."""
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest

from denseflow_jax.benchmarking import flops, measure

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_resource_sampler_sees_memory_and_load():
  with measure.ResourceSampler(interval=0.005) as sampler:
    block = bytearray(64 * 2 ** 20)  # 64 MiB resident while sampled
    block[::4096] = b'x' * len(block[::4096])
    time.sleep(0.05)
    del block
  assert sampler.peak_rss_gib >= measure.current_rss_gib() - 1e-3
  assert sampler.peak_rss_gib > 0.05
  assert measure.hwm_rss_gib() >= sampler.peak_rss_gib - 1e-3
  load = sampler.load_summary()
  assert load['samples'] >= 2 and load['max'] >= load['mean'] >= 0


def test_matmul_peak_and_timer():
  peak = measure.matmul_peak(n=64, reps=2)
  assert peak['n'] == 64 and peak['median_s'] > 0 and peak['dtype'] == 'float32'
  assert abs(peak['gflop_s'] - 2 * 64 ** 3 / peak['median_s'] / 1e9) < 1e-6 * peak['gflop_s']
  assert measure.matmul_peak(n=32, reps=1, dtype='bfloat16')['dtype'] == 'bfloat16'
  with pytest.raises(ValueError, match="dtype='float16'"):
    measure.matmul_peak(n=32, reps=1, dtype='float16')
  t = measure.median_time(lambda: None, 3)
  assert len(t['times_s']) == 3 and t['min_s'] <= t['median_s'] <= t['max_s']


def test_perf_flags_machine_and_git():
  once = measure.with_perf_xla_flags('--xla_foo=1')
  assert once.startswith('--xla_foo=1 ') and measure.with_perf_xla_flags(once) == once
  info = measure.machine_info()
  assert info['cpu_model'] and info['logical_cpus'] >= 1 and info['jax'] == jax.__version__
  git = measure.git_info(REPO_ROOT, ignore=('BENCHMARKS.md',))
  assert set(git) == {'commit', 'dirty'}


def test_counted_flops_of_dot_conv_and_scan():
  a, b = jnp.ones((8, 16)), jnp.ones((16, 4))
  x, w = jnp.ones((2, 5, 5, 3)), jnp.ones((3, 3, 3, 6))

  def fn(a, b, x, w):
    scanned = jax.lax.scan(lambda c, _: (c @ jnp.ones((16, 16)), None), a, None, length=3)[0]
    conv = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return scanned @ b, conv

  counts = flops.count_flops(jax.make_jaxpr(fn)(a, b, x, w))
  assert counts['dot'] == 2 * 8 * 16 * 4 + 3 * 2 * 8 * 16 * 16
  assert counts['conv'] == 2 * (2 * 5 * 5 * 6) * (3 * 9)  # zero padding counted
  assert flops.total(counts) == counts['dot'] + counts['conv']


def test_wait_with_rusage_is_the_one_child():
  """Each child's own peak RSS (not the maximum over all children), its status, a timeout."""
  big = subprocess.Popen([sys.executable, '-c', 'b = bytearray(300 * 2 ** 20); b[::4096] = '
                          'b"x" * len(b[::4096])'])
  got = measure.wait_with_rusage(big, timeout=60)
  assert got['returncode'] == 0 and not got['timed_out'] and got['peak_rss_gib'] > 0.28
  small = subprocess.Popen([sys.executable, '-c', 'import sys; sys.exit(3)'])
  assert measure.wait_with_rusage(small, timeout=60)['returncode'] == 3
  # A child's own high-water mark excludes the parent's memory (ru_maxrss does not).
  code = 'from denseflow_jax.benchmarking import measure; print(measure.hwm_rss_gib())'
  hwm = float(subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                             cwd=REPO_ROOT, check=True).stdout)
  assert 0 < hwm < 0.2
  slow = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
  got = measure.wait_with_rusage(slow, timeout=0.5)
  assert got['timed_out'] and got['returncode'] != 0
