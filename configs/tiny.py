"""The tiny DenseFlow of the reference fixture: blocks (2, 2, 1), modules (1, 1, 2), mid 16, growth 4."""
from configs import default


def get_config():
  """Tiny model on CIFAR-10 (10,148,504 parameters); small batches for tests and smoke runs."""
  config = default.get_config()
  m = config.model
  m.block_conf = (2, 2, 1)
  m.layers_conf = (1, 1, 2)
  m.mid_channels = (16, 16, 16)
  m.growth_rate = 4
  config.train.batch_size = 8
  return config
