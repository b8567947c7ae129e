"""What the command-line entry points share: one-line errors, argument and output checks.

`run(main)` replaces `absl.app.run(main)`: a bad flag, a bad value and every expected failure
(`ValueError`, `OSError`, `KeyError`, unreadable checkpoints or pickles, `UsageError`) end
the program with one line `error: ...` on stderr and exit status 2, instead of a traceback.
Anything else (a bug) still raises with its traceback. `DENSEFLOW_JAX_TRACEBACK=1` prints
the traceback of expected failures too.

Tools that read a trained workdir (evaluate, sample, score, fid, neighbours) take
`--config.<field>=<value>` overrides of the workdir's saved config.json
(`workdir_config(workdir)`): fields that do not change the model the checkpoint holds, e.g.
`--config.eval.batch_size=32` or `--config.model.remat=full`; an override of a model field
(architecture, dequantizer, ...) or of a field the config lacks is one line of error.

The `check_*` helpers raise `UsageError` naming the flag and its value; call them before any
long work (loading, compiling, evaluating), so that a bad output path is refused at once.
"""
import ast
import logging as logging_std
import math
import numbers
import os
import pickle
import sys
import traceback
from typing import Any, Callable, List, Optional, Sequence, Tuple

from absl import app, flags

EXIT_USAGE = 2
TRACEBACK_ENV = 'DENSEFLOW_JAX_TRACEBACK'
_MAX_MESSAGE = 2000


class UsageError(ValueError):
  """A bad argument or path given on the command line (the message names it)."""


def _expected_types() -> tuple:
  types = [ValueError, OSError, KeyError, pickle.UnpicklingError, app.UsageError,
           flags.Error]
  checkpoint = sys.modules.get('denseflow_jax.checkpoint')  # only if imported: no import cost
  if checkpoint is not None:
    types.append(checkpoint.CheckpointError)
  return tuple(types)


def one_line(error: BaseException) -> str:
  """The message of `error` on one line (whitespace collapsed, at most 2000 characters)."""
  if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
    text = error.args[0]  # str(KeyError) would add quotes
  else:
    text = str(error)
  text = ' '.join(text.split()) or type(error).__name__
  if isinstance(error, OSError) and not isinstance(error, UsageError) and (
      error.filename and str(error.filename) not in text):
    text = f'{text}: {error.filename}'
  if len(text) > _MAX_MESSAGE:
    text = text[:_MAX_MESSAGE] + ' ...'
  return text


def fail(message: str, status: int = EXIT_USAGE) -> None:
  """Prints `error: <message>` (one line) on stderr and exits with `status`."""
  print(f'error: {" ".join(str(message).split())}', file=sys.stderr, flush=True)
  sys.exit(status)


HELP_FLAGS = ('-h', '-?', '--help', '--helpshort', '--helpfull', '--helpxml')


def _check_config_files(argv: Sequence[str]) -> None:
  """A `--config PATH[:VARIANT]` that names no file is one line, before absl tries to load it."""
  for i, arg in enumerate(argv):
    if arg == '--config' and i + 1 < len(argv):
      value = argv[i + 1]
    elif arg.startswith('--config='):
      value = arg[len('--config='):]
    else:
      continue
    path = value.split(':', 1)[0]
    if path and not os.path.isfile(path):
      fail(f'--config {value}: no such config file {path!r}')


def _without_traceback(text: str) -> str:
  """`prefix: Traceback ... XError: message` (ml_collections' load errors) -> `prefix: message`."""
  head, marker, tail = text.partition('Traceback (most recent call last):')
  if not marker:
    return text
  last = [line for line in tail.strip().splitlines() if line.strip()][-1:]
  return head + (last[0].strip() if last else '')


# `--config.<field>=<value>` given to a tool without a `--config` flag: overrides of the saved
# config of the workdir it reads (`workdir_config`).
_SAVED_CONFIG_OVERRIDES: List[Tuple[str, str]] = []


def _split_config_overrides(argv: List[str]) -> List[str]:
  """Removes `--config.a.b=v` / `--config.a.b v` from `argv` into `_SAVED_CONFIG_OVERRIDES`."""
  rest, i = [argv[0]], 1
  while i < len(argv):
    arg = argv[i]
    if arg.startswith('--config.'):
      name, eq, value = arg[len('--config.'):].partition('=')
      if not eq:
        if i + 1 >= len(argv):
          fail(f'{arg} needs a value (--config.{name}=VALUE)')
        value, i = argv[i + 1], i + 1
      if not name:
        fail(f'{arg}: expected --config.<field>=<value>')
      _SAVED_CONFIG_OVERRIDES.append((name, value))
    else:
      rest.append(arg)
    i += 1
  return rest


def parse_flags(argv: List[str]) -> List[str]:
  """absl flag parsing with one-line errors (bad values, missing config files, --config overrides
  of missing fields); `--help` exits with status 0. For a tool without a `--config` flag,
  `--config.<field>=<value>` arguments are kept for `workdir_config`."""
  _check_config_files(argv[1:])
  if 'config' not in flags.FLAGS:
    del _SAVED_CONFIG_OVERRIDES[:]
    argv = _split_config_overrides(list(argv))
  try:
    return flags.FLAGS(argv)
  except SystemExit as e:  # absl's --help prints the usage, then exits with status 1
    if e.code == 1 and any(a.split('=')[0] in HELP_FLAGS for a in argv[1:]):
      sys.exit(0)
    raise
  except flags.Error as e:
    fail(one_line(_without_traceback(str(e))) if 'Traceback' in str(e) else one_line(e))
  except (AttributeError, KeyError) as e:  # raised by ConfigDict for an unknown field
    while e.args and isinstance(e.args[0], BaseException):
      e = e.args[0]
    message = str(e.args[0] if e.args else e)
    overrides = [a.split('=')[0] for a in argv[1:] if a.startswith('--config.')]
    fail(f'a --config override names a field that the config does not have: {message} '
         f'(overrides given: {", ".join(overrides)})')
  except (TypeError, ValueError) as e:  # a --config override of the wrong type
    fail(one_line(e))
  return []


def _parse_like(name: str, text: str, current: Any) -> Any:
  """`text` as a value of the type of `current` (the saved value of field `name`)."""
  def bad(what):
    return UsageError(f'--config.{name}={text!r}: expected {what} (the saved value is '
                      f'{current!r})')
  if isinstance(current, bool):
    low = text.strip().lower()
    if low in ('true', '1', 'yes'):
      return True
    if low in ('false', '0', 'no'):
      return False
    raise bad('true or false')
  if isinstance(current, numbers.Integral):
    try:
      return int(text)
    except ValueError:
      raise bad('an integer') from None
  if isinstance(current, numbers.Real):
    try:
      return float(text)
    except ValueError:
      raise bad('a number') from None
  if isinstance(current, (tuple, list)):
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      raise bad('a tuple such as (1, 2)') from None
    if not isinstance(value, (tuple, list)):
      raise bad('a tuple such as (1, 2)')
    return tuple(value)
  if current is None:
    try:
      return ast.literal_eval(text)
    except (ValueError, SyntaxError):
      return text
  return text


def apply_config_overrides(config, overrides: Sequence[Tuple[str, str]]):
  """`config` with `(dotted_field, text)` overrides applied (a copy; UsageError for a field
  the config lacks or a value of the wrong type)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(config.to_dict())
  for name, text in overrides:
    *parents, leaf = name.split('.')
    node = config
    for part in parents:
      node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
      if node is None:
        break
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node or isinstance(
        node[leaf], ml_collections.ConfigDict):
      raise UsageError(f'--config.{name}: the config has no field {name!r}')
    node[leaf] = _parse_like(name, text, node[leaf])
  return config


def workdir_config(workdir: str):
  """The saved config.json of `workdir` with this command's `--config.*` overrides.

  An override that changes the model the checkpoint holds (`config_file.model_differences`)
  is refused with a `UsageError`; the others (evaluation, data, implementation-only model
  fields such as `model.remat`) apply. The overrides given are logged in one line.
  """
  from denseflow_jax import config_file  # pylint: disable=g-import-not-at-top
  saved = config_file.load_config(workdir)
  if not _SAVED_CONFIG_OVERRIDES:
    return saved
  config = apply_config_overrides(saved, _SAVED_CONFIG_OVERRIDES)
  diffs = config_file.model_differences(saved, config)
  if diffs:
    raise UsageError(f'--config overrides would change the model that the checkpoint in '
                     f'{workdir} holds ({"; ".join(diffs)}); only fields that keep the model '
                     'can be overridden here')
  print('config overrides: ' + ', '.join(f'{n}={v}' for n, v in _SAVED_CONFIG_OVERRIDES),
        flush=True)
  return config


def _drop_work_unit_notes(record: logging_std.LogRecord) -> bool:
  """clu's ReportProgress also logs "Setting work unit notes: ..."; the loop prints its own."""
  return not str(record.msg).startswith('Setting work unit notes')


def quiet_startup() -> None:
  """No start-up noise from the libraries: TensorFlow's C++ lines (oneDNN notice, CPU-feature
  notice; TF only writes TensorBoard files and reads TFDS here, so its oneDNN kernels are off)
  and JAX's "Unable to initialize backend 'tpu' / 'proxy'". Must run before TF is imported;
  explicit settings of the environment variables win."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  logging_std.getLogger('absl').addFilter(_drop_work_unit_notes)
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  logging_std.getLogger('jax._src.xla_bridge').setLevel(logging_std.WARNING)


def run(main: Callable[[List[str]], Any]) -> None:
  """`absl.app.run(main)` with expected failures turned into `error: ...` and status 2.

  Also sets the process's BLAS libraries to one thread (`cpu_tuning.single_thread_blas`):
  every entry point runs XLA programs whose CPU LAPACK calls would otherwise wake BLAS
  threads that compete with XLA's own. A script's `main` (defined in `__main__`) first
  restarts its process once with malloc's transparent huge pages
  (`cpu_tuning.restart_with_huge_pages`; `DENSEFLOW_HUGE_PAGES=0` turns it off).
  """
  from denseflow_jax import cpu_tuning  # pylint: disable=g-import-not-at-top
  if getattr(main, '__module__', None) == '__main__':
    cpu_tuning.restart_with_huge_pages()  # returns only where it does not apply
  quiet_startup()
  cpu_tuning.single_thread_blas()

  def guarded(argv):
    if len(argv) > 1:
      fail(f'unexpected arguments: {" ".join(argv[1:])} (flags are --name=value)')
    try:
      return main(argv)
    except _expected_types() as e:  # pylint: disable=catching-non-exception
      if os.environ.get(TRACEBACK_ENV, '') not in ('', '0'):
        traceback.print_exc()
      fail(one_line(e))

  app.run(guarded, flags_parser=parse_flags)


# ----------------------------------------------------------------------------- value checks


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: Optional[int] = None,
              maximum: Optional[int] = None, note: str = '') -> int:
  """`value` as int if it is an integer in [minimum, maximum]; UsageError naming `name`."""
  bounds = []
  if minimum is not None:
    bounds.append(f'>= {minimum}')
  if maximum is not None:
    bounds.append(f'<= {maximum}')
  if not _is_int(value) or (minimum is not None and value < minimum) or (
      maximum is not None and value > maximum):
    raise UsageError(f'{name}={value!r} must be an integer {" and ".join(bounds)}'.rstrip()
                     + (f' ({note})' if note else ''))
  return int(value)


def check_positive_finite(name: str, value: Any) -> float:
  """`value` as float if it is finite and > 0; UsageError naming `name`."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
      math.isfinite(value) and value > 0):
    raise UsageError(f'{name}={value!r} must be a finite number > 0')
  return float(value)


# ----------------------------------------------------------------------------- path checks


def _nearest_existing(path: str) -> str:
  path = os.path.abspath(path)
  while not os.path.exists(path):
    parent = os.path.dirname(path)
    if parent == path:
      break
    path = parent
  return path


def check_output_dir(name: str, path: str) -> str:
  """Refuses a directory we could not create or write to (a file, or no write permission).

  The directory need not exist: the nearest existing ancestor must be a writable directory.
  Nothing is created. Returns the absolute path.
  """
  if not path:
    raise UsageError(f'{name} is empty')
  full = os.path.abspath(os.path.expanduser(path))
  if os.path.exists(full) and not os.path.isdir(full):
    raise UsageError(f'{name}={path!r} is a file, not a directory')
  existing = _nearest_existing(full)
  if not os.path.isdir(existing):
    raise UsageError(f'{name}={path!r}: {existing} is a file, not a directory')
  if not os.access(existing, os.W_OK | os.X_OK):
    raise UsageError(f'{name}={path!r}: {existing} is not writable')
  return full


def check_output_file(name: str, path: str) -> str:
  """Refuses a file path whose directory does not exist or is not writable, or a directory."""
  full = os.path.abspath(os.path.expanduser(path))
  parent = os.path.dirname(full)
  if os.path.isdir(full):
    raise UsageError(f'{name}={path!r} is a directory, expected a file path')
  if not os.path.isdir(parent):
    raise UsageError(f'{name}={path!r}: the directory {parent} does not exist')
  if not os.access(parent, os.W_OK | os.X_OK) or (
      os.path.exists(full) and not os.access(full, os.W_OK)):
    raise UsageError(f'{name}={path!r} is not writable')
  return full


def check_input_dir(name: str, path: str, needs: Sequence[str] = ()) -> str:
  """Refuses a missing directory (or a file), or one that lacks any of `needs` (relative)."""
  full = os.path.abspath(os.path.expanduser(path or ''))
  if not path or not os.path.exists(full):
    raise UsageError(f'{name}={path!r}: no such directory ({full})')
  if not os.path.isdir(full):
    raise UsageError(f'{name}={path!r} is a file, not a directory')
  missing = [n for n in needs if not os.path.exists(os.path.join(full, n))]
  if missing:
    raise UsageError(f'{name}={path!r} lacks {", ".join(missing)}')
  return full
