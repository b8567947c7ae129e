"""The digits classifier (feature network of the offline data set) and the Inception-style score."""
import numpy as np
import pytest

from denseflow_jax import data
from denseflow_jax.metrics import digits, feature_stats, frechet_distance


@pytest.fixture(scope='module')
def classifier(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('cache') / 'digits.npz')
  lines = []
  trained = digits.load_digits_classifier(path, log=lines.append)
  assert len(lines) == 1 and 'trained the digits classifier' in lines[0]
  cached = digits.load_digits_classifier(path, log=lines.append)
  assert len(lines) == 1 and cached.name == trained.name  # loaded, not trained again
  return cached


def test_inception_score_known_answers():
  assert digits.inception_score(np.eye(10)) == pytest.approx(10.0)         # confident, balanced
  assert digits.inception_score(np.tile(np.eye(10)[3], (7, 1))) == pytest.approx(1.0)  # one digit
  assert digits.inception_score(np.full((5, 10), 0.1)) == pytest.approx(1.0)  # no information
  half = np.array([[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])  # KL = log 2 for each row
  assert digits.inception_score(half) == pytest.approx(2.0)


def test_classifier_is_deterministic_and_separates_real_from_noise(classifier):
  again = digits.DigitsClassifier(digits.train_classifier())
  assert again.name == classifier.name          # same training, same weights
  assert classifier.accuracy('test') > 0.9 and classifier.accuracy('train') > 0.99
  test = digits._images_uint8('test')
  train = digits._images_uint8('train')
  assert digits.inception_score(classifier.probabilities(test)) > 8.5
  rng = np.random.default_rng(0)
  noise = (rng.integers(0, 32, test.shape) * 255 // 31).astype(np.uint8)
  ref = feature_stats(classifier(train))
  fid_real = frechet_distance(feature_stats(classifier(test)), ref)
  fid_noise = frechet_distance(feature_stats(classifier(noise)), ref)
  assert classifier(test).shape == (len(test), digits.FEATURE_DIM)
  assert 0 < fid_real < fid_noise / 10, (fid_real, fid_noise)
  with pytest.raises(ValueError, match=r'uint8 \(N, 8, 8, 1\)'):
    classifier(np.zeros((2, 32, 32, 3), np.uint8))
  assert len(digits.digits_labels()) == len(data.digits_images())


def test_fid_cli_with_the_digits_features(classifier, tmp_path):
  import json, os, subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cache = str(tmp_path / 'digits.npz')
  digits.load_digits_classifier(cache, log=lambda _: None)
  env = dict(os.environ, JAX_PLATFORMS='cpu', DENSEFLOW_JAX_DIGITS_CLASSIFIER=cache)
  env.pop('XLA_FLAGS', None)
  out = str(tmp_path / 'fid.json')
  result = subprocess.run([sys.executable, os.path.join(root, 'experiments', 'fid.py'),
                           '--features=digits', '--data=digits:test', '--num=120',
                           '--reference=digits:train', '--stats_cache=', f'--output={out}'],
                          env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.load(open(out))
  test = digits._images_uint8('test')[:120]
  want = frechet_distance(feature_stats(classifier(test)),
                          feature_stats(classifier(digits._images_uint8('train'))))
  assert report['feature_network'] == classifier.name and report['num'] == 120
  assert report['fid'] == pytest.approx(want, rel=1e-6)
  assert report['inception_score'] == pytest.approx(
      digits.inception_score(classifier.probabilities(test)), rel=1e-6)
  assert 'trained the digits classifier' not in result.stdout  # the cached one
