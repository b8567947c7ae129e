"""A small digits classifier as the feature network of the embedded offline data set.

Inception-v3 features mean nothing for 8x8 grey digits, so sample quality on the digits is
measured with a classifier of their own: an MLP (64 -> 128 -> 64 -> 10) trained
deterministically on the 1500 training digits (full batch, Adam, fixed seed) on first use and
cached as a small `.npz`. Its 64 penultimate activations are the features of a Fréchet
distance (`frechet.frechet_distance`); its class probabilities give the Inception-style score
`exp(E_x KL(p(y|x) || p(y)))` (10 = every sample confidently one digit and all digits equally
often; 1 = no information).
"""
import hashlib
import os
from typing import Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from denseflow_jax import artifacts, data

VERSION = 'digits-mlp-v1'
CACHE_ENV = 'DENSEFLOW_JAX_DIGITS_CLASSIFIER'
NUM_CLASSES = 10
FEATURE_DIM = 64
TRAIN_STEPS = 600


class DigitsMLP(nn.Module):
  """uint8 (N, 8, 8, 1) in [0, 255] -> (features (N, 64), logits (N, 10))."""

  @nn.compact
  def __call__(self, images):
    x = jnp.asarray(images, jnp.float32).reshape(images.shape[0], -1) / 255.0
    x = nn.relu(nn.Dense(128, name='hidden')(x))
    features = nn.relu(nn.Dense(FEATURE_DIM, name='features')(x))
    return features, nn.Dense(NUM_CLASSES, name='logits')(features)


def digits_labels() -> np.ndarray:
  """The digit (0..9) of each of the 1797 embedded images, in `data.digits_images()` order."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  return np.asarray(load_digits().target, np.int32)


def _images_uint8(split: str) -> np.ndarray:
  source = data.digits_source(split)
  return artifacts.to_uint8(source.read_batch(np.arange(len(source))), source.num_bits)


def train_classifier(seed: int = 0, steps: int = TRAIN_STEPS) -> Dict[str, np.ndarray]:
  """Trains the MLP on the training digits (full batch, Adam 3e-3, L2 1e-4); numpy params."""
  model = DigitsMLP()
  x = jnp.asarray(_images_uint8('train'))
  y = jnp.asarray(digits_labels()[:data.DIGITS_NUM_TRAIN])
  params = model.init(jax.random.key(seed), x[:1])['params']
  tx = optax.adam(3e-3)

  def loss_fn(p):
    logits = model.apply({'params': p}, x)[1]
    l2 = sum(jnp.sum(w * w) for w in jax.tree.leaves(p))
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() + 1e-4 * l2

  @jax.jit
  def run(p):
    def step(carry, _):
      p, s = carry
      grads = jax.grad(loss_fn)(p)
      updates, s = tx.update(grads, s, p)
      return (optax.apply_updates(p, updates), s), None
    return jax.lax.scan(step, (p, tx.init(p)), None, length=steps)[0][0]

  flat = jax.tree_util.tree_flatten_with_path(run(params))[0]
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(v) for path, v in flat}


class DigitsClassifier:
  """The feature network of the digits (see the module docstring); `FeatureNetwork` protocol."""
  dim = FEATURE_DIM

  def __init__(self, params: Dict[str, np.ndarray]):
    tree: Dict[str, Dict[str, np.ndarray]] = {}
    for name, value in params.items():
      layer, leaf = name.split('/')
      tree.setdefault(layer, {})[leaf] = jnp.asarray(value)
    self._params = tree
    digest = hashlib.sha256()
    for name in sorted(params):
      digest.update(name.encode())
      digest.update(np.ascontiguousarray(params[name]).tobytes())
    self.name = f'{VERSION}-{digest.hexdigest()[:12]}'
    model = DigitsMLP()
    self._apply = jax.jit(lambda p, x: model.apply({'params': p}, x))  # (features, logits)

  def _outputs(self, images: np.ndarray):
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape[1:] != (8, 8, 1):
      raise ValueError(f'the digits classifier takes uint8 (N, 8, 8, 1) images in [0, 255], '
                       f'got {images.dtype} {images.shape}')
    return self._apply(self._params, images)[0]

  def __call__(self, images: np.ndarray) -> np.ndarray:
    """(N, 64) float64 penultimate features."""
    return np.asarray(self._outputs(images), np.float64)

  def probabilities_from_features(self, features: np.ndarray) -> np.ndarray:
    """(N, 64) features (from `__call__`) -> (N, 10) float64 class probabilities."""
    layer = self._params['logits']
    logits = np.asarray(features, np.float64) @ np.asarray(layer['kernel'], np.float64)
    logits += np.asarray(layer['bias'], np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)

  def probabilities(self, images: np.ndarray) -> np.ndarray:
    """(N, 10) float64 class probabilities."""
    return self.probabilities_from_features(self(images))

  def accuracy(self, split: str = 'test') -> float:
    """Fraction of the embedded digits of `split` classified correctly."""
    labels = digits_labels()
    labels = labels[:data.DIGITS_NUM_TRAIN] if split == 'train' else labels[data.DIGITS_NUM_TRAIN:]
    return float(np.mean(self.probabilities(_images_uint8(split)).argmax(1) == labels))


def default_cache_path() -> str:
  """`$DENSEFLOW_JAX_DIGITS_CLASSIFIER`, else `~/.cache/denseflow_jax/<VERSION>.npz`."""
  return os.environ.get(CACHE_ENV) or os.path.expanduser(
      os.path.join('~', '.cache', 'denseflow_jax', f'{VERSION}.npz'))


def load_digits_classifier(path: Optional[str] = None, log=print) -> DigitsClassifier:
  """The cached classifier at `path` (default `default_cache_path()`), trained and cached first
  if the file is absent or unreadable (a few seconds on a CPU)."""
  path = path or default_cache_path()
  if os.path.isfile(path):
    try:
      with np.load(path) as f:
        return DigitsClassifier({k: f[k] for k in f.files})
    except (OSError, ValueError, KeyError) as e:
      log(f'digits classifier cache {path} unreadable ({e}); training it again')
  classifier = DigitsClassifier(train_classifier())
  log(f'trained the digits classifier ({classifier.name}): test accuracy '
      f'{classifier.accuracy("test"):.3f}; cached in {path}')
  try:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}.npz'
    np.savez(tmp, **{k: np.asarray(v) for k, v in _flat_params(classifier).items()})
    os.replace(tmp, path)
  except OSError as e:
    log(f'could not cache the digits classifier in {path}: {e}')
  return classifier


def _flat_params(classifier: DigitsClassifier) -> Dict[str, np.ndarray]:
  return {f'{layer}/{leaf}': np.asarray(v) for layer, leaves in classifier._params.items()  # pylint: disable=protected-access
          for leaf, v in leaves.items()}


def inception_score(probabilities: np.ndarray) -> float:
  """`exp(mean_x KL(p(y|x) || p(y)))` with p(y) the mean of the rows (one split)."""
  p = np.asarray(probabilities, np.float64)
  if p.ndim != 2 or not len(p):
    raise ValueError(f'expected (N, classes) probabilities, got shape {p.shape}')
  marginal = p.mean(axis=0, keepdims=True)
  with np.errstate(divide='ignore', invalid='ignore'):
    kl = np.where(p > 0, p * (np.log(p) - np.log(marginal)), 0.0).sum(axis=1)
  return float(np.exp(kl.mean()))
