r"""FID (Fréchet Inception distance, pytorch-fid's network and definition) of a model or data set.

  python experiments/fid.py --workdir DIR --num 50000 --reference cifar10:train \
      --inception pt_inception-2015-12-05-6726825d.pth

samples `--num` images from the workdir's model in batches, extracts pool3 features and prints
the distance to the reference statistics. `--data SPEC` instead of `--workdir` compares two
data sets (real vs real). Data specs: `npz:PATH`, `digits:train|test`, `[tfds:]cifar10:train`
(any of our TFDS names); `--reference` may also be a `.npz` statistics file with `mu` and
`sigma` (pytorch-fid's `--save-stats` layout). Reference statistics are cached in
`--stats_cache` (default ~/.cache/denseflow_jax/fid_stats), keyed by spec, count and weights
file. The weights file comes from `--inception` or `$DENSEFLOW_JAX_INCEPTION`.

Writes `--output` (default DIR/fid.json with --workdir): fid, counts, spec, seconds.
"""
import json
import os
import re
import time

from absl import flags

_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir whose model is sampled.')
_DATA = flags.DEFINE_string('data', None, 'Instead of --workdir: a data spec (real vs real).')
_REFERENCE = flags.DEFINE_string('reference', None, 'Reference: data spec or statistics .npz.')
_NUM = flags.DEFINE_integer('num', 50000, 'Samples to draw (--workdir) or images to use '
                            '(--data; 0 = all).')
_REFERENCE_NUM = flags.DEFINE_integer('reference_num', 0, 'Reference images to use (0 = all).')
_FEATURES = flags.DEFINE_enum('features', 'inception', ['inception', 'digits'],
                              'Feature network: pytorch-fid\'s Inception-v3 (natural images) or '
                              'the digits classifier (8x8 digits; also gives the Inception-style '
                              'score).')
_INCEPTION = flags.DEFINE_string('inception', None, 'pytorch-fid weights file '
                                 '(default: $DENSEFLOW_JAX_INCEPTION).')
_BATCH = flags.DEFINE_integer('batch', 250, 'Images per sampling and feature batch.')
_TEMPERATURE = flags.DEFINE_float('temperature', 1.0, 'Sampling temperature.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_STEP = flags.DEFINE_integer('step', -1, 'Checkpoint step (-1 = newest readable).')
_STATS_CACHE = flags.DEFINE_string('stats_cache', '~/.cache/denseflow_jax/fid_stats',
                                   'Directory for cached reference statistics ("" = no cache).')
_SAVE_STATS = flags.DEFINE_string('save_stats', '', 'Also write the statistics of the samples '
                                  '(or --data) to this .npz.')
_OUTPUT = flags.DEFINE_string('output', '', 'JSON result (default DIR/fid.json with --workdir).')
_DATA_DIR = flags.DEFINE_string('data_dir', '', 'TFDS data_dir for tfds specs.')


def _source_batches(source, num: int, batch: int):
  from denseflow_jax import artifacts  # pylint: disable=g-import-not-at-top
  for i in range(0, num, batch):
    images = source.read_batch(range(i, min(i + batch, num)))
    yield artifacts.to_uint8(images, source.num_bits)


def _stats_of_spec(network, spec: str, num: int, cache_dir: str, log):
  """Statistics of a data spec or stats file, through the cache."""
  from denseflow_jax import data  # pylint: disable=g-import-not-at-top
  from denseflow_jax.metrics import extract, feature_stats, frechet  # pylint: disable=g-import-not-at-top
  if frechet.is_stats_file(os.path.expanduser(spec)):
    stats = frechet.load_stats(os.path.expanduser(spec))
    log(f'reference statistics from {spec} ({stats.count or "?"} images)')
    return stats, spec
  source = data.source_from_spec(spec, _DATA_DIR.value)
  n = len(source) if num <= 0 else min(num, len(source))
  cache = ''
  if cache_dir:
    slug = re.sub(r'[^A-Za-z0-9._-]+', '_', spec).strip('_')[-80:]
    cache = os.path.join(os.path.expanduser(cache_dir), f'{slug}_n{n}_{network.name}.npz')
    if os.path.isfile(cache):
      stats = frechet.load_stats(cache)
      log(f'reference statistics of {spec} ({n} images) from the cache {cache}')
      return stats, cache
  features = extract(network, _source_batches(source, n, _BATCH.value), n, f'features of {spec}',
                     log)
  stats = feature_stats(features)
  if cache:
    frechet.save_stats(cache, stats)
    log(f'cached the statistics of {spec} in {cache}')
  return stats, cache


def main(argv):
  del argv
  from denseflow_jax import cli  # pylint: disable=g-import-not-at-top
  if (_WORKDIR.value is None) == (_DATA.value is None):
    raise cli.UsageError('give exactly one of --workdir (sample a model) and --data (a data set)')
  if not _REFERENCE.value:
    raise cli.UsageError('--reference is required (a data spec such as cifar10:train, or a '
                         'statistics .npz)')
  cli.check_int('--num', _NUM.value, 1 if _WORKDIR.value else 0)
  cli.check_int('--batch', _BATCH.value, 1)
  cli.check_int('--reference_num', _REFERENCE_NUM.value, 0)
  cli.check_int('--seed', _SEED.value, 0)
  cli.check_positive_finite('--temperature', _TEMPERATURE.value)
  if _WORKDIR.value:
    cli.check_input_dir('--workdir', _WORKDIR.value, ('config.json',))
  output = _OUTPUT.value or (os.path.join(_WORKDIR.value, 'fid.json') if _WORKDIR.value else '')
  for path, what in ((output, '--output'), (_SAVE_STATS.value, '--save_stats')):
    if path:
      cli.check_output_file(what, path)
  if _STATS_CACHE.value:
    cli.check_output_dir('--stats_cache', _STATS_CACHE.value)

  import jax  # pylint: disable=g-import-not-at-top
  from denseflow_jax import artifacts, checkpoint, data, parallel  # pylint: disable=g-import-not-at-top
  from denseflow_jax.metrics import (InceptionFeatures, extract, feature_stats,  # pylint: disable=g-import-not-at-top
                                     frechet, frechet_distance, inception)
  from denseflow_jax.metrics.progress import format_seconds  # pylint: disable=g-import-not-at-top
  checkpoint.quiet_orbax_logs()
  log = print if jax.process_index() == 0 else (lambda *_: None)
  start = time.monotonic()
  mesh = parallel.make_mesh()
  if _FEATURES.value == 'digits':
    from denseflow_jax.metrics import digits  # pylint: disable=g-import-not-at-top
    network = digits.load_digits_classifier(log=log)
    log(f'digits classifier features ({network.name}), {mesh.devices.size} device(s)')
  else:
    network = InceptionFeatures(_INCEPTION.value, _BATCH.value, mesh)
    log(f'Inception weights {inception.find_weights(_INCEPTION.value)} ({network.name}), '
        f'{mesh.devices.size} device(s)')
  ref_stats, ref_where = _stats_of_spec(network, _REFERENCE.value, _REFERENCE_NUM.value,
                                        _STATS_CACHE.value, log)
  if _DATA.value:
    source = data.source_from_spec(_DATA.value, _DATA_DIR.value)
    n = len(source) if _NUM.value <= 0 else min(_NUM.value, len(source))
    features = extract(network, _source_batches(source, n, _BATCH.value), n,
                       f'features of {_DATA.value}', log)
    what = {'data': _DATA.value}
  else:
    config, model, step, variables = checkpoint.load_model(
        _WORKDIR.value, mesh, None if _STEP.value < 0 else _STEP.value,
        config=cli.workdir_config(_WORKDIR.value))
    from denseflow_jax.sampling import sample_batches  # pylint: disable=g-import-not-at-top
    sharded = parallel.ShardedModel(model, mesh)
    batch = -(-_BATCH.value // mesh.devices.size) * mesh.devices.size
    samples = (artifacts.to_uint8(images, config.model.num_bits) for images in sample_batches(
        sharded, variables, _NUM.value, temperature=_TEMPERATURE.value, seed=_SEED.value,
        batch=batch))

    log(f'sampling {_NUM.value} images from step {step} of {_WORKDIR.value} '
        f'(T={_TEMPERATURE.value:g}, batches of {batch})')
    features = extract(network, samples, _NUM.value, 'samples and features', log)
    what = {'workdir': os.path.abspath(_WORKDIR.value), 'step': int(step),
            'temperature': _TEMPERATURE.value, 'seed': _SEED.value}
  stats = feature_stats(features)
  if _SAVE_STATS.value and jax.process_index() == 0:
    frechet.save_stats(_SAVE_STATS.value, stats)
  fid = frechet_distance(stats, ref_stats)
  seconds = time.monotonic() - start
  if hasattr(network, 'probabilities_from_features'):
    from denseflow_jax.metrics.digits import inception_score  # pylint: disable=g-import-not-at-top
    what['inception_score'] = inception_score(network.probabilities_from_features(features))
  result = {'fid': fid, 'num': stats.count, 'reference': _REFERENCE.value,
            'reference_num': ref_stats.count, 'reference_stats': ref_where,
            'feature_network': network.name, 'seconds': round(seconds, 1), **what}
  if jax.process_index() == 0:
    if output:
      tmp = output + '.tmp'
      with open(tmp, 'w') as f:
        json.dump(result, f, indent=1)
      os.replace(tmp, output)
    score = (f', Inception-style score {what["inception_score"]:.3f}'
             if 'inception_score' in what else '')
    log(f'FID {fid:.4f}{score} ({stats.count} vs {ref_stats.count} images, '
        f'{format_seconds(seconds)})' + (f'; written to {output}' if output else ''))


if __name__ == '__main__':
  from denseflow_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main)
