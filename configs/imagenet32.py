"""ImageNet 32x32 with DenseFlow-74-10 (paper: 3.63 bpd).

Data: TFDS `imagenet_resized/32x32`, the box-resized downsampled ImageNet of Chrabaszcz et
al. 2017 that the authors used (not van den Oord's `downsampled_imagenet`); the validation
split is the test set. Batch 64, 20 epochs, lr x 0.95 per epoch, flip + 4% translation;
IWBO k = 200. Variant `finetune`: 2 more epochs at lr 2e-5 (set `train.init_from`).
"""
from denseflow_jax import defaults


def get_config(variant: str = ''):
  """The ImageNet32 config; `variant` '' or 'finetune'."""
  defaults.check_variant(variant, ('', 'finetune'), 'configs/imagenet32.py')
  config = defaults.get_config()
  config.data.dataset = 'imagenet32'
  config.train.batch_size = 64
  config.train.num_epochs = 20
  config.train.decay_rate = 0.95
  config.eval.iwbo_k = 200
  if variant == 'finetune':
    defaults.finetune(config, num_epochs=2)
  return config
