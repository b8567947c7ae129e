"""The published training script's command line (`args.pickle`) -> our config.

`model_config_from_args` maps `block_conf`, `layers_conf`, `layer_mid_chnls`, `growth_rate`,
`num_bits`, `dataset` (cifar10 / imagenet32: 32x32x3, imagenet64 / celeba: 64x64x3) and
`checkpointing` (-> `remat`) onto `denseflow_jax.defaults`' model config; `config_from_args`
returns a full experiment config (data set, IWBO k) around it. Unknown fields or an
architecture our model cannot build raise `OfficialCheckpointError` naming the field.
"""
import argparse
from typing import Any, Tuple

import ml_collections

from denseflow_jax import defaults
from denseflow_jax.config_check import plan_model
from denseflow_jax.torch_reader import OfficialCheckpointError


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


#: The fields of the published training script's command line (30, in its order).
KNOWN_ARGS = ('epochs', 'seed', 'device', 'parallel', 'resume', 'name', 'project', 'eval_every',
              'check_every', 'log_tb', 'log_wandb', 'dataset', 'num_bits', 'batch_size',
              'num_workers', 'pin_memory', 'augmentation', 'num_classes', 'growth_rate',
              'checkpointing', 'block_conf', 'layer_mid_chnls', 'layers_conf', 'optimizer', 'lr',
              'warmup', 'momentum', 'momentum_sqr', 'gamma', 'use_grad_norm')
_ARCH_ARGS = ('dataset', 'num_bits', 'growth_rate', 'block_conf', 'layer_mid_chnls',
              'layers_conf')
#: Published data set name -> (image size, channels).
DATASETS = {'cifar10': (32, 3), 'imagenet32': (32, 3), 'imagenet64': (64, 3),
            'celeba': (64, 3)}


def _int_tuple(args: argparse.Namespace, field: str) -> Tuple[int, ...]:
  v = getattr(args, field)
  if isinstance(v, (list, tuple)) and v and all(_is_int(i) for i in v):
    return tuple(int(i) for i in v)
  raise OfficialCheckpointError(f'args.{field} = {v!r}: expected a non-empty list of ints')


def model_config_from_args(args: argparse.Namespace,
                           allow_unknown: bool = False) -> ml_collections.ConfigDict:
  """Our model config (`denseflow_jax.defaults` fields) for the published command line `args`.

  Raises `OfficialCheckpointError` naming the field for a missing architecture field, an
  unknown data set, an architecture our model cannot build, or (unless `allow_unknown`) a field
  the published script does not have (it might change the architecture).
  """
  fields = vars(args)
  unknown = sorted(set(fields) - set(KNOWN_ARGS))
  if unknown and not allow_unknown:
    raise OfficialCheckpointError(
        f'args.pickle has field(s) {unknown} that the published training script (whose 30 '
        f'fields this converter maps) does not have; they may change the architecture. '
        f'Pass allow_unknown=True (--allow_unknown_args) to ignore them')
  missing = [f for f in _ARCH_ARGS if f not in fields]
  if missing:
    raise OfficialCheckpointError(f'args.pickle lacks the architecture field(s) {missing}')
  if args.dataset not in DATASETS:
    raise OfficialCheckpointError(f'args.dataset = {args.dataset!r} is not supported; expected '
                                  f'one of {sorted(DATASETS)}')
  if not _is_int(args.num_bits) or not _is_int(args.growth_rate):
    raise OfficialCheckpointError(f'args.num_bits = {args.num_bits!r}, args.growth_rate = '
                                  f'{args.growth_rate!r}: expected ints')
  size, channels = DATASETS[args.dataset]
  m = defaults.get_model_config()
  m.image_size, m.num_channels = size, channels
  m.num_bits = int(args.num_bits)
  m.block_conf = _int_tuple(args, 'block_conf')
  m.layers_conf = _int_tuple(args, 'layers_conf')
  m.mid_channels = _int_tuple(args, 'layer_mid_chnls')
  m.growth_rate = int(args.growth_rate)
  m.remat = 'full' if fields.get('checkpointing', False) else 'none'
  try:
    plan_model(m)
  except ValueError as e:
    raise OfficialCheckpointError(
        f'args.pickle describes an architecture this port cannot build (block_conf='
        f'{m.block_conf}, layers_conf={m.layers_conf}, layer_mid_chnls={m.mid_channels}, '
        f'growth_rate={m.growth_rate}, dataset={args.dataset}): {e}') from None
  return m


def config_from_args(args: argparse.Namespace,
                     allow_unknown: bool = False) -> ml_collections.ConfigDict:
  """A full experiment config (`denseflow_jax.defaults`) for the published command line `args`.

  Model from `model_config_from_args`; `data.dataset` from `args.dataset` (CelebA without the
  random translation); `eval.iwbo_k` 1000 for CIFAR-10, 200 otherwise (paper protocol).
  """
  config = defaults.get_config()
  config.model = model_config_from_args(args, allow_unknown)
  config.data.dataset = args.dataset
  if args.dataset == 'celeba':
    config.data.translate = 0.0
  config.eval.iwbo_k = 1000 if args.dataset == 'cifar10' else 200
  if _is_int(getattr(args, 'seed', None)):
    config.train.seed = int(args.seed)
  return config
