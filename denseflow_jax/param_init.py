"""Parameter initialisation that draws every random parameter from two RNG calls.

`model.init` draws each randomly initialised parameter from a key of its own: flax folds the
parameter's path into the `params` key (one threefry hash) and the initialiser then draws from
that key (another). For the tiny DenseFlow that is ~690 threefry computations, each compiled
separately: its init program took 22.6 s to compile on XLA:CPU (at backend optimisation level
0) against 1.9 s for the model's forward pass, and the RNG was the whole difference.

`initial_variables(module, rngs, *args)` is traceable (use it under `jax.jit`) and instead:

1. **plans**: traces `module.init` abstractly (`jax.eval_shape`, nothing is compiled) while
   the project's random initialisers (those wrapped by `drawn_as`) return `RandomInit`
   placeholders that say what they draw: `'uniform'` in +-`scale`, a random `'orthogonal'`
   matrix, or one part of the LU decomposition of a random orthogonal matrix (`'lu_perm'`,
   `'lu_lower'`, `'lu_upper'`, `'lu_log_s'`, `'lu_sign_s'`; the parts of one module share one
   matrix);
2. **draws** all uniform parameters from one `jax.random.uniform` over a flat buffer and all
   Gaussian matrices from one `jax.random.normal` (in the order of the flattened parameter
   tree), then orthogonalises the matrices with a batched QR (sign-corrected, as
   `orthogonalise`, which `bijectors.conv1x1` uses too);
3. **initialises** the module with those parameters given: flax creates only the others
   (zeros, ones, ActNorm's data-dependent statistics, the batch statistics) exactly as
   `module.init` does, with `is_initializing()` true.

The variables have the structure, shapes, dtypes and distributions of `module.init(rngs,
*args)`, not its draws. Draws depend only on the `params` key (not on the device count).
Parameters with an initialiser that is not wrapped by `drawn_as` are left to flax (their own
key, as in `module.init`).
"""
import contextlib
import contextvars
import functools
from typing import Any, Callable, Dict, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

_PLANNING = contextvars.ContextVar('denseflow_jax_param_init_planning', default=False)

KINDS = ('uniform', 'orthogonal', 'lu_perm', 'lu_lower', 'lu_upper', 'lu_log_s', 'lu_sign_s')


@struct.dataclass
class RandomInit(flax.core.meta.AxisMetadata):
  """Placeholder for a random parameter while `initial_variables` plans (see the module doc).

  `value` holds zeros of the parameter's shape (the stacked shape under `nn.scan`); `kind` is
  one of `KINDS` and `scale` the uniform bound.
  """
  value: Any
  kind: str = struct.field(pytree_node=False)
  scale: float = struct.field(pytree_node=False, default=1.0)

  def unbox(self):
    return self.value

  def replace_boxed(self, val):
    return self.replace(value=val)

  def add_axis(self, index, params):
    del index, params
    return self

  def remove_axis(self, index, params):
    del index, params
    return self



def drawn_as(kind: str, scale: float = 1.0) -> Callable[[Callable], Callable]:
  """Marks a random initialiser `init(key, shape, ...)` as drawing `kind` (`KINDS`).

  Outside `initial_variables`'s planning pass the initialiser runs unchanged; inside it
  returns a `RandomInit` placeholder of zeros with the parameter's shape and dtype.
  """
  if kind not in KINDS:
    raise ValueError(f'drawn_as: kind {kind!r} is not one of {KINDS}')

  def wrap(init):
    @functools.wraps(init)
    def wrapped(key, shape, dtype=jnp.float32, *args, **kwargs):
      if _PLANNING.get():
        return RandomInit(jnp.zeros(shape, dtype), kind=kind, scale=float(scale))
      return init(key, shape, dtype, *args, **kwargs)
    return wrapped
  return wrap


@contextlib.contextmanager
def _planning():
  token = _PLANNING.set(True)
  try:
    yield
  finally:
    _PLANNING.reset(token)


def _is_box(x) -> bool:
  return isinstance(x, RandomInit)


def plan(module: nn.Module, rngs: Dict[str, jax.Array], *args, **kwargs) -> Any:
  """The `params` tree of `module.init(rngs, *args)` with `RandomInit` placeholders (holding
  `jax.ShapeDtypeStruct`s) for the drawn parameters and `ShapeDtypeStruct`s for the others.
  Traces abstractly; compiles nothing."""
  with _planning():
    variables = jax.eval_shape(functools.partial(module.init, **kwargs), rngs, *args)
  return variables['params']


def orthogonalise(a: jax.Array) -> jax.Array:
  """The Q of `a`'s QR decomposition with its columns' signs fixed by R's diagonal (so Q is
  Haar-distributed for Gaussian `a`); `a` is `(..., C, C)`."""
  q, r = jnp.linalg.qr(a)
  return q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[..., None, :]


def lu_parts(q: jax.Array) -> Dict[str, jax.Array]:
  """The parameters of an LU-parameterised kernel equal to `q` (`(..., C, C)`): 'perm',
  'lower' (strict), 'upper' (strict), 'log_s' and 'sign_s' (of U's diagonal)."""
  p, l, u = jax.scipy.linalg.lu(q)
  s = jnp.diagonal(u, axis1=-2, axis2=-1)
  return {'perm': p, 'lower': jnp.tril(l, -1), 'upper': jnp.triu(u, 1),
          'log_s': jnp.log(jnp.abs(s)), 'sign_s': jnp.sign(s)}


def draw(planned: Any, key: jax.Array) -> Dict[Tuple, jax.Array]:
  """Values for every `RandomInit` of `planned` (from `plan`), keyed by tree path.

  One uniform draw covers all `'uniform'` leaves (flattened tree order) and one normal draw
  all matrices (`'orthogonal'` leaves, then one matrix per LU module, same order).
  """
  flat = jax.tree_util.tree_flatten_with_path(planned, is_leaf=_is_box)[0]
  boxes = [(path, leaf) for path, leaf in flat if _is_box(leaf)]
  uniform = [(p, b) for p, b in boxes if b.kind == 'uniform']
  # Matrices: an orthogonal leaf, or an LU module (its 'lu_perm' leaf has the matrix shape).
  matrices = [(p, b) for p, b in boxes if b.kind in ('orthogonal', 'lu_perm')]
  lu_groups = {p[:-1] for p, b in boxes if b.kind.startswith('lu_')}
  perm_groups = {p[:-1] for p, b in matrices if b.kind == 'lu_perm'}
  if lu_groups != perm_groups:
    raise ValueError(f'param_init: LU parameters without a perm leaf under {lu_groups - perm_groups}')
  k_uniform, k_normal = jax.random.split(key)
  values: Dict[Tuple, jax.Array] = {}

  def slices(items, buffer):
    offset = 0
    for path, box in items:
      n = int(np.prod(box.value.shape))
      yield path, box, buffer[offset:offset + n].reshape(box.value.shape)
      offset += n

  sizes = lambda items: sum(int(np.prod(b.value.shape)) for _, b in items)
  if uniform:
    u = jax.random.uniform(k_uniform, (sizes(uniform),), jnp.float32, -1.0, 1.0)
    # Converted once: without the barrier XLA repeats the bits-to-float work in every slice.
    u = jax.lax.optimization_barrier(u)
    for path, box, part in slices(uniform, u):
      values[path] = (part * box.scale).astype(box.value.dtype)
  if matrices:
    g = jax.random.normal(k_normal, (sizes(matrices),), jnp.float32)
    for path, box, part in slices(matrices, g):
      q = orthogonalise(part)
      if box.kind == 'orthogonal':
        values[path] = q.astype(box.value.dtype)
        continue
      parts = lu_parts(q)
      for p, b in boxes:
        if p[:-1] == path[:-1] and b.kind.startswith('lu_'):
          values[p] = parts[b.kind[len('lu_'):]].astype(b.value.dtype)
  return values


def _fill(planned: Any, values: Dict[Tuple, jax.Array]) -> Any:
  """`planned` with its drawn leaves replaced by `values` and the others removed."""
  def build(tree, prefix):
    out = {}
    for name, sub in tree.items():
      path = prefix + (jax.tree_util.DictKey(name),)
      if _is_box(sub):
        out[name] = values[path]
      elif isinstance(sub, dict) or hasattr(sub, 'items'):
        inner = build(sub, path)
        if inner:
          out[name] = inner
    return out
  return build(planned, ())


def init_with_params(module: nn.Module, params: Any, rngs: Dict[str, jax.Array], *args,
                     **kwargs) -> Dict[str, Any]:
  """`module.init(rngs, *args, **kwargs)` with the parameters in `params` (a subtree of the
  `params` collection) given: flax creates only the others, with `is_initializing()` true.
  Traceable."""
  def fn(scope, *a, **kw):
    return module.clone(parent=scope)(*a, **kw)

  # As `module.init`: every collection but 'intermediates' is created.
  init_with = flax.core.apply(fn, mutable=flax.core.DenyList('intermediates'),
                              flags={'initializing': True})
  _, variables = init_with({'params': params}, *args, rngs=rngs, **kwargs)
  return flax.core.unfreeze(variables)


def initial_variables(module: nn.Module, rngs: Dict[str, jax.Array], *args,
                      **kwargs) -> Dict[str, Any]:
  """`module.init(rngs, *args, **kwargs)`'s variables with the random parameters drawn in two
  RNG calls from `rngs['params']` (see the module doc). Traceable."""
  planned = plan(module, rngs, *args, **kwargs)
  # The barrier keeps the ~hundreds of slices out of the forward pass's fusions (the init
  # program of the tiny model then compiles in 3.8 s instead of 4.9 s).
  drawn = jax.lax.optimization_barrier(_fill(planned, draw(planned, rngs['params'])))
  return init_with_params(module, drawn, rngs, *args, **kwargs)
