"""Reading `torch.save` files without torch: a restricted unpickler producing numpy arrays.

`torch.save` writes a zip archive: `<dir>/data.pkl` is a pickle of the saved object in which
every tensor is `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` and every
storage a persistent id `('storage', torch.<X>Storage, key, location, numel)` whose
little-endian bytes are the member `<dir>/data/<key>` (`numel` counts elements).

`read_torch_checkpoint(path)` unpickles such a file with an unpickler whose `find_class` resolves
only `torch._utils._rebuild_tensor_v2`, `collections.OrderedDict` and the typed storage names,
each to a stand-in of ours (nothing of torch is imported). Any other global is refused before
anything is called (`UnsafePickleError`, naming the global and the file), so a malicious file
cannot run code. Tensors come back as C-contiguous numpy arrays (offset, size and stride
honoured, 0-d tensors included). `read_args(path)` reads a pickled `argparse.Namespace`, the
only global it allows.
"""
import argparse
import collections
import io
import math
import os
import pickle
import zipfile
import zlib
from typing import Any, Dict, Mapping, Tuple

import numpy as np


class OfficialCheckpointError(ValueError):
  """A published checkpoint or args file that cannot be read or converted (the message says why)."""


class UnsafePickleError(pickle.UnpicklingError):
  """A pickle asked for a global outside the allowed set; nothing of it was called."""


# ----------------------------------------------------------------------------------------------
# Restricted unpickling
# ----------------------------------------------------------------------------------------------

# torch storage type name -> numpy dtype of its elements (little-endian in the file).
_STORAGE_DTYPES = {
    'FloatStorage': '<f4', 'DoubleStorage': '<f8', 'HalfStorage': '<f2',
    'BFloat16Storage': 'bfloat16', 'LongStorage': '<i8', 'IntStorage': '<i4',
    'ShortStorage': '<i2', 'CharStorage': 'i1', 'ByteStorage': 'u1', 'BoolStorage': '?',
    'ComplexFloatStorage': '<c8', 'ComplexDoubleStorage': '<c16',
}


def _storage_dtype(name: str) -> np.dtype:
  spec = _STORAGE_DTYPES[name]
  if spec == 'bfloat16':
    import ml_dtypes  # a jax dependency; imported only when a bfloat16 storage appears
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(spec)


class _Frozen:
  """Base of the stand-ins: no `__dict__`, no attribute assignment (so pickle BUILD fails)."""
  __slots__ = ()

  def __setattr__(self, name, value):
    raise UnsafePickleError(f'refusing to modify {type(self).__name__}.{name} from a pickle')


class _StorageType(_Frozen):
  """Stand-in for `torch.<X>Storage` (the class object named in a persistent id)."""
  __slots__ = ('name',)

  def __init__(self, name: str):
    object.__setattr__(self, 'name', name)

  def __repr__(self):
    return f'torch.{self.name}'


class _Storage(_Frozen):
  """Stand-in for a storage: a flat read-only numpy array of its elements."""
  __slots__ = ('array', 'key')

  def __init__(self, array: np.ndarray, key: str):
    object.__setattr__(self, 'array', array)
    object.__setattr__(self, 'key', key)


_MAX_ELEMENTS = 1 << 32  # refuse absurd tensor sizes (a stride-0 size bomb) before allocating


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None) -> np.ndarray:
  """Stand-in for `torch._utils._rebuild_tensor_v2`: a numpy copy of the strided view."""
  if not isinstance(storage, _Storage):
    raise UnsafePickleError(f'_rebuild_tensor_v2: expected a storage, got {type(storage).__name__}')
  size, stride = tuple(size), tuple(stride)
  if (not _is_int(storage_offset) or storage_offset < 0 or len(size) != len(stride)
      or not all(_is_int(s) and s >= 0 for s in size)
      or not all(_is_int(s) and s >= 0 for s in stride)):
    raise pickle.UnpicklingError(f'_rebuild_tensor_v2: bad geometry offset={storage_offset!r} '
                                 f'size={size!r} stride={stride!r} (storage {storage.key})')
  flat = storage.array
  if math.prod(size) > _MAX_ELEMENTS:
    raise pickle.UnpicklingError(f'_rebuild_tensor_v2: tensor of size {size} is implausibly large')
  if 0 in size:
    return np.zeros(size, flat.dtype)
  last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= flat.size:
    raise pickle.UnpicklingError(
        f'_rebuild_tensor_v2: tensor of size {size}, stride {stride}, offset {storage_offset} '
        f'reaches element {last} of storage {storage.key}, which holds {flat.size}')
  view = np.lib.stride_tricks.as_strided(flat[storage_offset:], size,
                                         tuple(s * flat.itemsize for s in stride),
                                         writeable=False)
  return np.array(view, dtype=flat.dtype.newbyteorder('='), order='C')


class _RestrictedUnpickler(pickle.Unpickler):
  """`pickle.Unpickler` that resolves only whitelisted globals, to our own stand-ins."""

  def __init__(self, data: bytes, source: str, allowed: Mapping[Tuple[str, str], Any],
               storage_loader=None):
    super().__init__(io.BytesIO(data))
    self._source = source
    self._allowed = allowed
    self._storage_loader = storage_loader

  def find_class(self, module: str, name: str) -> Any:
    target = self._allowed.get((module, name))
    if target is None:
      raise UnsafePickleError(
          f'{self._source}: refusing to load global {module}.{name}: it is not one of the '
          f'{len(self._allowed)} globals a checkpoint of this kind needs '
          f'({", ".join(sorted(m + "." + n for m, n in self._allowed))}); the file may be '
          f'malicious or not a plain checkpoint')
    return target

  def persistent_load(self, pid: Any) -> Any:
    if self._storage_loader is None:
      raise UnsafePickleError(f'{self._source}: unexpected persistent id {pid!r}')
    return self._storage_loader(pid)


_CHECKPOINT_GLOBALS: Dict[Tuple[str, str], Any] = {
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    **{('torch', n): _StorageType(n) for n in _STORAGE_DTYPES},  # immutable, shareable
}
_ARGS_GLOBALS: Dict[Tuple[str, str], Any] = {('argparse', 'Namespace'): argparse.Namespace}


def _zip_read(zf: zipfile.ZipFile, member: str, path: str) -> bytes:
  try:
    return zf.read(member)
  except KeyError:
    raise OfficialCheckpointError(f'{path}: the archive has no member {member!r}') from None
  except (zipfile.BadZipFile, EOFError, zlib.error, OSError, ValueError) as e:
    raise OfficialCheckpointError(f'{path}: cannot read member {member!r} '
                                  f'(truncated or corrupt archive?): {e}') from None


def read_torch_checkpoint(path: str) -> Any:
  """Unpickles a `torch.save` zip without torch; tensors come back as numpy arrays.

  Raises `OfficialCheckpointError` (naming the file) for anything that is not a readable zip
  with one `<dir>/data.pkl`, and `UnsafePickleError` for a pickle that names a global outside
  the allowed set.
  """
  path = os.fspath(path)
  try:
    zf = zipfile.ZipFile(path)
  except FileNotFoundError:
    raise OfficialCheckpointError(f'{path}: no such file') from None
  except (zipfile.BadZipFile, EOFError, OSError) as e:
    raise OfficialCheckpointError(
        f'{path}: not a readable zip archive ({e}); torch.save files are zips since PyTorch 1.6 '
        f'(the older tar/pickle format is not supported), or the file is truncated') from None
  with zf:
    pkls = [n for n in zf.namelist() if n.endswith('/data.pkl')]
    if len(pkls) != 1:
      raise OfficialCheckpointError(f'{path}: expected exactly one member ending in '
                                    f'"/data.pkl", found {pkls}')
    prefix = pkls[0][:-len('data.pkl')]
    big_endian = False
    if prefix + 'byteorder' in zf.namelist():
      order = _zip_read(zf, prefix + 'byteorder', path).decode('ascii', 'replace').strip()
      if order not in ('little', 'big'):
        raise OfficialCheckpointError(f'{path}: unknown byteorder {order!r}')
      big_endian = order == 'big'
    cache: Dict[str, _Storage] = {}

    def load_storage(pid: Any) -> _Storage:
      if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'):
        raise UnsafePickleError(f'{path}: unexpected persistent id {pid!r}')
      _, stype, key, _location, numel = pid
      if not isinstance(stype, _StorageType) or not isinstance(key, str) or not _is_int(numel):
        raise UnsafePickleError(f'{path}: malformed storage id {pid!r}')
      dtype = _storage_dtype(stype.name)
      if big_endian:
        dtype = dtype.newbyteorder('>')
      if key in cache:
        if cache[key].array.dtype != dtype:
          raise OfficialCheckpointError(f'{path}: storage {key} used with two dtypes')
        return cache[key]
      raw = _zip_read(zf, f'{prefix}data/{key}', path)
      if len(raw) != numel * dtype.itemsize:
        raise OfficialCheckpointError(
            f'{path}: storage {prefix}data/{key} holds {len(raw)} bytes, expected {numel} '
            f'elements of {dtype} = {numel * dtype.itemsize} bytes')
      cache[key] = _Storage(np.frombuffer(raw, dtype), key)
      return cache[key]

    data = _zip_read(zf, pkls[0], path)
    try:
      return _RestrictedUnpickler(data, f'{path}:{pkls[0]}', _CHECKPOINT_GLOBALS,
                                  load_storage).load()
    except (UnsafePickleError, OfficialCheckpointError):
      raise
    except Exception as e:  # malformed pickle stream
      raise OfficialCheckpointError(f'{path}: cannot unpickle {pkls[0]}: '
                                    f'{type(e).__name__}: {e}') from None


def read_args(path: str) -> argparse.Namespace:
  """Reads the training command line `args.pickle` (only `argparse.Namespace` is allowed)."""
  path = os.fspath(path)
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise OfficialCheckpointError(f'{path}: cannot read: {e}') from None
  try:
    args = _RestrictedUnpickler(data, path, _ARGS_GLOBALS).load()
  except UnsafePickleError:
    raise
  except Exception as e:
    raise OfficialCheckpointError(f'{path}: cannot unpickle: {type(e).__name__}: {e}') from None
  if not isinstance(args, argparse.Namespace):
    raise OfficialCheckpointError(f'{path}: expected a pickled argparse.Namespace, got '
                                  f'{type(args).__name__}')
  return args
