"""Numerics after real training: 50 steps of the tiny model on CIFAR-10, then round trips."""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from denseflow_jax import checkpoint, train
from denseflow_jax.model import DenseFlow

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN_NPZ = ROOT.parent / 'shared' / 'data' / 'cifar10_train_subset.npz'
TEST_NPZ = ROOT.parent / 'shared' / 'data' / 'cifar10_test_subset.npz'


@pytest.mark.slow  # started first under pytest-xdist (conftest)
@pytest.mark.skipif(not TRAIN_NPZ.exists(), reason=f'{TRAIN_NPZ} not present (real CIFAR-10)')
def test_round_trips_after_50_training_steps(tmp_path):
  config = tiny.get_config()
  config.data.dataset = 'npz'
  config.data.train_npz = str(TRAIN_NPZ)
  config.data.test_npz = str(TEST_NPZ)
  config.train.batch_size = 8
  config.train.num_steps = 50
  config.train.warmup_steps = 10
  config.train.log_every = 25
  config.train.checkpoint_every = 50
  config.train.eval_every = 0         # no evaluation or sampling: this test is about the flow
  config.eval.num_samples = 4
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  step, variables = checkpoint.load_variables(workdir)
  assert step == 50

  model = DenseFlow(config.model)
  x = jnp.asarray(np.load(TEST_NPZ)['images'][:8])
  key = jax.random.key(7)

  # Integer round trip through the whole model (with the dequantization noise of `key`).
  latents = jax.jit(lambda v, x, k: model.apply(v, x, rngs={'noise': k}, method=model.encode))(
      variables, x, key)
  x_back = jax.jit(lambda v, l: model.apply(v, l, method=model.decode))(variables, latents)
  assert x_back.dtype == jnp.uint8
  assert np.array_equal(np.asarray(x_back), np.asarray(x))

  # Float round trip of the continuous flow: y -> (z, dropped) -> y.
  def float_round_trip(v, x, k):
    def fn(m, x):
      y, _ = m.dequantizer(x, dtype=jnp.float32)
      z, dropped, _, _ = m.flow_forward(y)
      return y, m.flow_inverse(z, dropped)
    return model.apply(v, x, rngs={'noise': k}, method=fn)
  y, y_back = jax.jit(float_round_trip)(variables, x, key)
  err = float(jnp.max(jnp.abs(y - y_back)))
  print(f'float latent round trip after 50 steps: max |y - y_back| = {err:.3e} '
        f'({err * 256:.3e} in pixel units)')
  assert np.isfinite(err) and err < 1e-3
