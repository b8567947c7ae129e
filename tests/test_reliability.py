"""Reliability of experiments/train.py: exact resume after restart, SIGKILL and SIGINT,
fallback past a corrupted newest checkpoint, and the evaluate / sample entry points on the
resulting workdir in the converter's layout (config.json + params/batch_stats items).

Every run is a subprocess on a micro DenseFlow (8x8 digits, one block); the runs share a
persistent compilation cache, so only the first one compiles the train step.
"""
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from denseflow_jax import checkpoint

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO_ROOT, 'experiments', 'train.py')
NUM_STEPS = 300
K_STEPS = 60
CHECKPOINT_EVERY = 40

MICRO_CONFIG = '''
from configs import quickstart


def get_config():
  config = quickstart.get_config()
  m = config.model
  m.block_conf, m.layers_conf, m.mid_channels = (2,), (1,), (4,)
  m.growth_rate, m.dense_depth, m.dense_growth = 2, 1, 4
  m.dequantization = 'uniform'
  t = config.train
  t.batch_size, t.num_steps, t.warmup_steps = 16, {num_steps}, 10
  t.log_every, t.checkpoint_every, t.eval_every = 10, {checkpoint_every}, 0
  config.eval.at_start, config.eval.num_samples = False, 0
  config.eval.batch_size, config.eval.iwbo_k, config.eval.iwbo_chunk = 16, 4, 2
  return config
'''


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  """Subprocess environment: one CPU device, a shared compilation cache."""
  environ = dict(os.environ)
  environ.pop('XLA_FLAGS', None)
  environ['DENSEFLOW_JAX_CACHE'] = str(tmp_path_factory.getbasetemp() / 'xla_cache')
  environ['PYTHONPATH'] = REPO_ROOT + os.pathsep + environ.get('PYTHONPATH', '')
  return environ


@pytest.fixture(scope='module')
def micro_config_file(tmp_path_factory):
  path = tmp_path_factory.mktemp('configs') / 'micro.py'
  path.write_text(MICRO_CONFIG.format(num_steps=NUM_STEPS, checkpoint_every=CHECKPOINT_EVERY))
  return str(path)


def train_command(config_file, workdir, *overrides):
  return [sys.executable, TRAIN, f'--config={config_file}', f'--workdir={workdir}',
          *overrides]


def run(command, env, timeout=300):
  result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
  return result


def final_params(workdir, step=None):
  found, variables = checkpoint.load_variables(workdir, step=step)
  return found, jax.tree.map(np.asarray, variables)


def assert_bitwise_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  equal = jax.tree.map(np.array_equal, a, b)
  assert all(jax.tree.leaves(equal)), 'parameters differ'


@pytest.fixture(scope='module')
def reference(tmp_path_factory, micro_config_file, env):
  """An uninterrupted run of NUM_STEPS steps: (workdir, final variables)."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  result = run(train_command(micro_config_file, workdir), env)
  assert result.returncode == 0, result.stderr[-3000:]
  step, variables = final_params(workdir)
  assert step == NUM_STEPS
  return workdir, variables


def _wait_for(predicate, process, timeout=240.0, what=''):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    if process.poll() is not None:
      pytest.fail(f'process exited ({process.returncode}) before {what}')
    time.sleep(0.02)
  process.kill()
  pytest.fail(f'timed out waiting for {what}')


def _checkpoint_steps(workdir):
  root = os.path.join(workdir, 'checkpoints')
  return sorted(int(s) for s in os.listdir(root) if s.isdigit()) if os.path.isdir(root) else []


def test_restart_sigkill_sigint_resume_matches_uninterrupted_run(reference, micro_config_file,
                                                                 env, tmp_path):
  """k steps + restart + kill -9 + restart + Ctrl-C + restart == N straight steps, bitwise."""
  workdir = str(tmp_path / 'run')
  command = train_command(micro_config_file, workdir)
  first = run(train_command(micro_config_file, workdir, f'--config.train.num_steps={K_STEPS}'),
              env)
  assert first.returncode == 0, first.stderr[-3000:]
  assert _checkpoint_steps(workdir)[-1] == K_STEPS

  log = tmp_path / 'log1.txt'
  with open(log, 'w') as out:
    process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    _wait_for(lambda: _checkpoint_steps(workdir)[-1] > K_STEPS, process,
              what='a checkpoint after the restart')
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
  text = log.read_text()
  assert f'from checkpoint {K_STEPS}' in text
  assert f'train.num_steps: {K_STEPS} -> {NUM_STEPS}' in text  # logged, not refused
  killed_at = _checkpoint_steps(workdir)[-1]
  assert killed_at < NUM_STEPS, 'the run finished before it was killed'

  # Rerun; interrupt it with SIGINT once it trains again: it saves, then exits with 130.
  log = tmp_path / 'log2.txt'
  with open(log, 'w') as out:
    process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    resumed = f'from checkpoint {killed_at}'
    _wait_for(lambda: resumed in log.read_text() and 'train_bpd=' in log.read_text().split(
        resumed, 1)[-1], process, what='training after the resume')
    process.send_signal(signal.SIGINT)
    returncode = process.wait(timeout=120)
  text = log.read_text()
  assert returncode == 130, text[-3000:]
  interrupted_at = int(text.split('interrupted at step ')[1].split(';')[0])
  assert killed_at < interrupted_at and interrupted_at in _checkpoint_steps(workdir)

  final = run(command, env)
  assert final.returncode == 0, final.stderr[-3000:]
  assert f'from checkpoint {interrupted_at}' in final.stderr
  step, variables = final_params(workdir)
  assert step == NUM_STEPS
  assert_bitwise_equal(variables, reference[1])


def test_finetune_starts_from_another_workdir(reference, micro_config_file, env, tmp_path):
  """`train.init_from`: params and BatchNorm statistics of another run, fresh optimizer, step 0.

  The schedule is the micro config's (warm-up from 0) so the compiled step is reused; the
  fine-tuning lr of the dataset configs is checked in test_configs.
  """
  workdir = str(tmp_path / 'finetune')
  result = run(train_command(micro_config_file, workdir, f'--config.train.init_from={reference[0]}',
                             '--config.train.num_steps=3'), env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'fine-tuning from {reference[0]} (checkpoint {NUM_STEPS})' in result.stderr
  step, variables = final_params(workdir)
  assert step == 3
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), variables['params'],
                       reference[1]['params'])
  # Adamax moves each parameter by at most the lr per step: 0, 1e-4 and 2e-4 in the warm-up.
  assert 0 < max(jax.tree.leaves(diffs)) <= 3e-4 * 1.01
  result = run(train_command(micro_config_file, workdir, '--config.train.init_from=/nowhere'),
               env)
  assert result.returncode == 2
  assert "train.init_from='/nowhere' has no checkpoints/ directory" in result.stderr


def test_truncated_newest_checkpoint_falls_back_with_warning(reference, tmp_path, caplog):
  workdir = str(tmp_path / 'copy')
  shutil.copytree(reference[0], workdir)
  steps = _checkpoint_steps(workdir)
  newest = os.path.join(workdir, 'checkpoints', str(steps[-1]))
  for root, _, files in os.walk(os.path.join(newest, 'params')):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)
  # Read-only loading (evaluate / sample) skips it.
  found, _ = checkpoint.load_variables(workdir)
  assert found == steps[-2]
  assert f'skipping unreadable checkpoint {newest}' in caplog.text
  # Training restore: warns, moves it aside, returns the previous one.
  from denseflow_jax import parallel, train  # pylint: disable=g-import-not-at-top
  from denseflow_jax.data import make_data  # pylint: disable=g-import-not-at-top
  from denseflow_jax.model import DenseFlow  # pylint: disable=g-import-not-at-top
  config = checkpoint.load_config(workdir)
  mesh = parallel.make_mesh()
  tx = train.make_optimizer(config)
  init_fn = train.make_init_fn(DenseFlow(config.model), tx, config, mesh)
  abstract = train._abstract_state(init_fn, make_data(config), mesh)
  ckpts = checkpoint.Checkpoints(workdir)
  try:
    step, items = ckpts.restore_newest_valid({
        'params': abstract.params, 'batch_stats': abstract.batch_stats,
        'training': train._training_item(abstract)})
  finally:
    ckpts.close()
  assert step == steps[-2]
  assert int(items['training']['step']) == steps[-2]
  assert 'falling back to the previous one' in caplog.text
  assert not os.path.exists(newest)
  assert os.listdir(os.path.join(workdir, checkpoint.CORRUPT_DIR))[0].startswith(
      f'{steps[-1]}-')


def test_evaluate_and_sample_entry_points(reference, env, tmp_path):
  workdir = str(tmp_path / 'converted')  # the converter's layout: config + params/batch_stats
  os.makedirs(workdir)
  shutil.copy(os.path.join(reference[0], 'config.json'), workdir)
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'))
  manager.save(7, args=ocp.args.Composite(
      params=ocp.args.StandardSave(reference[1]['params']),
      batch_stats=ocp.args.StandardSave(reference[1]['batch_stats'])), force=True)
  manager.wait_until_finished()
  manager.close()
  step, variables = final_params(workdir)
  assert step == 7
  assert_bitwise_equal(variables, reference[1])

  output = str(tmp_path / 'iwbo.json')
  result = run([sys.executable, os.path.join(REPO_ROOT, 'experiments', 'evaluate.py'),
                f'--workdir={workdir}', '--k=4', '--chunk=2', '--max_examples=40',
                f'--output={output}'], env)
  assert result.returncode == 0, result.stderr[-3000:]
  import json  # pylint: disable=g-import-not-at-top
  report = json.load(open(output))
  assert report['num_examples'] == 40 and report['k'] == 4 and report['step'] == 7
  assert 0 < report["bpd_mean"] < 6 and 0 < report['bpd_stderr'] < 1
  assert 'test bpd (IWBO, k=4)' in result.stdout

  result = run([sys.executable, os.path.join(REPO_ROOT, 'experiments', 'sample.py'),
                f'--workdir={workdir}', '--num=5', '--temperature=0.7'], env)
  assert result.returncode == 0, result.stderr[-3000:]
  samples = np.load(os.path.join(workdir, 'samples', 'sample_t0.7_seed0.npy'))
  assert samples.shape == (5, 8, 8, 1) and samples.dtype == np.uint8 and samples.max() <= 31
  assert os.path.getsize(os.path.join(workdir, 'samples', 'sample_t0.7_seed0.png')) > 0
