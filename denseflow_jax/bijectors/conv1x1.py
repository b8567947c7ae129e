"""Invertible 1x1 convolutions (Glow): a learned C x C channel-mixing matrix."""
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from denseflow_jax import param_init
from denseflow_jax.bijectors.base import Array, Bijector, check_image


@param_init.drawn_as('orthogonal')
def random_orthogonal(key: jax.Array, shape: Tuple[int, int], dtype=jnp.float32) -> Array:
  """A random orthogonal `(C, C)` matrix (QR of a Gaussian matrix, sign-corrected).

  Drawn with the other random parameters by `param_init.initial_variables` (`drawn_as`).
  """
  return param_init.orthogonalise(jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def _mix(x: Array, kernel: Array) -> Array:
  """`y[..., o] = sum_i x[..., i] kernel[i, o]`, as one 2-D matmul."""
  shape = x.shape
  return (x.reshape(-1, shape[-1]) @ kernel).reshape(shape[:-1] + (kernel.shape[1],))


class Conv1x1(Bijector):
  """Invertible 1x1 convolution `y = x @ kernel` on the channel axis (a bijector).

  The plain, non-invertible 1x1 convolution layer of the networks is `nets.PointwiseConv`.

  `kernel` is `(C, C)` in (in, out) order, i.e. the transpose of PyTorch's `weight`
  (`z = x @ W.T`). Initialised to a random orthogonal matrix. Forward log-det
  `H * W * log|det kernel|` (slogdet); the inverse multiplies by `kernel^-1` and returns the
  negated log-det.
  """

  @nn.compact
  def __call__(self, x: Array, inverse: bool = False, **unused: Any) -> Tuple[Array, Array]:
    check_image(x, 'Conv1x1')
    c = x.shape[-1]
    kernel = self.param('kernel', random_orthogonal, (c, c)).astype(x.dtype)
    hw = x.shape[1] * x.shape[2]
    ld = hw * jnp.linalg.slogdet(kernel)[1]
    if inverse:
      y = _mix(x, jnp.linalg.inv(kernel))
      ld = -ld
    else:
      y = _mix(x, kernel)
    return y, jnp.broadcast_to(ld, (x.shape[0],))


class LUConv1x1(Bijector):
  """Invertible 1x1 convolution with an LU-parameterised kernel (Glow's option).

  `kernel = P @ (L + I) @ (U + diag(sign * exp(log_s)))` with a fixed permutation `P` and fixed
  signs (stored in the `params` collection under `stop_gradient`, so they never change), a
  strictly lower-triangular `L`, strictly upper-triangular `U` and `log_s`. Forward log-det is
  `H * W * sum(log_s)`: no determinant is computed. Initialised from the LU decomposition of a
  random orthogonal matrix, so it starts as the same kind of map as `Conv1x1`.
  """

  @nn.compact
  def __call__(self, x: Array, inverse: bool = False, **unused: Any) -> Tuple[Array, Array]:
    check_image(x, 'LUConv1x1')
    c = x.shape[-1]

    def lu_part(name):
      @param_init.drawn_as('lu_' + name)
      def init(key, shape, dtype=jnp.float32):
        del dtype
        return param_init.lu_parts(random_orthogonal(key, (c, c)))[name].astype(jnp.float32)
      return init

    # Every part is initialised from the same key, so they come from one decomposition.
    key = self.make_rng('params') if self.is_initializing() else None
    def get(name):
      init = lu_part(name)
      # flax also calls init functions at apply time (shape check only): use its key there.
      return lambda rng, shape: init(rng if key is None else key, shape)

    perm = jax.lax.stop_gradient(self.param('perm', get('perm'), (c, c)))
    sign_s = jax.lax.stop_gradient(self.param('sign_s', get('sign_s'), (c,)))
    lower = self.param('lower', get('lower'), (c, c))
    upper = self.param('upper', get('upper'), (c, c))
    log_s = self.param('log_s', get('log_s'), (c,))
    dt = x.dtype
    perm, sign_s, lower, upper, log_s = (a.astype(dt) for a in (perm, sign_s, lower, upper, log_s))
    eye = jnp.eye(c, dtype=dt)
    l_full = jnp.tril(lower, -1) + eye
    u_full = jnp.triu(upper, 1) + jnp.diag(sign_s * jnp.exp(log_s))
    kernel = perm @ l_full @ u_full
    hw = x.shape[1] * x.shape[2]
    ld = hw * jnp.sum(log_s)
    if inverse:
      y = _mix(x, jnp.linalg.inv(kernel))
      ld = -ld
    else:
      y = _mix(x, kernel)
    return y, jnp.broadcast_to(ld, (x.shape[0],))

