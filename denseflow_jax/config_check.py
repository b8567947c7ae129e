"""Config validation and shape planning, done before anything is loaded or compiled.

`plan_model` checks a model config and derives every shape; `experiment_problems` lists bad
train / eval / data values; `validate_config` runs both plus the checks against the device
count and the fine-tuning source directory (what `train.train_and_evaluate` runs first).
"""
import dataclasses
import math
import numbers
import os
from typing import Any, List, Optional, Tuple

import ml_collections

_CHOICES = {
    'coupling': ('denseflow', 'glow'),
    'noise': ('preconditioned', 'plain'),
    'attention_layout': ('published', 'tokens'),
    'dequantization': ('variational', 'uniform'),
    'conv1x1': ('full', 'lu'),
}

# The dtypes the non-invertible nets may compute in (`model.compute_dtype`).
COMPUTE_DTYPES = ('float32', 'bfloat16')

#: `model.remat` values: 'none' (no rematerialisation), 'full' (recompute everything in the
#: backward pass, as `nothing_saveable`), or the name of a `jax.checkpoint_policies` policy.
REMAT_POLICIES = ('none', 'full', 'nothing_saveable', 'everything_saveable', 'dots_saveable',
                  'checkpoint_dots', 'dots_with_no_batch_dims_saveable',
                  'checkpoint_dots_with_no_batch_dims')
#: `model.conv_backward` values (see `denseflow_jax.nets.layers.conv_backward_mode`).
CONV_BACKWARD_MODES = ('auto', 'tuned', 'xla')


def remat_policy(value: Any) -> str:
  """`model.remat` as a policy name; ValueError naming the choices for an unknown value.

  Configs saved before the field became a policy name hold booleans: False is 'none', True
  is 'full'.
  """
  if isinstance(value, bool):
    return 'full' if value else 'none'
  if not isinstance(value, str) or value not in REMAT_POLICIES:
    raise ValueError(f'model.remat = {value!r}; expected one of {REMAT_POLICIES}')
  return value


def check_conv_backward(value: Any) -> str:
  """`value` if it is a `model.conv_backward` value; ValueError naming the choices otherwise."""
  if not isinstance(value, str) or value not in CONV_BACKWARD_MODES:
    raise ValueError(f'model.conv_backward = {value!r}; expected one of {CONV_BACKWARD_MODES}')
  return value


@dataclasses.dataclass(frozen=True)
class BlockPlan:
  """Shapes of one DenseFlow block: spatial size, input channels, channels of each unit."""
  size: int
  in_channels: int
  unit_channels: Tuple[int, ...]

  @property
  def out_channels(self) -> int:
    return self.unit_channels[-1]


@dataclasses.dataclass(frozen=True)
class ModelPlan:
  """Every shape the model will have, derived from the config."""
  image_shape: Tuple[int, int, int]
  blocks: Tuple[BlockPlan, ...]
  latent_shape: Tuple[int, int, int]

  @property
  def num_dims(self) -> int:
    h, w, c = self.image_shape
    return h * w * c


def is_integer(value: Any) -> bool:
  """True for int and numpy integers (not bool, not float: 5.7 or 5.0 are not integers here)."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
  """True for int, float and numpy numbers (not bool)."""
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _integer_fields(cfg: ml_collections.ConfigDict) -> List[Tuple[str, int]]:
  """(field, minimum) of the integer model fields the configured variant uses."""
  fields = [('image_size', 1), ('num_channels', 1), ('num_bits', 1), ('growth_rate', 0)]
  if cfg.get('coupling') == 'denseflow':
    fields += [('dense_depth', 1), ('dense_growth', 1), ('num_landmarks', 1),
               ('pinv_iterations', 0)]
  else:
    fields += [('glow_hidden', 1)]
  if cfg.get('dequantization') == 'variational':
    fields += [('deq_steps', 1), ('deq_context_channels', 1)]
  return fields


def plan_model(cfg: ml_collections.ConfigDict) -> ModelPlan:
  """Validates a model config and returns its `ModelPlan`; raises ValueError naming the problem."""
  for field, choices in _CHOICES.items():
    value = cfg.get(field)
    if value not in choices:
      raise ValueError(f'model.{field} = {value!r}; expected one of {choices}')
  remat_policy(cfg.get('remat', 'none'))
  check_conv_backward(cfg.get('conv_backward', 'auto'))
  for field, minimum in _integer_fields(cfg):
    value = cfg.get(field)
    if not is_integer(value) or value < minimum:
      raise ValueError(f'model.{field} = {value!r}; expected an integer >= {minimum}')
  for name in ('block_conf', 'layers_conf', 'mid_channels'):
    if not all(is_integer(v) for v in getattr(cfg, name)):
      raise ValueError(f'model.{name} = {tuple(getattr(cfg, name))}; expected integers')
  compute_dtype = cfg.get('compute_dtype', 'float32')  # absent in older configs: float32
  if compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f'model.compute_dtype = {compute_dtype!r}; expected one of {COMPUTE_DTYPES}')
  momentum, epsilon = cfg.get('bn_momentum', 0.9), cfg.get('bn_epsilon', 1e-5)
  if not (is_real(momentum) and 0 <= momentum < 1 and is_real(epsilon)
          and math.isfinite(epsilon) and epsilon > 0):
    raise ValueError(f'model.bn_momentum = {momentum!r}, bn_epsilon = {epsilon!r}; expected '
                     'bn_momentum in [0, 1) and a finite bn_epsilon > 0')
  nb = len(cfg.block_conf)
  if nb == 0:
    raise ValueError('model.block_conf is empty; expected at least one block')
  if len(cfg.layers_conf) != nb or len(cfg.mid_channels) != nb:
    raise ValueError(f'model.block_conf, layers_conf and mid_channels must have the same length, '
                     f'got {len(cfg.block_conf)}, {len(cfg.layers_conf)}, '
                     f'{len(cfg.mid_channels)} ({tuple(cfg.block_conf)}, '
                     f'{tuple(cfg.layers_conf)}, {tuple(cfg.mid_channels)})')
  for name in ('block_conf', 'layers_conf', 'mid_channels'):
    for v in getattr(cfg, name):
      if int(v) < 1:
        raise ValueError(f'model.{name} = {tuple(getattr(cfg, name))}; every entry must be >= 1')
  if cfg.coupling == 'denseflow':
    if int(cfg.num_landmarks) < 1 or int(cfg.pinv_iterations) < 0:
      raise ValueError(f'model.num_landmarks = {cfg.num_landmarks}, pinv_iterations = '
                       f'{cfg.pinv_iterations}; expected num_landmarks >= 1 and '
                       f'pinv_iterations >= 0')
    for m in cfg.mid_channels:
      if m % 2:
        raise ValueError(f'model.mid_channels = {tuple(cfg.mid_channels)}; the attention width '
                         f'm/2 needs even values, got {m}')
  if not 1 <= cfg.num_bits <= 16:
    raise ValueError(f'model.num_bits = {cfg.num_bits}; expected 1..16')
  if cfg.growth_rate < 1 and cfg.augment:
    raise ValueError(f'model.growth_rate = {cfg.growth_rate}; expected >= 1 with augment=True')
  s, c = int(cfg.image_size), int(cfg.num_channels)
  if s < 1 or c < 1:
    raise ValueError(f'model.image_size = {s}, num_channels = {c}; expected positive values')
  if s % (2 ** nb):
    raise ValueError(f'model.image_size = {s} is not divisible by 2^{nb} = {2 ** nb} (the '
                     f'initial squeeze plus {nb - 1} transitions for {nb} blocks)')
  size, ch = s // 2, 4 * c
  blocks = []
  for b in range(nb):
    if cfg.coupling == 'denseflow' and (size * size) % cfg.num_landmarks:
      raise ValueError(f'block {b} works at {size}x{size}: H*W = {size * size} is not divisible '
                       f'by model.num_landmarks = {cfg.num_landmarks} (use fewer blocks or a '
                       f'larger image_size)')
    units = []
    cu = ch
    for j in range(cfg.block_conf[b]):
      if j >= 1 and cfg.augment:
        cu += cfg.growth_rate
      if cu % 2:
        raise ValueError(f'block {b} unit {j} has {cu} channels; the coupling and channel swap '
                         f'need an even count (check model.growth_rate = {cfg.growth_rate} and '
                         f'num_channels = {c})')
      units.append(cu)
    blocks.append(BlockPlan(size, ch, tuple(units)))
    if b < nb - 1:
      size, ch = size // 2, 2 * cu
  return ModelPlan((s, s, c), tuple(blocks), (size, size, blocks[-1].out_channels))


# Largest bit depth of the data pipeline (uint8 images).
MAX_DATA_BITS = 8


def experiment_problems(config: ml_collections.ConfigDict) -> List[str]:
  """Problems with the values of an experiment config's train / eval / data fields.

  Types and ranges only (integers where a count is meant, b1 and b2 in [0, 1), finite
  positive temperature and learning rate, seed >= 0, batch sizes >= 1, ...): divisibility by
  the device count and the data-dependent checks come later. An empty list means fine.
  """
  t, e, d, m = config.train, config.eval, config.data, config.model
  problems = []

  def integer(section: str, values, name: str, minimum: int, maximum=None, note: str = ''):
    if name not in values:
      return
    v = values[name]
    if not is_integer(v) or v < minimum or (maximum is not None and v > maximum):
      bound = f'in {minimum}..{maximum}' if maximum is not None else f'>= {minimum}'
      problems.append(f'{section}.{name}={v!r} must be an integer {bound}'
                      + (f' ({note})' if note else ''))

  def real(section: str, values, name: str, low: float, high: float, closed_high: bool,
           open_low: bool = False):
    if name not in values:
      return
    v = values[name]
    ok = is_real(v) and math.isfinite(v) and (v > low if open_low else v >= low) and (
        v <= high if closed_high else v < high)
    if not ok:
      lo_bracket = '(' if open_low else '['
      hi_bracket = ']' if closed_high else ')'
      where = (f'> {low:g}' if math.isinf(high) else
               f'in {lo_bracket}{low:g}, {high:g}{hi_bracket}')
      problems.append(f'{section}.{name}={v!r} must be a finite number {where}')

  integer('model', m, 'num_bits', 1, MAX_DATA_BITS, 'images are uint8')
  integer('train', t, 'seed', 0, 2**32 - 1)
  integer('train', t, 'batch_size', 1)
  integer('eval', e, 'batch_size', 1)
  for name in ('num_steps', 'warmup_steps', 'checkpoint_every', 'eval_every'):
    integer('train', t, name, 0)
  for name in ('log_every', 'max_consecutive_nonfinite', 'keep_checkpoints'):
    integer('train', t, name, 1)
  for name in ('max_examples', 'num_samples', 'iwbo_chunk'):
    integer('eval', e, name, 0)
  integer('eval', e, 'iwbo_k', 1)
  for name in ('holdout', 'max_train_examples', 'max_test_examples'):
    integer('data', d, name, 0)
  real('train', t, 'lr', 0.0, math.inf, False, open_low=True)
  real('train', t, 'b1', 0.0, 1.0, False)
  real('train', t, 'b2', 0.0, 1.0, False)
  real('train', t, 'decay_rate', 0.0, 1.0, True, open_low=True)
  real('train', t, 'grad_clip_norm', 0.0, math.inf, False)
  real('train', t, 'num_epochs', 0.0, math.inf, False)
  real('eval', e, 'temperature', 0.0, math.inf, False, open_low=True)
  real('data', d, 'translate', 0.0, 0.5, False)
  return problems


def validate_config(config: ml_collections.ConfigDict, num_devices: Optional[int] = None) -> None:
  """Checks the config before anything is loaded or compiled; ValueError listing problems.

  `num_devices` defaults to `jax.device_count()`. Data-dependent checks (dataset shape vs
  model, batch vs dataset size) are in `data.make_data`.
  """
  if num_devices is None:
    import jax  # pylint: disable=g-import-not-at-top
    num_devices = jax.device_count()
  from denseflow_jax.checkpoint import CHECKPOINT_DIR  # pylint: disable=g-import-not-at-top
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
  elif t.init_from and not os.path.isdir(os.path.join(t.init_from, CHECKPOINT_DIR)):
    problems.append(f'train.init_from={t.init_from!r} has no {CHECKPOINT_DIR}/ '
                    'directory (expected the workdir of a trained run)')
  if problems:
    raise ValueError('invalid config: ' + '; '.join(problems))
