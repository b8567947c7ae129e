"""Shared pytest fixtures: real CIFAR-10 test images and one initialised tiny DenseFlow.

The tiny model (configs/tiny.py, 10.1M parameters) takes about a minute to initialise and
compile on a 2-core CPU, so it is built once per test session and shared (read-only) by every
test that needs a real-sized model. Tests that can use a smaller model should build their own.
"""
import os
import types

import jax
import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR_TEST_NPZ = os.path.join(REPO_ROOT, '..', 'shared', 'data', 'cifar10_test_subset.npz')


def init_key(seed: int) -> jax.Array:
  """A PRNG key for initialising models in tests.

  Parameter initialisation draws one random array per parameter, and XLA:CPU compiles threefry
  draws slowly; the `unsafe_rbg` generator compiles several times faster. Tests only need
  *some* valid initialisation, so fixtures initialise with it.
  """
  return jax.random.key(seed, impl='unsafe_rbg')


def load_cifar_test_images(num: int) -> np.ndarray:
  """The first `num` CIFAR-10 test images `(num, 32, 32, 3)` uint8; skips the test if absent."""
  if not os.path.exists(CIFAR_TEST_NPZ):
    pytest.skip(f'real CIFAR-10 test images not found at {os.path.normpath(CIFAR_TEST_NPZ)}')
  with np.load(CIFAR_TEST_NPZ) as f:
    return np.asarray(f['images'][:num])


@pytest.fixture(scope='session')
def cifar_test_images() -> np.ndarray:
  """Eight real CIFAR-10 test images, uint8 `(8, 32, 32, 3)`; the test is skipped if absent."""
  return load_cifar_test_images(8)


@pytest.fixture(scope='session')
def tiny_flow() -> types.SimpleNamespace:
  """An initialised tiny DenseFlow shared by the session (treat it as read-only).

  Attributes: `config` (the full experiment ConfigDict), `model` (`DenseFlow`), `variables`
  (`params` and `batch_stats` from `init_variables`, ActNorm initialised on `images`), `images` (uint8
  `(8, 32, 32, 3)`: real CIFAR-10 test images when available, else uniform noise) and
  `real_images` (bool).
  """
  from configs import tiny
  from denseflow_jax import DenseFlow
  from denseflow_jax.model import init_variables

  config = tiny.get_config()
  model = DenseFlow(config.model)
  if os.path.exists(CIFAR_TEST_NPZ):
    images, real = load_cifar_test_images(8), True
  else:
    images = np.random.RandomState(0).randint(0, 256, (8, 32, 32, 3)).astype(np.uint8)
    real = False
  variables = jax.block_until_ready(init_variables(model, init_key(0), images))
  return types.SimpleNamespace(config=config, model=model, variables=variables, images=images,
                               real_images=real)


def pytest_collection_modifyitems(config, items):
  """Tests marked `slow` run first (a stable sort): with `-n 2` (pytest-xdist) the longest
  tests then overlap the many short ones instead of running alone at the end."""
  del config
  items.sort(key=lambda item: 0 if item.get_closest_marker('slow') else 1)


@pytest.fixture
def cache_dir(tmp_path):
  """JAX's persistent compilation cache on in `tmp_path/xla` for one test (and with it the
  saved exports of `denseflow_jax.program_cache`); the earlier settings afterwards."""
  before = (jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache)
  path = str(tmp_path / 'xla')
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_enable_compilation_cache', True)
  try:
    yield path
  finally:
    jax.config.update('jax_compilation_cache_dir', before[0])
    jax.config.update('jax_enable_compilation_cache', before[1])
