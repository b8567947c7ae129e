"""The checkpoint reader and writer on small pytrees (no model): one walk-back policy, and a
read-only reader that leaves the workdir as it found it."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from denseflow_jax import checkpoint


def _state(seed):
  rng = np.random.default_rng(seed)
  params = {'dense': {'kernel': jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)}}
  batch_stats = {'bn': {'mean': jnp.asarray(rng.normal(size=(4,)), jnp.float32)}}
  training = {'step': jnp.int32(seed), 'rng': jnp.asarray([seed, 1], jnp.uint32)}
  return params, batch_stats, training


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _abstract_items(seed=0):
  params, batch_stats, training = _state(seed)
  return {checkpoint.ITEM_PARAMS: _abstract(params),
          checkpoint.ITEM_BATCH_STATS: _abstract(batch_stats),
          checkpoint.ITEM_TRAINING: _abstract(training)}


def _listing(root):
  return sorted(os.path.relpath(os.path.join(d, n), root)
                for d, dirs, files in os.walk(root) for n in dirs + files)


def _damage(step_dir):
  files = [os.path.join(d, n) for d, _, names in os.walk(os.path.join(step_dir, 'params'))
           for n in names]
  victim = max(files, key=os.path.getsize)
  data = bytearray(open(victim, 'rb').read())
  data[len(data) // 2] ^= 0xFF
  open(victim, 'wb').write(bytes(data))


@pytest.fixture
def workdir(tmp_path):
  """A workdir with training checkpoints at steps 1, 2 and 3."""
  path = str(tmp_path / 'run')
  ckpts = checkpoint.Checkpoints(path, keep=0)
  try:
    for step in (1, 2, 3):
      assert ckpts.save(step, *_state(step))
  finally:
    ckpts.close()
  return path


def _step_dir(workdir, step):
  return os.path.join(workdir, checkpoint.CHECKPOINT_DIR, str(step))


def test_reader_skips_a_corrupt_newest_checkpoint_and_changes_nothing(workdir, caplog):
  _damage(_step_dir(workdir, 3))
  before = _listing(workdir)
  reader = checkpoint.CheckpointReader(workdir)
  step, items = reader.restore_newest_valid(_abstract_items())
  assert step == 2 and int(items['training']['step']) == 2
  np.testing.assert_array_equal(items['params']['dense']['kernel'],
                                _state(2)[0]['dense']['kernel'])
  warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING'
              and 'skipping corrupt checkpoint' in r.getMessage()]
  assert len(warnings) == 1 and _step_dir(workdir, 3) in warnings[0], warnings
  assert 'left it in place' in warnings[0]
  assert len(reader.skipped) == 1 and reader.skipped[0].startswith('3: checksum manifest: ')
  assert _listing(workdir) == before
  # load_variables (evaluation, sampling, FID, fine-tuning) is the same reader.
  found, variables = checkpoint.load_variables(workdir)
  assert found == 2 and set(variables) == {'params', 'batch_stats'}
  assert _listing(workdir) == before
  # The training writer walks back the same way and moves the corrupt one aside.
  ckpts = checkpoint.Checkpoints(workdir)
  try:
    step, _ = ckpts.restore_newest_valid(_abstract_items())
  finally:
    ckpts.close()
  assert step == 2
  assert not os.path.exists(_step_dir(workdir, 3))
  moved = os.listdir(os.path.join(workdir, checkpoint.CORRUPT_DIR))
  assert len(moved) == 1 and moved[0].startswith('3-')


def test_non_finite_checkpoints_are_skipped_by_every_reader(workdir, monkeypatch):
  params, batch_stats, training = _state(4)
  params['dense']['kernel'] = params['dense']['kernel'].at[0, 0].set(jnp.nan)
  monkeypatch.setattr(checkpoint, '_all_finite', lambda tree: True)  # let it be written
  ckpts = checkpoint.Checkpoints(workdir, keep=0)
  try:
    assert ckpts.save(4, params, batch_stats, training)
  finally:
    ckpts.close()
  monkeypatch.undo()
  before = _listing(workdir)
  reader = checkpoint.CheckpointReader(workdir)
  assert reader.restore_newest_valid(_abstract_items())[0] == 3
  assert reader.skipped == ['4: it holds non-finite values']
  assert checkpoint.load_variables(workdir)[0] == 3
  assert _listing(workdir) == before


def test_a_checkpoint_that_does_not_fit_stops_the_walk_back(workdir):
  before = _listing(workdir)
  abstract = _abstract_items()
  abstract['params']['dense']['kernel'] = jax.ShapeDtypeStruct((3, 5), jnp.float32)
  for reader in (checkpoint.CheckpointReader(workdir), checkpoint.Checkpoints(workdir)):
    with pytest.raises(checkpoint.CheckpointMismatchError,
                       match=rf'^{_step_dir(workdir, 3)} does not fit the model'):
      reader.restore_newest_valid(abstract)
    if isinstance(reader, checkpoint.Checkpoints):
      reader.close()
  assert _listing(workdir) == before


def test_load_variables_errors(workdir, tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match='no checkpoint for step 7'):
    checkpoint.load_variables(workdir, step=7)
  assert checkpoint.load_variables(workdir, step=1)[0] == 1
  with pytest.raises(checkpoint.CheckpointError, match='no checkpoints in'):
    checkpoint.load_variables(str(tmp_path / 'empty'))
  assert not os.path.exists(tmp_path / 'empty')  # reading creates nothing
  for step in (1, 2, 3):
    _damage(_step_dir(workdir, step))
  with pytest.raises(checkpoint.CheckpointError, match=r'no readable checkpoint in .*3: .*; 2: '):
    checkpoint.load_variables(workdir)
