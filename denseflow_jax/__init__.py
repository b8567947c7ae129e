"""denseflow-jax: DenseFlow (Densely connected normalizing flows) in JAX/Flax.

`denseflow_jax.defaults` is the config schema (`defaults.get_config()`); `DenseFlow` is the
model (imported on first use, so reading a config does not import JAX).
"""
from typing import Any

from denseflow_jax import defaults  # noqa: F401

__all__ = ['DenseFlow', 'defaults']


def __getattr__(name: str) -> Any:
  if name == 'DenseFlow':
    from denseflow_jax.model import DenseFlow  # pylint: disable=g-import-not-at-top
    return DenseFlow
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
