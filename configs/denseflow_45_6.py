"""DenseFlow-45-6 (the paper's ablation model, Table 4) on CIFAR-10."""
from configs import default


def get_config():
  """DenseFlow-45-6: blocks (5, 3, 1), modules (3, 5, 15), mid 48, growth 6 (75,020,522 params)."""
  config = default.get_config()
  config.model.block_conf = (5, 3, 1)
  config.model.layers_conf = (3, 5, 15)
  config.model.growth_rate = 6
  config.train.num_epochs = 300
  return config
