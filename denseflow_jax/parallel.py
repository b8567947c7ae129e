"""Data parallelism: a 1-D device mesh, sharded batches, compiled-once model helpers.

One code path for 1 device, N devices and several hosts: every device of every process sits
on a 1-D `jax.sharding.Mesh` with the axis `'data'`; batches are sharded along it
(`PartitionSpec('data')`) and parameters, optimizer state and BatchNorm statistics are
replicated (`PartitionSpec()`). Functions are compiled with `jax.jit` and these shardings;
the compiler (GSPMD/Shardy, axis type `Auto`) inserts the all-reduces.

Why `jax.jit` + `NamedSharding` rather than `pmap` or `shard_map`:
- The program is written for the *global* batch, so the loss `mean(bpd)` is the global-batch
  mean and its gradient is the global-batch mean gradient with no explicit collective. The
  same holds for statistics computed inside the model: BatchNorm batch statistics (and their
  running averages) and the ActNorm data-dependent init at `model.init` are over the global
  batch, identical to a 1-device run on the same batch (up to float reassociation).
- `pmap` is in maintenance mode in current JAX (the docs recommend `jit` with shardings), needs
  a leading device axis on every array and per-device replicated copies, and computes
  per-device BatchNorm/ActNorm statistics unless every such site gets an explicit `pmean`.
- `shard_map` writes the per-device program: every global reduction must be spelled out
  (`lax.pmean` of the loss *and* of every batch statistic). The classic pitfall: summing
  per-device gradients with `psum` of a per-device *mean* loss multiplies the gradient by the
  device count (the per-device losses are already means); the right reduction is `pmean`
  (or `psum` of per-device *sums* divided by the global batch). With `jit` there is nothing to
  get wrong, and a 1-device run is the same program.

Multi-host: `initialize_distributed` starts `jax.distributed`; each process reads only its
slice of every global batch (`denseflow_jax.data` with `process_index/process_count`) and
`shard_batch` assembles the global array with `jax.make_array_from_process_local_data`
(`prefetch_to_mesh` does it one batch ahead of the training step). The
mesh lists devices sorted by id, so process p's devices hold rows [p B/P, (p+1) B/P) of the
global batch, which is exactly the slice `data.py` gives process p.

PRNG keys may be typed (`jax.random.key`, dtype `key<...>`) or raw `uint32` arrays
(`jax.random.PRNGKey`): `shard_batch`, `replicate`, `to_host` and `ShardedModel` move typed keys
through their `jax.random.key_data` and give back typed keys of the same implementation.
"""
import collections
import itertools
import math
import os
from typing import Any, Dict, Iterable, Iterator, Optional, Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
import numpy as np

from denseflow_jax.config_check import plan_model
from denseflow_jax.model import DenseFlow

DATA_AXIS = 'data'
PyTree = Any


def initialize_distributed(coordinator_address: str = '', num_processes: int = 0,
                           process_id: int = -1, cpu_collectives: str = 'gloo',
                           auto: bool = False) -> bool:
  """Starts multi-host JAX when a coordinator is given (or `auto`); returns True if it did.

  Arguments fall back to the environment variables `JAX_COORDINATOR_ADDRESS` (host:port of
  process 0), `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`. `auto=True` with no coordinator lets
  `jax.distributed.initialize()` detect the cluster (Cloud TPU, SLURM, Open MPI). Otherwise,
  with no coordinator this is a single-process run and nothing happens. On CPU, cross-process
  collectives use `cpu_collectives` ('gloo'; 'mpi' needs an MPI install). Must run before any
  other JAX call.
  """
  address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS', '')
  if not address:
    if not auto:
      return False
    jax.config.update('jax_cpu_collectives_implementation', cpu_collectives)
    jax.distributed.initialize()
    logging.info('jax.distributed (auto-detected): process %d of %d', jax.process_index(),
                 jax.process_count())
    return True
  if num_processes <= 0:
    num_processes = int(os.environ.get('JAX_NUM_PROCESSES', '0'))
  if process_id < 0:
    process_id = int(os.environ.get('JAX_PROCESS_ID', '-1'))
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ValueError(f'multi-host run with coordinator {address!r} needs num_processes >= 1 '
                     f'and 0 <= process_id < num_processes, got num_processes={num_processes}, '
                     f'process_id={process_id} (flags or JAX_NUM_PROCESSES / JAX_PROCESS_ID)')
  jax.config.update('jax_cpu_collectives_implementation', cpu_collectives)
  jax.distributed.initialize(address, num_processes, process_id)
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices', process_id,
               num_processes, jax.local_device_count(), jax.device_count())
  return True


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh with axis 'data' over `devices` (default: all global devices, sorted by id)."""
  devices = list(jax.devices() if devices is None else devices)
  devices.sort(key=lambda d: (d.process_index, d.id))
  return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data', the other axes whole."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """A full copy on every device."""
  return NamedSharding(mesh, PartitionSpec())


def check_divisible(global_batch: int, mesh: Mesh, what: str = 'batch size') -> None:
  """Raises ValueError unless `global_batch` splits evenly over the mesh's devices."""
  n = mesh.devices.size
  if global_batch <= 0 or global_batch % n:
    raise ValueError(f'{what} {global_batch} is not divisible by the device count {n} '
                     f'(every device needs the same number of examples)')


def _is_typed_key(x: Any) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _through_key_data(fn, x: Any) -> Any:
  """`fn(x)`, or for a typed key `wrap_key_data(fn(key_data(x)))` with the same key impl."""
  if _is_typed_key(x):
    return jax.random.wrap_key_data(fn(jax.random.key_data(x)), impl=jax.random.key_impl(x))
  return fn(x)


def shard_batch(local_batch: Any, mesh: Mesh) -> Any:
  """This process's rows (numpy, leading axis B/P) -> global jax.Array(s) sharded on 'data'.

  Works on a single array or a pytree of arrays with the same leading axis.
  """
  sharding = batch_sharding(mesh)
  local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)

  def put(x):
    x = np.asarray(x)
    if x.shape[0] % local_devices:
      raise ValueError(f'per-process batch {x.shape[0]} is not divisible by the '
                       f'{local_devices} local devices')
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree.map(lambda x: _through_key_data(put, x), local_batch)


def prefetch_to_mesh(batches: Iterable[Any], mesh: Mesh, ahead: int = 1) -> Iterator[Any]:
  """`shard_batch(b, mesh)` for every `b` of `batches`, placed `ahead` batches in advance.

  Batch i + ahead is handed to the devices (`shard_batch`, an asynchronous host-to-device copy)
  just before batch i is yielded, so in a loop that dispatches an asynchronous step on each
  batch the copy of the next batch runs while the current step does. Reads at most `ahead`
  batches past the last one consumed. `ahead=0`: no prefetching.
  """
  if ahead < 0:
    raise ValueError(f'prefetch_to_mesh: ahead={ahead} must be >= 0')
  source = iter(batches)

  def generate():
    queue = collections.deque(shard_batch(b, mesh) for b in itertools.islice(source, ahead))
    while True:
      for b in itertools.islice(source, 1):
        queue.append(shard_batch(b, mesh))
      if not queue:
        return
      yield queue.popleft()

  return generate()


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Places a pytree (same values on every process) replicated on all devices of the mesh."""
  sharding = replicated_sharding(mesh)

  def put(x):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    return _through_key_data(
        lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a), np.shape(a)), x)

  return jax.tree.map(put, tree)


def to_host(tree: PyTree) -> PyTree:
  """Global arrays -> numpy on every process (all-gathers sharded arrays across hosts).

  numpy has no key dtype: typed keys come back as typed keys on the default device.
  """
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.sharding.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(lambda x: _through_key_data(get, x), tree)


class ShardedModel:
  """Compiled-once, data-parallel evaluation helpers for a `DenseFlow` on a mesh.

  `variables` = {'params', 'batch_stats'} (replicated). Batch inputs are global arrays or
  this process's numpy rows (then sharded with `shard_batch`); outputs are global arrays
  sharded on 'data' (`to_host` fetches them). Every jitted function is built once per
  instance and compiled once per input shape. All use evaluation-mode BatchNorm.
  """

  def __init__(self, model: DenseFlow, mesh: Mesh):
    self.model, self.mesh = model, mesh
    rep, bat = replicated_sharding(mesh), batch_sharding(mesh)
    self._rep, self._bat = rep, bat

    def log_prob(variables, x, rng):
      return model.apply(variables, x, rngs={'noise': rng}, method=DenseFlow.log_prob)

    def iwbo(variables, x, rng, k, chunk):
      return model.apply(variables, x, k, chunk, rngs={'noise': rng}, method=DenseFlow.iwbo)

    def encode(variables, x, rng):
      return model.apply(variables, x, rngs={'noise': rng}, method=DenseFlow.encode)

    def decode(variables, latents):
      return model.apply(variables, latents, method=DenseFlow.decode)

    def sample(variables, rng, num, temperature):
      return model.apply(variables, num, temperature, rngs={'noise': rng},
                         method=DenseFlow.sample)

    self._log_prob = jax.jit(log_prob, in_shardings=(rep, bat, rep), out_shardings=bat)
    self._iwbo = jax.jit(iwbo, static_argnums=(3, 4), in_shardings=(rep, bat, rep),
                         out_shardings=bat)
    self._encode = jax.jit(encode, in_shardings=(rep, bat, rep), out_shardings=bat)
    self._decode = jax.jit(decode, in_shardings=(rep, bat), out_shardings=bat)
    self._sample = jax.jit(sample, static_argnums=(2, 3), in_shardings=(rep, rep),
                           out_shardings=bat)

  @property
  def num_devices(self) -> int:
    """Devices on the mesh (global)."""
    return self.mesh.devices.size

  def _batch(self, x: Any) -> Any:
    """Global arrays pass through (resharded if needed); anything else is this process's rows."""
    if isinstance(x, jax.Array) and x.sharding == self._bat:
      return x
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.device_put(x, self._bat)
    check_divisible(np.shape(x)[0] * jax.process_count(), self.mesh)
    return shard_batch(np.asarray(x), self.mesh)

  def _key(self, rng: Any) -> jax.Array:
    """A PRNG key (typed, or raw uint32[2]) as a replicated global array (same on every process).

    Typed and raw keys with the same key data give the same draws.
    """
    if isinstance(rng, jax.Array) and rng.sharding == self._rep:
      return rng
    return replicate(rng, self.mesh)

  def variables(self, variables: Dict[str, PyTree]) -> Dict[str, PyTree]:
    """Replicates {'params', 'batch_stats'} over the mesh."""
    return replicate(dict(variables), self.mesh)

  def log_prob(self, variables, x, rng: jax.Array) -> jax.Array:
    """Lower bound on log p(x) in nats, one noise draw: (B,) sharded."""
    return self._log_prob(variables, self._batch(x), self._key(rng))

  def bits_per_dim(self, variables, x, rng: jax.Array) -> jax.Array:
    """-log_prob / (D ln 2): (B,) sharded."""
    d = plan_model(self.model.config).num_dims
    return -self.log_prob(variables, x, rng) / (d * math.log(2.0))

  def iwbo(self, variables, x, rng: jax.Array, k: int, chunk: int = 0) -> jax.Array:
    """Importance-weighted bound with k noise draws, `chunk` at a time: (B,) nats, sharded."""
    return self._iwbo(variables, self._batch(x), self._key(rng), int(k), int(chunk))

  def encode(self, variables, x, rng: jax.Array) -> Dict[str, Any]:
    """Images -> {'z', 'dropped'} latents, sharded on the batch axis."""
    return self._encode(variables, self._batch(x), self._key(rng))

  def decode(self, variables, latents: Dict[str, Any]) -> jax.Array:
    """Latents (global arrays, or this process's rows) -> integer images (B, H, W, C), sharded."""
    return self._decode(variables, jax.tree.map(self._batch, latents))

  def sample(self, variables, rng: jax.Array, num: int, temperature: float = 1.0) -> jax.Array:
    """`num` (global) samples uint8 (num, H, W, C) sharded on 'data'; num % devices == 0."""
    check_divisible(num, self.mesh, 'number of samples')
    return self._sample(variables, self._key(rng), int(num), float(temperature))
