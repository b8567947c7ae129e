"""FID: the Flax Inception-v3 against pytorch-fid's own outputs (fixture `../shared/fid_inception`,
seeded random weights in the real file's format), the Fréchet distance against a direct
scipy computation and the fixture's value, the legacy weights format, and `experiments/fid.py`.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from denseflow_jax import data, torch_reader
from denseflow_jax.metrics import frechet, inception
from denseflow_jax.metrics.features import InceptionFeatures
from denseflow_jax.metrics.progress import Progress, format_seconds

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.normpath(os.path.join(REPO_ROOT, '..', 'shared', 'fid_inception'))
WEIGHTS = os.path.join(FIXTURE, 'pt_inception_random.pth')
LEGACY = os.path.join(FIXTURE, 'legacy_stem.pth')
REFERENCE = os.path.join(FIXTURE, 'reference.npz')
needs_fixture = pytest.mark.skipif(
    not all(os.path.exists(p) for p in (WEIGHTS, LEGACY, REFERENCE)),
    reason=f'FID fixture not found at {FIXTURE} (../shared/fid_inception from the repo root)')


def max_relative(a, b):
  """max |a - b| / max |b|: the fixture's own measure of agreement."""
  return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.fixture(scope='module')
def reference():
  with np.load(REFERENCE) as npz:
    return {k: npz[k] for k in npz.files}


@needs_fixture
def test_legacy_file_reads_to_the_zip_files_arrays():
  legacy = torch_reader.read_torch_checkpoint(LEGACY)
  full = torch_reader.read_torch_checkpoint(WEIGHTS)
  assert len(full) == 566
  assert sorted(legacy) == sorted(k for k in full if k.startswith(('Conv2d_1a_3x3.',
                                                                   'Conv2d_2a_3x3.')))
  for key, value in legacy.items():
    assert value.dtype == full[key].dtype and value.shape == full[key].shape, key
    np.testing.assert_array_equal(value, full[key], err_msg=key)


@needs_fixture
def test_float64_blocks_and_pool3_match_pytorch_fid(reference):
  with jax.enable_x64(True):
    module, variables = inception.load_fid_inception(WEIGHTS, jnp.float64)
    blocks = jax.jit(module.apply)(variables, jnp.asarray(reference['images'][:16]))
    for i, block in enumerate(blocks):
      expected = reference[f'block{i}_f64']
      expected = expected.reshape(1, -1) if i == 3 else expected.transpose(0, 2, 3, 1)  # NHWC
      assert block.dtype == jnp.float64 and block[:1].shape == expected.shape
      assert max_relative(block[:1], expected) < 1e-10, i
    assert max_relative(blocks[3], reference['pool3_f64']) < 1e-10


@needs_fixture
def test_float32_features_match_pytorch_fid(reference):
  network = InceptionFeatures(WEIGHTS, batch_size=64)
  features = network(reference['images'])
  assert features.shape == (128, 2048) and network.dim == 2048
  assert max_relative(features, reference['pool3']) < 1e-4
  # A padded last batch (50 of 64 rows real) gives the same features for the real rows.
  np.testing.assert_allclose(network(reference['images'][:50]), features[:50], rtol=0,
                             atol=1e-5 * np.abs(features).max())


def test_resize_weights_follow_half_pixel_centres():
  """Each row sums to 1; an upsampled constant stays constant; the map from 2 to 4 pixels
  samples at 0.25 / 0.75 / 1.25 / 1.75 - 0.5, clamped (torch's align_corners=False)."""
  w = inception.resize_matrix(2, 4)
  np.testing.assert_allclose(w, [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]], atol=1e-15)
  w = inception.resize_matrix(32, 299)
  np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-15)
  x = jnp.full((1, 5, 7, 1), 200, jnp.uint8)
  y = inception.preprocess(x)
  assert y.shape == (1, 299, 299, 3)
  np.testing.assert_allclose(y, 2 * 200 / 255 - 1, atol=1e-6)


@needs_fixture
def test_frechet_distance_of_the_fixtures_halves(reference):
  features = reference['pool3']
  fid = frechet.frechet_distance(frechet.feature_stats(features[:64]),
                                 frechet.feature_stats(features[64:]))
  # 64 vectors of 2048 dims: both covariances are singular and the value moves by ~1e-6
  # relative with the BLAS rounding of S_a S_b (see denseflow_jax/metrics/frechet.py);
  # pytorch-fid's own scipy.linalg.sqrtm route on this machine is 1.4e-6 away as well.
  assert abs(fid - float(reference['fid'])) < 3e-6 * float(reference['fid'])


def test_frechet_distance_against_scipy_sqrtm():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(400, 12)) @ rng.normal(size=(12, 12))
  b = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12)) + 0.3
  sa, sb = frechet.feature_stats(a), frechet.feature_stats(b)
  np.testing.assert_allclose(sa.mu, a.mean(0), rtol=1e-14)
  np.testing.assert_allclose(sa.sigma, np.cov(a, rowvar=False), rtol=1e-14)
  covmean = scipy.linalg.sqrtm(sa.sigma @ sb.sigma).real
  direct = (np.sum((sa.mu - sb.mu) ** 2) + np.trace(sa.sigma) + np.trace(sb.sigma)
            - 2 * np.trace(covmean))
  assert abs(frechet.frechet_distance(sa, sb) - direct) < 1e-10 * direct
  assert abs(frechet.frechet_distance(sa, sa)) < 1e-9
  with pytest.raises(ValueError, match='feature dimensions differ'):
    frechet.frechet_distance(sa, frechet.feature_stats(a[:, :5]))


def test_stats_files_round_trip_and_pytorch_fid_layout(tmp_path):
  rng = np.random.default_rng(1)
  stats = frechet.feature_stats(rng.normal(size=(20, 4)))
  path = str(tmp_path / 'sub' / 'stats.npz')
  frechet.save_stats(path, stats)
  loaded = frechet.load_stats(path)
  np.testing.assert_array_equal(loaded.mu, stats.mu)
  np.testing.assert_array_equal(loaded.sigma, stats.sigma)
  assert loaded.count == 20 and frechet.is_stats_file(path)
  plain = str(tmp_path / 'pytorch_fid.npz')   # what pytorch-fid --save-stats writes
  np.savez(plain, mu=stats.mu.astype(np.float32), sigma=stats.sigma)
  assert frechet.load_stats(plain).count == 0
  np.savez(str(tmp_path / 'other.npz'), images=np.zeros((2, 8, 8, 1), np.uint8))
  assert not frechet.is_stats_file(str(tmp_path / 'other.npz'))
  with pytest.raises(ValueError, match="no array"):
    frechet.load_stats(str(tmp_path / 'other.npz'))


def test_data_specs(tmp_path):
  images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
  np.savez(str(tmp_path / 'x.npz'), images=images)
  source = data.source_from_spec(f'npz:{tmp_path / "x.npz"}')
  assert len(source) == 2 and source.num_bits == 8
  np.testing.assert_array_equal(source.read_batch([0, 1]), images)
  assert len(data.source_from_spec('digits:test')) == 297
  assert len(data.source_from_spec('digits:train')) == 1500
  for bad in ('', 'mnist:train', 'npz:', 'digits:valid'):
    with pytest.raises((ValueError, FileNotFoundError)):
      data.source_from_spec(bad)


def test_progress_lines_and_eta():
  times = iter([0.0, 10.0, 20.0, 25.0])
  lines = []
  progress = Progress(40, 'samples', lines.append, clock=lambda: next(times))
  progress.update(10)
  progress.update(10)
  progress.done()
  assert lines[0] == 'samples: 10/40 (25.0%), 1.0/s, elapsed 10s, ETA 30s'
  assert lines[1].endswith('ETA 20s') and lines[2] == 'samples: 20 done in 25s'
  assert format_seconds(3725) == '1h02m05s' and format_seconds(61.4) == '1m01s'


def test_missing_weights_is_a_clear_error(monkeypatch, tmp_path):
  monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
  with pytest.raises(FileNotFoundError, match='DENSEFLOW_JAX_INCEPTION.*download'):
    inception.find_weights(None)
  with pytest.raises(FileNotFoundError, match='no such Inception weights file'):
    inception.find_weights(str(tmp_path / 'nope.pth'))
  monkeypatch.setenv(inception.WEIGHTS_ENV, str(tmp_path / 'env.pth'))
  with pytest.raises(FileNotFoundError, match='env.pth'):
    inception.find_weights(None)
  with pytest.raises(ValueError, match='not a pytorch-fid Inception state_dict'):
    inception.params_from_state_dict({'fc.weight': np.zeros((2, 2))})


def _fid_command(*args):
  return [sys.executable, os.path.join(REPO_ROOT, 'experiments', 'fid.py'), *args]


def test_fid_cli_refuses_bad_input_in_one_line(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop(inception.WEIGHTS_ENV, None)
  cases = [
      (['--data=digits:test'], '--reference is required'),
      (['--data=digits:test', '--workdir=x', '--reference=digits:train'], 'exactly one of'),
      (['--data=digits:test', '--reference=digits:train', '--temperature=inf'], 'temperature'),
      (['--data=digits:test', '--reference=digits:train', '--output=/no/such/dir/f.json'],
       'does not exist'),
      (['--data=digits:test', '--reference=digits:train', f'--stats_cache={tmp_path}'],
       'DENSEFLOW_JAX_INCEPTION'),
  ]
  for args, message in cases:
    result = subprocess.run(_fid_command(*args), capture_output=True, text=True, env=env,
                            timeout=120)
    lines = [l for l in result.stderr.splitlines() if l.startswith('error:')]
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], (args, result.stderr)
    assert 'Traceback' not in result.stderr


@needs_fixture
def test_fid_cli_real_vs_real_with_cache(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu', DENSEFLOW_JAX_INCEPTION=WEIGHTS)
  common = ['--data=digits:test', '--num=16', '--reference=digits:train', '--reference_num=24',
            '--batch=8', f'--stats_cache={tmp_path / "cache"}']
  output = str(tmp_path / 'fid.json')
  result = subprocess.run(_fid_command(*common, f'--output={output}',
                                       f'--save_stats={tmp_path / "test_stats.npz"}'),
                          capture_output=True, text=True, env=env, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.load(open(output))
  assert report['num'] == 16 and report['reference_num'] == 24 and report['fid'] > 0
  assert 'ETA' in result.stdout and 'cached the statistics' in result.stdout
  cached = os.listdir(tmp_path / 'cache')
  assert len(cached) == 1 and cached[0].startswith('digits_train_n24_inception-pool3-')
  # The saved statistics, used as the reference, give the same distance as recomputing.
  saved = frechet.load_stats(str(tmp_path / 'test_stats.npz'))
  ref = frechet.load_stats(str(tmp_path / 'cache' / cached[0]))
  assert abs(frechet.frechet_distance(saved, ref) - report['fid']) < 1e-9 * report['fid']
  again = subprocess.run(_fid_command(*common), capture_output=True, text=True, env=env,
                         timeout=300)
  assert again.returncode == 0 and 'from the cache' in again.stdout, again.stderr[-3000:]
  assert f'FID {report["fid"]:.4f}' in again.stdout
