"""Offline quickstart: a small DenseFlow on the bundled 8x8 digits (5 bits), about 2 CPU minutes.

`python experiments/train.py --config configs/quickstart.py --workdir /tmp/denseflow_quickstart`
needs no download. At 8x8 only two blocks fit (after the initial squeeze the blocks work at
4x4 and 2x2; the Nystrom attention needs H*W divisible by 4 landmarks), so the model is
DenseFlow with blocks (2, 1), modules (3, 3), width 64, growth 4 and slimmer dense blocks than
the paper's, with uniform dequantization. Both choices were measured (README "Quickstart"):
the paper's variational dequantizer would hold 1.17 M of the parameters and two thirds of the
step time at this size, and a flow of width 64 with three modules per unit gives samples that
a digits classifier recognises far more often than the earlier width-32, two-module flow.
"""
from denseflow_jax import defaults


def get_config():
  """Quickstart config: digits, two-block small DenseFlow, 1800 steps of batch 32."""
  config = defaults.get_config()
  m = config.model
  m.image_size, m.num_channels, m.num_bits = 8, 1, 5
  m.block_conf = (2, 1)
  m.layers_conf = (3, 3)
  m.mid_channels = (64, 64)
  m.growth_rate = 4
  m.dense_depth = 2
  m.dense_growth = 32
  m.dequantization = 'uniform'      # variational: --config.model.dequantization=variational

  config.data.dataset = 'digits'
  config.data.hflip = False         # digits are not mirror-symmetric
  config.data.translate = 0.0

  t = config.train
  t.batch_size = 32
  t.lr = 2e-3                       # twice the paper's: a short run on small images
  t.num_steps = 1800                # 38 epochs of the 1500 training digits
  t.warmup_steps = 100
  t.decay_rate = 0.99               # per epoch (46 steps at batch 32)
  t.log_every = 50
  t.checkpoint_every = 600
  t.eval_every = 600

  config.eval.batch_size = 64
  config.eval.at_start = True
  config.eval.num_samples = 64
  config.eval.iwbo_k = 100
  config.eval.iwbo_chunk = 25
  return config
