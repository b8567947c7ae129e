"""Reading `torch.save` files without torch: a restricted unpickler producing numpy arrays.

Two formats are read:
- **zip** (PyTorch >= 1.6): `<dir>/data.pkl` is a pickle of the saved object in which every
  tensor is `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` and every
  storage a persistent id `('storage', torch.<X>Storage, key, location, numel)` whose
  little-endian bytes are the member `<dir>/data/<key>` (`numel` counts elements).
- **legacy** (older PyTorch; some published weight files): one file of consecutive pickles:
  a magic number, the protocol version 1001, a dict of system info (byte order), the saved
  object (storages as persistent ids `('storage', torch.<X>Storage, key, location, numel,
  view)`), the list of storage keys; then each storage's bytes in that order, every one
  preceded by its element count as an int64.

`read_torch_checkpoint(path)` unpickles either with an unpickler whose `find_class` resolves
only `torch._utils._rebuild_tensor_v2` (and the older `_rebuild_tensor`),
`collections.OrderedDict` and the typed storage names, each to a stand-in of ours (nothing of
torch is imported). Any other global is refused before anything is called
(`UnsafePickleError`, naming the global and the file), so a malicious file cannot run code.

Nothing is inflated or allocated before it is checked: unpickling only records each tensor's
geometry, which must lie inside its storage's declared size; the storages' declared sizes must
match what the file holds (zip member sizes, legacy element counts and the bytes left); and the
bytes of all storages plus all tensors built from them must stay under `max_bytes` (default
`DEFAULT_MAX_BYTES`), which stops stride-0 "size bombs" and over-compressed members. Tensors
come back as C-contiguous numpy arrays (offset, size and stride honoured, 0-d tensors
included). `read_args(path)` reads a pickled `argparse.Namespace`, the only global it allows.
"""
import argparse
import collections
import io
import math
import os
import pickle
import struct
import zipfile
import zlib
from typing import Any, BinaryIO, Dict, Mapping, Optional, Tuple

import numpy as np


class OfficialCheckpointError(ValueError):
  """A published checkpoint or args file that cannot be read or converted (the message says why)."""


class UnsafePickleError(pickle.UnpicklingError):
  """A pickle asked for a global outside the allowed set; nothing of it was called."""


# The most bytes one file may make us hold: its storages plus the tensors built from them.
DEFAULT_MAX_BYTES = 4 << 30
# torch.save stores zip members uncompressed; a member that inflates more than this (a re-zipped
# file of real weights compresses ~1.1:1) is refused before it is read.
_MAX_COMPRESSION_RATIO = 20
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001

# torch storage type name -> numpy dtype of its elements (little-endian in the file).
_STORAGE_DTYPES = {
    'FloatStorage': '<f4', 'DoubleStorage': '<f8', 'HalfStorage': '<f2',
    'BFloat16Storage': 'bfloat16', 'LongStorage': '<i8', 'IntStorage': '<i4',
    'ShortStorage': '<i2', 'CharStorage': 'i1', 'ByteStorage': 'u1', 'BoolStorage': '?',
    'ComplexFloatStorage': '<c8', 'ComplexDoubleStorage': '<c16',
}


def _storage_dtype(name: str, big_endian: bool = False) -> np.dtype:
  spec = _STORAGE_DTYPES[name]
  if spec == 'bfloat16':
    import ml_dtypes  # a jax dependency; imported only when a bfloat16 storage appears
    dtype = np.dtype(ml_dtypes.bfloat16)
  else:
    dtype = np.dtype(spec)
  return dtype.newbyteorder('>') if big_endian and dtype.itemsize > 1 else dtype


def _gib(nbytes: int) -> str:
  return f'{nbytes / 2**30:.2f} GiB'


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


class _StorageRef(_Frozen):
  """A storage named by a persistent id: `numel` elements of `dtype` starting at element
  `base_offset` of the file's storage `root` (a legacy view; 0 otherwise)."""
  __slots__ = ('key', 'root', 'base_offset', 'dtype', 'numel')

  def __init__(self, key: str, root: str, base_offset: int, dtype: np.dtype, numel: int):
    for name, value in (('key', key), ('root', root), ('base_offset', base_offset),
                        ('dtype', dtype), ('numel', numel)):
      object.__setattr__(self, name, value)


class _LazyTensor(_Frozen):
  """A tensor whose geometry has been checked and whose data is read after unpickling."""
  __slots__ = ('storage', 'offset', 'size', 'stride')

  def __init__(self, storage: _StorageRef, offset: int, size: Tuple[int, ...],
               stride: Tuple[int, ...]):
    for name, value in (('storage', storage), ('offset', offset), ('size', size),
                        ('stride', stride)):
      object.__setattr__(self, name, value)


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


class _Budget:
  """Counts the bytes a file makes us hold; raises once they pass `max_bytes`."""

  def __init__(self, path: str, max_bytes: int):
    self.path, self.max_bytes, self.used = path, max_bytes, 0

  def take(self, nbytes: int, what: str) -> None:
    self.used += nbytes
    if self.used > self.max_bytes:
      raise OfficialCheckpointError(
          f'{self.path}: {what} needs {_gib(nbytes)}, which brings the file to {_gib(self.used)}, '
          f'over the limit of {_gib(self.max_bytes)} (max_bytes); the file is malformed or '
          f'malicious, or pass a larger max_bytes')


class _Unpickler(pickle.Unpickler):
  """`pickle.Unpickler` that resolves only whitelisted globals, to our own stand-ins.

  With a `storage_ref` callback (checkpoint files), persistent ids become `_StorageRef`s and
  `_rebuild_tensor(_v2)` calls become checked `_LazyTensor`s; tensor bytes count in `budget`.
  """

  def __init__(self, stream: BinaryIO, source: str, allowed: Mapping[Tuple[str, str], Any],
               storage_ref=None, budget: Optional[_Budget] = None):
    super().__init__(stream)
    self._source = source
    self._allowed = allowed
    self._storage_ref = storage_ref
    self._budget = budget

  def find_class(self, module: str, name: str) -> Any:
    target = self._allowed.get((module, name))
    if target is None:
      raise UnsafePickleError(
          f'{self._source}: refusing to load global {module}.{name}: it is not one of the '
          f'{len(self._allowed)} globals a checkpoint of this kind needs '
          f'({", ".join(sorted(m + "." + n for m, n in self._allowed))}); the file may be '
          f'malicious or not a plain checkpoint')
    if target is _REBUILD:
      return self._rebuild_tensor
    return target

  def persistent_load(self, pid: Any) -> Any:
    if self._storage_ref is None:
      raise UnsafePickleError(f'{self._source}: unexpected persistent id {pid!r}')
    return self._storage_ref(pid)

  def _rebuild_tensor(self, storage, storage_offset, size, stride, *unused) -> _LazyTensor:
    """Stand-in for `torch._utils._rebuild_tensor(_v2)`: checks the geometry, defers the data."""
    if not isinstance(storage, _StorageRef):
      raise UnsafePickleError(f'{self._source}: _rebuild_tensor_v2: expected a storage, got '
                              f'{type(storage).__name__}')
    if not isinstance(size, (tuple, list)) or not isinstance(stride, (tuple, list)):
      raise pickle.UnpicklingError(f'_rebuild_tensor_v2: bad geometry size={size!r} '
                                   f'stride={stride!r} (storage {storage.key})')
    size, stride = tuple(size), tuple(stride)
    if (not _is_int(storage_offset) or storage_offset < 0 or len(size) != len(stride)
        or not all(_is_int(s) and s >= 0 for s in size)
        or not all(_is_int(s) and s >= 0 for s in stride)):
      raise pickle.UnpicklingError(f'_rebuild_tensor_v2: bad geometry offset={storage_offset!r} '
                                   f'size={size!r} stride={stride!r} (storage {storage.key})')
    if 0 not in size:
      last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
      if last >= storage.numel:
        raise pickle.UnpicklingError(
            f'_rebuild_tensor_v2: tensor of size {size}, stride {stride}, offset '
            f'{storage_offset} reaches element {last} of storage {storage.key}, which holds '
            f'{storage.numel}')
    self._budget.take(math.prod(size) * storage.dtype.itemsize, f'a tensor of size {size}')
    return _LazyTensor(storage, storage_offset, size, stride)


_REBUILD = object()  # marks the tensor-rebuilding globals in the allowed set
_CHECKPOINT_GLOBALS: Dict[Tuple[str, str], Any] = {
    ('torch._utils', '_rebuild_tensor_v2'): _REBUILD,
    ('torch._utils', '_rebuild_tensor'): _REBUILD,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    **{('torch', n): _StorageType(n) for n in _STORAGE_DTYPES},  # immutable, shareable
}
_ARGS_GLOBALS: Dict[Tuple[str, str], Any] = {('argparse', 'Namespace'): argparse.Namespace}


class _StorageTable:
  """The storages named by a file's persistent ids: one root per key, legacy views onto them."""

  def __init__(self, path: str, budget: _Budget, big_endian: bool):
    self.path, self.budget, self.big_endian = path, budget, big_endian
    self.roots: Dict[str, Tuple[np.dtype, int]] = {}  # key -> (dtype, numel), in first-use order
    self.refs: Dict[Tuple[str, Optional[Tuple]], _StorageRef] = {}

  def ref(self, pid: Any) -> _StorageRef:
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == 'storage'):
      raise UnsafePickleError(f'{self.path}: unexpected persistent id {pid!r}')
    stype, key, numel = pid[1], pid[2], pid[4]
    view = pid[5] if len(pid) == 6 else None
    if not isinstance(stype, _StorageType) or not isinstance(key, str) or not _is_int(numel) \
        or numel < 0:
      raise UnsafePickleError(f'{self.path}: malformed storage id {pid!r}')
    dtype = _storage_dtype(stype.name, self.big_endian)
    if key in self.roots:
      if self.roots[key] != (dtype, numel):
        raise OfficialCheckpointError(f'{self.path}: storage {key} used with two dtypes or sizes')
    else:
      self.budget.take(numel * dtype.itemsize, f'storage {key} ({numel} x {dtype})')
      self.roots[key] = (dtype, numel)
    ref_key = (key, view)
    if ref_key not in self.refs:
      if view is None:
        self.refs[ref_key] = _StorageRef(key, key, 0, dtype, numel)
      else:  # legacy storage view: (view_key, offset, view_numel) into the root storage
        if not (isinstance(view, tuple) and len(view) == 3 and isinstance(view[0], str)
                and _is_int(view[1]) and _is_int(view[2]) and view[1] >= 0 and view[2] >= 0
                and view[1] + view[2] <= numel):
          raise UnsafePickleError(f'{self.path}: malformed storage view {pid!r}')
        self.refs[ref_key] = _StorageRef(view[0], key, view[1], dtype, view[2])
    return self.refs[ref_key]


def _materialize(obj: Any, arrays: Mapping[str, np.ndarray]) -> Any:
  """`obj` with every `_LazyTensor` replaced by a C-contiguous numpy copy of its view."""
  if isinstance(obj, _LazyTensor):
    ref = obj.storage
    flat = arrays[ref.root][ref.base_offset:ref.base_offset + ref.numel]
    if 0 in obj.size:
      return np.zeros(obj.size, flat.dtype.newbyteorder('='))
    view = np.lib.stride_tricks.as_strided(flat[obj.offset:], obj.size,
                                           tuple(s * flat.itemsize for s in obj.stride),
                                           writeable=False)
    return np.array(view, dtype=flat.dtype.newbyteorder('='), order='C')
  if isinstance(obj, dict):
    return type(obj)((k, _materialize(v, arrays)) for k, v in obj.items())
  if isinstance(obj, list):
    return [_materialize(v, arrays) for v in obj]
  if isinstance(obj, tuple):
    return tuple(_materialize(v, arrays) for v in obj)
  return obj


def _unpickle(stream: BinaryIO, source: str, path: str, table: _StorageTable) -> Any:
  try:
    return _Unpickler(stream, source, _CHECKPOINT_GLOBALS, table.ref, table.budget).load()
  except (UnsafePickleError, OfficialCheckpointError):
    raise
  except Exception as e:  # malformed pickle stream
    raise OfficialCheckpointError(f'{path}: cannot unpickle {source}: '
                                  f'{type(e).__name__}: {e}') from None


def _zip_member(zf: zipfile.ZipFile, member: str, path: str,
                expected_bytes: Optional[int] = None) -> bytes:
  """Reads a zip member after checking its stored size (and how much it inflates)."""
  try:
    info = zf.getinfo(member)
  except KeyError:
    raise OfficialCheckpointError(f'{path}: the archive has no member {member!r}') from None
  if expected_bytes is not None:
    if info.file_size != expected_bytes:
      raise OfficialCheckpointError(
          f'{path}: storage {member} holds {info.file_size} bytes, expected {expected_bytes}')
    if (info.compress_type != zipfile.ZIP_STORED and info.file_size > (1 << 20)
        and info.file_size > _MAX_COMPRESSION_RATIO * max(info.compress_size, 1)):
      raise OfficialCheckpointError(
          f'{path}: storage {member} would inflate from {info.compress_size} to '
          f'{info.file_size} bytes, more than {_MAX_COMPRESSION_RATIO}:1 (torch.save does not '
          f'compress); refusing a likely zip bomb')
  try:
    return zf.read(member)
  except (zipfile.BadZipFile, EOFError, zlib.error, OSError, ValueError) as e:
    raise OfficialCheckpointError(f'{path}: cannot read member {member!r} '
                                  f'(truncated or corrupt archive?): {e}') from None


def _read_zip(zf: zipfile.ZipFile, path: str, max_bytes: int) -> Any:
  pkls = [n for n in zf.namelist() if n.endswith('/data.pkl')]
  if len(pkls) != 1:
    raise OfficialCheckpointError(f'{path}: expected exactly one member ending in '
                                  f'"/data.pkl", found {pkls}')
  prefix = pkls[0][:-len('data.pkl')]
  big_endian = False
  if prefix + 'byteorder' in zf.namelist():
    order = _zip_member(zf, prefix + 'byteorder', path).decode('ascii', 'replace').strip()
    if order not in ('little', 'big'):
      raise OfficialCheckpointError(f'{path}: unknown byteorder {order!r}')
    big_endian = order == 'big'
  table = _StorageTable(path, _Budget(path, max_bytes), big_endian)
  pkl = _zip_member(zf, pkls[0], path)
  obj = _unpickle(io.BytesIO(pkl), f'{path}:{pkls[0]}', path, table)
  arrays = {}
  for key, (dtype, numel) in table.roots.items():
    raw = _zip_member(zf, f'{prefix}data/{key}', path, numel * dtype.itemsize)
    arrays[key] = np.frombuffer(raw, dtype)
  return _materialize(obj, arrays)


def _read_legacy(f: BinaryIO, path: str, max_bytes: int) -> Any:
  header = _Unpickler(f, path, {})
  try:
    magic, protocol, info = header.load(), _Unpickler(f, path, {}).load(), \
        _Unpickler(f, path, {}).load()
  except UnsafePickleError:
    raise
  except Exception as e:
    raise OfficialCheckpointError(f'{path}: not a torch.save file: neither a zip archive nor the '
                                  f'legacy format ({type(e).__name__}: {e})') from None
  if magic != _LEGACY_MAGIC:
    raise OfficialCheckpointError(f'{path}: not a torch.save file: neither a zip archive nor the '
                                  f'legacy format (which starts with the magic number '
                                  f'{_LEGACY_MAGIC:#x}, found {magic!r:.40})')
  if protocol != _LEGACY_PROTOCOL:
    raise OfficialCheckpointError(f'{path}: legacy torch.save protocol {protocol!r}, only '
                                  f'{_LEGACY_PROTOCOL} is known')
  if not isinstance(info, dict) or not isinstance(info.get('little_endian', True), bool):
    raise OfficialCheckpointError(f'{path}: malformed legacy system info {info!r:.80}')
  table = _StorageTable(path, _Budget(path, max_bytes), not info.get('little_endian', True))
  obj = _unpickle(f, f'{path} (legacy format)', path, table)
  try:
    keys = _Unpickler(f, path, {}).load()
  except UnsafePickleError:
    raise
  except Exception as e:
    raise OfficialCheckpointError(f'{path}: truncated legacy file: no storage key list '
                                  f'({type(e).__name__}: {e})') from None
  if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) \
      or len(set(keys)) != len(keys):
    raise OfficialCheckpointError(f'{path}: malformed legacy storage key list {keys!r:.80}')
  missing = set(table.roots) - set(keys)
  if missing:
    raise OfficialCheckpointError(f'{path}: storages {sorted(missing)} are used but not stored')
  left = os.fstat(f.fileno()).st_size - f.tell()
  arrays = {}
  for key in keys:
    if key not in table.roots:
      raise OfficialCheckpointError(f'{path}: stores storage {key}, which no tensor uses')
    dtype, numel = table.roots[key]
    count = f.read(8)
    if len(count) != 8:
      raise OfficialCheckpointError(f'{path}: truncated before the data of storage {key}')
    (stored,) = struct.unpack('<q' if not table.big_endian else '>q', count)
    nbytes = numel * dtype.itemsize
    left -= 8
    if stored != numel or nbytes > left:
      raise OfficialCheckpointError(
          f'{path}: storage {key} declares {numel} elements of {dtype}; the file holds '
          f'{stored} elements and {left} bytes are left')
    raw = f.read(nbytes)
    if len(raw) != nbytes:
      raise OfficialCheckpointError(f'{path}: truncated inside the data of storage {key}')
    left -= nbytes
    arrays[key] = np.frombuffer(raw, dtype)
  return _materialize(obj, arrays)


def read_torch_checkpoint(path: str, max_bytes: int = DEFAULT_MAX_BYTES) -> Any:
  """Unpickles a `torch.save` file (zip or legacy format) without torch; tensors as numpy.

  Raises `OfficialCheckpointError` (naming the file) for anything that is not a readable
  torch.save file of either format, for sizes that do not match the file, and for files whose
  storages and tensors would need more than `max_bytes`; `UnsafePickleError` for a pickle that
  names a global outside the allowed set.
  """
  path = os.fspath(path)
  try:
    f = open(path, 'rb')
  except FileNotFoundError:
    raise OfficialCheckpointError(f'{path}: no such file') from None
  except OSError as e:
    raise OfficialCheckpointError(f'{path}: cannot open: {e.strerror or e}') from None
  with f:
    head = f.read(4)
    f.seek(0)
    if head.startswith(b'PK'):
      try:
        zf = zipfile.ZipFile(f)
      except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise OfficialCheckpointError(f'{path}: a truncated or corrupt zip archive ({e})') from None
      with zf:
        return _read_zip(zf, path, max_bytes)
    if head[:1] == b'\x80':  # a pickle protocol opcode: the legacy format
      return _read_legacy(f, path, max_bytes)
    raise OfficialCheckpointError(
        f'{path}: not a torch.save file (neither a zip archive nor the legacy pickle format)'
        + (', or an empty file' if not head else ''))


def read_args(path: str) -> argparse.Namespace:
  """Reads the training command line `args.pickle` (only `argparse.Namespace` is allowed)."""
  path = os.fspath(path)
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise OfficialCheckpointError(f'{path}: cannot read: {e}') from None
  try:
    args = _Unpickler(io.BytesIO(data), path, _ARGS_GLOBALS).load()
  except UnsafePickleError:
    raise
  except Exception as e:
    raise OfficialCheckpointError(f'{path}: cannot unpickle: {type(e).__name__}: {e}') from None
  if not isinstance(args, argparse.Namespace):
    raise OfficialCheckpointError(f'{path}: expected a pickled argparse.Namespace, got '
                                  f'{type(args).__name__}')
  return args
