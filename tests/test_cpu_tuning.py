"""denseflow_jax.cpu_tuning: which settings apply where, and that they take effect."""
import os
import subprocess
import sys

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
