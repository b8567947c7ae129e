"""Sample-quality metrics: Fréchet distance over a pluggable feature network (FID with
pytorch-fid's Inception-v3, loaded without torch; `metrics.digits`: a small classifier of the
offline digits, with the Inception-style score)."""
from denseflow_jax.metrics.features import FeatureNetwork, InceptionFeatures, extract
from denseflow_jax.metrics.frechet import (FeatureStats, feature_stats, frechet_distance,
                                           load_stats, save_stats)

__all__ = ['FeatureNetwork', 'InceptionFeatures', 'extract', 'FeatureStats', 'feature_stats',
           'frechet_distance', 'load_stats', 'save_stats']
