"""The training-loop row of experiments/benchmark.py: its data, its config, and what it reads
back from the loop (the steady step time from metrics.jsonl, the first finished step's time
from the loop's log line).

The row runs `denseflow_jax.train.train_and_evaluate` itself, in a process of its own; these
helpers import neither JAX nor the training code.
"""
import logging
import os
import statistics
from typing import Any, Dict, Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The real CIFAR-10 training subset beside the repository (never part of it).
CIFAR_SUBSET = os.path.join(REPO_ROOT, '..', 'shared', 'data', 'cifar10_train_subset.npz')
# What `train.train_and_evaluate` logs once the first step has finished.
FIRST_STEP_LOG = 'first train step done'
# What it logs at the start-up phases of a fresh run, in order (name: start of the message).
PHASE_LOGS = (('step_compile_start', 'compiling the train step'),
              ('step_compiled', 'train step compiled'),
              ('state_ready', 'train state ready'),
              ('first_step', FIRST_STEP_LOG))

def set_compute_dtype(config, dtype: str) -> bool:
  """Sets `config.model.compute_dtype` to `dtype`; False (config untouched) where the config
  has no such field and `dtype` is not float32 (the only precision such a config has)."""
  if 'compute_dtype' in config.model:
    config.model.compute_dtype = dtype
    return True
  return dtype == 'float32'


def loop_data(config, choice: str, cifar_subset: str = CIFAR_SUBSET) -> Dict[str, Any]:
  """The data of a loop row: {'dataset', 'train_npz', 'description'}.

  `choice`: '' (automatic), 'digits' or the path of an npz file. Automatic: the config's own
  offline data (digits, or an npz file that exists; relative paths from the repository root),
  else the CIFAR-10 training subset for a 32x32x3 8-bit model, else the embedded digits for an
  8x8x1 5-bit model. ValueError (one line) when none fits the model.
  """
  m, d = config.model, config.data
  shape = (int(m.image_size), int(m.num_channels), int(m.num_bits))
  digits = {'dataset': 'digits', 'train_npz': '', 'description': 'digits (embedded)'}
  if choice == 'digits' or (not choice and d.dataset == 'digits'):
    if shape != (8, 1, 5):
      raise ValueError(f'the digits are 8x8x1 images with 5 bits; the model takes {shape} '
                       '(image size, channels, bits)')
    return digits
  if choice:
    path = os.path.abspath(choice)
    if not os.path.isfile(path):
      raise ValueError(f'--loop_data={choice!r}: no such file')
    return {'dataset': 'npz', 'train_npz': path, 'description': path}
  own = os.path.join(REPO_ROOT, d.train_npz) if d.dataset == 'npz' and d.train_npz else ''
  if own and os.path.isfile(own):
    path = os.path.normpath(own)
    return {'dataset': 'npz', 'train_npz': path, 'description': path}
  if shape == (32, 3, 8) and os.path.isfile(cifar_subset):
    path = os.path.normpath(cifar_subset)
    return {'dataset': 'npz', 'train_npz': path, 'description': f'CIFAR-10 subset {path}'}
  if shape == (8, 1, 5):
    return digits
  raise ValueError(f'no offline data for a model of {shape} (image size, channels, bits): '
                   f'{os.path.normpath(cifar_subset)} is missing; pass --loop_data=PATH.npz')


def loop_config(config, batch: int, steps: int, log_every: int, data: Dict[str, Any]):
  """`config` as a loop row trains it (changed in place and returned): `steps` steps of
  `batch` images, steps/s written every `log_every` steps, no evaluation, one checkpoint at
  the end, the data of `loop_data`."""
  t = config.train
  t.batch_size, t.num_steps, t.log_every = int(batch), int(steps), int(log_every)
  t.checkpoint_every, t.eval_every, t.keep_checkpoints, t.init_from = 0, 0, 1, ''
  config.eval.at_start = False
  config.data.dataset = data['dataset']
  config.data.train_npz = data['train_npz']
  config.data.test_npz, config.data.holdout = '', 0
  return config


class FirstStepClock(logging.Handler):
  """A logging handler that keeps the creation time (`time.time()` scale) of the first record
  of each of `PHASE_LOGS`; add it to the 'absl' logger before training. `time`: the first
  finished step's."""

  def __init__(self):
    super().__init__()
    self.times: Dict[str, float] = {}

  @property
  def time(self) -> Optional[float]:
    return self.times.get('first_step')

  def emit(self, record):
    message = str(record.msg)
    for name, prefix in PHASE_LOGS:
      if name not in self.times and message.startswith(prefix):
        self.times[name] = record.created

  def phases(self, start: float) -> Dict[str, Optional[float]]:
    """Seconds of the start-up phases of a fresh run: `before_compile` (from `start`: imports,
    data, config checks, the init's trace), `step_compile`, `init` (the init program's compile
    and run) and `first_step` (the first step's run); None where a record is missing."""
    t = dict(self.times, start=start)
    span = lambda a, b: t[b] - t[a] if a in t and b in t else None
    return {'before_compile': span('start', 'step_compile_start'),
            'step_compile': span('step_compile_start', 'step_compiled'),
            'init': span('step_compiled', 'state_ready'),
            'first_step': span('state_ready', 'first_step')}

def steady_step_seconds(metric_rows: Sequence[Dict[str, Any]]) -> Optional[float]:
  """1 / median of the `steps_per_sec` values of metrics.jsonl rows (None if there are none).

  The loop writes one at every log point, for the interval since the previous one; the first
  interval starts after the first step, so none includes compilation.
  """
  rates = [r['steps_per_sec'] for r in metric_rows if r.get('steps_per_sec', 0) > 0]
  return 1.0 / statistics.median(rates) if rates else None
