"""The workdir's orbax checkpoints: writing them, and restoring the newest valid one.

Layout of a workdir (shared by training, evaluation, sampling and converted official weights):

  <workdir>/config.json               the full experiment config (`config_file`)
  <workdir>/checkpoints/<step>/       one orbax checkpoint per saved step, with items
      params/                         model parameters (orbax `StandardSave` pytree)
      batch_stats/                    BatchNorm running statistics (absent when the model
                                      has none, e.g. Glow couplings)
      training/                       {'step', 'opt_state', 'rng', 'nonfinite'}: only in
                                      training checkpoints
      denseflow_manifest.json         size and SHA-256 of every other file of the step, written
                                      after orbax committed the step and checked before restoring
  <workdir>/checkpoints_corrupt/<step>-<time>/  checkpoints found corrupt at restart, moved aside
  <workdir>/train.lock                held by the training run using the workdir (workdir_lock)

Evaluation and sampling only need `params` (+ `batch_stats`), so a converted checkpoint
holding just those two items is a valid workdir.

One reader, `CheckpointReader`, restores every checkpoint (training's resume, fine-tuning,
evaluation, sampling, FID, the converter): it walks back from the newest step past corrupt or
non-finite checkpoints, skipping each with a one-line warning, and never changes the workdir.
`Checkpoints`, the writer training uses (the converter too), is a reader that also moves the
corrupt checkpoints it skips aside.

Errors (`CheckpointError` and its subclasses, one line each): a checkpoint whose files are
damaged is `CheckpointCorruptError` (skipped); one that does not fit the model is
`CheckpointMismatchError` and one that cannot be read for lack of permission
`CheckpointAccessError` (both stop the walk back, nothing is moved); a failed save is
`CheckpointWriteError`.
"""
import asyncio
import errno
import gc
import json
import logging as logging_std
import os
import shutil
import sys
import threading
import time
import types
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from denseflow_jax import config_file
from denseflow_jax.artifacts import file_sha256

PyTree = Any
CHECKPOINT_DIR = 'checkpoints'
CORRUPT_DIR = 'checkpoints_corrupt'
ITEM_PARAMS, ITEM_BATCH_STATS, ITEM_TRAINING = 'params', 'batch_stats', 'training'


# orbax records that only repeat an error our own message reports (in one line).
_ORBAX_DROPPED = ('raised an exception', 'Metadata file does not exist',
                  'Failed to get item metadata', 'Save Finalize thread',
                  'Handler Commit operations')


# orbax threads that write one checkpoint in the background.
_ORBAX_WRITER_THREADS = ('write_metadata_after_commits', 'serialize_shardings', 'save_finalize',
                         'async_save')


class _QuietOrbax(logging_std.Filter):
  """Drops orbax's INFO records (a dozen per checkpoint) and the warnings and errors that only
  echo a failure this module reports itself; other orbax warnings and errors pass, cut to
  their first line (no traceback, no TensorStore spec)."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    message = record.getMessage()
    if any(text in message for text in _ORBAX_DROPPED):
      return False
    if '/orbax/' not in record.pathname:
      return True
    if record.levelno < logging_std.WARNING:
      return False
    record.msg, record.args = _first_line(message), None
    record.exc_info, record.exc_text, record.stack_info = None, None, None
    return True


def quiet_orbax_logs() -> None:
  """Hides orbax's INFO logs and its echoes of reported errors (entry points call this)."""
  # On the handler (absl's, when the program runs under absl.app) and on the `absl` logger
  # (whatever handler the program uses).
  for target in (logging.get_absl_handler(), logging_std.getLogger('absl')):
    if not any(isinstance(f, _QuietOrbax) for f in target.filters):
      target.addFilter(_QuietOrbax())
  _quiet_closed_loop_errors()


def _first_line(text: str, limit: int = 300) -> str:
  """The first line of `text`, at most `limit` characters."""
  line = text.strip().splitlines()[0] if text.strip() else ''
  return line if len(line) <= limit else line[:limit] + ' ...'


def _describe_error(e: BaseException) -> str:
  return f'{type(e).__name__}: {_first_line(str(e))}' if str(e) else type(e).__name__


class _QuietAbandonedFutures(logging_std.Filter):
  """Drops asyncio's reports of the futures and tasks a failed orbax save or restore left
  behind ("Future exception was never retrieved", "Task was destroyed but it is pending"):
  the failure itself is reported once, by this module."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    message = record.getMessage()
    return not ('was never retrieved' in message or 'destroyed but it is pending' in message)


def _quiet_closed_loop_errors() -> None:
  """Silences `RuntimeError('Event loop is closed')` raised in TensorStore callbacks (and the
  finalisation errors at exit of orbax's write coroutines abandoned by a failed save).

  When an orbax restore fails, TensorStore still completes the reads in flight and hands the
  results to the asyncio loop of a checkpointer that has already been closed; Python prints
  each as an ignored exception with its traceback (dozens per bad checkpoint). Only that
  exact error is dropped; every other ignored exception goes to the previous hook.
  """
  asyncio_logger = logging_std.getLogger('asyncio')
  if not any(isinstance(f, _QuietAbandonedFutures) for f in asyncio_logger.filters):
    asyncio_logger.addFilter(_QuietAbandonedFutures())
  previous = sys.unraisablehook
  if getattr(previous, '_denseflow_quiet', False):
    return

  def hook(unraisable):
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == 'Event loop is closed':
      return
    if isinstance(value, ImportError) and 'likely shutting down' in str(value) and (
        'orbax' in repr(unraisable.object) or 'write_fragment' in repr(unraisable.object)):
      return  # an abandoned orbax write coroutine finalised at exit, after a failed save
    previous(unraisable)

  hook._denseflow_quiet = True  # pylint: disable=protected-access
  sys.unraisablehook = hook


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_dir(workdir: str) -> str:
  """`<workdir>/checkpoints`."""
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


@jax.jit
def _finite(leaves: List[jax.Array]) -> jax.Array:
  return jax.numpy.all(jax.numpy.stack([jax.numpy.all(jax.numpy.isfinite(x)) for x in leaves]))


def _all_finite(tree: PyTree) -> bool:
  """True when every floating-point leaf is finite (all processes must call it together)."""
  leaves = [x for x in jax.tree.leaves(tree) if jax.numpy.issubdtype(x.dtype, jax.numpy.inexact)]
  return bool(_finite(leaves)) if leaves else True


class CheckpointError(RuntimeError):
  """A checkpoint or workdir problem that stops the run (the message is one line naming it)."""


class CheckpointCorruptError(CheckpointError):
  """A checkpoint whose files are damaged: checksum or size mismatch, truncation, bad data."""


class CheckpointMismatchError(CheckpointError):
  """An intact checkpoint that does not fit the model (other shapes, missing or extra items)."""


class CheckpointAccessError(CheckpointError):
  """A checkpoint that this process may not read (permission denied)."""


class CheckpointWriteError(CheckpointError):
  """A checkpoint could not be written (disk full, permissions, I/O error)."""


# ----------------------------------------------------------------------------- checksums

MANIFEST_FILE = 'denseflow_manifest.json'
_MANIFEST_VERSION = 1


def _data_files(step_dir: str) -> List[str]:
  """Relative paths of every file of a step directory except the manifest, sorted."""
  out = []
  for root, dirs, files in os.walk(step_dir):
    dirs.sort()
    for name in files:
      rel = os.path.relpath(os.path.join(root, name), step_dir)
      if not rel.startswith(MANIFEST_FILE):
        out.append(rel)
  return sorted(out)




def write_manifest(step_dir: str) -> str:
  """Writes `<step_dir>/denseflow_manifest.json` (size and SHA-256 of every file), atomically."""
  files = {}
  for rel in _data_files(step_dir):
    path = os.path.join(step_dir, rel)
    files[rel] = {'size': os.path.getsize(path), 'sha256': file_sha256(path)}
  path = os.path.join(step_dir, MANIFEST_FILE)
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    with open(tmp, 'w') as f:
      json.dump({'version': _MANIFEST_VERSION, 'algorithm': 'sha256', 'files': files}, f,
                indent=0, sort_keys=True)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def _is_permission_error(error: BaseException) -> bool:
  """Whether `error` (or what caused it) is a permission error, from Python or TensorStore."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, PermissionError) or (
        isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM)):
      return True
    text = str(error)
    if 'PERMISSION_DENIED' in text or 'Permission denied' in text:
      return True
    error = error.__cause__ or error.__context__
  return False


def _access_error(what: str, error: BaseException) -> CheckpointAccessError:
  return CheckpointAccessError(
      f'cannot read {what}: permission denied ({_describe_error(error)}); fix the permissions '
      '(the checkpoints were left as they are)')


def verify_manifest(step_dir: str) -> bool:
  """Checks the files of a step against its manifest: True if they match, False if it has none.

  Raises `CheckpointCorruptError` naming the first file that is missing or differs in size or
  checksum (or an unreadable manifest), `CheckpointAccessError` on a permission error.
  """
  path = os.path.join(step_dir, MANIFEST_FILE)
  if not os.path.isfile(path):
    return False
  try:
    with open(path) as f:
      manifest = json.load(f)
    files = manifest['files']
    if manifest.get('algorithm') != 'sha256' or not isinstance(files, dict):
      raise ValueError('unknown manifest format')
    for rel, entry in sorted(files.items()):
      file_path = os.path.join(step_dir, rel)
      if not os.path.isfile(file_path):
        raise CheckpointCorruptError(f'{rel} is missing')
      size = os.path.getsize(file_path)
      if size != entry['size']:
        raise CheckpointCorruptError(f'{rel} has {size} bytes, the manifest says '
                                     f'{entry["size"]}')
      if file_sha256(file_path) != entry['sha256']:
        raise CheckpointCorruptError(f'{rel} does not match its SHA-256 checksum')
  except CheckpointCorruptError as e:
    raise CheckpointCorruptError(f'checksum manifest: {e}') from None
  except Exception as e:  # pylint: disable=broad-except
    if _is_permission_error(e):
      raise _access_error(step_dir, e) from None
    raise CheckpointCorruptError(f'unreadable {MANIFEST_FILE} ({_describe_error(e)})') from None
  return True


# ----------------------------------------------------------------------------- structure


def _key_name(key: Any) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _leaf_specs(tree: PyTree) -> Dict[str, Tuple[Any, str]]:
  """{'a/b/c': (shape, dtype)} for every leaf (namedtuple fields and dict keys alike)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    shape = getattr(leaf, 'shape', None)
    dtype = getattr(leaf, 'dtype', None)
    out['/'.join(_key_name(k) for k in path)] = (
        tuple(shape) if shape is not None else None, str(dtype) if dtype is not None else None)
  return out


def structure_differences(stored: PyTree, expected: PyTree, item: str) -> List[str]:
  """How the stored leaves of `item` differ from the model's: missing, extra, shape, dtype."""
  a, b = _leaf_specs(stored), _leaf_specs(expected)
  diffs = [f'{item}/{k}: not in the checkpoint' for k in sorted(set(b) - set(a))]
  diffs += [f'{item}/{k}: in the checkpoint but not in the model' for k in sorted(set(a) - set(b))]
  for k in sorted(set(a) & set(b)):
    (sa, da), (sb, db) = a[k], b[k]
    if sa is not None and sa != sb:
      diffs.append(f'{item}/{k}: shape {sa} in the checkpoint, {sb} in the model')
    elif da is not None and db is not None and da != db:
      diffs.append(f'{item}/{k}: dtype {da} in the checkpoint, {db} in the model')
  return diffs


def _stored_tree(item_dir: str) -> PyTree:
  """The stored leaves' metadata; ValueError when orbax cannot read it (it returns None then,
  e.g. for damaged array data) or it holds no arrays."""
  with ocp.StandardCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(item_dir)
  tree = getattr(metadata, 'item_metadata', metadata)
  tree = getattr(tree, 'tree', tree)
  if tree is None or not jax.tree.leaves(tree):
    raise ValueError('orbax found no readable array metadata')
  return tree


def check_structure(step_dir: str, expected: Dict[str, PyTree]) -> None:
  """Compares the stored items of our layout with `expected` ({item: abstract tree}).

  `CheckpointMismatchError` (listing the first differences) if the checkpoint does not fit;
  `CheckpointCorruptError` if its metadata cannot be read; `CheckpointAccessError` on a
  permission error. Items whose expected tree is empty must be absent (or empty).
  """
  diffs = []
  for item, tree in expected.items():
    item_dir = os.path.join(step_dir, item)
    has_leaves = bool(jax.tree.leaves(tree))
    if not os.path.isdir(item_dir):
      if has_leaves:
        diffs.append(f'item {item}/ is missing')
      continue
    try:
      stored = _stored_tree(item_dir)
    except Exception as e:  # pylint: disable=broad-except
      if _is_permission_error(e):
        raise _access_error(item_dir, e) from None
      raise CheckpointCorruptError(f'unreadable metadata of {item}/ '
                                   f'({_describe_error(e)})') from None
    diffs += structure_differences(stored, tree, item)
  if diffs:
    more = f' ... ({len(diffs)} differences)' if len(diffs) > 3 else ''
    raise CheckpointMismatchError(
        f'{step_dir} does not fit the model: {"; ".join(diffs[:3])}{more}. It was written by a '
        'run with another model config: resume with that config (the workdir\'s config.json), '
        'or use a new --workdir')


# ----------------------------------------------------------------------------- checkpoints


def _agree(ok: bool) -> bool:
  """Whether `ok` holds on every process (a collective on several processes)."""
  if jax.process_count() == 1:
    return ok
  flags = multihost_utils.process_allgather(np.int32(ok))
  return bool(np.all(flags))


def _broadcast_code(code: int) -> int:
  """Process 0's `code` on every process."""
  if jax.process_count() == 1:
    return code
  return int(multihost_utils.broadcast_one_to_all(np.int32(code)))


def _write_cause(error: BaseException) -> str:
  """'no space left on device' etc. for a write error from Python, orbax or TensorStore."""
  seen, text = set(), []
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno:
      return f'{os.strerror(error.errno).lower()} ({error.filename or ""})'.replace(' ()', '')
    text.append(str(error))
    error = error.__cause__ or error.__context__
  joined = ' '.join(text)
  for needle, cause in (('No space left', 'no space left on device'),
                        ('ENOSPC', 'no space left on device'),
                        ('Disk quota', 'disk quota exceeded'),
                        ('Read-only file system', 'read-only file system'),
                        ('Permission denied', 'permission denied'),
                        ('PERMISSION_DENIED', 'permission denied')):
    if needle in joined:
      return cause
  if 'RESOURCE_EXHAUSTED' in joined:
    return 'no space left on device (or quota exceeded)'
  return _first_line(joined) or 'unknown error'


def _close_abandoned_writes() -> None:
  """Closes the write coroutines that orbax abandoned in its closed event loop.

  After the first failed write of a save (e.g. a full disk) orbax closes the loop with the
  other writes of the step still suspended in it; left alone they are finalised at exit, when
  each prints a traceback (and the loop's "Task was destroyed but it is pending"). Closing
  them here runs their cleanup while the interpreter is intact.
  """
  gc.collect()
  for obj in gc.get_objects():
    try:
      if isinstance(obj, asyncio.Task) and not obj.done() and obj.get_loop().is_closed():
        obj._log_destroy_pending = False  # pylint: disable=protected-access
        coroutine = obj.get_coro()
      elif isinstance(obj, types.CoroutineType) and obj.cr_frame is not None and (
          '/orbax/' in obj.cr_code.co_filename):
        coroutine = obj
      else:
        continue
      if coroutine is not None and getattr(coroutine, 'cr_frame', None) is not None:
        coroutine.close()
    except Exception:  # pylint: disable=broad-except
      pass
  gc.collect()
  _quiet_closed_loop_errors()


def _step_dirs(directory: str) -> List[int]:
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory)
                if name.isdigit() and os.path.isdir(os.path.join(directory, name)))


def _restore_tree(path: str, target: Optional[PyTree]) -> PyTree:
  """Restores a pytree item; without a target, onto this process's first device.

  (A checkpoint written on another device topology cannot be restored without a target, so
  the target is then built from the stored shapes and dtypes.)
  """
  with ocp.StandardCheckpointer() as checkpointer:
    if target is None:
      target = _stored_tree(path)
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            target)
    return checkpointer.restore(path, target)


class CheckpointReader:
  """Restores checkpoints of `<workdir>/checkpoints`; never changes the workdir.

  `restore_newest_valid` is the one walk-back policy: newest step first, past corrupt or
  non-finite checkpoints (one warning each, listed in `skipped`); a checkpoint that does not
  fit the model (`CheckpointMismatchError`) or cannot be read for lack of permission
  (`CheckpointAccessError`) stops it.
  """

  def __init__(self, workdir: str):
    self.directory = checkpoint_dir(workdir)
    self.workdir = os.path.abspath(workdir)
    self.skipped: List[str] = []

  def all_steps(self) -> Sequence[int]:
    """Saved steps, oldest first."""
    return _step_dirs(self.directory)

  def _verify(self, step_dir: str) -> bool:
    """The manifest check on process 0, its outcome on every process."""
    code, error = 0, None
    if jax.process_index() == 0:
      try:
        code = 1 if verify_manifest(step_dir) else 0
      except CheckpointAccessError as e:
        code, error = 3, e
      except CheckpointCorruptError as e:
        code, error = 2, e
    code = _broadcast_code(code)
    if code == 2:
      raise error or CheckpointCorruptError('checksum mismatch (found on process 0)')
    if code == 3:
      raise error or CheckpointAccessError(f'cannot read {step_dir} (on process 0)')
    return code == 1

  def restore(self, step: int, abstract: Dict[str, Optional[PyTree]]) -> Dict[str, PyTree]:
    """{item: tree} of checkpoint `step`, checked against its manifest and `abstract`.

    `abstract` maps item names to pytrees of `jax.ShapeDtypeStruct` (optionally with
    shardings) giving the structure to restore into; an empty tree means the item must be
    absent, None restores whatever is stored (onto the first local device; {} if absent).
    """
    step_dir = os.path.join(self.directory, str(step))
    self._verify(step_dir)
    check_structure(step_dir, {name: tree for name, tree in abstract.items()
                               if tree is not None})
    out = {}
    for name, tree in abstract.items():
      item_dir = os.path.join(step_dir, name)
      if tree is not None and not jax.tree.leaves(tree):
        out[name] = tree
        continue
      if tree is None and not os.path.isdir(item_dir):
        if name == ITEM_PARAMS:
          raise CheckpointCorruptError(f'it has no {ITEM_PARAMS}/ item')
        out[name] = {}
        continue
      try:
        out[name] = _restore_tree(item_dir, tree)
      except Exception as e:  # pylint: disable=broad-except
        _quiet_closed_loop_errors()
        if _is_permission_error(e):
          raise _access_error(step_dir, e) from None
        raise CheckpointCorruptError(_describe_error(e)) from None
    if not _all_finite(out):
      raise CheckpointCorruptError('it holds non-finite values')
    return out

  def _set_aside(self, step: int) -> str:
    """What is done with a corrupt checkpoint, for the warning: here nothing."""
    del step
    return 'left it in place'

  def restore_newest_valid(self, abstract: Dict[str, Optional[PyTree]],
                           steps: Optional[Sequence[int]] = None
                           ) -> Tuple[Optional[int], Optional[Dict[str, PyTree]]]:
    """(step, {item: tree}) of the newest intact, finite checkpoint, or (None, None).

    Looks at `steps` (default: all saved steps), newest first; see `restore` for `abstract`.
    """
    self.skipped = []
    for step in sorted(self.all_steps() if steps is None else steps, reverse=True):
      try:
        return step, self.restore(step, abstract)
      except CheckpointCorruptError as e:
        step_dir = os.path.join(self.directory, str(step))
        done = self._set_aside(step)
        logging.warning('skipping corrupt checkpoint %s (%s): %s; falling back to the previous '
                        'one', step_dir, e, done)
        self.skipped.append(f'{step}: {e}')
    return None, None


class Checkpoints(CheckpointReader):
  """The writer: orbax `CheckpointManager` over `<workdir>/checkpoints` (atomic, keep the
  newest K), restoring as `CheckpointReader` but moving the corrupt checkpoints it skips to
  `<workdir>/checkpoints_corrupt/`.

  `save` writes `{'params', 'batch_stats', 'training'}` (see the module docstring; no
  `training` item for a converted model) and refuses a non-finite state. Saves are
  asynchronous: a save is committed (its checksum manifest written and "saved checkpoint N"
  logged) at the next `save`, `wait` or `close`, and a failed write raises
  `CheckpointWriteError` there, with the previous checkpoints intact.
  """

  def __init__(self, workdir: str, keep: int = 3, asynchronous: bool = True):
    super().__init__(workdir)
    self._pending: Optional[int] = None
    self._closed = False
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep > 0 else None, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=asynchronous)
    try:
      self.manager = ocp.CheckpointManager(self.directory, options=options)
    except OSError as e:
      raise CheckpointWriteError(f'cannot create {self.directory}: {_write_cause(e)}') from None

  def all_steps(self) -> Sequence[int]:
    """Saved steps, oldest first."""
    return sorted(self.manager.all_steps())

  def _write_failed(self, step: int, error: BaseException) -> CheckpointWriteError:
    """Removes the unfinished step (process 0) and describes the failure in one line.

    The manager is closed first (the other writers of the step may still be running); the run
    stops on this error, so nothing saves again.
    """
    self._close_manager()
    # orbax stops waiting at the first failed write; its other writer threads of the step may
    # still run (and recreate files): let them end before removing the step.
    for thread in threading.enumerate():
      if thread.name in _ORBAX_WRITER_THREADS:
        try:
          thread.join(timeout=60)
        except Exception:  # pylint: disable=broad-except
          pass  # orbax's threads re-raise their failure on join
    _close_abandoned_writes()
    if jax.process_index() == 0 and os.path.isdir(self.directory):
      for _ in range(3):  # a late write may recreate it (a restart removes what is left)
        names = [n for n in os.listdir(self.directory)
                 if n == str(step) or n.startswith(f'{step}.orbax-checkpoint-tmp')]
        if not names:
          break
        for name in names:
          shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        time.sleep(0.2)
    kept = [s for s in _step_dirs(self.directory) if s != step]
    previous = (f'the previous checkpoint {kept[-1]} is intact' if kept else
                'no earlier checkpoint exists')
    return CheckpointWriteError(
        f'could not write checkpoint {step} to {os.path.join(self.directory, str(step))}: '
        f'{_write_cause(error)}; {previous}, and rerunning the same command resumes from it '
        'once the cause is fixed')

  def _commit_pending(self) -> None:
    """Waits for the pending save; writes its manifest and logs it, or raises why not."""
    step, self._pending = self._pending, None
    if self._closed:  # after a failed write: nothing is pending any more
      return
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_failed(step if step is not None else -1, e) from None
    if step is None:
      return
    error = None
    if jax.process_index() == 0:
      try:
        if step not in self.manager.all_steps():
          raise OSError(f'orbax did not commit step {step}')
        write_manifest(os.path.join(self.directory, str(step)))
      except Exception as e:  # pylint: disable=broad-except
        error = e
    if not _agree(error is None):
      raise self._write_failed(step, error or OSError('failed on process 0')) from None
    logging.info('saved checkpoint %d', step)

  def save(self, step: int, params: PyTree, batch_stats: PyTree,
           training: Optional[PyTree]) -> bool:
    """Saves a checkpoint at `step` (all processes call this); False if refused as non-finite.

    The previous save is committed first (see the class docstring). `training=None` writes
    no `training` item (a converted model).
    """
    self._commit_pending()
    if not _all_finite((params, batch_stats, training or {})):
      logging.error('not saving step %d: the state holds non-finite values', step)
      return False
    items = {ITEM_PARAMS: ocp.args.StandardSave(params)}
    if training is not None:
      items[ITEM_TRAINING] = ocp.args.StandardSave(training)
    if jax.tree.leaves(batch_stats):
      items[ITEM_BATCH_STATS] = ocp.args.StandardSave(batch_stats)
    if step in self.manager.all_steps():
      logging.info('checkpoint for step %d already exists; not saving again', step)
      return True
    try:
      self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_failed(step, e) from None
    self._pending = step
    return True

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk and committed."""
    self._commit_pending()

  def close(self) -> None:
    """Commits pending saves and releases the manager (also when the commit fails)."""
    try:
      self._commit_pending()
    finally:
      self._close_manager()

  def _close_manager(self) -> None:
    if self._closed:
      return
    self._closed = True
    try:
      self.manager.close()
    except Exception:  # pylint: disable=broad-except
      pass  # a failed background write: reported by `_write_failed`

  def _move_aside(self, step: int) -> str:
    """Moves checkpoint `step` to `<workdir>/checkpoints_corrupt/<step>-<time>` (process 0)."""
    src = os.path.join(self.directory, str(step))
    dst = os.path.join(self.workdir, CORRUPT_DIR, f'{step}-{int(time.time())}')
    if jax.process_index() == 0 and os.path.isdir(src):
      try:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.move(src, dst)
      except OSError as e:
        raise CheckpointWriteError(f'cannot move the corrupt checkpoint {src} to {dst}: '
                                   f'{_write_cause(e)}') from None
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'denseflow_move_aside_{step}')
    self.manager.reload()
    return dst

  def _set_aside(self, step: int) -> str:
    return f'moved it to {self._move_aside(step)}'


# ----------------------------------------------------------------------------- loading weights


def load_variables(workdir: str, abstract: Optional[Dict[str, PyTree]] = None,
                   step: Optional[int] = None) -> Tuple[int, Dict[str, PyTree]]:
  """(step, {'params', 'batch_stats'}) from the newest readable checkpoint of `workdir`.

  `abstract` ({'params', 'batch_stats'} of `jax.ShapeDtypeStruct`, e.g. from `jax.eval_shape`
  of `model.init`, optionally with shardings) checks the structure and places the arrays;
  `step` picks a checkpoint instead of the newest. Corrupt checkpoints (checksum mismatch,
  unreadable data) are skipped with a one-line warning (never moved: this is a read-only use
  of the workdir); `CheckpointMismatchError` (the checkpoint does not fit `abstract`) and
  `CheckpointAccessError` (permission denied) are raised at once.
  """
  reader = CheckpointReader(workdir)
  steps = list(reader.all_steps())
  if step is not None:
    if step not in steps:
      raise CheckpointError(f'no checkpoint for step {step} in {reader.directory} (have {steps})')
    steps = [step]
  if not steps:
    raise CheckpointError(f'no checkpoints in {reader.directory}: expected '
                          f'{CHECKPOINT_DIR}/<step>/')
  abstract = abstract or {}
  found, variables = reader.restore_newest_valid(
      {name: abstract.get(name) for name in (ITEM_PARAMS, ITEM_BATCH_STATS)}, steps)
  if found is None:
    raise CheckpointError(f'no readable checkpoint in {reader.directory}: '
                          f'{"; ".join(reader.skipped)}')
  return found, variables


def load_model(workdir: str, mesh=None, step: Optional[int] = None, config=None):
  """(config, model, step, variables) from a workdir; variables replicated over `mesh`.

  `mesh` defaults to all devices (`parallel.make_mesh()`). Works for training workdirs and
  for converted checkpoints with only params (+ batch_stats). `config` replaces the saved
  config.json (e.g. with evaluation overrides); its model must be the one saved.
  """
  from denseflow_jax import parallel  # pylint: disable=g-import-not-at-top
  from denseflow_jax.model import DenseFlow  # pylint: disable=g-import-not-at-top
  if config is None:
    config = config_file.load_config(workdir)
  mesh = mesh if mesh is not None else parallel.make_mesh()
  model = DenseFlow(config.model)
  m = config.model
  dummy = jax.ShapeDtypeStruct((1, m.image_size, m.image_size, m.num_channels), jax.numpy.uint8)
  key = jax.random.PRNGKey(0)
  shapes = jax.eval_shape(lambda x: model.init({'params': key, 'noise': key}, x), dummy)
  rep = parallel.replicated_sharding(mesh)
  abstract = {name: jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep),
                                 shapes.get(name, {})) for name in (ITEM_PARAMS, ITEM_BATCH_STATS)}
  found, variables = load_variables(workdir, abstract, step)
  return config, model, found, variables
