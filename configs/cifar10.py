"""CIFAR-10 with DenseFlow-74-10 (the paper's main result, 2.98 bpd).

Adamax 1e-3, warm-up 5000 steps, lr x 0.9975 per epoch, batch 64, 580 epochs, random flip and
4% edge-padded translation; test bits/dim by IWBO with k = 1000.
Variant `finetune` (`--config configs/cifar10.py:finetune --config.train.init_from=RUN`):
70 more epochs at a constant lr 2e-5 from the newest checkpoint of RUN, in a new workdir.
"""
from denseflow_jax import defaults


def get_config(variant: str = ''):
  """The CIFAR-10 config; `variant` '' (train from scratch) or 'finetune'."""
  defaults.check_variant(variant, ('', 'finetune'), 'configs/cifar10.py')
  config = defaults.get_config()
  config.data.dataset = 'cifar10'
  config.train.batch_size = 64
  config.train.num_epochs = 580
  config.train.decay_rate = 0.9975
  config.eval.iwbo_k = 1000
  if variant == 'finetune':
    defaults.finetune(config, num_epochs=70)
  return config
