"""DenseFlow-45-6 (the paper's ablation model, Table 4) on CIFAR-10."""
from denseflow_jax import defaults


def get_config():
  """DenseFlow-45-6: blocks (5, 3, 1), modules (3, 5, 15), mid 48, growth 6 (75,020,522 params)."""
  config = defaults.set_architecture(defaults.get_config(), '45-6')
  config.train.num_epochs = 300
  return config
