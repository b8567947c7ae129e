"""The workdir: saved config, orbax checkpoints, restoring the newest valid one.

Layout of a workdir (shared by training, evaluation, sampling and converted official weights):

  <workdir>/config.json               the full experiment config (`ConfigDict.to_json`)
  <workdir>/checkpoints/<step>/       one orbax checkpoint per saved step, with items
      params/                         model parameters (orbax `StandardSave` pytree)
      batch_stats/                    BatchNorm running statistics (absent when the model
                                      has none, e.g. Glow couplings)
      training/                       {'step', 'opt_state', 'rng', 'nonfinite'}: only in
                                      training checkpoints
  <workdir>/checkpoints_corrupt/<step>/  checkpoints found unreadable at restart, moved aside

Evaluation and sampling only need `params` (+ `batch_stats`), so a converted checkpoint
holding just those two items is a valid workdir. `load_variables` also accepts the two other
ways of writing {'params', 'batch_stats'} with orbax: one pytree item named `default`
(`CheckpointManager.save(step, args=StandardSave(tree))`) or the step directory itself
being a pytree checkpoint (`StandardCheckpointer().save(step_dir, tree)`).
"""
import json
import logging as logging_std
import os
import shutil
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import orbax.checkpoint as ocp

PyTree = Any
CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'
CORRUPT_DIR = 'checkpoints_corrupt'
ITEM_PARAMS, ITEM_BATCH_STATS, ITEM_TRAINING = 'params', 'batch_stats', 'training'
# Model fields that may change between runs that share parameters.
IMPLEMENTATION_ONLY_FIELDS = ('remat',)


class _QuietOrbax(logging_std.Filter):
  """Drops orbax's INFO records (a dozen per checkpoint); its warnings and errors pass."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    return record.levelno >= logging_std.WARNING or '/orbax/' not in record.pathname


def quiet_orbax_logs() -> None:
  """Hides orbax's INFO logs from the absl handler (entry points call this)."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietOrbax) for f in handler.filters):
    handler.addFilter(_QuietOrbax())


# ----------------------------------------------------------------------------- config file


def _tuples(value: Any) -> Any:
  """JSON lists -> tuples (our configs use tuples), recursively."""
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def _merge(base: ml_collections.ConfigDict, values: Dict[str, Any]) -> None:
  for key, value in values.items():
    if isinstance(value, dict) and isinstance(base.get(key), ml_collections.ConfigDict):
      _merge(base[key], value)
    elif key in base and isinstance(base[key], float) and isinstance(value, int):
      base[key] = float(value)
    else:
      base[key] = value


def config_from_json(text: str) -> ml_collections.ConfigDict:
  """A config saved by `save_config`, laid over `configs.default` (missing fields keep defaults)."""
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  _merge(config, _tuples(json.loads(text)))
  return config


def config_path(workdir: str) -> str:
  """`<workdir>/config.json`."""
  return os.path.join(workdir, CONFIG_FILE)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """Reads `<workdir>/config.json`; FileNotFoundError naming the path if absent."""
  path = config_path(workdir)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} not found: {workdir!r} is not a DenseFlow workdir (it '
                            f'needs {CONFIG_FILE} and {CHECKPOINT_DIR}/<step>/)')
  with open(path) as f:
    return config_from_json(f.read())


def _plain(value: Any) -> Any:
  return json.loads(json.dumps(value, default=list))


def model_differences(saved: ml_collections.ConfigDict,
                      current: ml_collections.ConfigDict) -> List[str]:
  """`field: saved -> current` for every model field that changes the parameters or function."""
  diffs = []
  keys = sorted(set(saved.model.keys()) | set(current.model.keys()))
  for key in keys:
    if key in IMPLEMENTATION_ONLY_FIELDS:
      continue
    a, b = _plain(saved.model.get(key)), _plain(current.model.get(key))
    if a != b:
      diffs.append(f'model.{key}: {a!r} -> {b!r}')
  return diffs


def _flat(config: ml_collections.ConfigDict, prefix: str = '') -> Dict[str, Any]:
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[prefix + key] = _plain(value)
  return out


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes `<workdir>/config.json` atomically (call on process 0 only)."""
  os.makedirs(workdir, exist_ok=True)
  path = config_path(workdir)
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(config.to_json(indent=2, sort_keys=True))
  os.replace(tmp, path)


def check_and_save_config(config: ml_collections.ConfigDict, workdir: str,
                          write: bool = True) -> None:
  """Refuses a workdir whose saved config has another model; records the config used.

  Differences outside the model section (e.g. more steps) are logged as warnings and the new
  config replaces the saved one. `write=False` on processes other than 0.
  """
  path = config_path(workdir)
  if os.path.isfile(path):
    saved = load_config(workdir)
    diffs = model_differences(saved, config)
    if diffs:
      raise ValueError(f'{path} holds a run with a different model ({"; ".join(diffs)}); '
                       'resume with the saved config or use a new --workdir')
    old, new = _flat(saved), _flat(config)
    changed = [f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k)]
    if changed:
      logging.warning('config differs from the saved %s: %s', path, '; '.join(changed))
  if write:
    save_config(config, workdir)


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
  """No readable checkpoint where one was expected."""


class Checkpoints:
  """orbax `CheckpointManager` over `<workdir>/checkpoints` (atomic, keep the newest K).

  `save` writes `{'params', 'batch_stats', 'training'}` (see the module docstring) and
  refuses a non-finite state; `restore_newest_valid` walks back from the newest step past
  unreadable or non-finite checkpoints, warning about each and moving it aside.
  """

  def __init__(self, workdir: str, keep: int = 3, asynchronous: bool = True):
    self.directory = checkpoint_dir(workdir)
    self.workdir = os.path.abspath(workdir)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep > 0 else None, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=asynchronous)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> Sequence[int]:
    """Saved steps, oldest first."""
    return sorted(self.manager.all_steps())

  def save(self, step: int, params: PyTree, batch_stats: PyTree, training: PyTree) -> bool:
    """Saves a checkpoint at `step` (all processes call this); False if refused as non-finite."""
    if not _all_finite((params, batch_stats, training)):
      logging.error('not saving step %d: the state holds non-finite values', step)
      return False
    items = {ITEM_PARAMS: ocp.args.StandardSave(params),
             ITEM_TRAINING: ocp.args.StandardSave(training)}
    if jax.tree.leaves(batch_stats):
      items[ITEM_BATCH_STATS] = ocp.args.StandardSave(batch_stats)
    if step in self.manager.all_steps():
      logging.info('checkpoint for step %d already exists; not saving again', step)
      return True
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    return True

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self.manager.wait_until_finished()
    self.manager.close()

  def _restore(self, step: int, abstract: Dict[str, PyTree]) -> Dict[str, PyTree]:
    items = {name: ocp.args.StandardRestore(tree) for name, tree in abstract.items()
             if jax.tree.leaves(tree)}
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    out = {name: restored[name] if name in items else tree for name, tree in abstract.items()}
    if not _all_finite(out):
      raise CheckpointError(f'checkpoint {step} holds non-finite values')
    return out

  def _move_aside(self, step: int) -> None:
    src = os.path.join(self.directory, str(step))
    if jax.process_index() == 0 and os.path.isdir(src):
      dst = os.path.join(self.workdir, CORRUPT_DIR, f'{step}-{int(time.time())}')
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      shutil.move(src, dst)
      logging.warning('moved the unreadable checkpoint %s to %s', src, dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'denseflow_move_aside_{step}')
    self.manager.reload()

  def restore_newest_valid(self, abstract: Dict[str, PyTree]
                           ) -> Tuple[Optional[int], Optional[Dict[str, PyTree]]]:
    """(step, {item: tree}) of the newest readable, finite checkpoint, or (None, None).

    `abstract` maps item names to pytrees of `jax.ShapeDtypeStruct` (with shardings) that give
    the structure to restore into.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        return step, self._restore(step, abstract)
      except Exception as e:  # pylint: disable=broad-except
        message = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        logging.warning('checkpoint %s/%d is unreadable or invalid (%s: %s); falling back to '
                        'the previous one', self.directory, step, type(e).__name__, message)
        self._move_aside(step)
    return None, None


# ----------------------------------------------------------------------------- loading weights


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
      metadata = checkpointer.metadata(path)
      tree = getattr(metadata, 'item_metadata', metadata)
      tree = getattr(tree, 'tree', tree)
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            tree)
    return checkpointer.restore(path, target)


def _restore_variables(step_dir: str, abstract: Optional[Dict[str, PyTree]]) -> Dict[str, PyTree]:
  abstract = abstract or {}
  has_bs = bool(jax.tree.leaves(abstract.get(ITEM_BATCH_STATS, {'x': 0})))
  if os.path.isdir(os.path.join(step_dir, ITEM_PARAMS)):  # our layout: one item per collection
    out = {ITEM_PARAMS: _restore_tree(os.path.join(step_dir, ITEM_PARAMS),
                                      abstract.get(ITEM_PARAMS)), ITEM_BATCH_STATS: {}}
    bs_dir = os.path.join(step_dir, ITEM_BATCH_STATS)
    if os.path.isdir(bs_dir) and has_bs:
      out[ITEM_BATCH_STATS] = _restore_tree(bs_dir, abstract.get(ITEM_BATCH_STATS))
    elif has_bs and abstract:
      raise CheckpointError(f'{step_dir} has no {ITEM_BATCH_STATS} item but the model has '
                            'BatchNorm statistics')
    return out
  for tree_dir in (os.path.join(step_dir, 'default'), step_dir):  # one pytree {'params', ...}
    if os.path.isfile(os.path.join(tree_dir, '_METADATA')):
      target = None
      if abstract:
        target = {ITEM_PARAMS: abstract[ITEM_PARAMS]}
        if has_bs:
          target[ITEM_BATCH_STATS] = abstract[ITEM_BATCH_STATS]
      tree = _restore_tree(tree_dir, target)
      return {ITEM_PARAMS: tree[ITEM_PARAMS], ITEM_BATCH_STATS: tree.get(ITEM_BATCH_STATS, {})}
  raise CheckpointError(f'{step_dir} is not a checkpoint: expected an orbax item '
                        f"'{ITEM_PARAMS}/' (or 'default/', or a pytree checkpoint)")


def load_variables(workdir: str, abstract: Optional[Dict[str, PyTree]] = None,
                   step: Optional[int] = None) -> Tuple[int, Dict[str, PyTree]]:
  """(step, {'params', 'batch_stats'}) from the newest readable checkpoint of `workdir`.

  `abstract` ({'params', 'batch_stats'} of `jax.ShapeDtypeStruct`, e.g. from `jax.eval_shape`
  of `model.init`, optionally with shardings) checks the structure and places the arrays;
  `step` picks a checkpoint instead of the newest. Unreadable checkpoints are skipped with a
  warning (never moved: this is a read-only use of the workdir).
  """
  directory = checkpoint_dir(workdir)
  steps = _step_dirs(directory)
  if step is not None:
    if step not in steps:
      raise CheckpointError(f'no checkpoint for step {step} in {directory} (have {steps})')
    steps = [step]
  if not steps:
    raise CheckpointError(f'no checkpoints in {directory}: expected {CHECKPOINT_DIR}/<step>/')
  errors = []
  for s in reversed(steps):
    step_dir = os.path.join(directory, str(s))
    try:
      variables = _restore_variables(step_dir, abstract)
    except Exception as e:  # pylint: disable=broad-except
      first = str(e).splitlines()[0][:300] if str(e) else ''
      logging.warning('skipping unreadable checkpoint %s (%s: %s)', step_dir, type(e).__name__,
                      first)
      errors.append(f'{s}: {type(e).__name__}: {first}')
      continue
    return s, variables
  raise CheckpointError(f'no readable checkpoint in {directory}: {"; ".join(errors)}')


def load_model(workdir: str, mesh=None, step: Optional[int] = None):
  """(config, model, step, variables) from a workdir; variables replicated over `mesh`.

  `mesh` defaults to all devices (`parallel.make_mesh()`). Works for training workdirs and
  for converted checkpoints with only params (+ batch_stats).
  """
  from denseflow_jax import parallel  # pylint: disable=g-import-not-at-top
  from denseflow_jax.model import DenseFlow  # pylint: disable=g-import-not-at-top
  config = load_config(workdir)
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
