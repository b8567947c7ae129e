r"""Test bits/dim of a trained model by the importance-weighted bound (IWBO).

`python experiments/evaluate.py --workdir DIR --k 1000 --chunk 50`

log p(x) >= logsumexp_i log p(x, noise_i) - log k over k draws of the dequantization and
cross-unit noise, evaluated `chunk` draws at a time (`denseflow_jax.evaluation.iwbo_bpd`).
Prints and writes (JSON, default `DIR/eval_iwbo_k<k>.json`) the mean test bits/dim and its
standard error over examples.
Works with training workdirs and with converted checkpoints (config.json + params).

`--data` names other images in the syntax of every tool (`npz:PATH`, `digits:test`,
`[tfds:]NAME[:SPLIT]`); the default is the run's own test split. Published weights on a local
npz: `python experiments/evaluate.py --workdir runs/official_cifar10 --data npz:test.npz`.
Per-image scores of any images: `experiments/score.py`.
"""
import json
import os
import time

from absl import flags

from denseflow_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir with config.json and checkpoints/.')
_K = flags.DEFINE_integer('k', 0, 'Importance samples per image (0 = config.eval.iwbo_k).')
_CHUNK = flags.DEFINE_integer('chunk', -1, 'Draws evaluated at once (-1 = config.eval.iwbo_chunk'
                              ', 0 = all k).')
_BATCH = flags.DEFINE_integer('batch_size', 0, 'Images per batch (0 = config.eval.batch_size).')
_DATA = flags.DEFINE_string('data', '', 'Images to evaluate (default: the run\'s test split): '
                            'npz:PATH, digits:SPLIT, [tfds:]NAME[:SPLIT].')
_MAX = flags.DEFINE_integer('max_examples', 0, 'Evaluate the first N images (0 = all).')
_STEP = flags.DEFINE_integer('step', -1, 'Checkpoint step (-1 = newest readable).')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the noise draws.')
_OUTPUT = flags.DEFINE_string('output', '', 'JSON path (default DIR/eval_iwbo_k<k>.json).')
_DATA_DIR = flags.DEFINE_string('data_dir', '', 'TFDS data_dir (default config.data.data_dir).')
_CACHE = flags.DEFINE_bool('compilation_cache', True, 'Use the persistent XLA compilation '
                            'cache (DENSEFLOW_JAX_CACHE, default ~/.cache/denseflow_jax/xla).')
flags.mark_flag_as_required('workdir')


def check_flags() -> None:
  """The flags' ranges and the output path, before anything is loaded (UsageError)."""
  cli.check_int('--k', _K.value, 0, note='0 = config.eval.iwbo_k')
  cli.check_int('--chunk', _CHUNK.value, -1, note='-1 = config.eval.iwbo_chunk, 0 = all k')
  cli.check_int('--batch_size', _BATCH.value, 0, note='0 = config.eval.batch_size')
  cli.check_int('--max_examples', _MAX.value, 0, note='0 = all')
  cli.check_int('--step', _STEP.value, -1, note='-1 = newest readable')
  cli.check_int('--seed', _SEED.value, 0, 2**32 - 1)
  cli.check_input_dir('--workdir', _WORKDIR.value)
  if _OUTPUT.value:
    cli.check_output_file('--output', _OUTPUT.value)
  elif not os.access(_WORKDIR.value, os.W_OK | os.X_OK):
    raise cli.UsageError(f'--workdir={_WORKDIR.value!r} is not writable (the result goes to '
                         'DIR/eval_iwbo_k<k>.json); pass --output')


def main(argv):
  del argv  # checked by cli.run
  check_flags()
  import jax  # pylint: disable=g-import-not-at-top
  # pylint: disable=g-import-not-at-top
  from denseflow_jax import checkpoint, config_file, data, evaluation, parallel
  # pylint: enable=g-import-not-at-top
  checkpoint.quiet_orbax_logs()
  if _CACHE.value:
    from denseflow_jax.model import enable_compilation_cache  # pylint: disable=g-import-not-at-top
    enable_compilation_cache()

  workdir = _WORKDIR.value
  config = cli.workdir_config(workdir)
  k = _K.value or int(config.eval.iwbo_k)
  chunk = int(config.eval.iwbo_chunk) if _CHUNK.value < 0 else _CHUNK.value
  chunk = min(chunk, k) if chunk else k
  batch_size = _BATCH.value or int(config.eval.batch_size)
  mesh = parallel.make_mesh()
  problems = []
  if k < 1 or batch_size < 1:
    problems.append(f'k={k} (--k or eval.iwbo_k in {config_file.config_path(workdir)}) and '
                    f'batch size {batch_size} must be >= 1')
  elif k % chunk:
    problems.append(f'--k={k} is not divisible by --chunk={chunk}')
  if batch_size % mesh.devices.size:
    problems.append(f'--batch_size={batch_size} is not divisible by the device count '
                    f'{mesh.devices.size}')
  if problems:
    cli.fail('; '.join(problems))
  output = _OUTPUT.value or os.path.join(workdir, f'eval_iwbo_k{k}.json')
  source = data.source_for_model(_DATA.value, config, 'test', _DATA_DIR.value)
  _, model, step, variables = checkpoint.load_model(
      workdir, mesh, None if _STEP.value < 0 else _STEP.value,
      config=config)
  start = time.time()
  iwbo = evaluation.iwbo_bpd_of_source(model, variables, source, mesh, k, chunk,
                                       seed=_SEED.value, max_examples=_MAX.value,
                                       batch_size=batch_size)
  n = iwbo.num_examples
  result = {
      'workdir': os.path.abspath(workdir), 'step': int(step),
      'data': _DATA.value or config.data.dataset,
      'split': source.split, 'num_examples': n, 'k': k, 'chunk': chunk,
      'batch_size': batch_size, 'seed': _SEED.value, 'bpd_mean': iwbo.mean,
      'bpd_stderr': iwbo.stderr, 'num_devices': int(mesh.devices.size),
      'wall_s': time.time() - start}
  print(f"test bpd (IWBO, k={k}): {result['bpd_mean']:.4f} +- {result['bpd_stderr']:.4f} "
        f"(standard error, {n} images, step {step})")
  if jax.process_index() == 0:
    with open(output, 'w') as f:
      json.dump(result, f, indent=2)
    print(f'wrote {output}')


if __name__ == '__main__':
  cli.run(main)
