"""FLOP counts of jitted functions: matmul + convolution FLOPs from the jaxpr, and XLA's.

`count_flops(traced.jaxpr)` is the count used for fractions of peak: `2 * MACs` of every
`dot_general` and `conv_general_dilated`, scan bodies times their length, the most expensive
branch of a `cond`, while loops once (reported in `while_loops`), convolutions with the full
kernel at every output position (zero padding included). This is the convention of PyTorch's
flop counter, which produced the published GFLOP/img. `xla_flops(lowered.cost_analysis())` is
XLA's number; `xla_cost_checks()` shows on small programs where it differs (BENCHMARKS.md,
"How FLOPs are counted").
"""
import math
from typing import Any, Dict, Optional

from absl import logging
import jax
import jax.extend  # noqa: F401  (jax.extend.core: the jaxpr types)


def _sub_jaxprs(params: Dict[str, Any]):
  for value in params.values():
    items = value if isinstance(value, (tuple, list)) else (value,)
    for item in items:
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


def matmul_flops(jaxpr) -> Dict[str, float]:
  """{'dot', 'conv', 'while_loops'}: `2 * MACs` of a jaxpr's matmuls and convolutions
  (recursively, with the conventions of the module docstring)."""
  out = {'dot': 0.0, 'conv': 0.0, 'while_loops': 0}
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      (lhs_contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      k = math.prod(lhs[d] for d in lhs_contract)
      out['dot'] += 2.0 * math.prod(eqn.outvars[0].aval.shape) * k
      continue
    if name == 'conv_general_dilated':
      rhs = eqn.invars[1].aval.shape
      rhs_spec = eqn.params['dimension_numbers'].rhs_spec
      k = rhs[rhs_spec[1]] * math.prod(rhs[d] for d in rhs_spec[2:])
      out['conv'] += 2.0 * math.prod(eqn.outvars[0].aval.shape) * k
      continue
    subs = list(_sub_jaxprs(eqn.params))
    if not subs:
      continue
    counts = [matmul_flops(s) for s in subs]
    if name == 'cond':
      counts = [max(counts, key=lambda c: c['dot'] + c['conv'])]
    mult = float(eqn.params.get('length', 1)) if name == 'scan' else 1.0
    if name == 'while':
      out['while_loops'] += 1
    for c in counts:
      out['dot'] += mult * c['dot']
      out['conv'] += mult * c['conv']
      out['while_loops'] += c['while_loops']
  return out


def count_flops(closed_jaxpr) -> Dict[str, float]:
  """`matmul_flops` after dead-code elimination (XLA removes unused work too, e.g. the primal
  output that `jax.vjp` recomputes inside a custom VJP's backward rule)."""
  jaxpr = closed_jaxpr.jaxpr
  try:
    from jax._src.interpreters import partial_eval as pe  # pylint: disable=g-import-not-at-top
    jaxpr, _ = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))  # no public DCE entry point
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('jaxpr DCE failed (%s); counting without it', e)
  return matmul_flops(jaxpr)


def total(counts: Dict[str, float]) -> float:
  """dot + conv FLOPs of a `count_flops` result."""
  return counts['dot'] + counts['conv']


def xla_flops(cost: Any) -> Optional[float]:
  """The 'flops' entry of a `cost_analysis()` result (None where XLA gives none)."""
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost:
    return None
  value = cost.get('flops')
  return None if value is None else float(value)


def xla_cost_checks() -> Dict[str, Dict[str, Optional[float]]]:
  """Analytic FLOPs against XLA's lowered and compiled counts on small programs: a 3x3 conv,
  the gradients of the library's `conv3x3`, a matmul and a scan of five matmuls."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from denseflow_jax.nets import conv3x3  # pylint: disable=g-import-not-at-top

  def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  x = jnp.ones((8, 16, 16, 400), jnp.float32)
  w = jnp.ones((3, 3, 400, 64), jnp.float32)
  conv_analytic = 2.0 * 8 * 16 * 16 * 64 * 9 * 400
  a = jnp.ones((2048, 400), jnp.float32)
  b = jnp.ones((400, 400), jnp.float32)
  dot_analytic = 2.0 * 2048 * 400 * 400

  def scan5(a, b):
    return jax.lax.scan(lambda c, _: (jnp.tanh(c @ b), None), a, None, length=5)[0]

  grad_custom = jax.grad(lambda x, w: conv3x3(x, w).sum(), (0, 1))
  cases = {
      'conv3x3_forward': (conv, (x, w), conv_analytic),
      # input gradient (a conv) + weight gradient (one matmul) of the custom-VJP conv
      'conv3x3_custom_vjp_grads': (grad_custom, (x, w), 2 * conv_analytic),
      'dot_2048x400x400': (lambda a, b: a @ b, (a, b), dot_analytic),
      'scan_5_dots': (scan5, (a, b), 5 * dot_analytic),
  }
  result = {}
  for name, (fn, args, analytic) in cases.items():
    lowered = jax.jit(fn).lower(*args)
    compiled = lowered.compile()
    result[name] = {'analytic_flops': analytic,
                    'xla_lowered_flops': xla_flops(lowered.cost_analysis()),
                    'xla_compiled_flops': xla_flops(compiled.cost_analysis())}
  return result
