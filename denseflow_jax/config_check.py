"""Model-config validation and shape planning, done before anything is compiled."""
import dataclasses
from typing import Tuple

import ml_collections

_CHOICES = {
    'coupling': ('denseflow', 'glow'),
    'noise': ('preconditioned', 'plain'),
    'attention_layout': ('published', 'tokens'),
    'dequantization': ('variational', 'uniform'),
    'conv1x1': ('full', 'lu'),
}


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


def plan_model(cfg: ml_collections.ConfigDict) -> ModelPlan:
  """Validates a model config and returns its `ModelPlan`; raises ValueError naming the problem."""
  for field, choices in _CHOICES.items():
    value = cfg.get(field)
    if value not in choices:
      raise ValueError(f'model.{field} = {value!r}; expected one of {choices}')
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
