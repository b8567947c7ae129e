r"""Draws samples from a trained model: PNG grid and the integer images as .npy.

`python experiments/sample.py --workdir DIR --num 64 --temperature 0.8`

Writes `DIR/samples/sample_t<T>_seed<S>.png` and `.npy` (uint8 (num, H, W, C) with values in
[0, 2^num_bits - 1]; the PNG is rescaled to 8 bits). Works with training workdirs and with
converted checkpoints (config.json + params).
"""
import os

from absl import flags

from denseflow_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir with config.json and checkpoints/.')
_NUM = flags.DEFINE_integer('num', 64, 'Number of samples.')
_TEMPERATURE = flags.DEFINE_float('temperature', 1.0, 'Scale of every Gaussian draw.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_STEP = flags.DEFINE_integer('step', -1, 'Checkpoint step (-1 = newest readable).')
_OUTPUT_DIR = flags.DEFINE_string('output_dir', '', 'Where to write (default DIR/samples).')
_CACHE = flags.DEFINE_bool('compilation_cache', True, 'Use the persistent XLA compilation '
                            'cache (DENSEFLOW_JAX_CACHE, default ~/.cache/denseflow_jax/xla).')
flags.mark_flag_as_required('workdir')


def check_flags() -> str:
  """The flags' ranges and the output directory, before anything is loaded; returns it."""
  cli.check_int('--num', _NUM.value, 1)
  cli.check_positive_finite('--temperature', _TEMPERATURE.value)
  cli.check_int('--seed', _SEED.value, 0, 2**32 - 1)
  cli.check_int('--step', _STEP.value, -1, note='-1 = newest readable')
  cli.check_input_dir('--workdir', _WORKDIR.value)
  from denseflow_jax import artifacts  # pylint: disable=g-import-not-at-top
  out = _OUTPUT_DIR.value or os.path.join(_WORKDIR.value, artifacts.SAMPLES_DIR)
  cli.check_output_dir('--output_dir' if _OUTPUT_DIR.value else '--workdir (DIR/samples)', out)
  return out


def main(argv):
  del argv  # checked by cli.run
  out = check_flags()
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from denseflow_jax import artifacts, checkpoint, parallel  # pylint: disable=g-import-not-at-top
  checkpoint.quiet_orbax_logs()
  if _CACHE.value:
    from denseflow_jax.model import enable_compilation_cache  # pylint: disable=g-import-not-at-top
    enable_compilation_cache()

  mesh = parallel.make_mesh()
  config, model, step, variables = checkpoint.load_model(
      _WORKDIR.value, mesh, None if _STEP.value < 0 else _STEP.value)
  devices = mesh.devices.size
  padded = -(-_NUM.value // devices) * devices  # every device draws the same number
  key = parallel.replicate(np.asarray(jax.random.PRNGKey(_SEED.value)), mesh)
  sharded = parallel.ShardedModel(model, mesh)
  images = parallel.to_host(sharded.sample(variables, key, padded, _TEMPERATURE.value))
  images = images[:_NUM.value]
  if jax.process_index() == 0:
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, f'sample_t{_TEMPERATURE.value:g}_seed{_SEED.value}')
    np.save(stem + '.npy', images)
    artifacts.save_sample_grid(stem + '.png', images, config.model.num_bits)
    print(f'{len(images)} samples from step {step} (T={_TEMPERATURE.value:g}): {stem}.png, '
          f'{stem}.npy')


if __name__ == '__main__':
  cli.run(main)
