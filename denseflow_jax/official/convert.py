"""Published model directories in, converted workdirs out, and the state_dict `.npz` files.

The authors' training script leaves a model directory `MODEL/` with `args.pickle` (the command
line) and `check/checkpoint.pt` (a `torch.save` zip whose `model` entry is the state_dict);
`load_official` reads both without torch (`denseflow_jax.torch_reader`) and converts them.

`save_converted` writes the training workdir layout without the training state, with the
writers training uses (`config_file.save_config`, `checkpoint.Checkpoints`):
`workdir/config.json` and `workdir/checkpoints/<step>/{params,batch_stats}/`, plus
`workdir/official/{buffers.npz, args.json, source.json}`. `load_converted` reads them back
through the workdir reader (`checkpoint.load_variables`). `experiments/convert_official.py` is
the command-line entry point.
"""
import argparse
import collections
import dataclasses
import json
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import ml_collections
import numpy as np

from denseflow_jax.official.args import _is_int, config_from_args
from denseflow_jax.official.layout import Variables, _strip_module_prefix, import_state_dict
from denseflow_jax.torch_reader import OfficialCheckpointError, read_args, read_torch_checkpoint


def _state_dict_of(obj: Any, path: str) -> Dict[str, np.ndarray]:
  sd = obj.get('model') if isinstance(obj, Mapping) and 'model' in obj else obj
  if not isinstance(sd, Mapping) or not all(
      isinstance(k, str) and isinstance(v, np.ndarray) for k, v in sd.items()):
    top = list(obj)[:20] if isinstance(obj, Mapping) else type(obj).__name__
    raise OfficialCheckpointError(f'{path}: expected a dict with a "model" state_dict of '
                                  f'tensors, found {top}')
  return _strip_module_prefix(sd)


def read_state_dict(path: str) -> Dict[str, np.ndarray]:
  """The model state_dict of a published `checkpoint.pt` as `{name: numpy array}`.

  Takes the checkpoint's `model` entry (or the whole object if it is itself a state_dict);
  strips a `module.` prefix (DataParallel). Optimizer and scheduler states are ignored.
  """
  return _state_dict_of(read_torch_checkpoint(path), os.fspath(path))


def save_state_dict_npz(path: str, state_dict: Mapping[str, np.ndarray]) -> None:
  """Writes a state_dict as an uncompressed `.npz` keyed by the published names."""
  with open(path, 'wb') as f:
    np.savez(f, **state_dict)


def load_state_dict_npz(path: str) -> 'collections.OrderedDict[str, np.ndarray]':
  """Reads a `save_state_dict_npz` file (no pickles allowed)."""
  with np.load(path, allow_pickle=False) as z:
    return collections.OrderedDict((k, z[k]) for k in z.files)


@dataclasses.dataclass
class OfficialModel:
  """A published model directory, converted.

  `config`: our experiment config; `variables`: `{'params', 'batch_stats'}`; `buffers`: the
  left-over published buffers; `args`: the raw command line; `state_dict`: the file's
  state_dict as read (published names and layouts, `module.` prefix stripped).
  """
  config: ml_collections.ConfigDict
  variables: Variables
  buffers: Dict[str, np.ndarray]
  args: argparse.Namespace
  state_dict: Dict[str, np.ndarray]
  checkpoint_path: str
  current_epoch: Optional[int] = None


def load_official(model_dir: str, allow_unknown_args: bool = False) -> OfficialModel:
  """Reads `model_dir/args.pickle` and `model_dir/check/checkpoint.pt` and converts them."""
  args_path = os.path.join(model_dir, 'args.pickle')
  ckpt_path = os.path.join(model_dir, 'check', 'checkpoint.pt')
  args = read_args(args_path)
  config = config_from_args(args, allow_unknown_args)
  obj = read_torch_checkpoint(ckpt_path)
  sd = _state_dict_of(obj, ckpt_path)
  variables, buffers = import_state_dict(sd, config.model, source=ckpt_path)
  epoch = obj.get('current_epoch') if isinstance(obj, Mapping) else None
  return OfficialModel(config, variables, buffers, args, sd, ckpt_path,
                       epoch if _is_int(epoch) else None)


def _jsonable(v: Any) -> Any:
  if isinstance(v, (str, bool, int, float)) or v is None:
    return v
  if isinstance(v, (list, tuple)):
    return [_jsonable(i) for i in v]
  if isinstance(v, Mapping):
    return {str(k): _jsonable(i) for k, i in v.items()}
  return repr(v)


def save_converted(workdir: str, config: ml_collections.ConfigDict, variables: Variables,
                   buffers: Optional[Mapping[str, np.ndarray]] = None,
                   args: Optional[argparse.Namespace] = None, step: int = 0,
                   source: Optional[Mapping[str, Any]] = None) -> str:
  """Writes a converted model into `workdir`; returns the checkpoint directory.

  Layout (the training workdir's, minus the training state):
    `workdir/config.json`                   the experiment config (`config_file.save_config`)
    `workdir/checkpoints/<step>/params/`    orbax item (`checkpoint.Checkpoints`), + manifest
    `workdir/checkpoints/<step>/batch_stats/`  same, BatchNorm running statistics
    `workdir/official/buffers.npz`          published buffers without a variable (bit-exact export)
    `workdir/official/args.json`            the published command line
    `workdir/official/source.json`          source file, sha256, epoch
  Raises `CheckpointError` if the workdir already holds a checkpoint for `step`.
  """
  from denseflow_jax import checkpoint, config_file  # pylint: disable=g-import-not-at-top
  workdir = os.path.abspath(workdir)
  step = int(step)
  os.makedirs(os.path.join(workdir, 'official'), exist_ok=True)
  config_file.save_config(config, workdir)
  ckpts = checkpoint.Checkpoints(workdir, keep=0, asynchronous=False)
  try:
    if step in ckpts.all_steps():
      raise checkpoint.CheckpointError(
          f'{os.path.join(ckpts.directory, str(step))} exists; not overwriting it')
    if not ckpts.save(step, variables['params'], variables.get('batch_stats') or {}, None):
      raise checkpoint.CheckpointWriteError(f'not saving step {step}: the variables hold '
                                            'non-finite values')
  finally:
    ckpts.close()
  save_state_dict_npz(os.path.join(workdir, 'official', 'buffers.npz'), dict(buffers or {}))
  if args is not None:
    with open(os.path.join(workdir, 'official', 'args.json'), 'w') as f:
      json.dump(_jsonable(vars(args)), f, indent=2)
  if source is not None:
    with open(os.path.join(workdir, 'official', 'source.json'), 'w') as f:
      json.dump(_jsonable(source), f, indent=2)
  return os.path.join(ckpts.directory, str(step))


def load_converted(workdir: str, step: Optional[int] = None
                   ) -> Tuple[ml_collections.ConfigDict, Variables, Dict[str, np.ndarray]]:
  """Reads what `save_converted` wrote: `(config, variables, buffers)`, variables as numpy.

  The config and the checkpoint are read as for any workdir (`config_file.load_config`,
  `checkpoint.load_variables`: newest valid step if `step` is None).
  """
  from denseflow_jax import checkpoint, config_file  # pylint: disable=g-import-not-at-top
  workdir = os.path.abspath(workdir)
  config = config_file.load_config(workdir)
  _, variables = checkpoint.load_variables(workdir, step=step)
  variables = {k: _plain(v) for k, v in variables.items()}
  buffers_path = os.path.join(workdir, 'official', 'buffers.npz')
  buffers = dict(load_state_dict_npz(buffers_path)) if os.path.exists(buffers_path) else {}
  return config, variables, buffers


def _plain(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {k: _plain(v) for k, v in tree.items()}
  return np.asarray(tree)
