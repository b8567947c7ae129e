"""experiments/benchmark.py: the validity rule, the matmul unit and published comparison on
constructed rows, the loop row's helpers, and one smoke run (a train-step row and a
training-loop row on a minimal model, ~20 s on an idle 2-core CPU, ~50 s under load).

No test asserts a timing: the smoke run checks what is timed (the library's train step with
its donation and sharding; `train_and_evaluate` on the offline digits), the structure of the
JSON and the printed rows.
"""
import json
import logging
import os
import subprocess
import sys

import pytest

from denseflow_jax import defaults
from denseflow_jax.benchmarking import loop, measure, report

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, 'experiments', 'benchmark.py')


def _peak(seconds, n=4096, dtype='float32'):
  return {dtype: {'n': n, 'dtype': dtype, 'median_s': seconds}}


def test_validity_rule():
  ok = report.validity(0.2, {'float32': 1.0}, {'float32': 1.09})
  assert ok == {'valid': True, 'reasons': []}
  loaded = report.validity(0.7, {'float32': 1.0}, {'float32': 1.0})
  assert not loaded['valid'] and 'load 0.70' in loaded['reasons'][0]
  drift = report.validity(0.2, {'float32': 1.0}, {'float32': 1.15})
  assert not drift['valid'] and '15.0%' in drift['reasons'][0]
  # The difference is relative to the faster peak, in either order.
  assert not report.validity(0.2, {'float32': 1.15}, {'float32': 1.0})['valid']
  assert not report.validity(float('nan'), {'float32': 1.0}, {'float32': 1.0})['valid']
  assert not report.validity(0.1, {}, {})['valid']
  # Every precision measured counts (accelerator rows measure f32 and bf16).
  both = report.validity(0.1, {'float32': 1.0, 'bfloat16': 0.2},
                         {'float32': 1.0, 'bfloat16': 0.3})
  assert not both['valid'] and 'bfloat16' in both['reasons'][0]
  assert not report.validity(0.1, {'float32': 1.0}, {})['valid']  # measured once only


def test_summarize_units_published_and_targets():
  tiny = defaults.set_architecture(defaults.get_config(), 'tiny')
  key = report.published_key(tiny.model)
  assert key == 'tiny'
  row = {'kind': 'step', 'batch': 8, 'dtype': 'float32', 'platform': 'cpu',
         'published_key': key, 'seconds': 0.2, 'load_at_start': 0.1,
         'matmul_before': _peak(0.32), 'matmul_after': _peak(0.34), 'peak_rss_gib': 1.44,
         'flops': 72.3e9}
  s = report.summarize(row)
  assert s['valid'] and s['dot_s'] == pytest.approx(0.33)
  assert s['units'] == pytest.approx(0.2 / 0.33)
  assert s['published_units'] == 0.88 and s['target_units'] == 0.68
  assert s['speed_ratio'] == pytest.approx(0.88 / (0.2 / 0.33))
  assert s['meets_target'] is True                       # 0.61 <= 0.68
  assert s['rss_ratio'] == pytest.approx(1.44 / 0.72)
  gflop_s = 2 * 4096 ** 3 / 0.33 / 1e9
  assert s['frac_of_peak']['float32'] == pytest.approx(72.3 / 0.2 / gflop_s)
  slow = report.summarize(dict(row, seconds=0.5, load_at_start=0.9))
  assert slow['meets_target'] is False and not slow['valid']
  assert slow['speed_ratio'] < 1
  # Another unit (n != 4096) or platform: no published comparison.
  other = report.summarize(dict(row, matmul_before=_peak(0.01, n=128),
                                matmul_after=_peak(0.01, n=128)))
  assert 'published_units' not in other and 'published_note' in other
  # Sampling rows compare by the number of images; bf16 rows have no published row.
  sample = report.summarize(dict(row, kind='sample', n=16, batch=None, seconds=0.066))
  assert sample['published_units'] == 0.26 and sample['target_units'] == 0.20
  assert report.summarize(dict(row, dtype='bfloat16')).get('published_units') is None
  ev = report.summarize(dict(row, kind='eval', batch=64, seconds=1.0, flops=0.9 * gflop_s * 1e9))
  assert ev['target_frac'] == 0.85 and ev['meets_target'] is True
  # The paper's GPU figure for 128 samples of 74-10.
  gpu = report.summarize({'kind': 'sample', 'n': 128, 'platform': 'gpu', 'dtype': 'float32',
                          'published_key': 'denseflow_74_10', 'seconds': 0.48,
                          'load_at_start': 0.0, 'matmul_before': _peak(0.01, n=8192),
                          'matmul_after': _peak(0.01, n=8192)})
  assert gpu['paper_gpu_seconds'] == 0.96 and gpu['paper_gpu_speed_ratio'] == pytest.approx(2.0)


def test_rows_print_and_markdown_keeps_only_valid_rows(tmp_path):
  base = {'kind': 'step', 'batch': 8, 'dtype': 'float32', 'platform': 'cpu',
          'published_key': 'tiny', 'seconds': 0.3, 'matmul_before': _peak(0.33),
          'matmul_after': _peak(0.335), 'peak_rss_gib': 2.0, 'label': 'tiny'}
  valid = report.summarize(dict(base, load_at_start=0.2))
  invalid = report.summarize(dict(base, kind='loop', load_at_start=1.9, first_step_s=30.0))
  text = report.format_rows([valid, invalid])
  assert 'step b8' in text and 'loop b8' in text and 'VALID' in text
  assert 'NOT VALID: load 1.90 at process start > 0.5' in text
  assert '0.88' in text and '0.68' in text  # published units and target
  doc = {'meta': {'date': '2026-12-05T00:00:00+00:00', 'git': {'commit': 'a' * 40,
                                                              'dirty': False}},
         'rows': [valid, invalid]}
  md = tmp_path / 'B.md'
  md.write_text(f'# B\n\n{report.TABLE_HEADER}\n{report.TABLE_MARKER}\n\nafter\n')
  report.insert_markdown(str(md), report.markdown_rows(doc))
  lines = md.read_text().splitlines()
  i = lines.index(report.TABLE_MARKER)
  assert '| step b8 |' in lines[i - 1] and 'loop b8' not in md.read_text()
  assert lines[-1] == 'after'
  assert len(report.markdown_rows(doc, include_invalid=True)) == 2


def test_loop_helpers(tmp_path):
  from configs import quickstart, tiny
  q = quickstart.get_config()
  assert loop.loop_data(q, '')['dataset'] == 'digits'
  t = tiny.get_config()
  missing = str(tmp_path / 'none.npz')
  with pytest.raises(ValueError, match='no offline data for a model of'):
    loop.loop_data(t, '', cifar_subset=missing)
  with pytest.raises(ValueError, match='digits are 8x8x1'):
    loop.loop_data(t, 'digits')
  npz = tmp_path / 'subset.npz'
  npz.write_bytes(b'')
  assert loop.loop_data(t, '', cifar_subset=str(npz)) == {
      'dataset': 'npz', 'train_npz': str(npz), 'description': f'CIFAR-10 subset {npz}'}
  cfg = loop.loop_config(t, 16, 30, 5, loop.loop_data(t, str(npz)))
  assert (cfg.train.batch_size, cfg.train.num_steps, cfg.train.log_every) == (16, 30, 5)
  assert cfg.train.eval_every == 0 and cfg.data.dataset == 'npz' and cfg.data.holdout == 0
  assert loop.steady_step_seconds([{'step': 1}, {'steps_per_sec': 2.0}, {'steps_per_sec': 4.0},
                                    {'steps_per_sec': 5.0}]) == pytest.approx(0.25)
  assert loop.steady_step_seconds([]) is None
  # The clock reads the loop's own log line (denseflow_jax.train logs it through absl).
  clock = loop.FirstStepClock()
  assert clock.time is None
  train_source = open(os.path.join(REPO_ROOT, 'denseflow_jax', 'train.py')).read()
  for i, (name, prefix) in enumerate(loop.PHASE_LOGS):
    record = logging.LogRecord('absl', logging.INFO, 'train.py', 1, prefix + ' in %s', ('3 s',),
                               None)
    record.created = 100.0 + 10 * i + i * i  # 100, 111, 124, 139
    clock.emit(record)
    repeat = logging.LogRecord('absl', logging.INFO, 'train.py', 1, prefix, (), None)
    clock.emit(repeat)  # a later record of the same phase changes nothing
    assert f"'{prefix}" in train_source, prefix  # the loop still logs it
  assert clock.time == 139.0
  assert clock.phases(start=95.0) == {'before_compile': 5.0, 'step_compile': 11.0,
                                      'init': 13.0, 'first_step': 15.0}
  partial = loop.FirstStepClock()
  partial.emit(logging.LogRecord('absl', logging.INFO, 'train.py', 1, loop.FIRST_STEP_LOG, (),
                                 None))
  assert partial.phases(start=0.0)['step_compile'] is None  # a resumed run compiles later
  assert loop.set_compute_dtype(t, 'float32')
  if 'compute_dtype' not in t.model:  # configs of a version without mixed precision
    assert not loop.set_compute_dtype(t, 'bfloat16') and 'compute_dtype' not in t.model
    t.model.compute_dtype = 'float32'
  assert loop.set_compute_dtype(t, 'bfloat16') and t.model.compute_dtype == 'bfloat16'
  argv = ['x', '--config', 'c.py', '--config.model.a', '1', '--steps=3', '--mode=cpu']
  assert measure.child_argv(argv, 'configs/tiny.py', REPO_ROOT, drop=('mode',)) == [
      f'--config={os.path.join(REPO_ROOT, "configs/tiny.py")}', '--steps=3']
  assert measure.child_argv(argv, None, REPO_ROOT) == [
      f'--config={os.path.abspath("c.py")}', '--config.model.a=1', '--steps=3', '--mode=cpu']


@pytest.mark.timeout(300)
def test_benchmark_smoke_step_and_loop_rows(tmp_path):
  out = tmp_path / 'bench.json'
  cmd = [
      sys.executable, SCRIPT, f'--config={os.path.join(REPO_ROOT, "configs", "quickstart.py")}',
      # A minimal model on the 8x8 digits: one unit per block, one Glow-coupling module each,
      # uniform dequantization, no cross-unit coupling.
      '--config.model.coupling=glow', '--config.model.glow_hidden=8',
      '--config.model.augment=false', '--config.model.dequantization=uniform',
      '--config.model.block_conf=(1,1)', '--config.model.layers_conf=(1,1)',
      # batch 4: divisible by 1 and by 4 devices; --settle_s=0: no wait for an idle machine.
      '--jobs=step,loop', '--batch_sizes=4', '--loop_batch_sizes=4', '--settle_s=0',
      '--loop_steps=4',
      '--loop_log_every=2', '--steps=1', '--warmup=0', '--peak_n=128', '--peak_reps=1',
      f'--out={out}', '--label=smoke']
  env = dict(os.environ)  # this checkout's package, also when PYTHONPATH is relative
  env['PYTHONPATH'] = os.pathsep.join([REPO_ROOT] + [p for p in env.get('PYTHONPATH', '').split(
      os.pathsep) if p and os.path.isabs(p)])
  proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True,
                        timeout=290)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

  result = json.loads(out.read_text())
  meta = result['meta']
  assert meta['mode'] == 'cpu' and meta['label'] == 'smoke' and meta['published_key'] is None
  assert len(meta['git']['commit']) == 40 and meta['machine']['cpu_model']
  assert result['reference']['date'] == '2026-12-01' and result['skipped'] == []
  step, loop = result['rows']
  for row in (step, loop):
    assert isinstance(row['valid'], bool) and row['load_at_start'] >= 0
    assert row['valid'] == (not row['invalid_reasons'])
    assert row['matmul_before']['float32']['n'] == 128 and row['matmul_after']['float32']
    assert row['seconds'] > 0 and row['units'] > 0 and row['peak_rss_gib'] > 0.1
    assert row['platform'] == 'cpu' and row['label'] == 'smoke'
  # The step the training loop compiles: denseflow_jax.train's, state donated, batch sharded.
  assert step['kind'] == 'step' and step['batch'] == 4
  assert step['step_fn'] == 'denseflow_jax.train.make_train_step.<locals>.step_fn'
  assert step['donated_state'] is True and step['donated_batch'] is False
  assert "P('data'" in step['batch_sharding'] and step['finite'] and step['flops'] > 0
  assert len(step['times_s']) == 1 and step['frac_of_peak']['float32'] > 0
  # The real loop on the digits: steps/s from its metrics.jsonl, time to the first step.
  assert loop['kind'] == 'loop' and loop['batch'] == 4 and loop['data'] == 'digits (embedded)'
  assert len(loop['steps_per_sec']) == 2 and loop['cache'] == 'cold'
  assert [s for s, _ in loop['train_bpd_curve']] == [2, 4]
  assert 0 < loop['first_step_s'] < loop['process_wall_s']
  phases = loop['startup_phases_s']  # a fresh run: every phase logged, in order
  assert set(phases) == {'before_compile', 'step_compile', 'init', 'first_step'}
  assert all(v is not None and v >= 0 for v in phases.values()), phases
  assert sum(phases.values()) < loop['first_step_s'] and phases['step_compile'] > 0
  assert set(loop['cpu_tuning']) == {'xla_flags', 'malloc'}  # as experiments/train.py applies it
  # Printed: one line per row with its validity.
  printed = [l for l in proc.stdout.splitlines()
             if l.startswith('smoke') and ('step b4' in l or 'loop b4' in l)]
  assert len(printed) >= 2 and all('VALID' in l for l in printed)
  assert 'start-up of smoke loop b4: before compile ' in proc.stdout


@pytest.mark.parametrize('name', ['benchmark.py', 'profile_components.py', 'ablation.py'])
def test_help_exits_0_with_usage(name):
  proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, 'experiments', name), '--help'],
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f'Usage: python experiments/{name}' in proc.stdout + proc.stderr


def test_gpu_check_dry_run(tmp_path):
  """The GPU script's plan (nothing runs): wheels found, every step under a time limit."""
  whl = os.path.join(REPO_ROOT, '.whl')
  if not any(n.endswith('.whl') for n in (os.listdir(whl) if os.path.isdir(whl) else [])):
    pytest.skip('no .whl/ wheels (experiments/fetch_gpu_wheels.sh fetches them)')
  proc = subprocess.run(['bash', os.path.join(REPO_ROOT, 'experiments', 'gpu_check.sh'),
                         '--dry-run'], env=dict(os.environ, OUT=str(tmp_path)),
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  plan = [l for l in proc.stdout.splitlines() if l.startswith('+ (limit')]
  assert any('--no-deps' in l and '.whl/' in l for l in plan)
  assert any('--mode=accelerator --jobs=step,sample' in l for l in plan)
  assert any('--jobs=loop' in l and '--dtypes=float32,bfloat16' in l and '--loop_steps=200' in l
             for l in plan)
