"""CelebA 64x64 with DenseFlow-74-10 (paper: 1.99 bpd).

Data: TFDS `celeb_a`, aligned images cropped to the 148x148 box at (row 40, column 15) and
resized to 64x64 (bilinear); official partition, test split. Batch 32, 50 epochs, lr x 0.95
per epoch, horizontal flip only; IWBO k = 200. Variant `finetune`: 5 more epochs at lr 2e-5.
"""
from denseflow_jax import defaults


def get_config(variant: str = ''):
  """The CelebA config; `variant` '' or 'finetune'."""
  defaults.check_variant(variant, ('', 'finetune'), 'configs/celeba.py')
  config = defaults.get_config()
  config.model.image_size = 64
  config.data.dataset = 'celeba'
  config.data.hflip = True
  config.data.translate = 0.0
  config.train.batch_size = 32
  config.train.num_epochs = 50
  config.train.decay_rate = 0.95
  config.eval.batch_size = 32
  config.eval.iwbo_k = 200
  if variant == 'finetune':
    defaults.finetune(config, num_epochs=5)
  return config
