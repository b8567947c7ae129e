"""The workdir's `config.json`: reading it over the defaults, writing it atomically, and
checking a saved config against the current one (model fields must agree)."""
import json
import os
from typing import Any, Dict, List

from absl import logging
import ml_collections

from denseflow_jax import defaults
from denseflow_jax.config_check import remat_policy

CONFIG_FILE = 'config.json'
# Model fields that may change between runs that share parameters (compute options: a workdir
# trained in float32 can be evaluated or fine-tuned with `compute_dtype='bfloat16'` and back).
IMPLEMENTATION_ONLY_FIELDS = ('remat', 'compute_dtype', 'conv_backward')


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
  """A config saved by `save_config`, laid over `denseflow_jax.defaults` (missing fields keep defaults).

  A boolean `model.remat` (configs saved before it named a policy) becomes 'none' / 'full'.
  """
  config = defaults.get_config()
  values = _tuples(json.loads(text))
  model = values.get('model') if isinstance(values, dict) else None
  if isinstance(model, dict) and isinstance(model.get('remat'), bool):
    model['remat'] = remat_policy(model['remat'])
  _merge(config, values)
  return config


def config_path(workdir: str) -> str:
  """`<workdir>/config.json`."""
  return os.path.join(workdir, CONFIG_FILE)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """Reads `<workdir>/config.json`; FileNotFoundError naming the path if absent."""
  path = config_path(workdir)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} not found: {workdir!r} is not a DenseFlow workdir (it '
                            f'needs {CONFIG_FILE} and checkpoints/<step>/)')
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


def flat_config(config: ml_collections.ConfigDict, prefix: str = '') -> Dict[str, Any]:
  """`{'train.num_steps': 50, ...}`: every field by its dotted name, as plain JSON values."""
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(flat_config(value, f'{prefix}{key}.'))
    else:
      out[prefix + key] = _plain(value)
  return out


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes `<workdir>/config.json` atomically (call on process 0 only)."""
  os.makedirs(workdir, exist_ok=True)
  path = config_path(workdir)
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    with open(tmp, 'w') as f:
      f.write(config.to_json(indent=2, sort_keys=True))
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


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
    old, new = flat_config(saved), flat_config(config)
    changed = [f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k)]
    if changed:
      logging.warning('config differs from the saved %s: %s', path, '; '.join(changed))
  if write:
    save_config(config, workdir)
