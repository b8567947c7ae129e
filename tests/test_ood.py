"""AUROC of likelihood scores (experiments/score.py --ood) on cases with known answers."""
import itertools
import os

import numpy as np
import pytest

from denseflow_jax.ood import auroc, plot_histograms


def pairwise(a, b):
  """The definition: P(out > in) + P(out == in) / 2 over all pairs."""
  pairs = list(itertools.product(a, b))
  return sum((y > x) + 0.5 * (y == x) for x, y in pairs) / len(pairs)


def test_known_answers():
  assert auroc([1, 2, 3], [4, 5]) == 1.0       # separated: out scores all higher
  assert auroc([4, 5], [1, 2, 3]) == 0.0       # out-of-distribution looks more likely
  assert auroc([1, 2], [1, 2]) == 0.5          # identical sets
  assert auroc([1, 3], [2]) == 0.5             # one of two pairs
  assert auroc([1, 2, 2], [2, 3]) == pytest.approx(pairwise([1, 2, 2], [2, 3]))  # = 3.5/6 + ...


def test_matches_the_pairwise_definition_with_ties():
  rng = np.random.default_rng(0)
  a = rng.integers(0, 6, 37).astype(float)    # many ties
  b = rng.integers(1, 8, 23).astype(float)
  assert auroc(a, b) == pytest.approx(pairwise(a, b), abs=1e-12)
  # Gaussians one standard deviation apart: AUROC = Phi(1 / sqrt(2)) = 0.7602...
  x, y = rng.normal(0, 1, 20000), rng.normal(1, 1, 20000)
  assert auroc(x, y) == pytest.approx(0.76025, abs=0.006)


def test_errors_and_plot(tmp_path):
  with pytest.raises(ValueError, match='both sets'):
    auroc([], [1.0])
  with pytest.raises(ValueError, match='finite'):
    auroc([np.nan], [1.0])
  path = plot_histograms(str(tmp_path / 'h.png'), {'in': np.arange(10.0), 'out': np.ones(5)})
  assert os.path.getsize(path) > 1000
