"""DenseFlow-74-10 (all main results of the paper) on CIFAR-10: the defaults."""
from denseflow_jax import defaults


def get_config():
  """DenseFlow-74-10: blocks (6, 4, 1), modules (5, 6, 20), mid 48, growth 10 (130,647,294 params)."""
  return defaults.set_architecture(defaults.get_config(), '74-10')
