"""Table-4 ablation row (CIFAR-10, DenseFlow-45-6, 300 epochs): denseflow coupling,
no cross-unit coupling (no augmentation).

Paper: 3.14 bpd. The six rows are configs/ablation_{glow,denseflow}_{noaug,aug,aug_precond}.py.
"""
from configs import denseflow_45_6


def get_config():
  """DenseFlow-45-6 with coupling='denseflow', augment=False, noise='preconditioned'."""
  config = denseflow_45_6.get_config()
  config.model.coupling = 'denseflow'
  config.model.augment = False
  config.model.noise = 'preconditioned'
  config.train.num_epochs = 300
  return config
