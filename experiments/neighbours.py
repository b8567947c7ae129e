r"""Nearest training neighbours of generated images (the memorisation check, paper Appendix E).

`python experiments/neighbours.py --workdir DIR --num 8 --temperature 0.8`

Samples `--num` images and finds the `--k` nearest training images of each by L2 distance over
the whole image or a centre crop (`--crop`), exactly and batched on device. Writes
`DIR/neighbours/neighbours_t<T>_seed<S>.png` (one row per sample: the sample, then its
neighbours, nearest first) and `.npz` (samples, indices, distances). As a yardstick it also
reports how far real test images are from their nearest training image (`--baseline`): samples
much closer to the training set than test images are would be copies.

`--data` names the training images (default: the run's own training split), in the syntax of
every tool: `npz:PATH`, `digits:train`, `[tfds:]NAME[:SPLIT]`.
"""
import json
import os
import time

from absl import flags

from denseflow_jax import cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir with config.json and checkpoints/.')
_NUM = flags.DEFINE_integer('num', 8, 'Number of samples (rows of the grid).')
_K = flags.DEFINE_integer('k', 5, 'Neighbours per sample.')
_CROP = flags.DEFINE_integer('crop', 0, 'Compare the central CROP x CROP pixels (0 = all).')
_TEMPERATURE = flags.DEFINE_float('temperature', 1.0, 'Scale of every Gaussian draw.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_STEP = flags.DEFINE_integer('step', -1, 'Checkpoint step (-1 = newest readable).')
_DATA = flags.DEFINE_string('data', '', 'Training images to search (default: the run\'s '
                            'training split): npz:PATH, digits:train, [tfds:]NAME[:SPLIT].')
_DATA_DIR = flags.DEFINE_string('data_dir', '', 'TFDS data_dir for a TFDS --data.')
_BASELINE = flags.DEFINE_integer('baseline', -1, 'Real test images whose nearest training '
                                 'distance is reported as a yardstick (-1 = as many as --num, '
                                 '0 = none).')
_BATCH = flags.DEFINE_integer('batch', 1024, 'Training images compared per device call.')
_OUTPUT_DIR = flags.DEFINE_string('output_dir', '', 'Where to write (default DIR/neighbours).')
flags.mark_flag_as_required('workdir')


def check_flags() -> str:
  """The flags' ranges and the output directory, before anything is loaded; returns it."""
  cli.check_int('--num', _NUM.value, 1)
  cli.check_int('--k', _K.value, 1)
  cli.check_int('--crop', _CROP.value, 0, note='0 = the whole image')
  cli.check_positive_finite('--temperature', _TEMPERATURE.value)
  cli.check_int('--seed', _SEED.value, 0, 2**32 - 1)
  cli.check_int('--step', _STEP.value, -1, note='-1 = newest readable')
  cli.check_int('--baseline', _BASELINE.value, -1, note='-1 = as many as --num')
  cli.check_int('--batch', _BATCH.value, 1)
  cli.check_input_dir('--workdir', _WORKDIR.value)
  out = _OUTPUT_DIR.value or os.path.join(_WORKDIR.value, 'neighbours')
  cli.check_output_dir('--output_dir' if _OUTPUT_DIR.value else '--workdir (DIR/neighbours)', out)
  return out


def _batches(source, batch: int, crop: int):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from denseflow_jax.neighbours import centre_crop  # pylint: disable=g-import-not-at-top
  for start in range(0, len(source), batch):
    yield centre_crop(source.read_batch(np.arange(start, min(start + batch, len(source)))),
                      crop)


def main(argv):
  del argv  # checked by cli.run
  out = check_flags()
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from denseflow_jax import artifacts, checkpoint, data, parallel  # pylint: disable=g-import-not-at-top
  from denseflow_jax.neighbours import centre_crop, nearest_neighbours  # pylint: disable=g-import-not-at-top
  from denseflow_jax.sampling import sample_batches  # pylint: disable=g-import-not-at-top
  checkpoint.quiet_orbax_logs()
  start = time.monotonic()
  mesh = parallel.make_mesh()
  config, model, step, variables = checkpoint.load_model(
      _WORKDIR.value, mesh, None if _STEP.value < 0 else _STEP.value,
      config=cli.workdir_config(_WORKDIR.value))
  bits = int(config.model.num_bits)
  if _DATA.value:
    train, test = data.source_from_spec(_DATA.value, _DATA_DIR.value), None
  else:
    train, test = data.load_sources(config.data, num_bits=bits)
  if train.num_bits != bits or train.shape != tuple(
      (config.model.image_size, config.model.image_size, config.model.num_channels)):
    raise ValueError(f'{train.name}: images {train.shape} with {train.num_bits} bits, but the '
                     f'model makes {config.model.image_size}x{config.model.image_size}x'
                     f'{config.model.num_channels} with {bits} bits')
  crop = _CROP.value
  centre_crop(np.zeros((1,) + train.shape, np.uint8), crop)  # checks the crop size
  print(f'sampling {_NUM.value} images from step {step} (T={_TEMPERATURE.value:g}); searching '
        f'{len(train)} training images of {train.name}', flush=True)
  sharded = parallel.ShardedModel(model, mesh)
  samples = np.concatenate(list(sample_batches(
      sharded, variables, _NUM.value, temperature=_TEMPERATURE.value, seed=_SEED.value,
      batch=_NUM.value)))
  index, dist = nearest_neighbours(centre_crop(samples, crop), _batches(train, _BATCH.value, crop),
                                   k=_K.value, batch=_BATCH.value)
  result = {'workdir': os.path.abspath(_WORKDIR.value), 'step': int(step),
            'temperature': _TEMPERATURE.value, 'seed': _SEED.value, 'crop': crop,
            'train': train.name, 'num_train': len(train),
            'nearest_median': float(np.median(dist[:, 0])),
            'nearest_min': float(np.min(dist[:, 0]))}
  baseline = _NUM.value if _BASELINE.value < 0 else _BASELINE.value
  if baseline and test is not None and len(test):
    real = test.read_batch(np.arange(min(baseline, len(test))))
    _, real_dist = nearest_neighbours(centre_crop(real, crop), _batches(train, _BATCH.value, crop),
                                      k=1, batch=_BATCH.value)
    result.update(test_nearest_median=float(np.median(real_dist[:, 0])),
                  num_test=len(real))
  if jax.process_index() == 0:
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, f'neighbours_t{_TEMPERATURE.value:g}_seed{_SEED.value}')
    rows = np.concatenate([samples[:, None], train.read_batch(index.reshape(-1)).reshape(
        index.shape + train.shape)], axis=1)
    artifacts.save_sample_grid(stem + '.png', rows.reshape((-1,) + train.shape), bits,
                               columns=_K.value + 1)
    np.savez(stem + '.npz', samples=samples, indices=index, distances=dist)
    with open(stem + '.json', 'w') as f:
      json.dump(result, f, indent=1)
    line = (f'nearest training image: median L2 {result["nearest_median"]:.1f}, min '
            f'{result["nearest_min"]:.1f}')
    if 'test_nearest_median' in result:
      line += f' (real test images: median {result["test_nearest_median"]:.1f})'
    print(f'{line}; {time.monotonic() - start:.1f} s; {stem}.png, .npz, .json')


if __name__ == '__main__':
  cli.run(main)
