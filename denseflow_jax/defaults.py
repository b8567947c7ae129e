"""The config schema: every field the library reads, with the paper's values as defaults.

`get_config()` is DenseFlow-74-10 on CIFAR-10 with the paper's training settings; the files in
the repository's `configs/` start from it and change only what differs. The library itself
reads configs through this module only (it never imports the top-level `configs/`), so a saved
`config.json` from an older version loads with the newer fields at their defaults.

Also here, because several configs use them: the published architectures (`ARCHITECTURES`,
`set_architecture`), the fine-tuning stage (`finetune`) and the six Table-4 ablation rows
(`TABLE4`, `set_table4_variant`).
"""
import dataclasses
from typing import Dict, NamedTuple, Tuple

import ml_collections
from ml_collections import config_dict


def get_model_config() -> ml_collections.ConfigDict:
  """Model fields (DenseFlow-74-10, SPEC section 2)."""
  m = ml_collections.ConfigDict()
  m.image_size = 32                 # square images: height = width = image_size
  m.num_channels = 3                # 3 for RGB, 1 for grey
  m.num_bits = 8                    # data in {0 .. 2^num_bits - 1}
  m.block_conf = (6, 4, 1)          # units per block
  m.layers_conf = (5, 6, 20)        # glow-like modules per unit, per block
  m.mid_channels = (48, 48, 48)     # coupling-net width m, per block
  m.growth_rate = 10                # k: channels appended by each cross-unit coupling
  # Table-4 ablation switches.
  m.coupling = 'denseflow'          # 'denseflow' (dense block + Nystrom attention) or 'glow'
  m.glow_hidden = 512               # hidden width of the Glow coupling net
  m.augment = True                  # cross-unit coupling (latent augmentation) on/off
  m.noise = 'preconditioned'        # 'preconditioned' (mu, sigma from g_j) or 'plain' (N(0, I))
  # Coupling-net internals (published values).
  m.dense_depth = 7
  m.dense_growth = 64
  m.num_landmarks = 4
  m.pinv_iterations = 6
  m.attention_layout = 'published'  # 'published' (plain reshape) or 'tokens' (pixels as tokens)
  # Dequantization.
  m.dequantization = 'variational'  # 'variational' (Flow++ style) or 'uniform'
  m.deq_context_channels = 64
  m.deq_steps = 4
  # Implementation options (do not change the model's function).
  m.conv1x1 = 'full'                # 'full' (slogdet) or 'lu' (LU-parameterised)
  m.remat = 'none'                  # rematerialisation of each glow-like module in the backward
                                    # pass: 'none', 'full' or a jax.checkpoint_policies name
                                    # (config_check.REMAT_POLICIES; README "Speed")
  m.conv_backward = 'auto'          # 3x3 conv gradient: 'auto' (tuned on CPU, XLA's elsewhere),
                                    # 'tuned' or 'xla' on every platform (README "Speed")
  m.compute_dtype = 'float32'       # 'float32' or 'bfloat16': dtype the nets compute in (README)
  m.bn_momentum = 0.9               # flax convention (PyTorch momentum 0.1)
  m.bn_epsilon = 1e-5
  return m


def get_config() -> ml_collections.ConfigDict:
  """Full experiment config: model, data, train, eval."""
  config = ml_collections.ConfigDict()
  config.model = get_model_config()

  config.data = ml_collections.ConfigDict()
  config.data.dataset = 'cifar10'   # cifar10 | imagenet32 | imagenet64 | celeba | digits | npz
  config.data.data_dir = ''         # TFDS data_dir ('' = TFDS default)
  config.data.train_npz = ''        # for dataset='npz': array 'images' uint8 (N, H, W, C)
  config.data.test_npz = ''         # optional separate test file for dataset='npz'
  config.data.holdout = 0           # for dataset='npz' with no test_npz: last N images are the test split
  config.data.hflip = True          # random horizontal flip
  config.data.translate = 0.04      # random translation, fraction of the size, edge padding
  config.data.max_train_examples = 0  # 0 = all
  config.data.max_test_examples = 0   # 0 = all
  config.data.read_threads = 4      # threads decoding and augmenting training images
  config.data.prefetch = 8          # training batches prepared ahead of the step

  config.train = ml_collections.ConfigDict()
  config.train.seed = 0
  config.train.batch_size = 64      # global batch, split over all devices
  config.train.num_epochs = 580
  config.train.num_steps = 0        # > 0 overrides num_epochs
  config.train.lr = 1e-3
  config.train.b1 = 0.9
  config.train.b2 = 0.999
  config.train.warmup_steps = 5000  # linear warm-up, in steps
  config.train.decay_rate = 0.9975  # exponential lr decay once per epoch (1.0 = public code)
  config.train.grad_clip_norm = 0.0  # 0 = no clipping
  config.train.init_from = ''       # workdir or checkpoint to start from (fine-tuning)
  config.train.max_consecutive_nonfinite = 20
  config.train.log_every = 100
  config.train.checkpoint_every = 1000
  config.train.keep_checkpoints = 3
  config.train.eval_every = 5000

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 64
  config.eval.max_examples = 0      # 0 = whole test split during periodic eval
  config.eval.iwbo_k = 1000         # experiments/evaluate.py default (paper: 1000 CIFAR-10, 200 else)
  config.eval.iwbo_chunk = 50
  config.eval.num_samples = 64
  config.eval.temperature = 1.0
  config.eval.at_start = False      # also evaluate and sample before the first step
  config.eval.sample_metrics = True  # digits: FID and Inception-style score of the samples
  return config


@dataclasses.dataclass(frozen=True)
class Architecture:
  """The fields that name a DenseFlow size: units per block, modules per unit, width, growth."""
  block_conf: Tuple[int, ...]
  layers_conf: Tuple[int, ...]
  mid_channels: Tuple[int, ...]
  growth_rate: int


#: The paper's two models and the tiny model of the reference fixture (CIFAR-10 parameters:
#: 130,647,294 / 75,020,522 / 10,148,504).
ARCHITECTURES: Dict[str, Architecture] = {
    '74-10': Architecture((6, 4, 1), (5, 6, 20), (48, 48, 48), 10),
    '45-6': Architecture((5, 3, 1), (3, 5, 15), (48, 48, 48), 6),
    'tiny': Architecture((2, 2, 1), (1, 1, 2), (16, 16, 16), 4),
}


def set_architecture(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """Sets `config.model` to the architecture `name` (a key of `ARCHITECTURES`); returns config."""
  if name not in ARCHITECTURES:
    raise ValueError(f'unknown architecture {name!r}; expected one of {sorted(ARCHITECTURES)}')
  for field, value in dataclasses.asdict(ARCHITECTURES[name]).items():
    config.model[field] = value
  return config


def finetune(config: ml_collections.ConfigDict, *, num_epochs: int) -> ml_collections.ConfigDict:
  """Turns a training config into its fine-tuning stage: lr 2e-5, no warm-up, no decay.

  `train.init_from` becomes a required field: the workdir (or checkpoint) of the trained run.
  """
  config.train.init_from = config_dict.placeholder(str)
  config.train.lr = 2e-5
  config.train.warmup_steps = 0
  config.train.decay_rate = 1.0
  config.train.num_epochs = int(num_epochs)
  config.train.num_steps = 0
  return config


def check_variant(variant: str, allowed: Tuple[str, ...], config_file: str) -> None:
  """ValueError naming the config file unless `variant` is one of `allowed`."""
  if variant not in allowed:
    raise ValueError(f'unknown variant {variant!r} of {config_file}; expected one of '
                     f'{list(allowed)}')


class Table4Row(NamedTuple):
  """One row of the paper's Table 4: the model switches, the label and the paper's bits/dim."""
  coupling: str
  augment: bool
  noise: str
  augmentation_label: str
  paper_bpd: float


#: The six Table-4 ablation rows (CIFAR-10, DenseFlow-45-6, 300 epochs), in the paper's order.
TABLE4: Dict[str, Table4Row] = {
    'glow_noaug': Table4Row('glow', False, 'preconditioned', 'none', 3.42),
    'glow_aug': Table4Row('glow', True, 'plain', 'plain noise', 3.40),
    'glow_aug_precond': Table4Row('glow', True, 'preconditioned', 'pre-conditioned noise', 3.37),
    'denseflow_noaug': Table4Row('denseflow', False, 'preconditioned', 'none', 3.14),
    'denseflow_aug': Table4Row('denseflow', True, 'plain', 'plain noise', 3.08),
    'denseflow_aug_precond': Table4Row('denseflow', True, 'preconditioned',
                                       'pre-conditioned noise', 3.07),
}


def set_table4_variant(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """Sets the model switches (coupling, augment, noise) of the Table-4 row `name`."""
  if name not in TABLE4:
    raise ValueError(f'unknown Table-4 variant {name!r}; expected one of {list(TABLE4)}')
  row = TABLE4[name]
  config.model.coupling, config.model.augment, config.model.noise = (
      row.coupling, row.augment, row.noise)
  return config
