"""ImageNet 64x64 with DenseFlow-74-10 (paper: 3.35 bpd).

Data: TFDS `imagenet_resized/64x64` (box-resized, Chrabaszcz et al. 2017); validation split
as the test set. Batch 32, 10 epochs, lr x 0.95 per epoch, flip + 4% translation; IWBO
k = 200. Final latent (308, 8, 8). Variant `finetune`: 1 more epoch at lr 2e-5.
"""
from denseflow_jax import defaults


def get_config(variant: str = ''):
  """The ImageNet64 config; `variant` '' or 'finetune'."""
  defaults.check_variant(variant, ('', 'finetune'), 'configs/imagenet64.py')
  config = defaults.get_config()
  config.model.image_size = 64
  config.data.dataset = 'imagenet64'
  config.train.batch_size = 32
  config.train.num_epochs = 10
  config.train.decay_rate = 0.95
  config.eval.batch_size = 32
  config.eval.iwbo_k = 200
  if variant == 'finetune':
    defaults.finetune(config, num_epochs=1)
  return config
