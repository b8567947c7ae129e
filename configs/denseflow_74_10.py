"""DenseFlow-74-10 (all main results of the paper) on CIFAR-10: the defaults."""
from configs import default


def get_config():
  """DenseFlow-74-10: blocks (6, 4, 1), modules (5, 6, 20), mid 48, growth 10 (130,647,294 params)."""
  return default.get_config()
