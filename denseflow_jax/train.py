"""Training: state, optimizer and schedule, the jitted steps and the loop (`train_and_evaluate`).

Workdir layout (see `checkpoint.py` and `artifacts.py`):

  <workdir>/config.json               full config of the run (a different model is refused)
  <workdir>/checkpoints/<step>/       orbax items params/, batch_stats/, training/
  <workdir>/metrics.jsonl             train/test metrics per logged step (process 0)
  <workdir>/samples/step_<s>.png      sample grid at every evaluation (process 0)
  <workdir>/bpd_curve.png             train and test bits/dim against the step (process 0)
  <workdir>/events.out.tfevents.*     TensorBoard scalars and sample images (clu writers)

Converted official weights use the same layout with only params/ and batch_stats/ items.

Semantics:
- Loss: mean bits/dim (one dequantization / cross-unit noise draw per example) with
  `train=True` (BatchNorm on batch statistics, running averages updated). The noise key of step
  s is `fold_in(state.rng, s)`; the batch of step s is `Data.train_batches(start_step=s)`'s
  first element. A run resumed from the checkpoint of step k therefore repeats exactly what
  an uninterrupted run does from step k on (bitwise on the same hardware and program).
- Learning rate (`learning_rate_schedule`): linear warm-up from 0 at step 0 to `lr` at step
  `warmup_steps`, then `lr * decay_rate ** floor((step - warmup_steps) / steps_per_epoch)`:
  the once-per-epoch staircase counts epochs from the *end* of the warm-up, so the peak is
  reached exactly and held for one epoch. `decay_rate = 1.0` is the public code's behaviour.
  The rate is a function of the global step (set into the optimizer state each step), so a
  skipped update does not shift the schedule.
- Optimizer: optional `clip_by_global_norm(grad_clip_norm)` then `adamax(lr, b1, b2)`.
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
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from absl import logging
from clu import parameter_overview
import flax.struct
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from denseflow_jax import artifacts, checkpoint, config_file, parallel
from denseflow_jax.config_check import experiment_problems, plan_model
from denseflow_jax.data import Data, make_data
from denseflow_jax.model import DenseFlow

PyTree = Any
_INIT_TAG, _TRAIN_TAG, _EVAL_TAG, _SAMPLE_TAG = 0, 1, 2, 3


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


# ----------------------------------------------------------------------------- schedule


def num_train_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """`train.num_steps` if > 0, else `train.num_epochs * steps_per_epoch`."""
  if config.train.num_steps > 0:
    return int(config.train.num_steps)
  return int(math.ceil(config.train.num_epochs * steps_per_epoch))


def learning_rate_schedule(config: ml_collections.ConfigDict,
                           steps_per_epoch: int) -> optax.Schedule:
  """Linear warm-up 0 -> lr over `warmup_steps`, then a per-epoch exponential staircase.

  lr(s) = lr * s / warmup for s < warmup; lr * decay_rate ** floor((s - warmup) / spe) after
  (spe = steps per epoch; epochs are counted from the end of the warm-up).
  """
  t = config.train
  decay = optax.exponential_decay(float(t.lr), transition_steps=max(1, int(steps_per_epoch)),
                                  decay_rate=float(t.decay_rate), staircase=True)
  warmup = int(t.warmup_steps)
  if warmup <= 0:
    return decay
  ramp = optax.linear_schedule(0.0, float(t.lr), warmup)
  return optax.join_schedules([ramp, decay], [warmup])


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """[clip_by_global_norm] + adamax(b1, b2); the learning rate is injected each step."""
  t = config.train

  def optimizer(learning_rate):
    parts = []
    if t.grad_clip_norm > 0:
      parts.append(optax.clip_by_global_norm(float(t.grad_clip_norm)))
    parts.append(optax.adamax(learning_rate, b1=float(t.b1), b2=float(t.b2)))
    return optax.chain(*parts)

  return optax.inject_hyperparams(optimizer)(learning_rate=float(t.lr))


def _with_learning_rate(opt_state: PyTree, lr: jax.Array) -> PyTree:
  hyper = dict(opt_state.hyperparams)
  hyper['learning_rate'] = jnp.asarray(lr, jnp.asarray(hyper['learning_rate']).dtype)
  return opt_state._replace(hyperparams=hyper)


# ----------------------------------------------------------------------------- validation


def validate_config(config: ml_collections.ConfigDict, num_devices: Optional[int] = None) -> None:
  """Checks the config before anything is loaded or compiled; ValueError listing problems.

  Data-dependent checks (dataset shape vs model, batch vs dataset size) are in `make_data`.
  """
  num_devices = num_devices or jax.device_count()
  plan_model(config.model)
  t, e = config.train, config.eval
  problems = experiment_problems(config)  # types and ranges; divisibility below
  if problems:
    raise ValueError('invalid config: ' + '; '.join(problems))
  if t.batch_size % num_devices:
    problems.append(f'train.batch_size={t.batch_size} is not divisible by the device count '
                    f'{num_devices}')
  if e.batch_size % num_devices:
    problems.append(f'eval.batch_size={e.batch_size} is not divisible by the device count '
                    f'{num_devices}')
  if e.num_samples % num_devices:
    problems.append(f'eval.num_samples={e.num_samples} is not divisible by the device count '
                    f'{num_devices} (0 disables samples)')
  if e.iwbo_k < 1 or e.iwbo_chunk < 0 or (e.iwbo_chunk and e.iwbo_k % e.iwbo_chunk):
    problems.append(f'eval.iwbo_k={e.iwbo_k} must be >= 1 and divisible by eval.iwbo_chunk='
                    f'{e.iwbo_chunk}')
  if t.num_steps <= 0 and t.num_epochs <= 0:
    problems.append(f'train.num_steps={t.num_steps} and train.num_epochs={t.num_epochs}: one '
                    'must be positive')
  if not t.lr > 0 or t.warmup_steps < 0 or not 0 < t.decay_rate <= 1:
    problems.append(f'train.lr={t.lr} must be > 0, warmup_steps={t.warmup_steps} >= 0, '
                    f'decay_rate={t.decay_rate} in (0, 1]')
  if t.grad_clip_norm < 0:
    problems.append(f'train.grad_clip_norm={t.grad_clip_norm} must be >= 0 (0 = off)')
  for name in ('log_every', 'max_consecutive_nonfinite', 'keep_checkpoints'):
    if t[name] < 1:
      problems.append(f'train.{name}={t[name]} must be >= 1')
  for name in ('checkpoint_every', 'eval_every'):
    if t[name] < 0:
      problems.append(f'train.{name}={t[name]} must be >= 0 (0 = only at the end / never)')
  if t.init_from is None:
    problems.append('train.init_from must be set for fine-tuning '
                    '(--config.train.init_from=WORKDIR_OF_THE_TRAINED_RUN)')
  elif t.init_from and not os.path.isdir(os.path.join(t.init_from, checkpoint.CHECKPOINT_DIR)):
    problems.append(f'train.init_from={t.init_from!r} has no {checkpoint.CHECKPOINT_DIR}/ '
                    'directory (expected the workdir of a trained run)')
  if problems:
    raise ValueError('invalid config: ' + '; '.join(problems))


# ----------------------------------------------------------------------------- steps


def _base_key(config: ml_collections.ConfigDict, tag: int) -> jax.Array:
  return jax.random.fold_in(jax.random.PRNGKey(int(config.train.seed)), tag)


def make_init_fn(model: DenseFlow, tx: optax.GradientTransformation,
                 config: ml_collections.ConfigDict, mesh) -> Callable[[jax.Array], TrainState]:
  """`first_batch -> TrainState` at step 0 (ActNorm data-dependent init on that batch).

  Compiled on first use; `.abstract(batch_spec)` gives the state's structure without compiling.
  """
  rep, bat = parallel.replicated_sharding(mesh), parallel.batch_sharding(mesh)

  def init(batch):
    params_key, noise_key = jax.random.split(_base_key(config, _INIT_TAG))
    variables = model.init({'params': params_key, 'noise': noise_key}, batch)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params),
                      rng=_base_key(config, _TRAIN_TAG), nonfinite=jnp.zeros((), jnp.int32))

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
    opt_state = _with_learning_rate(state.opt_state, lr)
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


def make_eval_step(model: DenseFlow, config: ml_collections.ConfigDict, mesh):
  """Jitted `(variables, images, mask, batch_index) -> (sum of masked bpd, count)`, replicated.

  ELBO bits/dim with one noise draw per example; the noise of eval batch i is fixed
  (`fold_in(eval key, i)`) so evaluations at different steps see the same draws.
  """
  rep, bat = parallel.replicated_sharding(mesh), parallel.batch_sharding(mesh)
  eval_key = _base_key(config, _EVAL_TAG)

  def eval_fn(variables, images, mask, batch_index):
    bpd = model.apply(variables, images, rngs={'noise': jax.random.fold_in(eval_key, batch_index)},
                      method='bits_per_dim')
    weight = mask.astype(bpd.dtype)
    return jnp.sum(bpd * weight), jnp.sum(weight)

  return jax.jit(eval_fn, in_shardings=(rep, bat, bat, rep), out_shardings=rep)


def evaluate_bpd(eval_step, variables: Dict[str, PyTree], data: Data, mesh,
                 max_examples: int = 0) -> float:
  """Mean test ELBO bits/dim over the (first `max_examples` of the) test split."""
  total, count = 0.0, 0.0
  for i, batch in enumerate(data.eval_batches(max_examples)):
    images, mask = parallel.shard_batch((batch.images, batch.mask), mesh)
    s, n = eval_step(variables, images, mask, parallel.replicate(np.int32(i), mesh))
    s, n = parallel.to_host((s, n))
    total, count = total + float(s), count + float(n)
  return total / max(count, 1.0)


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
    source = config.train.init_from
    diffs = config_file.model_differences(config_file.load_config(source), config)
    if diffs:
      raise ValueError(f'train.init_from={source!r} has a different model: {"; ".join(diffs)}')
    from_step, variables = checkpoint.load_variables(source, {
        'params': abstract.params, 'batch_stats': abstract.batch_stats})
    logging.info('fine-tuning from %s (checkpoint %d)', source, from_step)
    init_opt = jax.jit(tx.init, out_shardings=parallel.replicated_sharding(mesh))
    return TrainState(step=parallel.replicate(np.int32(0), mesh), params=variables['params'],
                      batch_stats=variables['batch_stats'],
                      opt_state=init_opt(variables['params']),
                      rng=parallel.replicate(np.asarray(_base_key(config, _TRAIN_TAG)), mesh),
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

  Uses every visible device (all hosts) with the batch sharded over them. Raises
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
  data = make_data(config, jax.process_index(), jax.process_count())
  if host0:
    os.makedirs(workdir, exist_ok=True)
  lock = _lock_workdir(workdir, host0)
  try:
    return _train_locked(config, workdir, data, mesh, host0, nonfinite_steps)
  finally:
    if lock is not None:
      lock.release()


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
  eval_step = make_eval_step(model, config, mesh) if data.test is not None else None
  sampler = parallel.ShardedModel(model, mesh)
  t = config.train

  ckpts = checkpoint.Checkpoints(workdir, keep=t.keep_checkpoints)
  writer, failed = None, True
  try:
    abstract = _abstract_state(init_fn, data, mesh)
    state = _restore_or_init(config, workdir, ckpts, init_fn, tx, data, mesh, abstract)
    if host0:
      config_file.save_config(config, workdir)
    # clu's writers import TensorFlow (for TensorBoard): several seconds, so only when training.
    from clu import metric_writers, periodic_actions  # pylint: disable=g-import-not-at-top
    writer = metric_writers.create_default_writer(workdir, just_logging=not host0)
    start = int(parallel.to_host(state.step))
    logging.info('%d devices, %d processes; global batch %d; %d steps/epoch; steps %d -> %d',
                 jax.device_count(), jax.process_count(), data.global_batch_size,
                 steps_per_epoch, start, total_steps)
    if host0:
      parameter_overview.log_parameter_overview(parallel.to_host(state.params))
      writer.write_hparams({k: v for k, v in _flat_hparams(config).items()})

    def run_eval(step: int) -> None:
      if eval_step is None:
        return
      t0 = time.time()
      bpd = evaluate_bpd(eval_step, state.variables(), data, mesh, config.eval.max_examples)
      logging.info('step %d: test bpd %.4f (%.1fs)', step, bpd, time.time() - t0)
      scalars = {'test_bpd': bpd}
      if host0:
        writer.write_scalars(step, scalars)
        artifacts.append_metrics(workdir, step, scalars)
      if config.eval.num_samples > 0:
        key = parallel.replicate(np.asarray(jax.random.fold_in(_base_key(config, _SAMPLE_TAG),
                                                               step)), mesh)
        images = parallel.to_host(sampler.sample(state.variables(), key, config.eval.num_samples,
                                                 config.eval.temperature))
        if host0:
          path = os.path.join(workdir, artifacts.SAMPLES_DIR, f'step_{step}.png')
          artifacts.save_sample_grid(path, images, config.model.num_bits)
          writer.write_images(step, {'samples': artifacts.image_grid(
              images, config.model.num_bits)[None]})
      if host0:
        artifacts.plot_bpd_curve(workdir)
        writer.flush()

    if start >= total_steps:
      logging.info('%s already holds the final checkpoint (step %d): nothing to train', workdir,
                   start)
    if start == 0 and config.eval.get('at_start', False):
      run_eval(0)
    report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                             every_steps=t.log_every, every_secs=None)
    batches = iter(data.train_batches(start))
    window = _Window()
    # The checkpoint holding the parameters of the last finite update, if one does (skipped
    # updates leave the parameters as they are, so any checkpoint saved since does).
    finite_saved = start if start in ckpts.all_steps() else None
    last_finite = start - int(parallel.to_host(state.nonfinite))  # steps with finite updates
    with _StopSignal() as stop:
      for step in range(start, total_steps):
        batch = parallel.shard_batch(next(batches), mesh)
        state, metrics = train_step(state, batch)
        metrics = parallel.to_host(metrics)
        window.add(metrics)
        done = step + 1
        report(done)
        if done % t.log_every == 0 or done == total_steps:
          scalars = window.summary()
          scalars['learning_rate'] = float(metrics['learning_rate'])
          scalars['epoch'] = done / steps_per_epoch
          if host0:
            writer.write_scalars(done, scalars)
            artifacts.append_metrics(workdir, done, scalars)
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
          run_eval(done)
        if _should_stop(stop, done, t.log_every):
          _save(ckpts, state)
          ckpts.wait()
          raise TrainingInterrupted(f'interrupted at step {done}; checkpoint saved in '
                                    f'{ckpts.directory}; rerun the same command to resume')
    failed = False
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


def _flat_hparams(config: ml_collections.ConfigDict, prefix: str = '') -> Dict[str, Any]:
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_flat_hparams(value, f'{prefix}{key}.'))
    elif isinstance(value, (int, float, str, bool)):
      out[prefix + key] = value
    else:
      out[prefix + key] = str(value)
  return out
