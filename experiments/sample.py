r"""Draws samples from a trained model: PNG grid and the integer images as .npy.

`python experiments/sample.py --workdir DIR --num 64 --temperature 0.8`

Writes `DIR/samples/sample_t<T>_seed<S>.png` and `.npy` (uint8 (num, H, W, C) with values in
[0, 2^num_bits - 1]; the PNG is rescaled to 8 bits and enlarged to >= 256 px). Works with
training workdirs and with converted checkpoints (config.json + params).

`--temperatures 0.5,0.7,0.9,1.0` instead writes one grid with a row per temperature, every row
from the same Gaussian draws scaled by its temperature (the standard figure of a flow):
`sample_grid_t0.5-0.7-0.9-1_seed<S>.png` and `.npy` (uint8 (temperatures, num, H, W, C)).
"""
import os

from absl import flags

from denseflow_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir with config.json and checkpoints/.')
_NUM = flags.DEFINE_integer('num', 64, 'Number of samples.')
_TEMPERATURE = flags.DEFINE_float('temperature', 1.0, 'Scale of every Gaussian draw.')
_TEMPERATURES = flags.DEFINE_list('temperatures', [], 'Comma-separated temperatures: one grid '
                                  'row per temperature (overrides --temperature).')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_STEP = flags.DEFINE_integer('step', -1, 'Checkpoint step (-1 = newest readable).')
_OUTPUT_DIR = flags.DEFINE_string('output_dir', '', 'Where to write (default DIR/samples).')
_CACHE = flags.DEFINE_bool('compilation_cache', True, 'Use the persistent XLA compilation '
                            'cache (DENSEFLOW_JAX_CACHE, default ~/.cache/denseflow_jax/xla).')
flags.mark_flag_as_required('workdir')


def temperatures() -> list:
  """--temperatures as floats, each checked (empty: the single --temperature)."""
  out = []
  for text in _TEMPERATURES.value:
    try:
      value = float(text)
    except ValueError:
      raise cli.UsageError(f'--temperatures: {text!r} is not a number') from None
    out.append(cli.check_positive_finite('--temperatures', value))
  return out


def check_flags() -> str:
  """The flags' ranges and the output directory, before anything is loaded; returns it."""
  cli.check_int('--num', _NUM.value, 1)
  cli.check_positive_finite('--temperature', _TEMPERATURE.value)
  temperatures()
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
      _WORKDIR.value, mesh, None if _STEP.value < 0 else _STEP.value,
      config=cli.workdir_config(_WORKDIR.value))
  devices = mesh.devices.size
  padded = -(-_NUM.value // devices) * devices  # every device draws the same number
  key = parallel.replicate(np.asarray(jax.random.PRNGKey(_SEED.value)), mesh)
  sharded = parallel.ShardedModel(model, mesh)
  grid = temperatures()
  rows = [parallel.to_host(sharded.sample(variables, key, padded, t))[:_NUM.value]
          for t in (grid or [_TEMPERATURE.value])]
  if jax.process_index() == 0:
    os.makedirs(out, exist_ok=True)
    if grid:
      images = np.stack(rows)
      stem = os.path.join(out, f'sample_grid_t{"-".join(f"{t:g}" for t in grid)}_seed{_SEED.value}')
      artifacts.save_sample_grid(stem + '.png', images.reshape((-1,) + images.shape[2:]),
                                 config.model.num_bits, columns=_NUM.value)
      what = f'{_NUM.value} samples at each of T = {", ".join(f"{t:g}" for t in grid)}'
    else:
      images = rows[0]
      stem = os.path.join(out, f'sample_t{_TEMPERATURE.value:g}_seed{_SEED.value}')
      artifacts.save_sample_grid(stem + '.png', images, config.model.num_bits)
      what = f'{len(images)} samples (T={_TEMPERATURE.value:g})'
    np.save(stem + '.npy', images)
    print(f'{what} from step {step}: {stem}.png, {stem}.npy')

if __name__ == '__main__':
  cli.run(main)
