"""Smoke test of experiments/benchmark.py: one step of every job on a shrunken tiny config.

Checks that what is timed is the library's (the training loop's train step with its donation
and sharding, the eval step, ShardedModel.sample), the structure of the JSON and the Markdown
rows; never the timings.
"""
import json
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, 'experiments', 'benchmark.py')


@pytest.mark.timeout(600)
def test_benchmark_script_writes_json_and_markdown(tmp_path):
  out = tmp_path / 'bench.json'
  md = tmp_path / 'BENCHMARKS.md'
  cmd = [
      sys.executable, SCRIPT, f'--config={os.path.join(REPO_ROOT, "configs", "tiny.py")}',
      # Minimal sizes: the tiny model with one unit per block, one-layer dense blocks and one
      # dequantizer step.
      '--config.model.dense_depth=1', '--config.model.deq_steps=1', '--image_size=16',
      '--config.model.block_conf=(1,1,1)', '--config.model.layers_conf=(1,1,1)',
      '--batch_sizes=2', '--eval_batch=2', '--sample_sizes=2', '--steps=1', '--warmup=0',
      '--sample_steps=1', '--peak_n=128', '--peak_reps=1', '--xla_flags',
      f'--out={out}', f'--markdown={md}', '--label=smoke']
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True,
                        timeout=580)
  assert proc.returncode == 0, proc.stderr[-4000:]

  report = json.loads(out.read_text())
  meta = report['meta']
  assert meta['xla_flags'] is True
  assert '--xla_cpu_use_onednn=true' in meta['XLA_FLAGS']
  assert meta['label'] == 'smoke'
  assert meta['published_key'] is None  # shrunken model: no published row to compare with
  assert meta['device']['device_count'] >= 1 and meta['device']['jax']
  assert len(meta['git']['commit']) == 40
  assert meta['machine']['cpu_model']

  (row,) = report['train']
  assert row['batch'] == 2
  # The step the training loop compiles: denseflow_jax.train's, state donated, batch sharded.
  assert row['step_fn'] == 'denseflow_jax.train.make_train_step.<locals>.step_fn'
  assert row['donated_state'] is True and row['donated_batch'] is False
  assert "P('data'" in row['batch_sharding']
  assert row['finite'] and row['loss_bpd'] > 0
  assert row['load_during']['samples'] >= 2 and row['peak_rss_run_gib'] > 0
  assert '--xla_cpu_use_onednn=true' in row['xla_flags_env']
  for key in ('trace_s', 'lower_s', 'compile_s', 'first_call_s', 'step_s', 'img_s',
              'peak_rss_gib'):
    assert row[key] > 0, key
  assert len(row['step']['times_s']) == 1
  assert row['flops_per_img']['counted_matmul_conv'] > 0
  assert row['matmul_peak']['gflop_s'] > 0
  assert row['summary']['frac_counted'] > 0
  checks = report['xla_cost_checks']
  assert checks['conv3x3_forward']['analytic_flops'] > 0

  ev = report['eval']
  assert ev['step_fn'] == 'denseflow_jax.evaluation.make_eval_step.<locals>.eval_fn'
  assert ev['batch'] == 2 and ev['img_s'] > 0 and ev['flops_per_img']['counted_matmul_conv'] > 0
  assert report['sample']['step_fn'] == 'denseflow_jax.parallel.ShardedModel.sample'
  (sample,) = report['sample']['sizes']
  assert sample['n'] == 2 and sample['time_s'] > 0

  text = md.read_text()
  lines = text.splitlines()
  train_rows = [l for l in lines if l.startswith('| ') and '| smoke | 2 | on |' in l]
  assert len(train_rows) == 3  # one train, one eval, one sampling row
  for kind in ('train', 'eval', 'sampling'):
    marker = f'<!-- benchmark.py: {kind} rows above -->'
    assert marker in text
    i = lines.index(marker)
    assert '| smoke |' in lines[i - 1]  # the row sits right above its table's marker
