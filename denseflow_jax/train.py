"""Training: the train state, its init, the jitted train step and the loop (`train_and_evaluate`).

The optimizer and learning-rate schedule are in `optim.py`, the evaluation at `eval_every`
steps in `evaluation.py`, the config checks run first in `config_check.py`, the metrics
writer in `metric_writer.py`, what the loop prints in `console.py`.

Workdir layout (see `checkpoint.py` and `artifacts.py`):

  <workdir>/config.json               full config of the run (a different model is refused)
  <workdir>/checkpoints/<step>/       orbax items params/, batch_stats/, training/
  <workdir>/metrics.jsonl             every scalar written: train/test metrics, steps/s (process 0)
  <workdir>/samples/step_<s>.png      sample grid at every evaluation (process 0)
  <workdir>/bpd_curve.png             train and test bits/dim against the step (process 0)
  <workdir>/parameters.txt            the parameter table (process 0)
  <workdir>/events.out.tfevents.*     TensorBoard scalars and sample images (metric_writer, no TensorFlow)

Converted official weights use the same layout with only params/ and batch_stats/ items.

Semantics:
- Loss: mean bits/dim (one dequantization / cross-unit noise draw per example) with
  `train=True` (BatchNorm on batch statistics, running averages updated). The noise key of step
  s is `fold_in(state.rng, s)`; the batch of step s is `Data.train_batches(start_step=s)`'s
  first element. A run resumed from the checkpoint of step k therefore repeats exactly what
  an uninterrupted run does from step k on (bitwise on the same hardware and program).
- Learning rate and optimizer: `optim.py` (warm-up, per-epoch staircase, clipped Adamax; the
  rate is a function of the global step, so a skipped update does not shift the schedule).
- Non-finite loss or gradient: the update is skipped inside the jitted step (params,
  optimizer state and BatchNorm statistics keep their values; the step counter advances to the
  next batch) and `state.nonfinite` counts the skipped steps in a row, on the device. The host
  sees skips only at its check points (next item):
  - Stop: once a run of skipped steps has reached `max_consecutive_nonfinite`, the next check
    point raises `NonFiniteError` (up to `log_every` steps later; the skipped steps in between
    change nothing but the step counter). A run that reached the limit and ended before the
    check point stops training as well.
  - The last finite state is on disk by then, and the error names its checkpoint. A skipped
    update leaves the state as the last finite update made it, so the state at a check point
    inside a run of skipped steps *is* the last finite state (with a later step counter and
    its skip count, so a resume from it goes on exactly as the uninterrupted run would); such
    a check point saves it unless a checkpoint written since that update exists. That is the
    only checkpoint taken from a state whose last step was skipped (at most one per run of
    skipped steps, besides the one of a SIGINT/SIGTERM, which holds the same parameters); the
    other periodic checkpoints during a run of skipped steps are left out. When the run that
    reached the limit has ended before the check point, the state there is finite and is
    saved.
- Check points and host transfers: between check points the loop moves nothing from the
  devices to the host (the next batch goes to the devices while the current step runs,
  `parallel.prefetch_to_mesh`; `STEP_TRANSFER_GUARD` can make a transfer there an error). The
  check points are the log points (every `log_every` steps), the checkpoint points (every
  `checkpoint_every` steps), the last step and a received SIGINT/SIGTERM. There the loop
  fetches, in one transfer, the skip count and the train metrics accumulated on the device
  since the last log point (float32 sums of the loss and gradient norm over the finite steps,
  counts of finite and skipped steps, the last learning rate, the longest run of skipped
  steps). At log points it writes them (`train_bpd`, `grad_norm`: means over the finite steps;
  `skipped_steps`, `learning_rate`, `epoch`, and `steps_per_sec` since the previous log point,
  the first step and its compilation excluded) and starts a new window; the stop for skipped
  steps writes the window it ends. Evaluations at `eval_every` steps and checkpoint saves
  transfer what they need.
- The workdir: a training run holds `<workdir>/train.lock` (`workdir_lock`) from start to end;
  a second run on the same workdir stops at once with `WorkdirLockedError` naming the holder.
  A checkpoint that cannot be written (full disk, I/O or permission error) stops the run with
  `checkpoint.CheckpointWriteError` naming the path and the cause; the previous checkpoints
  stay intact and rerunning resumes from the newest. At the restart, corrupt checkpoints are
  moved aside (see `checkpoint.Checkpoints`); one that does not fit the model, or cannot be
  read for lack of permission, stops the run before anything is written.
- Init: `param_init.initial_variables` on the first training batch: the random parameters
  from one uniform and one normal draw of the run's init key, then `model.init`'s ActNorm
  data-dependent init on that batch (global batch, so the statistics are the same on every
  device and host).
- Programs: the init and the train step are exported and compiled from their export
  (`program_cache`); with the persistent compilation cache on, the export is saved there and a
  restart loads it instead of tracing the model (tiny: the first step 6 s after process start
  instead of 14 s with the compiled programs cached, BENCHMARKS.md).
- Fine-tuning: `config.train.init_from = '<workdir of a trained run>'` loads its newest
  params and BatchNorm statistics (the model config must match), with a fresh optimizer and
  step 0; use with `lr = 2e-5`, `warmup_steps = 0`, `decay_rate = 1.0` (the `finetune`
  variant of the dataset configs, e.g. `--config configs/cifar10.py:finetune`). A restart of
  the fine-tuning run resumes from its own checkpoints.
- SIGINT / SIGTERM: the loop finishes the current step, saves a checkpoint and raises
  `TrainingInterrupted`. On several hosts the processes agree on stopping every `log_every`
  steps (send the signal to all of them).
"""
import contextlib
import functools
import os
import signal
import threading
import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from absl import logging
import flax.struct
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from denseflow_jax import (checkpoint, config_file, console, cpu_tuning, evaluation, optim,
                           param_init, parallel, program_cache)
from denseflow_jax.config_check import validate_config
from denseflow_jax.data import Data, make_data
from denseflow_jax.evaluation import INIT_TAG, TRAIN_TAG, run_key
from denseflow_jax.metrics.progress import format_seconds
from denseflow_jax.model import DenseFlow
from denseflow_jax.optim import (learning_rate_schedule, make_optimizer, num_train_steps,
                                 with_learning_rate)

PyTree = Any


class NonFiniteError(RuntimeError):
  """Too many consecutive steps with a non-finite loss or gradient."""


class TrainingInterrupted(RuntimeError):
  """SIGINT/SIGTERM stopped training after a checkpoint was saved."""


class TrainState(flax.struct.PyTreeNode):
  """Everything that determines the rest of a run.

  step: int32 scalar, steps taken = index of the next training batch.
  params, batch_stats: model variables. opt_state: optax state of the parameters as one vector
  (`optim.init_state`; includes the current lr).
  rng: uint32[2] base key (constant; step s uses `fold_in(rng, s)`).
  nonfinite: int32 scalar, consecutive skipped (non-finite) steps so far.
  """
  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  rng: jax.Array
  nonfinite: jax.Array

  def variables(self) -> Dict[str, PyTree]:
    """{'params', 'batch_stats'} for `model.apply`."""
    return {'params': self.params, 'batch_stats': self.batch_stats}


# ----------------------------------------------------------------------------- steps


# The init program runs once: compiled at backend optimisation level 0.
INIT_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0}


def program_key(config: ml_collections.ConfigDict, model, **extra) -> Dict[str, Any]:
  """What a saved program of this run depends on besides its arguments (`program_cache`)."""
  return {'config': config.to_json_best_effort(sort_keys=True),
          'model': f'{type(model).__module__}.{type(model).__qualname__}', **extra}


def make_init_fn(model: DenseFlow, tx: optax.GradientTransformation,
                 config: ml_collections.ConfigDict, mesh) -> Callable[[jax.Array], TrainState]:
  """`first_batch -> TrainState` at step 0 (ActNorm data-dependent init on that batch).

  Compiled on first use; `.abstract(batch_spec)` gives the state's structure without compiling
  (from the same trace, so a fresh run traces the init once).
  """
  rep, bat = parallel.replicated_sharding(mesh), parallel.batch_sharding(mesh)

  def init(batch):
    params_key, noise_key = jax.random.split(run_key(config, INIT_TAG))
    # `model.init`'s variables, with the random parameters from two draws (`param_init`).
    variables = param_init.initial_variables(model, {'params': params_key, 'noise': noise_key},
                                             batch)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}),
                      opt_state=optim.init_state(tx, params),
                      rng=run_key(config, TRAIN_TAG), nonfinite=jnp.zeros((), jnp.int32))

  jitted = jax.jit(init, in_shardings=(bat,), out_shardings=rep)
  programs = {}

  def program(batch) -> program_cache.Program:
    # One export (or saved one) serves `.abstract` (the loop asks for it first) and the compile.
    key = (tuple(batch.shape), jnp.dtype(batch.dtype))
    if key not in programs:
      with jax.threefry_partitionable(False):
        programs[key] = program_cache.Program.load_or_export(
            jitted, (jax.ShapeDtypeStruct(batch.shape, batch.dtype, sharding=bat),),
            name='init', key=program_key(config, model), mesh=mesh,
            compiler_options=INIT_COMPILER_OPTIONS)
    return programs[key]

  def run(batch: jax.Array) -> TrainState:
    # Runs once: compiled at XLA backend optimisation level 0, as in
    # `denseflow_jax.model.init_variables` (a few seconds for the tiny model).
    with jax.threefry_partitionable(False):
      compiled = program(batch).compile()
    programs.clear()
    return compiled(batch)

  run.abstract = lambda batch: program(batch).out_info  # structure without compiling
  return run


# XLA:CPU options of the train step: backend optimisation level 1 and LLVM without its
# expensive passes. The step's time goes to library convolutions and matmuls (oneDNN, YNN),
# not to the loops LLVM optimises, so the step runs as fast while it compiles in about 20 s
# instead of 28 s (tiny, BENCHMARKS.md). Not used on GPU or TPU.
CPU_STEP_COMPILER_OPTIONS = {'xla_backend_optimization_level': 1,
                             'xla_llvm_disable_expensive_passes': True}


def make_train_step(model: DenseFlow, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    mesh, nonfinite_steps: Sequence[int] = ()
                    ) -> Callable[[TrainState, jax.Array], Tuple[TrainState, Dict[str, jax.Array]]]:
  """Jitted `(state, batch) -> (state, metrics)`; state replicated, batch sharded on 'data'.

  metrics: loss (mean bits/dim), grad_norm, learning_rate, finite (bool), nonfinite (the
  consecutive-skip count after this step). `nonfinite_steps` is a testing hook: the loss is
  multiplied by NaN at those steps (fault injection for the skip logic).
  """
  rep, bat = parallel.replicated_sharding(mesh), parallel.batch_sharding(mesh)
  poison = np.asarray(sorted(set(int(s) for s in nonfinite_steps)), np.int32)  # no device constant

  def step_fn(state: TrainState, batch: jax.Array):
    noise_key = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      bpd, updates = model.apply({'params': params, 'batch_stats': state.batch_stats}, batch,
                                 train=True, rngs={'noise': noise_key}, mutable=['batch_stats'],
                                 method='bits_per_dim')
      loss = jnp.mean(bpd)
      if poison.size:
        loss = loss * jnp.where(jnp.isin(state.step, poison), jnp.nan, 1.0)
      return loss, updates.get('batch_stats', {})

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_vector = optim.parameter_vector(grads)  # one update for all parameters (optim.py)
    grad_norm = optax.tree.norm(grad_vector)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    lr = schedule(state.step)
    opt_state = with_learning_rate(state.opt_state, lr)
    new_params, new_opt_state = optim.apply_update(tx, grad_vector, opt_state, state.params,
                                                   keep=finite)
    nonfinite = jnp.where(finite, 0, state.nonfinite + 1).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1, params=new_params,
        batch_stats=jax.tree.map(lambda a, b: jnp.where(finite, a, b), batch_stats,
                                 state.batch_stats),
        opt_state=new_opt_state, nonfinite=nonfinite)
    metrics = {'loss': loss, 'grad_norm': grad_norm, 'learning_rate': lr, 'finite': finite,
               'nonfinite': nonfinite}
    return new_state, metrics

  return jax.jit(step_fn, in_shardings=(rep, bat), out_shardings=(rep, rep), donate_argnums=(0,),
                 compiler_options=step_compiler_options(mesh))


def step_compiler_options(mesh) -> Optional[Dict[str, Any]]:
  """The train step's compile options on `mesh`'s platform (`CPU_STEP_COMPILER_OPTIONS`)."""
  return CPU_STEP_COMPILER_OPTIONS if mesh.devices.flat[0].platform == 'cpu' else None


# ----------------------------------------------------------------------------- the loop


class _StopSignal:
  """Turns SIGINT/SIGTERM into a flag checked between steps (main thread only)."""

  def __init__(self):
    self.received: Optional[int] = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.received is not None and signum == signal.SIGINT:  # second Ctrl-C: hard stop
      raise KeyboardInterrupt
    self.received = signum
    logging.warning('received signal %d: saving a checkpoint after this step, then stopping',
                    signum)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False


def _batch_spec(data: Data, mesh) -> jax.ShapeDtypeStruct:
  """The global train batch as the step sees it (uint8, sharded on 'data')."""
  return jax.ShapeDtypeStruct((data.global_batch_size, data.image_size, data.image_size,
                               data.num_channels), jnp.uint8,
                              sharding=parallel.batch_sharding(mesh))


def _abstract_state(init_fn, data: Data, mesh) -> TrainState:
  shapes = init_fn.abstract(_batch_spec(data, mesh))
  rep = parallel.replicated_sharding(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), shapes)


def _compile_step(train_step, abstract: TrainState, data: Data, mesh, key: Dict[str, Any]):
  """`train_step` compiled for the loop's state and batch, before the state exists.

  Compiling first and then building the state (init or restore) keeps the compile's peak off
  the initial state and the init program's freed memory, and both are handed back to the
  kernel afterwards (`cpu_tuning.release_free_memory`): on the tiny config the process peaks
  at 2.0 GiB instead of 2.9 GiB, and holds 1.3 GiB instead of 2.6 GiB while training. The
  program is exported (or its saved export loaded, `program_cache`: no trace on a restart)
  and compiled with the jitted step's shardings, donation and compile options.
  """
  logging.info('compiling the train step...')
  t0 = time.monotonic()
  program = program_cache.Program.load_or_export(
      train_step, (abstract, _batch_spec(data, mesh)), name='train_step', key=key, mesh=mesh,
      donate_argnums=(0,), compiler_options=step_compiler_options(mesh))
  compiled = program.compile()
  cpu_tuning.release_free_memory()
  logging.info('train step compiled in %s (%s)', format_seconds(time.monotonic() - t0),
               'its saved export loaded' if program.loaded else 'traced and exported')
  return compiled


def _training_item(state: TrainState) -> Dict[str, PyTree]:
  return {'step': state.step, 'opt_state': state.opt_state, 'rng': state.rng,
          'nonfinite': state.nonfinite}


def _save(ckpts: checkpoint.Checkpoints, state: TrainState) -> bool:
  """Saves `state` (logged as saved once committed, see `Checkpoints`); False if refused."""
  step = int(parallel.to_host(state.step))
  return ckpts.save(step, state.params, state.batch_stats, _training_item(state))


def _lock_workdir(workdir: str, host0: bool):
  """The workdir lock (process 0 takes it; every process raises if it could not)."""
  from denseflow_jax import workdir_lock  # pylint: disable=g-import-not-at-top
  lock, error = None, None
  if host0:
    try:
      lock = workdir_lock.WorkdirLock(workdir).acquire()
    except workdir_lock.WorkdirLockedError as e:
      error = e
  if jax.process_count() > 1:
    flags = multihost_utils.process_allgather(np.int32(error is None))
    if not np.all(flags) and error is None:
      if lock is not None:
        lock.release()
      error = workdir_lock.WorkdirLockedError(f'process 0 could not lock {workdir}')
  if error is not None:
    raise error
  return lock


def _restore_newest(ckpts, tx, mesh, abstract: TrainState):
  """`restore_newest_valid` of the train state; also reads checkpoints whose optimizer state
  holds one moment per parameter array (written before `optim.init_state`'s one vector)."""
  def items(state):
    return {checkpoint.ITEM_PARAMS: state.params, checkpoint.ITEM_BATCH_STATS: state.batch_stats,
            checkpoint.ITEM_TRAINING: _training_item(state)}

  try:
    return ckpts.restore_newest_valid(items(abstract))
  except checkpoint.CheckpointMismatchError as error:
    rep = parallel.replicated_sharding(mesh)
    per_array = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                             jax.eval_shape(tx.init, abstract.params))
    try:
      step, restored = ckpts.restore_newest_valid(items(abstract.replace(opt_state=per_array)))
    except checkpoint.CheckpointMismatchError:
      raise error from None
    if restored is not None:
      training = restored[checkpoint.ITEM_TRAINING]
      training['opt_state'] = jax.jit(
          lambda tree: optim.state_from_tree(tree, abstract.params),
          out_shardings=rep)(training['opt_state'])
      logging.info('checkpoint %d holds one optimizer moment per parameter array: converted to '
                   'one vector', step)
    return step, restored


def _restore_or_init(config, workdir, ckpts, init_fn, tx, data, mesh, abstract) -> TrainState:
  step, items = _restore_newest(ckpts, tx, mesh, abstract)
  if items is not None:
    training = items[checkpoint.ITEM_TRAINING]
    logging.info('resuming %s from checkpoint %d', workdir, step)
    return TrainState(step=training['step'], params=items[checkpoint.ITEM_PARAMS],
                      batch_stats=items[checkpoint.ITEM_BATCH_STATS],
                      opt_state=training['opt_state'], rng=training['rng'],
                      nonfinite=training['nonfinite'])
  if config.train.init_from:
    source = config.train.init_from  # checked by `_check_init_from`
    from_step, variables = checkpoint.load_variables(source, {
        'params': abstract.params, 'batch_stats': abstract.batch_stats})
    logging.info('fine-tuning from %s (checkpoint %d)', source, from_step)
    init_opt = jax.jit(functools.partial(optim.init_state, tx),
                       out_shardings=parallel.replicated_sharding(mesh))
    return TrainState(step=parallel.replicate(np.int32(0), mesh), params=variables['params'],
                      batch_stats=variables['batch_stats'],
                      opt_state=init_opt(variables['params']),
                      rng=parallel.replicate(np.asarray(run_key(config, TRAIN_TAG)), mesh),
                      nonfinite=parallel.replicate(np.int32(0), mesh))
  first = parallel.shard_batch(next(iter(data.train_batches(0))), mesh)
  logging.info('initialising from scratch (ActNorm data-dependent init on the first batch)')
  return init_fn(first)


def _empty_window(mesh) -> Dict[str, jax.Array]:
  """The device-side train metrics of a log window before its first step (replicated)."""
  return parallel.replicate({
      'loss': np.float32(0), 'grad_norm': np.float32(0),  # sums over the finite steps
      'finite': np.int32(0), 'skipped': np.int32(0),       # step counts
      'learning_rate': np.float32(0),                      # of the last step
      'longest_streak': np.int32(0),  # longest run of skipped steps seen (from before too)
      'longest_end': np.int32(0),     # its last step, counted from the window's first step
  }, mesh)


def _accumulate(window: Dict[str, jax.Array], metrics: Dict[str, jax.Array]
                ) -> Dict[str, jax.Array]:
  """`window` with one more step's `make_train_step` metrics (jitted in the loop)."""
  finite = metrics['finite']
  longer = metrics['nonfinite'] > window['longest_streak']
  return {
      'loss': window['loss'] + jnp.where(finite, metrics['loss'], 0.0).astype(jnp.float32),
      'grad_norm': window['grad_norm'] + jnp.where(finite, metrics['grad_norm'],
                                                   0.0).astype(jnp.float32),
      'finite': window['finite'] + finite.astype(jnp.int32),
      'skipped': window['skipped'] + (~finite).astype(jnp.int32),
      'learning_rate': jnp.asarray(metrics['learning_rate'], jnp.float32),
      'longest_streak': jnp.maximum(window['longest_streak'], metrics['nonfinite']),
      'longest_end': jnp.where(longer, window['finite'] + window['skipped'],
                               window['longest_end']),
  }


def _transfer_guard(level: Optional[str]):
  """`jax.transfer_guard_device_to_host(level)`, or no change for None."""
  return contextlib.nullcontext() if level is None else jax.transfer_guard_device_to_host(level)


#: Device-to-host transfer guard level (`jax.transfer_guard_device_to_host`) of the loop's
#: per-step work between check points; None leaves the guard as configured. Tests set
#: 'disallow_explicit', which makes any fetch there an error (check points, evaluations and
#: saves lift it).
STEP_TRANSFER_GUARD: Optional[str] = None


class _CheckPoints:
  """The loop's check points (module docstring): the one fetch of the device-side window and
  the skip count, the log row, the checkpoint saves and the stop after skipped steps."""

  def __init__(self, config, ckpts, writer, progress, mesh, host0, start, steps_per_epoch):
    self.t, self.ckpts, self.writer, self.progress = config.train, ckpts, writer, progress
    self.mesh, self.host0, self.steps_per_epoch = mesh, host0, steps_per_epoch
    # The newest checkpoint written (or resumed from); the parameters it holds are those of
    # the last finite update before it.
    self.last_saved = start if start in ckpts.all_steps() else None
    self.window_start = start

  def holds(self, last_finite: int) -> bool:
    """Whether a checkpoint holds the state of the finite update that ended at `last_finite`."""
    return self.last_saved is not None and self.last_saved >= last_finite

  def save(self, state: TrainState, done: int) -> bool:
    if _save(self.ckpts, state):
      self.last_saved = done
      return True
    return False

  def __call__(self, state: TrainState, window, done: int, *, log: bool, save: bool):
    """Runs the check point after `done` steps; returns the window to go on with."""
    t = self.t
    summary, streak = parallel.to_host((window, state.nonfinite))
    streak, longest = int(streak), int(summary['longest_streak'])
    last_finite = done - streak  # the step count after the last finite update
    too_many = longest >= t.max_consecutive_nonfinite
    log = log or too_many  # the stop writes the window it ends
    if log:
      scalars = {'skipped_steps': float(summary['skipped'])}
      finite = int(summary['finite'])
      if finite:
        scalars.update(train_bpd=float(summary['loss']) / finite,
                       grad_norm=float(summary['grad_norm']) / finite)
      scalars['learning_rate'] = float(summary['learning_rate'])
      scalars['epoch'] = done / self.steps_per_epoch
      rate = self.progress.steps_per_sec(done)
      if rate is not None:
        scalars['steps_per_sec'] = rate
      if self.host0:
        self.writer.write_scalars(done, scalars)
      logging.info('%s', self.progress.line(done, scalars))
      if summary['skipped']:
        logging.warning('steps %d-%d: %d of %d updates skipped for a non-finite loss or '
                        'gradient; %d skipped in a row now (limit %d)', self.window_start,
                        done - 1, int(summary['skipped']), done - self.window_start, streak,
                        t.max_consecutive_nonfinite)
    if not self.holds(last_finite) and (save or streak or too_many):
      if streak:  # the update was skipped: `state` holds the last finite state
        logging.warning('step %d: saving the last finite state (the parameters after step %d) '
                        'during a run of %d skipped steps', done, last_finite, streak)
      if self.save(state, done) and (streak or too_many):
        self.ckpts.wait()
    elif save and streak:
      logging.warning('step %d: not saving a checkpoint during a run of %d skipped steps '
                      '(checkpoint %d holds the parameters after step %d)', done, streak,
                      self.last_saved, last_finite)
    if too_many:
      end = self.window_start + int(summary['longest_end'])
      where = (f'Checkpoint {self.last_saved} in {self.ckpts.directory} holds the last finite '
               f'state (the parameters after step {last_finite})' if self.holds(last_finite)
               else f'No checkpoint of a finite state could be saved in {self.ckpts.directory}')
      raise NonFiniteError(
          f'{longest} consecutive training steps (up to step {end}) had a non-finite loss '
          f'or gradient; stopping. {where}: lower train.lr, set train.grad_clip_norm, or '
          'check the data')
    if log:
      self.window_start = done
      return _empty_window(self.mesh)
    return window


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       nonfinite_steps: Sequence[int] = ()) -> TrainState:
  """Trains (or resumes) in `workdir` and evaluates periodically; returns the final state.

  Uses every visible device (all hosts) with the batch sharded over them. Raises ValueError
  for an invalid config, data or fine-tuning source before anything is created or compiled
  (`config_check.validate_config`, `data.make_data`, `_check_init_from`) and for a workdir
  whose config.json holds another model (before anything is written there);
  `NonFiniteError` at the check point after `max_consecutive_nonfinite` skipped steps in a
  row (module docstring) and
  `TrainingInterrupted` after saving on SIGINT/SIGTERM; `checkpoint.CheckpointError`
  subclasses (`WorkdirLockedError`, `CheckpointWriteError`, `CheckpointMismatchError`,
  `CheckpointAccessError`) for a workdir that is in use, cannot be written, or holds
  checkpoints of another model or unreadable ones. `nonfinite_steps`: testing hook, see
  `make_train_step`. Sets the process's BLAS libraries to one thread
  (`cpu_tuning.single_thread_blas`: JAX's CPU LAPACK calls inside the step use them).
  """
  validate_config(config)
  cpu_tuning.single_thread_blas()
  host0 = jax.process_index() == 0
  mesh = parallel.make_mesh()
  try:
    data = make_data(config, jax.process_index(), jax.process_count())
  except RuntimeError as e:  # a TFDS dataset in a format without random access
    raise ValueError(str(e)) from e
  _check_init_from(config)
  if host0:
    os.makedirs(workdir, exist_ok=True)
  lock = _lock_workdir(workdir, host0)
  try:
    return _train_locked(config, workdir, data, mesh, host0, nonfinite_steps)
  finally:
    if lock is not None:
      lock.release()


def _check_init_from(config: ml_collections.ConfigDict) -> None:
  """The fine-tuning source is a trained run of the same model with a checkpoint (ValueError).

  Runs before the workdir is created; `validate_config` has checked the checkpoints/ directory.
  """
  source = config.train.init_from
  if not source:
    return
  if not os.path.isfile(config_file.config_path(source)):
    raise ValueError(f'train.init_from={source!r} has no {config_file.CONFIG_FILE} (expected '
                     'the workdir of a trained run)')
  diffs = config_file.model_differences(config_file.load_config(source), config)
  if diffs:
    raise ValueError(f'train.init_from={source!r} holds another model ({"; ".join(diffs)}); '
                     'fine-tuning needs the same model config')
  directory = checkpoint.checkpoint_dir(source)
  if not any(n.isdigit() for n in os.listdir(directory)):
    raise ValueError(f'train.init_from={source!r}: {directory} holds no checkpoint')


def _train_locked(config, workdir, data, mesh, host0, nonfinite_steps) -> TrainState:
  """`train_and_evaluate` once the workdir is locked."""
  # Written after the restore: a checkpoint that does not fit the model leaves it untouched.
  config_file.check_and_save_config(config, workdir, write=False)
  model = DenseFlow(config.model)
  steps_per_epoch = data.steps_per_epoch
  total_steps = num_train_steps(config, steps_per_epoch)
  schedule = learning_rate_schedule(config, steps_per_epoch)
  tx = make_optimizer(config)
  init_fn = make_init_fn(model, tx, config, mesh)
  train_step = make_train_step(model, tx, schedule, mesh, nonfinite_steps)
  step_key = program_key(config, model, steps_per_epoch=steps_per_epoch,
                         nonfinite_steps=sorted(int(s) for s in nonfinite_steps))
  t = config.train

  ckpts = checkpoint.Checkpoints(workdir, keep=t.keep_checkpoints)
  writer, failed = None, True
  try:
    abstract = _abstract_state(init_fn, data, mesh)
    # A fresh run compiles the step before the init program runs; a resumed one after the
    # restore (which compiles nothing), and only if there are steps left.
    compiled_step = (None if ckpts.all_steps() else
                     _compile_step(train_step, abstract, data, mesh, step_key))
    t_init = time.monotonic()
    state = _restore_or_init(config, workdir, ckpts, init_fn, tx, data, mesh, abstract)
    jax.block_until_ready(state)
    cpu_tuning.release_free_memory()
    logging.info('train state ready in %s', format_seconds(time.monotonic() - t_init))
    if host0:
      config_file.save_config(config, workdir)
    # Imported when training only (its TensorBoard writer).
    from denseflow_jax import metric_writer  # pylint: disable=g-import-not-at-top
    writer = metric_writer.create_writer(workdir, host0)
    start = int(parallel.to_host(state.step))
    if compiled_step is None and start < total_steps:
      compiled_step = _compile_step(train_step, abstract, data, mesh, step_key)
    logging.info('%d devices, %d processes; global batch %d; %d steps/epoch; steps %d -> %d',
                 jax.device_count(), jax.process_count(), data.global_batch_size,
                 steps_per_epoch, start, total_steps)
    if host0:
      logging.info('%s', console.describe_parameters(parallel.to_host(state.params), workdir))
      writer.write_hparams(config.to_dict())  # flattened ('model.block_conf.0', ...)
      logging.info('config: %s (and TensorBoard hparams)', config_file.config_path(workdir))

    evaluate = evaluation.LoopEvaluator(model, config, data, mesh, workdir, writer, host0)

    if start >= total_steps:
      logging.info('%s already holds the final checkpoint (step %d): nothing to train', workdir,
                   start)
    if start == 0 and config.eval.get('at_start', False):
      evaluate(0, state.variables())
    progress = console.ProgressLine(start, total_steps)
    checks = _CheckPoints(config, ckpts, writer, progress, mesh, host0, start, steps_per_epoch)
    rep = parallel.replicated_sharding(mesh)
    accumulate = jax.jit(_accumulate, in_shardings=(rep, rep), out_shardings=rep,
                         donate_argnums=(0,))
    window = _empty_window(mesh)
    batches = parallel.prefetch_to_mesh(data.train_batches(start), mesh)
    with _StopSignal() as stop, _transfer_guard(STEP_TRANSFER_GUARD):
      for step in range(start, total_steps):
        # Per-step work: nothing here fetches from the devices or (after the first step) waits
        # for them.
        state, metrics = compiled_step(state, next(batches))
        window = accumulate(window, metrics)
        if step == start:
          jax.block_until_ready(state)
          progress.first_step_done()
          logging.info('first train step done in %s', format_seconds(progress.elapsed()))
        done = step + 1
        log_point = done % t.log_every == 0 or done == total_steps
        save_point = bool(t.checkpoint_every and done % t.checkpoint_every == 0) or (
            done == total_steps)
        signalled = jax.process_count() == 1 and stop.received is not None
        stopping = False
        if log_point or save_point or signalled:
          with jax.transfer_guard_device_to_host('allow'):
            window = checks(state, window, done, log=log_point, save=save_point)
            stopping = _should_stop(stop, done, t.log_every)
        if t.eval_every and (done % t.eval_every == 0 or done == total_steps):
          with jax.transfer_guard_device_to_host('allow'):
            evaluate(done, state.variables())
        if stopping:
          with jax.transfer_guard_device_to_host('allow'):
            if checks.last_saved != done:
              checks.save(state, done)
            ckpts.wait()
          raise TrainingInterrupted(f'interrupted at step {done}; checkpoint saved in '
                                    f'{ckpts.directory}; rerun the same command to resume')
    failed = False
    if host0:
      logging.info('%s', console.run_summary(workdir, state, total_steps, evaluate.last, progress))
  finally:
    try:
      ckpts.close()
    except checkpoint.CheckpointError as e:
      if not failed:
        raise
      logging.error('%s', e)  # the error that is already propagating wins
    finally:
      if writer is not None:
        writer.flush()
        writer.close()
  return state


def _should_stop(stop: _StopSignal, done: int, every: int) -> bool:
  """Whether to stop now; several processes agree every `every` steps."""
  if jax.process_count() == 1:
    return stop.received is not None
  if done % every:
    return False
  flags = multihost_utils.process_allgather(np.int32(stop.received is not None))
  return bool(np.any(flags))

