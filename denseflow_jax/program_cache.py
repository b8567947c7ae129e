"""The training loop's programs, saved with `jax.export` so that a restart skips their trace.

JAX's persistent compilation cache (`model.enable_compilation_cache`) saves the compiled
programs, but finding one there needs the program's StableHLO, i.e. a Python trace and
lowering of the model: 5-8 s for the tiny model's train step on 2 CPU cores, most of a warm
start. `Program.load_or_export` keeps the lowered program itself (`jax.export`, serialised)
next to that cache, under `<cache dir>/exported/`, and a later process with the same program
deserialises it instead of tracing.

One path, cache or not: every program is exported first and compiled from its export
(`jax.jit(exported.call)`), so a run that traced and a run that loaded compile the same
module and give the same bits. Without a persistent cache directory nothing is written.

A saved program is found by a key over everything its trace depends on: the caller's key
(the config, the steps per epoch, test hooks), the argument structure, shapes, dtypes and
shardings, the devices (platform, kind, count, processes), the compile options and donation,
`XLA_FLAGS`, the versions of jax, jaxlib, flax, optax and numpy, and a hash of every source
file of the `denseflow_jax` package. A file that cannot be read is reported, ignored and
replaced. Several processes (hosts) never share a file: with more than one process the
programs are exported but not saved. The files hold pickled pytree structures: keep the cache
directory as private as the code you run (as JAX's own cache, whose programs run as they are).
"""
import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import os
import pickle
import tempfile
from typing import Any, Callable, Dict, Optional, Sequence

from absl import logging
import jax
from jax import export

PyTree = Any
FORMAT = 1
_SUFFIX = '.jaxexport'


@functools.lru_cache(maxsize=1)
def source_fingerprint() -> str:
  """sha256 of every `.py` file of the `denseflow_jax` package (paths and contents)."""
  root = os.path.dirname(os.path.abspath(__file__))
  digest = hashlib.sha256()
  for folder, dirs, files in os.walk(root):
    dirs.sort()
    for name in sorted(files):
      if name.endswith('.py'):
        path = os.path.join(folder, name)
        digest.update(os.path.relpath(path, root).encode())
        with open(path, 'rb') as f:
          digest.update(hashlib.sha256(f.read()).digest())
  return digest.hexdigest()


def _versions() -> Dict[str, str]:
  out = {}
  for name in ('jax', 'jaxlib', 'flax', 'optax', 'numpy'):
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = ''
  return out


def directory() -> Optional[str]:
  """`<persistent compilation cache>/exported`, or None when that cache is off."""
  cache = jax.config.jax_compilation_cache_dir
  if not cache or not jax.config.jax_enable_compilation_cache or jax.process_count() > 1:
    return None
  return os.path.join(cache, 'exported')


def _spec(leaf) -> str:
  return f'{tuple(leaf.shape)}:{leaf.dtype}:{getattr(leaf, "sharding", None)}'


@dataclasses.dataclass
class Program:
  """A jitted function's export for given arguments; `compile()` gives the callable.

  `args`: the arguments it is compiled for (pytrees of `jax.ShapeDtypeStruct` with their
  shardings); `out_info`: the output structure (a pytree of `jax.ShapeDtypeStruct`);
  `loaded`: whether it came from disk (no trace).
  """
  exported: export.Exported
  mesh: jax.sharding.Mesh
  args: Sequence[PyTree]
  donate_argnums: Sequence[int]
  compiler_options: Optional[Dict[str, Any]]
  loaded: bool

  @property
  def out_info(self) -> PyTree:
    shardings = self.exported.out_shardings_jax(self.mesh)
    leaves = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
              for a, s in zip(self.exported.out_avals, shardings)]
    return jax.tree.unflatten(self.exported.out_tree, leaves)

  def compile(self) -> Callable[..., PyTree]:
    """The compiled program (through the persistent compilation cache when it is on)."""
    jitted = jax.jit(self.exported.call, donate_argnums=tuple(self.donate_argnums),
                     compiler_options=self.compiler_options)
    return jitted.lower(*self.args).compile()

  @classmethod
  def load_or_export(cls, jitted: Callable, args: Sequence[PyTree], *, name: str,
                     key: Dict[str, Any], mesh: jax.sharding.Mesh, donate_argnums: Sequence[int] = (),
                     compiler_options: Optional[Dict[str, Any]] = None) -> 'Program':
    """The program of `jitted(*args)` (`args`: pytrees of `jax.ShapeDtypeStruct` with
    shardings on `mesh`), loaded from the saved exports when one has the same key, else exported (and
    saved when the persistent cache is on). `donate_argnums` and `compiler_options` must be
    `jitted`'s own (they are applied again when compiling the export)."""
    leaves, in_tree = jax.tree.flatten(tuple(args))
    material = json.dumps({
        'format': FORMAT, 'name': name, 'key': key, 'in_tree': str(in_tree),
        'leaves': [_spec(leaf) for leaf in leaves], 'donate': list(donate_argnums),
        'options': compiler_options or {}, 'devices': [str(d.device_kind) for d in jax.devices()],
        'platform': jax.default_backend(), 'mesh': str(mesh), 'processes': jax.process_count(),
        'partitionable': bool(jax.config.jax_threefry_partitionable),
        'xla_flags': os.environ.get('XLA_FLAGS', ''), 'versions': _versions(),
        'source': source_fingerprint()}, sort_keys=True, default=str)
    digest = hashlib.sha256(material.encode()).hexdigest()[:40]
    folder = directory()
    path = os.path.join(folder, f'{name}-{digest}{_SUFFIX}') if folder else None
    if path and os.path.isfile(path):
      try:
        exported = _read(path)
        logging.info('%s: loaded its saved export (%s)', name, path)
        return cls(exported, mesh, tuple(args), donate_argnums, compiler_options, loaded=True)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('%s: cannot read %s (%s: %s); exporting it again', name, path,
                        type(e).__name__, e)
    exported = export.export(jitted)(*args)
    if path:
      try:
        _write(path, exported)
      except OSError as e:
        logging.warning('%s: cannot save its export to %s (%s)', name, path, e)
    return cls(exported, mesh, tuple(args), donate_argnums, compiler_options, loaded=False)


def _read(path: str) -> export.Exported:
  with open(path, 'rb') as f:
    stored = pickle.load(f)
  if stored.get('format') != FORMAT:
    raise ValueError(f'format {stored.get("format")}, expected {FORMAT}')
  exported = export.deserialize(bytearray(stored['exported']))
  return dataclasses.replace(exported, in_tree=stored['in_tree'], out_tree=stored['out_tree'])


def _write(path: str, exported: export.Exported) -> None:
  """Atomically (a temporary file renamed into place)."""
  # Serialised with flat argument and result trees: the project's pytree nodes (TrainState,
  # optax states) need no registration for `jax.export`; the trees are pickled beside it.
  flat = lambda tree: jax.tree.structure([0] * tree.num_leaves)
  serialised = dataclasses.replace(exported, in_tree=flat(exported.in_tree),
                                   out_tree=flat(exported.out_tree)).serialize()
  blob = pickle.dumps({'format': FORMAT, 'exported': bytes(serialised),
                       'in_tree': exported.in_tree, 'out_tree': exported.out_tree})
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(blob)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
