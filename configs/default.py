"""Shared defaults: DenseFlow-74-10 on CIFAR-10 with the paper's training settings.

The fields are declared, with their meaning, in `denseflow_jax/defaults.py` (the library's
config schema, which it also uses to read saved configs); this file is the entry point for
experiment configs. Every experiment config starts from `get_config()` and changes only what
differs. Any field can be overridden on the command line: `--config.train.batch_size=32`.
"""
from denseflow_jax.defaults import get_config, get_model_config  # noqa: F401
