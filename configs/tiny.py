"""The tiny DenseFlow of the reference fixture: blocks (2, 2, 1), modules (1, 1, 2), mid 16, growth 4."""
from denseflow_jax import defaults


def get_config():
  """Tiny model on CIFAR-10 (10,148,504 parameters); small batches for tests and smoke runs."""
  config = defaults.set_architecture(defaults.get_config(), 'tiny')
  config.train.batch_size = 8
  return config
