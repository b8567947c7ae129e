"""Smoke test of experiments/ablation.py: all six variants plus a second seed of row 6, a few
steps each on random 8x8 images with a micro model, in a subprocess.

Checks only that everything runs, the numbers are finite and the table, plot and JSON are
written; a second invocation must skip every finished run.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, 'experiments', 'ablation.py')


def _command(npz: str, out_dir: str):
  overrides = {
      'model.image_size': 8, 'model.block_conf': '(2,)', 'model.layers_conf': '(1,)',
      'model.mid_channels': '(4,)', 'model.growth_rate': 2, 'model.dense_depth': 1,
      'model.dense_growth': 4, 'model.glow_hidden': 8, 'model.dequantization': 'uniform',
      'data.train_npz': npz, 'data.holdout': 6, 'data.translate': 0.0,
      'train.batch_size': 4, 'train.num_steps': 3, 'train.warmup_steps': 1,
      'train.log_every': 1, 'train.checkpoint_every': 0, 'eval.batch_size': 4,
      'eval.iwbo_k': 2, 'eval.iwbo_chunk': 2, 'ablation.output_dir': out_dir,
      'ablation.repeat': 'denseflow_aug_precond', 'ablation.num_seeds': 2}
  return [sys.executable, SCRIPT, '--config', os.path.join(REPO_ROOT, 'configs',
                                                           'ablation_small.py')] + [
      f'--config.{k}={v}' for k, v in overrides.items()]


def _run(cmd, cache_dir):
  # A private compilation cache (the seed repeat reuses the compiled train and eval steps) and
  # XLA's lowest backend optimisation level: compiling dominates these micro runs.
  flags = (os.environ.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0').strip()
  env = dict(os.environ, JAX_PLATFORMS='cpu', DENSEFLOW_JAX_CACHE=cache_dir, XLA_FLAGS=flags)
  proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, f'exit {proc.returncode}\nstdout:\n{proc.stdout}\n' \
                               f'stderr (tail):\n{proc.stderr[-4000:]}'
  return proc


@pytest.mark.slow  # started first under pytest-xdist (conftest)
def test_ablation_script_end_to_end(tmp_path):
  rng = np.random.RandomState(0)
  npz = str(tmp_path / 'images.npz')
  np.savez(npz, images=rng.randint(0, 256, (22, 8, 8, 3)).astype(np.uint8))
  out_dir = str(tmp_path / 'ablation')

  _run(_command(npz, out_dir), str(tmp_path / 'xla_cache'))
  with open(os.path.join(out_dir, 'ablation.json')) as f:
    results = json.load(f)
  runs = results['runs']
  expected = {f'{v}_seed0' for v in ('glow_noaug', 'glow_aug', 'glow_aug_precond',
                                     'denseflow_noaug', 'denseflow_aug', 'denseflow_aug_precond')}
  expected.add('denseflow_aug_precond_seed1')
  assert set(runs) == expected
  for key, run in runs.items():
    assert run['status'] == 'done', key
    assert np.isfinite(run['test_bpd']) and run['all_finite'], key
    assert run['steps'] == 3 and run['params'] > 0 and run['test_examples'] == 6, key
    assert run['step_s'] > 0, key  # from the steps_per_sec rows of the run's metrics.jsonl
  rows = {r['variant']: r for r in results['summary']}
  assert rows['glow_noaug']['n'] == 1 and rows['denseflow_aug_precond']['n'] == 2
  assert np.isfinite(rows['denseflow_aug_precond']['std'])
  for name in ('ablation.md', 'ablation.png'):
    assert os.path.getsize(os.path.join(out_dir, name)) > 0, name
  table = open(os.path.join(out_dir, 'ablation.md')).read()
  assert table.count('\n| ') >= 7 and 'pre-conditioned noise' in table

  again = _run(_command(npz, out_dir), str(tmp_path / 'xla_cache'))
  assert again.stdout.count('done earlier, skipped') == len(expected)
