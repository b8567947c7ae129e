"""The paper's Table-4 ablation on CIFAR-10: DenseFlow-45-6, 300 epochs, one config per row.

`--config configs/table4.py:VARIANT` with VARIANT one of glow_noaug, glow_aug,
glow_aug_precond, denseflow_noaug, denseflow_aug, denseflow_aug_precond (paper: 3.42, 3.40,
3.37, 3.14, 3.08, 3.07 bpd). The rows are `denseflow_jax.defaults.TABLE4`; the small-scale
reproduction that runs all of them is `configs/ablation_small.py`.
"""
from denseflow_jax import defaults


def get_config(variant: str = ''):
  """DenseFlow-45-6 with the coupling / augmentation / noise switches of Table-4 row `variant`."""
  defaults.check_variant(variant, tuple(defaults.TABLE4), 'configs/table4.py')
  config = defaults.set_architecture(defaults.get_config(), '45-6')
  config.train.num_epochs = 300
  return defaults.set_table4_variant(config, variant)
