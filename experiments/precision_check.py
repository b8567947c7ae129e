"""float32 against bfloat16 (`model.compute_dtype`): training curves and held-out bits/dim.

  python experiments/precision_check.py                       # tiny model, 200 steps, batch 8
  python experiments/precision_check.py --steps=400 --every=50 --config.train.lr=2e-3

Both runs start from the same initial state (one `train.make_init_fn` call, copied) and see
the same training batches and noise keys (`train.make_train_step`, the training loop's step);
only `model.compute_dtype` differs. Prints one line per `--every` steps: the step, then the
mean training loss (bits/dim) of the last `--every` steps for float32 and for bfloat16. Then
both trained models are scored on `--eval_images` held-out images, each in float32 and in
bfloat16 (the same noise for all four), which separates what bfloat16 costs in training from
what it costs in evaluation.

The training data: `--config.data.*` (default: the CIFAR-10 training subset at
`../shared/data/cifar10_train_subset.npz`, its last 1000 images held out, which the held-out
scores use). The learning rate warms up over `--config.train.warmup_steps` (default here 20,
so that a few hundred steps train at all). Nothing is written to disk.
"""
import os

from absl import app, flags
import jax
import numpy as np
from ml_collections import config_flags

from denseflow_jax import cli, optim, parallel, train
from denseflow_jax.data import make_data
from denseflow_jax.model import DenseFlow, enable_compilation_cache

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRAIN_NPZ = os.path.normpath(os.path.join(REPO_ROOT, '..', 'shared', 'data',
                                          'cifar10_train_subset.npz'))
DTYPES = ('float32', 'bfloat16')

_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(REPO_ROOT, 'configs', 'tiny.py'), 'Experiment config (model, train).')
_STEPS = flags.DEFINE_integer('steps', 200, 'Training steps per run.')
_EVERY = flags.DEFINE_integer('every', 20, 'Print the mean loss of every this many steps.')
_EVAL_IMAGES = flags.DEFINE_integer('eval_images', 64, 'Held-out images scored at the end '
                                    '(0: none).')
_CACHE = flags.DEFINE_bool('compilation_cache', True, 'Use the persistent XLA compilation '
                            'cache (DENSEFLOW_JAX_CACHE, default ~/.cache/denseflow_jax/xla).')


def _prepared(config):
  """`config` with the defaults of this script where the command line left them."""
  if config.data.dataset == 'cifar10' and not config.data.train_npz:
    config.data.dataset, config.data.train_npz, config.data.holdout = 'npz', TRAIN_NPZ, 1000
  if config.train.warmup_steps == 5000:  # the paper's warm-up: nothing would train here
    config.train.warmup_steps = 20
  return config


def train_curves(config, steps: int, dtypes=DTYPES):
  """`({dtype: per-step losses (steps,)}, {dtype: final TrainState}, data)` for each dtype.

  Same initial state, batches and noise for every dtype. `config.model.compute_dtype` is set
  per run; the rest of `config` is used as given.
  """
  mesh = parallel.make_mesh()
  data = make_data(config)
  tx = optim.make_optimizer(config)
  schedule = optim.learning_rate_schedule(config, data.steps_per_epoch)
  batches = data.train_batches(0)
  first = next(batches)
  init = train.make_init_fn(DenseFlow(config.model), tx, config, mesh)
  state0 = jax.tree.map(np.asarray, init(parallel.shard_batch(first, mesh)))  # host copy
  runs = [first] + [next(batches) for _ in range(steps - 1)]
  losses, states = {}, {}
  for dtype in dtypes:
    cfg = config.copy_and_resolve_references()
    cfg.model.compute_dtype = dtype
    step = train.make_train_step(DenseFlow(cfg.model), tx, schedule, mesh)
    state = parallel.replicate(state0, mesh)  # fresh device buffers (the step donates them)
    history = []
    for batch in runs:
      state, metrics = step(state, parallel.shard_batch(batch, mesh))
      history.append(float(metrics['loss']))
    losses[dtype], states[dtype] = np.asarray(history), state
  return losses, states, data


def held_out_bpd(config, state, images: np.ndarray, key: jax.Array):
  """`{dtype: mean bits/dim}` of `images` under `state`'s variables, evaluated in each dtype."""
  out = {}
  for dtype in DTYPES:
    cfg = config.copy_and_resolve_references()
    cfg.model.compute_dtype = dtype
    model = DenseFlow(cfg.model)
    bpd = jax.jit(lambda v, x, k, m=model: m.apply(v, x, rngs={'noise': k},
                                                   method=m.bits_per_dim))
    out[dtype] = float(np.mean(bpd(state.variables(), images, key)))
  return out


def main(argv):
  del argv  # checked by cli.run
  steps, every = _STEPS.value, _EVERY.value
  if steps < 1 or every < 1:
    raise app.UsageError(f'--steps={steps} and --every={every} must be >= 1')
  if _CACHE.value:
    enable_compilation_cache()
  config = _prepared(_CONFIG.value)
  print(f'config: blocks {tuple(config.model.block_conf)}, batch {config.train.batch_size}, lr '
        f'{config.train.lr} (warm-up {config.train.warmup_steps}), {steps} steps, data '
        f'{config.data.dataset} {config.data.train_npz}', flush=True)
  losses, states, data = train_curves(config, steps)
  print('step  f32_bpd  bf16_bpd   (mean training loss of the last steps)')
  for end in range(every, steps + 1, every):
    window = slice(end - every, end)
    print(f'{end:4d}  {losses["float32"][window].mean():7.4f}  '
          f'{losses["bfloat16"][window].mean():8.4f}', flush=True)
  if _EVAL_IMAGES.value and data.test is not None:
    n = min(_EVAL_IMAGES.value, len(data.test))
    images = data.test.read_batch(list(range(n)))
    key = jax.random.key(12345)
    for trained in DTYPES:
      scores = held_out_bpd(config, states[trained], images, key)
      print(f'trained in {trained}: held-out bpd ({n} images) evaluated in float32 '
            f'{scores["float32"]:.4f}, in bfloat16 {scores["bfloat16"]:.4f}', flush=True)


if __name__ == '__main__':
  cli.run(main)
