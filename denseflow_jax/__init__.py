"""denseflow-jax: DenseFlow (Densely connected normalizing flows) in JAX/Flax."""
from denseflow_jax.model import DenseFlow  # noqa: F401
import configs  # noqa: F401  (re-exported: `from denseflow_jax import configs`)

__all__ = ['DenseFlow', 'configs']
