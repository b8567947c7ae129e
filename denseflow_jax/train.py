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
  <workdir>/events.out.tfevents.*     TensorBoard scalars and sample images (clu writers)

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
  optimizer state and BatchNorm statistics keep their values, the step counter advances to the
  next batch); `max_consecutive_nonfinite` skips in a row stop training with
  `NonFiniteError`. The last finite state is always on disk by then: the first skip of a run
  of skipped steps saves a checkpoint (its parameters are those of the last finite update)
  unless one written since that update exists, and the error names that checkpoint. No
  periodic checkpoint is written during a run of skipped steps, and none from a non-finite
  state.
- The workdir: a training run holds `<workdir>/train.lock` (`workdir_lock`) from start to end;
  a second run on the same workdir stops at once with `WorkdirLockedError` naming the holder.
  A checkpoint that cannot be written (full disk, I/O or permission error) stops the run with
  `checkpoint.CheckpointWriteError` naming the path and the cause; the previous checkpoints
  stay intact and rerunning resumes from the newest. At the restart, corrupt checkpoints are
  moved aside (see `checkpoint.Checkpoints`); one that does not fit the model, or cannot be
  read for lack of permission, stops the run before anything is written.
- ActNorm data-dependent init: `model.init` on the first training batch (global batch, so the
  statistics are the same on every device and host).
- Fine-tuning: `config.train.init_from = '<workdir of a trained run>'` loads its newest
  params and BatchNorm statistics (the model config must match), with a fresh optimizer and
  step 0; use with `lr = 2e-5`, `warmup_steps = 0`, `decay_rate = 1.0` (the `finetune`
  variant of the dataset configs, e.g. `--config configs/cifar10.py:finetune`). A restart of
  the fine-tuning run resumes from its own checkpoints.
- SIGINT / SIGTERM: the loop finishes the current step, saves a checkpoint and raises
  `TrainingInterrupted`. On several hosts the processes agree on stopping every `log_every`
  steps (send the signal to all of them).
"""
import dataclasses
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

from denseflow_jax import checkpoint, config_file, console, evaluation, parallel
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
  params, batch_stats: model variables. opt_state: optax state (includes the current lr).
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


def make_init_fn(model: DenseFlow, tx: optax.GradientTransformation,
                 config: ml_collections.ConfigDict, mesh) -> Callable[[jax.Array], TrainState]:
  """`first_batch -> TrainState` at step 0 (ActNorm data-dependent init on that batch).

  Compiled on first use; `.abstract(batch_spec)` gives the state's structure without compiling.
  """
  rep, bat = parallel.replicated_sharding(mesh), parallel.batch_sharding(mesh)

  def init(batch):
    params_key, noise_key = jax.random.split(run_key(config, INIT_TAG))
    variables = model.init({'params': params_key, 'noise': noise_key}, batch)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params),
                      rng=run_key(config, TRAIN_TAG), nonfinite=jnp.zeros((), jnp.int32))

  jitted = jax.jit(init, in_shardings=(bat,), out_shardings=rep)

  def run(batch: jax.Array) -> TrainState:
    # Runs once: XLA backend optimisation level 0 compiles several times faster (the program
    # is dominated by parameter initialisers), as in `denseflow_jax.model.init_variables`.
    with jax.threefry_partitionable(False):
      lowered = jitted.lower(batch)
    return lowered.compile(compiler_options={'xla_backend_optimization_level': 0})(batch)

  run.abstract = lambda batch: jax.eval_shape(init, batch)  # structure without compiling
  return run


def make_train_step(model: DenseFlow, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    mesh, nonfinite_steps: Sequence[int] = ()
                    ) -> Callable[[TrainState, jax.Array], Tuple[TrainState, Dict[str, jax.Array]]]:
  """Jitted `(state, batch) -> (state, metrics)`; state replicated, batch sharded on 'data'.

  metrics: loss (mean bits/dim), grad_norm, learning_rate, finite (bool), nonfinite (the
  consecutive-skip count after this step). `nonfinite_steps` is a testing hook: the loss is
  multiplied by NaN at those steps (fault injection for the skip logic).
  """
  rep, bat = parallel.replicated_sharding(mesh), parallel.batch_sharding(mesh)
  poison = jnp.asarray(sorted(set(int(s) for s in nonfinite_steps)), jnp.int32)

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
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    lr = schedule(state.step)
    opt_state = with_learning_rate(state.opt_state, lr)
    updates, new_opt_state = tx.update(grads, opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    nonfinite = jnp.where(finite, 0, state.nonfinite + 1).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1, params=keep(new_params, state.params),
        batch_stats=keep(batch_stats, state.batch_stats),
        opt_state=keep(new_opt_state, state.opt_state), nonfinite=nonfinite)
    metrics = {'loss': loss, 'grad_norm': grad_norm, 'learning_rate': lr, 'finite': finite,
               'nonfinite': nonfinite}
    return new_state, metrics

  return jax.jit(step_fn, in_shardings=(rep, bat), out_shardings=(rep, rep), donate_argnums=(0,))


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


def _abstract_state(init_fn, data: Data, mesh) -> TrainState:
  batch = jax.ShapeDtypeStruct((data.global_batch_size, data.image_size, data.image_size,
                                data.num_channels), jnp.uint8,
                               sharding=parallel.batch_sharding(mesh))
  shapes = init_fn.abstract(batch)
  rep = parallel.replicated_sharding(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), shapes)


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


def _restore_or_init(config, workdir, ckpts, init_fn, tx, data, mesh, abstract) -> TrainState:
  step, items = ckpts.restore_newest_valid({
      checkpoint.ITEM_PARAMS: abstract.params,
      checkpoint.ITEM_BATCH_STATS: abstract.batch_stats,
      checkpoint.ITEM_TRAINING: _training_item(abstract)})
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
    init_opt = jax.jit(tx.init, out_shardings=parallel.replicated_sharding(mesh))
    return TrainState(step=parallel.replicate(np.int32(0), mesh), params=variables['params'],
                      batch_stats=variables['batch_stats'],
                      opt_state=init_opt(variables['params']),
                      rng=parallel.replicate(np.asarray(run_key(config, TRAIN_TAG)), mesh),
                      nonfinite=parallel.replicate(np.int32(0), mesh))
  first = parallel.shard_batch(next(iter(data.train_batches(0))), mesh)
  logging.info('initialising from scratch (ActNorm data-dependent init on the first batch)')
  return init_fn(first)


@dataclasses.dataclass
class _Window:
  """Train metrics accumulated between two log points (finite steps only for the means)."""
  loss: float = 0.0
  grad_norm: float = 0.0
  finite: int = 0
  skipped: int = 0

  def add(self, metrics: Dict[str, Any]) -> None:
    if bool(metrics['finite']):
      self.loss += float(metrics['loss'])
      self.grad_norm += float(metrics['grad_norm'])
      self.finite += 1
    else:
      self.skipped += 1

  def summary(self) -> Dict[str, float]:
    out = {'skipped_steps': float(self.skipped)}
    if self.finite:
      out.update(train_bpd=self.loss / self.finite, grad_norm=self.grad_norm / self.finite)
    return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       nonfinite_steps: Sequence[int] = ()) -> TrainState:
  """Trains (or resumes) in `workdir` and evaluates periodically; returns the final state.

  Uses every visible device (all hosts) with the batch sharded over them. Raises ValueError
  for an invalid config, data or fine-tuning source before anything is created or compiled
  (`config_check.validate_config`, `data.make_data`, `_check_init_from`) and for a workdir
  whose config.json holds another model (before anything is written there);
  `NonFiniteError` after `max_consecutive_nonfinite` skipped steps in a row and
  `TrainingInterrupted` after saving on SIGINT/SIGTERM; `checkpoint.CheckpointError`
  subclasses (`WorkdirLockedError`, `CheckpointWriteError`, `CheckpointMismatchError`,
  `CheckpointAccessError`) for a workdir that is in use, cannot be written, or holds
  checkpoints of another model or unreadable ones. `nonfinite_steps`: testing hook, see
  `make_train_step`.
  """
  validate_config(config)
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
  t = config.train

  ckpts = checkpoint.Checkpoints(workdir, keep=t.keep_checkpoints)
  writer, failed = None, True
  try:
    t_init = time.monotonic()
    abstract = _abstract_state(init_fn, data, mesh)
    state = _restore_or_init(config, workdir, ckpts, init_fn, tx, data, mesh, abstract)
    logging.info('train state ready in %s', format_seconds(time.monotonic() - t_init))
    if host0:
      config_file.save_config(config, workdir)
    # clu's writers import TensorFlow (for TensorBoard): several seconds, so only when training.
    from clu import periodic_actions  # pylint: disable=g-import-not-at-top
    from denseflow_jax import metric_writer  # pylint: disable=g-import-not-at-top
    writer = metric_writer.create_writer(workdir, host0)
    start = int(parallel.to_host(state.step))
    logging.info('%d devices, %d processes; global batch %d; %d steps/epoch; steps %d -> %d',
                 jax.device_count(), jax.process_count(), data.global_batch_size,
                 steps_per_epoch, start, total_steps)
    if host0:
      logging.info('%s', console.describe_parameters(parallel.to_host(state.params), workdir))
      writer.write_hparams(config.to_dict())  # clu flattens it ('model.block_conf.0', ...)
      logging.info('config: %s (and TensorBoard hparams)', config_file.config_path(workdir))

    evaluate = evaluation.LoopEvaluator(model, config, data, mesh, workdir, writer, host0)

    if start >= total_steps:
      logging.info('%s already holds the final checkpoint (step %d): nothing to train', workdir,
                   start)
    if start == 0 and config.eval.get('at_start', False):
      evaluate(0, state.variables())
    report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                             every_steps=t.log_every, every_secs=None)
    progress = console.ProgressLine(start, total_steps)
    batches = iter(data.train_batches(start))
    window = _Window()
    # The checkpoint holding the parameters of the last finite update, if one does (skipped
    # updates leave the parameters as they are, so any checkpoint saved since does).
    finite_saved = start if start in ckpts.all_steps() else None
    last_finite = start - int(parallel.to_host(state.nonfinite))  # steps with finite updates
    with _StopSignal() as stop:
      for step in range(start, total_steps):
        batch = parallel.shard_batch(next(batches), mesh)
        if step == start:
          logging.info('compiling the train step (the first step includes it)...')
        state, metrics = train_step(state, batch)
        metrics = parallel.to_host(metrics)
        if step == start:
          progress.first_step_done()
          logging.info('first train step done in %s', format_seconds(progress.elapsed()))
        window.add(metrics)
        done = step + 1
        report(done)
        if done % t.log_every == 0 or done == total_steps:
          scalars = window.summary()
          scalars['learning_rate'] = float(metrics['learning_rate'])
          scalars['epoch'] = done / steps_per_epoch
          if host0:
            writer.write_scalars(done, scalars)
          logging.info('%s', progress.line(done, scalars))
          window = _Window()
        if metrics['finite']:
          last_finite, finite_saved = done, None
        else:
          count = int(metrics['nonfinite'])
          logging.warning('step %d: non-finite loss %s or gradient norm %s; update skipped '
                          '(%d in a row, limit %d)', step, metrics['loss'], metrics['grad_norm'],
                          count, t.max_consecutive_nonfinite)
          if finite_saved is None:
            # The update was skipped, so `state` still holds the last finite parameters: keep
            # them on disk before the streak can stop the run.
            logging.warning('step %d: saving the last finite state (the parameters after step '
                            '%d) before the skipped steps go on', done, last_finite)
            if _save(ckpts, state):
              ckpts.wait()
              finite_saved = done
          if count >= t.max_consecutive_nonfinite:
            where = (f'Checkpoint {finite_saved} in {ckpts.directory} holds the last finite state '
                     f'(the parameters after step {last_finite})' if finite_saved is not None
                     else f'No checkpoint of a finite state could be saved in {ckpts.directory}')
            raise NonFiniteError(
                f'{count} consecutive training steps (up to step {step}) had a non-finite loss '
                f'or gradient; stopping. {where}: lower train.lr, set train.grad_clip_norm, or '
                'check the data')
        streak = int(metrics['nonfinite'])
        if (t.checkpoint_every and done % t.checkpoint_every == 0) or done == total_steps:
          if streak:  # keep the last checkpoint of a finite update
            if finite_saved != done:
              logging.warning('step %d: not saving a checkpoint during a run of %d skipped '
                              'steps', done, streak)
          elif _save(ckpts, state):
            finite_saved = done
        if (t.eval_every and done % t.eval_every == 0) or (
            done == total_steps and t.eval_every):
          evaluate(done, state.variables())
        if _should_stop(stop, done, t.log_every):
          _save(ckpts, state)
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

