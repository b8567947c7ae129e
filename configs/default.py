"""Shared defaults: DenseFlow-74-10 on CIFAR-10 with the paper's training settings.

Every experiment config starts from `get_config()` here and changes only what differs.
Any field can be overridden on the command line: `--config.train.batch_size=32`.
"""
import ml_collections


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
  m.remat = False                   # rematerialise each glow-like module in the backward pass
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
  return config
