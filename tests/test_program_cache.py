"""program_cache: the loop's programs exported, saved beside the compilation cache, reloaded."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from denseflow_jax import parallel, program_cache, train


def _state(scale=1.0):
  """A TrainState (a pytree node `jax.export` cannot serialise without our flat trees)."""
  return train.TrainState(step=jnp.zeros((), jnp.int32),
                          params={'w': scale * jnp.arange(6.0).reshape(2, 3)},
                          batch_stats={}, opt_state=(jnp.ones(6),),
                          rng=jnp.zeros(2, jnp.uint32), nonfinite=jnp.zeros((), jnp.int32))


def _step(state, batch):
  w = state.params['w'] * jnp.mean(batch.astype(jnp.float32))
  return state.replace(step=state.step + 1, params={'w': w}), {'sum': jnp.sum(w)}


def _program(mesh, key):
  rep, bat = parallel.replicated_sharding(mesh), parallel.batch_sharding(mesh)
  jitted = jax.jit(_step, in_shardings=(rep, bat), out_shardings=(rep, rep), donate_argnums=(0,))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                          _state())
  batch = jax.ShapeDtypeStruct((4 * jax.device_count(), 2), jnp.uint8, sharding=bat)
  return program_cache.Program.load_or_export(jitted, (abstract, batch), name='toy_step',
                                              key=key, mesh=mesh, donate_argnums=(0,))


def _run(program, mesh):
  rep, bat = parallel.replicated_sharding(mesh), parallel.batch_sharding(mesh)
  state = jax.device_put(_state(), rep)
  batch = jax.device_put(np.full((4 * jax.device_count(), 2), 3, np.uint8), bat)
  new_state, metrics = program.compile()(state, batch)
  assert state.params['w'].is_deleted()  # donated, as the jitted function donates
  return new_state, metrics


def test_a_saved_program_is_loaded_and_runs_as_the_traced_one(cache_dir):
  mesh = parallel.make_mesh()
  first = _program(mesh, {'config': 'a'})
  assert not first.loaded
  files = os.listdir(os.path.join(cache_dir, 'exported'))
  assert len(files) == 1 and files[0].startswith('toy_step-')
  second = _program(mesh, {'config': 'a'})
  assert second.loaded
  assert jax.tree.structure(second.out_info) == jax.tree.structure(first.out_info)
  (s1, m1), (s2, m2) = _run(first, mesh), _run(second, mesh)
  assert isinstance(s2, train.TrainState) and int(s2.step) == 1
  for a, b in zip(jax.tree.leaves((s1, m1)), jax.tree.leaves((s2, m2))):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(s2.params['w'], 3 * np.arange(6.0).reshape(2, 3))
  # Another key, or another library source, is another program.
  assert not _program(mesh, {'config': 'b'}).loaded
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(program_cache, 'source_fingerprint', lambda: 'another library source')
    assert not _program(mesh, {'config': 'a'}).loaded
  assert len(os.listdir(os.path.join(cache_dir, 'exported'))) == 3


def test_an_unreadable_saved_program_is_exported_again(cache_dir, caplog):
  mesh = parallel.make_mesh()
  _program(mesh, {'config': 'a'})
  folder = os.path.join(cache_dir, 'exported')
  path = os.path.join(folder, os.listdir(folder)[0])
  with open(path, 'wb') as f:
    f.write(b'not a program')
  again = _program(mesh, {'config': 'a'})
  assert not again.loaded
  assert 'cannot read' in caplog.text and 'exporting it again' in caplog.text
  assert _program(mesh, {'config': 'a'}).loaded  # the file was replaced
  np.testing.assert_allclose(_run(again, mesh)[1]['sum'], 3 * 15.0)


def test_nothing_is_saved_without_the_compilation_cache(tmp_path):
  before = jax.config.jax_enable_compilation_cache
  jax.config.update('jax_enable_compilation_cache', False)
  try:
    assert program_cache.directory() is None
    program = _program(parallel.make_mesh(), {'config': 'a'})
  finally:
    jax.config.update('jax_enable_compilation_cache', before)
  assert not program.loaded
  np.testing.assert_allclose(_run(program, parallel.make_mesh())[1]['sum'], 3 * 15.0)
  assert not os.listdir(tmp_path)
