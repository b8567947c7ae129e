"""Training-time code needs no TensorFlow: it is neither imported nor required.

Each test runs a fresh interpreter (a few seconds of imports each): one checks that the
training, evaluation and sampling modules and the metrics writer leave `tensorflow` out of
`sys.modules`; one hides TensorFlow completely (as if it were not installed) and reads the
offline digits, an npz file and a real TFDS ArrayRecord dataset written here without
TensorFlow, through `data.make_data`.
"""
import json
import os
import subprocess
import sys
import textwrap

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO_ROOT, 'tests')

# Makes `tensorflow` (and its submodules) unfindable, exactly as when it is not installed:
# `import tensorflow` raises ModuleNotFoundError and `importlib.util.find_spec` returns None.
# (A `sys.modules['tensorflow'] = None` entry would not do: libraries that test
# `'tensorflow' in sys.modules` would take it for loaded.)
HIDE_TENSORFLOW = '''
import sys

class _HideTensorFlow:
  def __init__(self, finder):
    self._finder = finder

  def find_spec(self, name, path=None, target=None):
    if name.partition('.')[0] == 'tensorflow':
      return None
    find = getattr(self._finder, 'find_spec', None)
    return find(name, path, target) if find else None

  def __getattr__(self, attr):
    return getattr(self._finder, attr)

sys.meta_path[:] = [_HideTensorFlow(f) for f in sys.meta_path]
'''


def run_python(code: str, cwd: str, hide_tensorflow: bool = False) -> dict:
  """Runs `code` in a fresh interpreter (after HIDE_TENSORFLOW if `hide_tensorflow`); returns
  the JSON object it prints last."""
  code = (HIDE_TENSORFLOW if hide_tensorflow else '') + textwrap.dedent(code)
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join([REPO_ROOT, TESTS, env.get('PYTHONPATH', '')])
  env['JAX_PLATFORMS'] = 'cpu'
  result = subprocess.run([sys.executable, '-c', code], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-4000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_training_modules_and_writer_leave_tensorflow_unimported(tmp_path):
  out = run_python('''
      import json, sys
      import numpy as np
      import denseflow_jax.train, denseflow_jax.evaluation, denseflow_jax.sampling
      from denseflow_jax import data, metric_writer
      from test_data import make_config
      writer = metric_writer.create_writer('run')
      writer.write_hparams({'model': {'block_conf': [2, 2]}, 'lr': 1e-3})
      writer.write_scalars(1, {'train_bpd': 3.0})
      writer.write_images(1, {'samples': np.zeros((1, 8, 8, 1), np.uint8)})
      writer.flush()
      writer.close()
      loaded = data.make_data(make_config())
      batch = next(iter(loaded.train_batches()))
      print(json.dumps({'tensorflow': sorted(m for m in sys.modules
                                             if m.partition('.')[0] == 'tensorflow'),
                        'batch': list(batch.shape)}))
  ''', cwd=str(tmp_path))
  assert out == {'tensorflow': [], 'batch': [16, 8, 8, 1]}
  files = sorted(os.listdir(tmp_path / 'run'))
  assert files[0].startswith('events.out.tfevents.') and files[1] == 'metrics.jsonl'


def test_data_reads_tfds_npz_and_digits_with_tensorflow_absent(tmp_path):
  """The cifar10 split files are real ArrayRecord files of TFDS-serialized examples (PNG
  bytes, encoded with PIL), so tfds.builder / data_source and the feature decoding run for
  real; only the preparation (download_and_prepare) needs TensorFlow."""
  out = run_python('''
      import importlib.util, io, json
      import numpy as np
      from PIL import Image
      try:
        import tensorflow
        hidden = False
      except ModuleNotFoundError:
        hidden = importlib.util.find_spec('tensorflow') is None
      import tensorflow_datasets as tfds
      from array_record.python import array_record_module
      from configs import cifar10
      from denseflow_jax import data
      from test_data import make_config, write_tfds_metadata

      # Not prepared: the message says how, and that preparing needs the `prepare` extra.
      try:
        data.tfds_source('cifar10', 'train', data_dir='empty')
        message = ''
      except FileNotFoundError as e:
        message = str(e)

      n = 6
      images = {s: np.random.default_rng(i).integers(0, 256, (n, 32, 32, 3), np.uint8)
                for i, s in enumerate(('train', 'test'))}
      write_tfds_metadata('tfds', 'cifar10', ('train', 'test'), n=n)
      builder = tfds.builder('cifar10', data_dir='tfds')
      for split, split_images in images.items():
        (path,) = builder.info.splits[split].filepaths
        writer = array_record_module.ArrayRecordWriter(str(path), 'group_size:1')
        for i, image in enumerate(split_images):
          png = io.BytesIO()
          Image.fromarray(image).save(png, format='PNG')
          png.seek(0)
          writer.write(builder.info.features.serialize_example(
              {'id': f'{split}_{i}', 'image': png, 'label': i % 10}))
        writer.close()
      source = data.tfds_source('cifar10', 'test', data_dir='tfds')
      exact = bool((source.read_batch(range(n)) == images['test']).all())

      config = cifar10.get_config()
      config.data.data_dir = 'tfds'
      config.train.batch_size = config.eval.batch_size = 4
      loaded = data.make_data(config)
      batch = next(iter(loaded.train_batches()))
      evals = list(loaded.eval_batches())
      evals_exact = bool((np.concatenate([b.images[b.mask] for b in evals])
                          == images['test']).all())

      digits = data.make_data(make_config())
      np.savez('x.npz', images=np.zeros((20, 8, 8), np.uint8))
      npz = data.make_data(make_config('npz', train_npz='x.npz', holdout=2))
      print(json.dumps({
          'hidden': hidden, 'prepare_hint': "denseflow-jax[prepare]" in message,
          'exact': exact, 'train_batch': list(batch.shape),
          'eval_sizes': [int(b.mask.sum()) for b in evals], 'evals_exact': evals_exact,
          'digits': [digits.num_train, digits.num_test], 'npz': [npz.num_train, npz.num_test],
          'tensorflow': sorted(m for m in sys.modules if m.partition('.')[0] == 'tensorflow')}))
  ''', cwd=str(tmp_path), hide_tensorflow=True)
  assert out == {'hidden': True, 'prepare_hint': True, 'exact': True, 'train_batch': [4, 32, 32, 3],
                 'eval_sizes': [4, 2], 'evals_exact': True, 'digits': [1500, 297],
                 'npz': [18, 2], 'tensorflow': []}, out


def test_training_run_needs_no_tensorflow(tmp_path):
  """A short real training run (train, evaluate, sample, checkpoint, TensorBoard events) with
  TensorFlow hidden as if it were not installed (about 25 s: compiles a micro model)."""
  out = run_python('''
      import json, sys
      from denseflow_jax import artifacts, train
      from test_train import micro_config
      config = micro_config(num_steps=2, eval_every=2, log_every=1, checkpoint_every=2)
      config.eval.num_samples, config.eval.max_examples, config.eval.batch_size = 4, 16, 16
      train.train_and_evaluate(config, 'run')
      print(json.dumps({'tensorflow': sorted(m for m in sys.modules
                                             if m.partition('.')[0] == 'tensorflow'),
                        'test_bpd': sorted(artifacts.metric_curve(
                            artifacts.read_metrics('run'), 'test_bpd'))}))
  ''', cwd=str(tmp_path), hide_tensorflow=True)
  assert out == {'tensorflow': [], 'test_bpd': [2]}, out
