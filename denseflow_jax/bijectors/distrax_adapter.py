"""`to_distrax`: one of our bijectors, with its variables, as a `distrax.Bijector`.

Our bijectors are Flax modules whose `forward` maps data to latent and returns
`(y, log_det)`. distrax's `Bijector.forward` returns only `y`, and `distrax.Transformed(base,
bijector)` pushes base samples (latents) through `bijector.forward` to get data. The adapter
makes the direction explicit:

- `direction='latent_to_data'`: distrax `forward` = our `inverse`, distrax `inverse` = our
  `forward`. This is the bijector `distrax.Transformed` needs for `log_prob` and `sample`. Our
  `Chain([a, b, c])` then equals `distrax.Chain([A, B, C])` (same list order) with `A, B, C`
  the members wrapped the same way.
- `direction='data_to_latent'`: distrax `forward` = our `forward`. Our `Chain([a, b, c])`
  equals `distrax.Chain([C, B, A])`: distrax applies a chain's list in reverse.

Log-dets keep their meaning: distrax's `forward_log_det_jacobian` is `log|det d forward|` of
whichever map is its forward. distrax is imported only when `to_distrax` is called.
"""
import functools
from typing import Any, Dict, Optional

import flax.linen as nn

DIRECTIONS = ('latent_to_data', 'data_to_latent')


@functools.cache
def _adapter_class():
  import distrax  # pylint: disable=import-outside-toplevel

  class FlaxBijector(distrax.Bijector):
    """A bound Flax bijector seen through distrax's interface (see `to_distrax`)."""

    def __init__(self, module, variables, direction, event_ndims, rngs, kwargs):
      super().__init__(event_ndims_in=event_ndims)
      self.module, self.variables, self.direction = module, variables, direction
      self._rngs, self._kwargs = rngs, kwargs

    def _run(self, x, ours_inverse: bool):
      nd = self.event_ndims_in
      if x.ndim < nd:
        raise ValueError(f'to_distrax: input of shape {x.shape} has fewer than event_ndims={nd} '
                         f'axes')
      batch, event = x.shape[:x.ndim - nd], x.shape[x.ndim - nd:]
      flat = x.reshape((-1,) + event)
      y, log_det = self.module.apply(self.variables, flat,
                                     method='inverse' if ours_inverse else 'forward',
                                     rngs=self._rngs, **self._kwargs)
      return y.reshape(batch + y.shape[1:]), log_det.reshape(batch)

    def forward_and_log_det(self, x):
      return self._run(x, ours_inverse=self.direction == 'latent_to_data')

    def inverse_and_log_det(self, y):
      return self._run(y, ours_inverse=self.direction == 'data_to_latent')

  return FlaxBijector


def to_distrax(bijector: nn.Module, variables: Dict[str, Any], *, direction: str,
               event_ndims: int = 3, rngs: Optional[Dict[str, Any]] = None, **kwargs: Any):
  """Wraps `bijector` (a module of `denseflow_jax.bijectors`) and its variables as a
  `distrax.Bijector`.

  `direction` ('latent_to_data' or 'data_to_latent', no default) says which of our directions
  becomes distrax's `forward` (see the module docstring); use 'latent_to_data' with
  `distrax.Transformed`. Events are the last `event_ndims` axes (3: one `(H, W, C)` image);
  any leading axes are batch axes (none, one or several). `rngs` (e.g. `{'noise': key}`) and
  `kwargs` (e.g. `context=...`) are passed to every call in both directions; with a fixed
  `rngs` a stochastic bijector becomes a deterministic map. Needs distrax installed.
  """
  if direction not in DIRECTIONS:
    raise ValueError(f'to_distrax: direction must be one of {DIRECTIONS}, got {direction!r}')
  if event_ndims < 1:
    raise ValueError(f'to_distrax: event_ndims must be >= 1 (log-dets are per example), got '
                     f'{event_ndims}')
  return _adapter_class()(bijector, variables, direction, event_ndims, rngs, kwargs)
