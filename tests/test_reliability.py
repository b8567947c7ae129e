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

from denseflow_jax import checkpoint, config_file, data

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
  t.batch_size, t.num_steps, t.warmup_steps, t.lr = 16, {num_steps}, 10, 1e-3
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
    _wait_for(lambda: resumed in log.read_text() and '): train bpd ' in log.read_text().split(
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
  assert f'skipping corrupt checkpoint {newest}' in caplog.text
  # Training restore: warns, moves it aside, returns the previous one.
  from denseflow_jax import optim, parallel, train  # pylint: disable=g-import-not-at-top
  from denseflow_jax.data import make_data  # pylint: disable=g-import-not-at-top
  from denseflow_jax.model import DenseFlow  # pylint: disable=g-import-not-at-top
  config = config_file.load_config(workdir)
  mesh = parallel.make_mesh()
  tx = optim.make_optimizer(config)
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

  # The same test images named by a data spec give the same bound (same order, seed, batches).
  images = np.asarray(data.digits_source('test').read_batch(np.arange(40)))
  np.savez(tmp_path / 'digits40.npz', images=images, num_bits=np.array(5))
  output2 = str(tmp_path / 'iwbo_npz.json')
  result = run([sys.executable, os.path.join(REPO_ROOT, 'experiments', 'evaluate.py'),
                f'--workdir={workdir}', '--k=4', '--chunk=2', f'--output={output2}',
                f'--data=npz:{tmp_path / "digits40.npz"}'], env)
  assert result.returncode == 0, result.stderr[-3000:]
  again = json.load(open(output2))
  assert again['num_examples'] == 40 and again['bpd_mean'] == report['bpd_mean']

  # A grid with a row per temperature, from the same draws.
  result = run([sys.executable, os.path.join(REPO_ROOT, 'experiments', 'sample.py'),
                f'--workdir={workdir}', '--num=3', '--temperatures=0.5,1.0'], env)
  assert result.returncode == 0, result.stderr[-3000:]
  grid = np.load(os.path.join(workdir, 'samples', 'sample_grid_t0.5-1_seed0.npy'))
  assert grid.shape == (2, 3, 8, 8, 1) and grid.dtype == np.uint8
  from PIL import Image  # pylint: disable=g-import-not-at-top
  png = Image.open(os.path.join(workdir, 'samples', 'sample_grid_t0.5-1_seed0.png'))
  assert max(png.size) >= 256 and png.size[0] > png.size[1]  # 3 columns, 2 rows, enlarged

  # Nearest training neighbours: the distances agree with brute force over the training set.
  result = run([sys.executable, os.path.join(REPO_ROOT, 'experiments', 'neighbours.py'),
                f'--workdir={workdir}', '--num=3', '--k=2', '--batch=256'], env)
  assert result.returncode == 0, result.stderr[-3000:]
  found = np.load(os.path.join(workdir, 'neighbours', 'neighbours_t1_seed0.npz'))
  train_images = data.digits_source('train').read_batch(np.arange(1500)).astype(np.int64)
  d = np.sqrt(((found['samples'].astype(np.int64)[:, None] - train_images[None]) ** 2).sum(
      axis=(2, 3, 4)))
  np.testing.assert_allclose(found['distances'], np.sort(d, axis=1)[:, :2])
  assert 'real test images: median' in result.stdout

  # Per-image scores and the AUROC against a noised copy of the same images.
  noisy = np.clip(images.astype(int) + np.random.default_rng(0).integers(-8, 9, images.shape),
                  0, 31).astype(np.uint8)
  np.savez(tmp_path / 'noisy.npz', images=noisy, num_bits=np.array(5))
  result = run([sys.executable, os.path.join(REPO_ROOT, 'experiments', 'score.py'),
                f'--workdir={workdir}', f'--data=npz:{tmp_path / "digits40.npz"}', '--k=2',
                f'--ood=npz:{tmp_path / "noisy.npz"}', '--repeats=2'], env)
  assert result.returncode == 0, result.stderr[-3000:]
  scores = np.load(os.path.join(workdir, 'scores', 'npz_digits40.npy'))
  rows = open(os.path.join(workdir, 'scores', 'npz_digits40.csv')).read().splitlines()
  assert scores.shape == (40,) and rows[0] == 'index,bpd,stderr' and len(rows) == 41
  summary = json.load(open(os.path.join(workdir, 'scores', 'npz_digits40_vs_npz_noisy.json')))
  from denseflow_jax.ood import auroc  # pylint: disable=g-import-not-at-top
  noisy_scores = np.load(os.path.join(workdir, 'scores', 'npz_noisy.npy'))
  assert summary['auroc'] == auroc(scores, noisy_scores) and summary['ood']['num'] == 40
  assert summary['auroc'] > 0.5  # even this briefly trained model finds noise less likely
  assert os.path.getsize(summary['histogram']) > 1000

  # FID of the model's samples (the FID fixture's random-weight Inception stands in for the
  # real weights): samples in batches, features, reference statistics, fid.json.
  weights = os.path.join(REPO_ROOT, '..', 'shared', 'fid_inception', 'pt_inception_random.pth')
  if os.path.exists(weights):
    result = run([sys.executable, os.path.join(REPO_ROOT, 'experiments', 'fid.py'),
                  f'--workdir={workdir}', '--num=12', '--batch=8', '--reference=digits:test',
                  '--reference_num=16', f'--inception={weights}', '--stats_cache=',
                  '--temperature=0.8'], env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.load(open(os.path.join(workdir, 'fid.json')))
    assert report['num'] == 12 and report['step'] == 7 and report['fid'] > 0
    assert 'samples and features: 12 done' in result.stdout


# ----------------------------------------------------------------------------- second round
# The workdir lock, full disks, checksums, classified restore errors and quiet logs. These
# reuse the reference workdir and tiny pytrees; none trains.


def _restore_abstract(config):
  """The training restore target ({'params', 'batch_stats', 'training'}) for `config`."""
  from denseflow_jax import optim, parallel, train  # pylint: disable=g-import-not-at-top
  from denseflow_jax.data import make_data  # pylint: disable=g-import-not-at-top
  from denseflow_jax.model import DenseFlow  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh()
  tx = optim.make_optimizer(config)
  init_fn = train.make_init_fn(DenseFlow(config.model), tx, config, mesh)
  abstract = train._abstract_state(init_fn, make_data(config), mesh)
  return {'params': abstract.params, 'batch_stats': abstract.batch_stats,
          'training': train._training_item(abstract)}


def _tree_listing(root):
  return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root)
                for f in files)


HOLD_LOCK = '''
import sys, time
from denseflow_jax import workdir_lock
lock = workdir_lock.WorkdirLock(sys.argv[1]).acquire()
print('locked', flush=True)
time.sleep(60)
'''


def test_workdir_lock_refuses_a_second_run_and_takes_over_a_dead_one(env, tmp_path, caplog):
  from denseflow_jax import train, workdir_lock  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  holder = subprocess.Popen([sys.executable, '-c', HOLD_LOCK, workdir], env=env,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(workdir_lock.WorkdirLockedError,
                       match=rf'in use by another training run: pid {holder.pid} on host '):
      workdir_lock.WorkdirLock(workdir).acquire()
    # A training run gives up before writing anything into the workdir.
    from configs import quickstart  # pylint: disable=g-import-not-at-top
    config = quickstart.get_config()
    with pytest.raises(workdir_lock.WorkdirLockedError, match=f'pid {holder.pid}'):
      train.train_and_evaluate(config, workdir)
    assert os.listdir(workdir) == [workdir_lock.LOCK_FILE]
  finally:
    holder.kill()
    holder.wait()
  # The holder died with the lock: the next run takes it over, with a warning naming it.
  with workdir_lock.WorkdirLock(workdir) as lock:
    assert f'taking over the workdir lock {lock.path} left by pid {holder.pid}' in caplog.text
    assert '(no longer running)' in caplog.text
    with pytest.raises(workdir_lock.WorkdirLockedError, match='already in use'):
      workdir_lock.WorkdirLock(workdir).acquire()  # not twice in one process either
  assert open(os.path.join(workdir, workdir_lock.LOCK_FILE)).read() == ''  # released cleanly
  assert issubclass(workdir_lock.WorkdirLockedError, checkpoint.CheckpointError)


def _small_tree(kib):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return {'w': jnp.arange(kib * 256, dtype=jnp.float32), 'b': jnp.ones((3,), jnp.float32)}


def _can_mount_tmpfs(path):
  if os.geteuid() != 0:
    return False
  result = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=2m', 'tmpfs', str(path)],
                          capture_output=True)
  return result.returncode == 0


def test_disk_full_raises_one_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch,
                                                                      caplog):
  """A save that cannot be written: CheckpointWriteError naming the path and 'no space left',
  'saved' never logged for it, the partial step removed, the previous checkpoint readable.

  On a real 2 MB tmpfs where this process may mount one (root), else with the commit's
  writer patched to fail with ENOSPC.
  """
  import errno  # pylint: disable=g-import-not-at-top
  import logging  # pylint: disable=g-import-not-at-top
  caplog.set_level(logging.INFO)
  mount = tmp_path / 'disk'
  mount.mkdir()
  mounted = _can_mount_tmpfs(mount)
  try:
    workdir = str(mount / 'run')
    ckpts = checkpoint.Checkpoints(workdir)
    ckpts.save(1, _small_tree(400), {}, {'step': np.int32(1)})
    ckpts.wait()
    assert 'saved checkpoint 1' in caplog.text
    if mounted:  # leave about 100 KiB: the next 400 KiB checkpoint does not fit
      free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
      with open(mount / 'filler', 'wb') as f:
        f.write(b'\0' * max(0, free - 100 * 1024))
    else:
      def no_space(step_dir):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), step_dir)
      monkeypatch.setattr(checkpoint, 'write_manifest', no_space)
    with pytest.raises(checkpoint.CheckpointWriteError) as info:
      ckpts.save(2, _small_tree(400), {}, {'step': np.int32(2)})
      ckpts.close()
    message = str(info.value)
    assert '\n' not in message
    assert f'could not write checkpoint 2 to {ckpts.directory}/2: no space left on device' in (
        message)
    assert 'the previous checkpoint 1 is intact' in message
    ckpts.close()  # idempotent after the failure
    assert 'saved checkpoint 2' not in caplog.text
    assert sorted(os.listdir(ckpts.directory)) == ['1']
    monkeypatch.undo()
    found, variables = checkpoint.load_variables(workdir)
    assert found == 1 and variables['params']['w'].shape == (400 * 256,)
  finally:
    if mounted:
      subprocess.run(['umount', str(mount)], check=False)


def _flip_bit(path, offset=None):
  with open(path, 'r+b') as f:
    data = bytearray(f.read())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x10
    f.seek(0)
    f.write(data)


def test_checksum_manifest_catches_a_flipped_bit_orbax_misses(reference, tmp_path, caplog):
  workdir = str(tmp_path / 'copy')
  shutil.copytree(reference[0], workdir)
  steps = _checkpoint_steps(workdir)
  newest = os.path.join(workdir, 'checkpoints', str(steps[-1]))
  assert os.path.isfile(os.path.join(newest, checkpoint.MANIFEST_FILE))
  assert checkpoint.verify_manifest(newest)
  # A bit in a data file of the per-process OCDBT tree: orbax reads the merged tree, so it
  # loads this checkpoint without any error; only the checksum sees the change.
  data_dir = os.path.join(newest, 'params', 'ocdbt.process_0', 'd')
  victim = max((os.path.join(data_dir, n) for n in os.listdir(data_dir)), key=os.path.getsize)
  _flip_bit(victim)
  with pytest.raises(checkpoint.CheckpointCorruptError, match='does not match its SHA-256'):
    checkpoint.verify_manifest(newest)
  found, _ = checkpoint.load_variables(workdir)
  assert found == steps[-2]
  assert f'skipping corrupt checkpoint {newest}' in caplog.text
  caplog.clear()
  config = config_file.load_config(workdir)
  ckpts = checkpoint.Checkpoints(workdir)
  try:
    step, _ = ckpts.restore_newest_valid(_restore_abstract(config))
  finally:
    ckpts.close()
  assert step == steps[-2]
  warnings = [r for r in caplog.records if r.levelname == 'WARNING' and newest in r.getMessage()]
  assert len(warnings) == 1, [r.getMessage() for r in warnings]
  assert f'{newest} (checksum manifest: params/ocdbt.process_0/d/' in warnings[0].getMessage()
  assert 'falling back to the previous one' in warnings[0].getMessage()
  assert not os.path.exists(newest)
  # A file of a checkpoint shorter than the manifest says is corruption too.
  previous = os.path.join(workdir, 'checkpoints', str(steps[-2]))
  with open(os.path.join(previous, 'params', '_METADATA'), 'a') as f:
    f.write(' ')
  with pytest.raises(checkpoint.CheckpointCorruptError, match=r'params/_METADATA has \d+ bytes'):
    checkpoint.verify_manifest(previous)


def test_model_mismatch_and_permission_errors_stop_and_touch_nothing(reference, tmp_path,
                                                                      monkeypatch):
  from denseflow_jax import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'copy')
  shutil.copytree(reference[0], workdir)
  os.remove(os.path.join(workdir, 'config.json'))  # the saved config cannot help
  before = [p for p in _tree_listing(workdir) if p != 'train.lock']
  config = config_file.config_from_json(open(os.path.join(reference[0], 'config.json')).read())
  config.model.growth_rate = 4
  newest = os.path.join(workdir, 'checkpoints', str(_checkpoint_steps(workdir)[-1]))
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=rf'^{newest} does not fit the model: params/.*shape'):
    train.train_and_evaluate(config, workdir)
  after = [p for p in _tree_listing(workdir) if p != 'train.lock']
  assert after == before  # nothing moved, no config.json written
  assert not os.path.exists(os.path.join(workdir, checkpoint.CORRUPT_DIR))
  with pytest.raises(checkpoint.CheckpointMismatchError):  # read-only loading too
    checkpoint.load_variables(
        workdir, {k: v for k, v in _restore_abstract(config).items() if k != 'training'})

  # Permission denied while reading a good checkpoint: a real chmod where that binds (not
  # root), else the reader patched to fail the same way.
  config.model.growth_rate = 2
  victim = os.path.join(newest, 'params', '_METADATA')
  if os.geteuid() != 0:
    os.chmod(victim, 0)
  else:
    real = checkpoint.file_sha256
    def denied(path):
      if path == victim:
        raise PermissionError(13, 'Permission denied', path)
      return real(path)
    monkeypatch.setattr(checkpoint, 'file_sha256', denied)
  ckpts = checkpoint.Checkpoints(workdir)
  try:
    with pytest.raises(checkpoint.CheckpointAccessError, match='permission denied'):
      ckpts.restore_newest_valid(_restore_abstract(config))
  finally:
    ckpts.close()
    os.chmod(victim, 0o644)
  assert [p for p in _tree_listing(workdir) if p != 'train.lock'] == before
  # orbax / TensorStore report it in their own words; still a permission error.
  assert checkpoint._is_permission_error(ValueError('PERMISSION_DENIED: Error opening file'))
  assert not checkpoint._is_permission_error(ValueError('DATA_LOSS: Error reading'))


QUIET_LOAD = '''
import sys
from absl import logging
from denseflow_jax import checkpoint, config_file
checkpoint.quiet_orbax_logs()
print('loaded step', checkpoint.load_model(sys.argv[1])[2])  # with the model's structure
'''


def test_a_bad_checkpoint_costs_a_few_log_lines(reference, env, tmp_path):
  """Truncated data files: no asyncio 'Event loop is closed' blocks, no TensorStore specs;
  and unreadable array metadata is corruption, not a model mismatch."""
  workdir = str(tmp_path / 'copy')
  shutil.copytree(reference[0], workdir)
  steps = _checkpoint_steps(workdir)
  for step in steps[-2:]:
    step_dir = os.path.join(workdir, 'checkpoints', str(step))
    os.remove(os.path.join(step_dir, checkpoint.MANIFEST_FILE))  # let orbax meet the damage
    data_dir = os.path.join(step_dir, 'params', 'd')
    for name in os.listdir(data_dir):
      path = os.path.join(data_dir, name)
      with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)
  result = run([sys.executable, '-c', QUIET_LOAD, workdir], env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'loaded step {steps[-3]}' in result.stdout
  lines = [l for l in result.stderr.splitlines()
           if l.strip() and 'xla_bridge' not in l and 'backend' not in l]
  assert 'Event loop is closed' not in result.stderr
  assert len(lines) == 2, lines  # one warning per bad checkpoint
  for step, line in zip(reversed(steps[-2:]), lines):
    assert f'skipping corrupt checkpoint {workdir}/checkpoints/{step} (' in line
    assert len(line) < 600
