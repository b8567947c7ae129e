r"""Per-image bits/dim of any images, and likelihood as an out-of-distribution score.

`python experiments/score.py --workdir DIR --data digits:test --ood npz:other.npz --k 16`

Scores every image of `--data` (default: the run's test split) by the importance-weighted bound
with `--k` draws, `--repeats` times with independent draws, and writes
`DIR/scores/<data>.npy` (float64 bits/dim per image, the mean over repeats) and `<data>.csv`
(`index,bpd,stderr`: the standard error of that mean over the repeats, 0 for one repeat).
With `--ood SPEC` it also scores those images, reports the AUROC of bits/dim as the test
"out of distribution" (`denseflow_jax.ood.auroc`), and plots both histograms in
`<data>_vs_<ood>.png`, with the numbers in `<data>_vs_<ood>.json`.
Data specs: `npz:PATH`, `digits:train|test`, `[tfds:]NAME[:SPLIT]`.
"""
import json
import os
import re
import time

from absl import flags

from denseflow_jax import cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir with config.json and checkpoints/.')
_DATA = flags.DEFINE_string('data', '', 'Images to score (default: the run\'s test split).')
_OOD = flags.DEFINE_string('ood', '', 'Out-of-distribution images to score and compare.')
_K = flags.DEFINE_integer('k', 16, 'Importance samples per image and repeat.')
_CHUNK = flags.DEFINE_integer('chunk', 0, 'Draws evaluated at once (0 = all k).')
_REPEATS = flags.DEFINE_integer('repeats', 2, 'Independent IWBO estimates per image (for the '
                                'standard error).')
_NUM = flags.DEFINE_integer('num', 0, 'Score the first N images of each set (0 = all).')
_BATCH = flags.DEFINE_integer('batch_size', 0, 'Images per batch (0 = config.eval.batch_size).')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the noise draws.')
_STEP = flags.DEFINE_integer('step', -1, 'Checkpoint step (-1 = newest readable).')
_DATA_DIR = flags.DEFINE_string('data_dir', '', 'TFDS data_dir (default config.data.data_dir).')
_OUTPUT_DIR = flags.DEFINE_string('output_dir', '', 'Where to write (default DIR/scores).')
flags.mark_flag_as_required('workdir')


def check_flags() -> str:
  """The flags' ranges and the output directory, before anything is loaded; returns it."""
  cli.check_int('--k', _K.value, 1)
  cli.check_int('--chunk', _CHUNK.value, 0, note='0 = all k')
  if _CHUNK.value and _K.value % _CHUNK.value:
    raise cli.UsageError(f'--k={_K.value} is not divisible by --chunk={_CHUNK.value}')
  cli.check_int('--repeats', _REPEATS.value, 1)
  cli.check_int('--num', _NUM.value, 0, note='0 = all')
  cli.check_int('--batch_size', _BATCH.value, 0, note='0 = config.eval.batch_size')
  cli.check_int('--seed', _SEED.value, 0, 2**32 - 1 - 1000)
  cli.check_int('--step', _STEP.value, -1, note='-1 = newest readable')
  cli.check_input_dir('--workdir', _WORKDIR.value)
  out = _OUTPUT_DIR.value or os.path.join(_WORKDIR.value, 'scores')
  cli.check_output_dir('--output_dir' if _OUTPUT_DIR.value else '--workdir (DIR/scores)', out)
  return out


def slug(spec: str) -> str:
  """A file-name stem for a data spec: `npz:/a/b.npz` -> `npz_b`, `digits:test` -> `digits_test`."""
  kind, _, rest = spec.partition(':')
  if kind == 'npz':
    rest = os.path.splitext(os.path.basename(rest))[0]
  return re.sub(r'[^A-Za-z0-9._-]+', '_', f'{kind}_{rest}' if rest else kind).strip('_')


def score(model, variables, source, mesh, batch_size: int):
  """(bpd per image: mean over repeats, its standard error over repeats)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from denseflow_jax import evaluation  # pylint: disable=g-import-not-at-top
  runs = np.stack([evaluation.iwbo_bpd_of_source(
      model, variables, source, mesh, _K.value, _CHUNK.value, seed=_SEED.value + r,
      max_examples=_NUM.value, batch_size=batch_size).bpd for r in range(_REPEATS.value)])
  stderr = (runs.std(axis=0, ddof=1) / np.sqrt(len(runs)) if len(runs) > 1
            else np.zeros(runs.shape[1]))
  return runs.mean(axis=0), stderr


def write_scores(stem: str, bpd, stderr) -> None:
  import numpy as np  # pylint: disable=g-import-not-at-top
  np.save(stem + '.npy', bpd)
  with open(stem + '.csv', 'w') as f:
    f.write('index,bpd,stderr\n')
    for i, (b, s) in enumerate(zip(bpd, stderr)):
      f.write(f'{i},{b:.6f},{s:.6f}\n')


def main(argv):
  del argv  # checked by cli.run
  out = check_flags()
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from denseflow_jax import checkpoint, data, ood, parallel  # pylint: disable=g-import-not-at-top
  checkpoint.quiet_orbax_logs()
  start = time.monotonic()
  config = cli.workdir_config(_WORKDIR.value)
  mesh = parallel.make_mesh()
  batch_size = _BATCH.value or int(config.eval.batch_size)
  batch_size = -(-batch_size // mesh.devices.size) * mesh.devices.size
  sets = {'data': (_DATA.value or f'{config.data.dataset}:test',
                   data.source_for_model(_DATA.value, config, 'test', _DATA_DIR.value))}
  if _OOD.value:
    sets['ood'] = (_OOD.value, data.source_for_model(_OOD.value, config, 'test', _DATA_DIR.value))
  _, model, step, variables = checkpoint.load_model(
      _WORKDIR.value, mesh, None if _STEP.value < 0 else _STEP.value,
      config=config)
  results, summary = {}, {'workdir': os.path.abspath(_WORKDIR.value), 'step': int(step),
                          'k': _K.value, 'repeats': _REPEATS.value, 'seed': _SEED.value}
  host0 = jax.process_index() == 0
  if host0:
    os.makedirs(out, exist_ok=True)
  for role, (spec, source) in sets.items():
    n = len(source) if _NUM.value <= 0 else min(_NUM.value, len(source))
    print(f'scoring {n} images of {spec} (IWBO k={_K.value}, {_REPEATS.value} repeats)',
          flush=True)
    bpd, stderr = score(model, variables, source, mesh, batch_size)
    results[role] = bpd
    stem = os.path.join(out, slug(spec))
    if host0:
      write_scores(stem, bpd, stderr)
    summary[role] = {'spec': spec, 'num': int(len(bpd)), 'bpd_mean': float(bpd.mean()),
                     'bpd_median': float(np.median(bpd)), 'stderr_median': float(np.median(stderr)),
                     'scores': stem + '.npy'}
    print(f'{spec}: mean {bpd.mean():.4f} bits/dim, median {np.median(bpd):.4f} ({len(bpd)} '
          f'images; median standard error {np.median(stderr):.4f}); {stem}.npy, .csv')
  if 'ood' in results:
    summary['auroc'] = ood.auroc(results['data'], results['ood'])
    name = f'{slug(sets["data"][0])}_vs_{slug(sets["ood"][0])}'
    if host0:
      summary['histogram'] = ood.plot_histograms(
          os.path.join(out, name + '.png'), {sets['data'][0]: results['data'],
                                             sets['ood'][0]: results['ood']},
          title=f'AUROC {summary["auroc"]:.3f} (step {step}, k={_K.value})')
      with open(os.path.join(out, name + '.json'), 'w') as f:
        json.dump(summary, f, indent=1)
    print(f'AUROC of bits/dim for "{sets["ood"][0]}" against "{sets["data"][0]}": '
          f'{summary["auroc"]:.4f} (1 = separated, 0.5 = chance); '
          f'{os.path.join(out, name)}.png, .json')
  print(f'done in {time.monotonic() - start:.1f} s')


if __name__ == '__main__':
  cli.run(main)
