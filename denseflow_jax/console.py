"""What the training loop prints: the model in one line, one progress line per report, and the
end-of-run summary (the parameter table goes to `<workdir>/parameters.txt`)."""
import os
import time
from typing import Any, Dict, Optional

from clu import parameter_overview
import jax
import numpy as np

from denseflow_jax import artifacts, checkpoint, config_file
from denseflow_jax.metrics.progress import format_seconds

PyTree = Any
PARAMETERS_FILE = 'parameters.txt'


def describe_parameters(params: PyTree, workdir: str) -> str:
  """One line: parameters in total and per top-level module; the full table goes to a file."""
  counts = {name: sum(int(np.size(x)) for x in jax.tree.leaves(tree))
            for name, tree in params.items()}
  total = sum(counts.values())
  path = os.path.join(workdir, PARAMETERS_FILE)
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(parameter_overview.get_parameter_overview(params) + '\n')
  os.replace(tmp, path)
  parts = ', '.join(f'{name} {n:,}' for name, n in counts.items() if n >= 0.01 * total)
  return f'model: {total:,} parameters ({parts}); table in {path}'


class ProgressLine:
  """The one progress line per report: step, train bpd, rate, learning rate, ETA to the second.

  The rate counts the steps after the first one (which includes the compilation)."""

  def __init__(self, start: int, total: int):
    self.total = total
    self.t0 = time.monotonic()
    self.last_step, self.last_time = start, self.t0

  def elapsed(self) -> float:
    return time.monotonic() - self.t0

  def first_step_done(self) -> None:
    self.last_step, self.last_time = self.last_step + 1, time.monotonic()

  def steps_per_sec(self, step: int) -> Optional[float]:
    """Steps per second since the previous call (or the first step); None if no step since.

    Call it once per report, after the device has finished the steps up to `step`.
    """
    if step <= self.last_step:
      return None
    now = time.monotonic()
    rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    return rate

  def line(self, step: int, scalars: Dict[str, float]) -> str:
    """The line for `scalars` (train_bpd, skipped_steps, learning_rate, steps_per_sec)."""
    rate = scalars.get('steps_per_sec')
    eta = format_seconds((self.total - step) / rate) if rate else '?'
    bpd = scalars.get('train_bpd')
    text = f'step {step}/{self.total} ({100.0 * step / self.total:.0f}%): ' + (
        f'train bpd {bpd:.4f}' if bpd is not None else 'no finite step')
    skipped = int(scalars.get('skipped_steps', 0))
    return (text + (f', {skipped} skipped' if skipped else '') +
            f', {rate or 0.0:.1f} steps/s, lr {scalars["learning_rate"]:.3g}, elapsed '
            f'{format_seconds(self.elapsed())}, ETA {eta}')


def run_summary(workdir: str, state, total: int, last: Dict[str, float], progress) -> str:
  """The end-of-run lines: final numbers and where every output is."""
  numbers = [f'{total} steps in {format_seconds(progress.elapsed())}']
  if 'test_bpd' in last:
    numbers.append(f'test bpd {last["test_bpd"]:.4f} (ELBO, one draw)')
  if 'sample_fid' in last:
    numbers.append(f'samples: FID {last["sample_fid"]:.2f}, Inception-style score '
                   f'{last["sample_is"]:.2f} (digits classifier)')
  del state
  outputs = [f'{name} {os.path.join(workdir, rel)}' for name, rel in (
      ('checkpoints', checkpoint.CHECKPOINT_DIR), ('metrics', artifacts.METRICS_FILE),
      ('samples', artifacts.SAMPLES_DIR), ('bpd curve', artifacts.CURVE_FILE),
      ('parameters', PARAMETERS_FILE), ('config', config_file.CONFIG_FILE))
      if os.path.exists(os.path.join(workdir, rel))]
  return ('done: ' + '; '.join(numbers) + '\n  outputs: ' + ', '.join(outputs) +
          f'\n  TensorBoard: tensorboard --logdir {workdir}\n  IWBO test bpd: python '
          f'experiments/evaluate.py --workdir {workdir}')
