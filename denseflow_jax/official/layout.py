"""Where each entry of the published state_dict lives in our variables, and the conversion
both ways.

`import_state_dict(state_dict, model_config) -> (variables, buffers)`:
`variables = {'params': ..., 'batch_stats': ...}` for `DenseFlow(model_config)` (float32, as
published). Layouts: convs `(out, in, kh, kw)` -> HWIO, 1x1 convs -> `(in, out)`, invertible
1x1 flow weights `W` -> `kernel = W.T`, per-channel `(1, C, 1, 1)` -> `(C,)`, BatchNorm
`weight`/`bias` -> `scale`/`bias`, `running_mean`/`running_var` -> `batch_stats` `mean`/`var`.
The modules of a unit are stacked (`nn.scan`): `.../unit_{j}/modules/...` has a leading axis
of length `layers_conf[b]`. A `module.` prefix (DataParallel) is accepted. Every missing,
unexpected or mis-shaped key is listed in one error.

`buffers` holds, under their published names, the state_dict entries that have no variable in
our model (`*.initialized`, `*.num_batches_tracked`, `transforms.{4,6,..}.dist.buffer`, the
sigmoid `temperature`, `transforms.1._shift` / `_scale`, `transforms.0.ldj_per_dim`). Their
values are checked where they change the function (`initialized` must be 1, `_shift` -0.5,
`_scale` 1, `temperature` 1, `ldj_per_dim` the float32 `-num_bits ln 2` our model uses).
They are kept only so that an export reproduces the file bit for bit (`num_batches_tracked`
counts training batches and is not otherwise recoverable).

`export_state_dict(variables, model_config, buffers=None)` is the inverse: an ordered
`{published name: numpy array}` in the published key order; buffers come from `buffers` when
given, else the published defaults. Importing an export gives the same variables; exporting
an import (with its buffers) gives the same tensors bit for bit.
"""
import collections
import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import ml_collections
import numpy as np

from denseflow_jax.bijectors.dequantize import log_bin_width
from denseflow_jax.config_check import plan_model
from denseflow_jax.torch_reader import OfficialCheckpointError

Variables = Dict[str, Any]


def _strip_module_prefix(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
  keys = list(state_dict)
  if keys and all(k.startswith('module.') for k in keys):
    return {k[len('module.'):]: v for k, v in state_dict.items()}
  return dict(state_dict)


@dataclasses.dataclass(frozen=True)
class Entry:
  """One published state_dict entry and where it lives in our variables.

  `collection` is 'params', 'batch_stats' or 'buffer' (no counterpart: kept aside). `path` is
  the key path inside the collection, `index` the position on a scanned (stacked) axis or None.
  `layout`: 'conv' (OIHW -> HWIO), 'conv1x1' ((out, in, 1, 1) -> (in, out)), 'flow'
  (W -> W.T), 'channel' ((1, C, 1, 1) -> (C,)), 'same'. `default` is a buffer's export value.
  """
  name: str
  shape: Tuple[int, ...]
  collection: str
  path: Tuple[str, ...] = ()
  index: Optional[int] = None
  layout: str = 'same'
  default: Optional[np.ndarray] = None


def _to_ours(value: np.ndarray, layout: str) -> np.ndarray:
  if layout == 'conv':
    return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
  if layout == 'conv1x1':
    return np.ascontiguousarray(value[:, :, 0, 0].T)
  if layout == 'flow':
    return np.ascontiguousarray(value.T)
  if layout == 'channel':
    return np.ascontiguousarray(value.reshape(-1))
  return np.array(value)


def _to_published(value: np.ndarray, layout: str) -> np.ndarray:
  if layout == 'conv':
    return np.ascontiguousarray(value.transpose(3, 2, 0, 1))
  if layout == 'conv1x1':
    return np.ascontiguousarray(value.T[:, :, None, None])
  if layout == 'flow':
    return np.ascontiguousarray(value.T)
  if layout == 'channel':
    return np.ascontiguousarray(value.reshape(1, -1, 1, 1))
  return np.array(value)


class _Layout:
  """Builds the entry list in the published (PyTorch registration) order."""

  def __init__(self):
    self.entries: List[Entry] = []

  def param(self, name, shape, path, layout='same', index=None, collection='params'):
    self.entries.append(Entry(name, tuple(shape), collection, tuple(path), index, layout))

  def buffer(self, name, value):
    value = np.asarray(value)
    self.entries.append(Entry(name, value.shape, 'buffer', default=value))

  def conv(self, name, cout, cin, k, path, index=None, bias=True):
    """A conv `name` (`.weight` (cout, cin, k, k) and `.bias`) -> `path + (kernel|bias)`."""
    layout = 'conv1x1' if k == 1 else 'conv'
    self.param(f'{name}.weight', (cout, cin, k, k), path + ('kernel',), layout, index)
    if bias:
      self.param(f'{name}.bias', (cout,), path + ('bias',), 'same', index)

  def dense_block(self, name, cin, cout, depth, growth, path, index=None):
    """Dense layers `name.{i}.nn.{0,2}` and the gate `name.{depth}.conv` of a `DenseBlock`."""
    for i in range(depth):
      c = cin + i * growth
      self.conv(f'{name}.{i}.nn.0', c, c, 1, path + (f'layer_{i}', 'conv1x1'), index)
      self.conv(f'{name}.{i}.nn.2', growth, c, 3, path + (f'layer_{i}', 'conv3x3'), index)
    self.conv(f'{name}.{depth}.conv', 3 * cout, cin + depth * growth, 1, path + ('gate', 'conv'),
              index)


def state_dict_layout(model_config: ml_collections.ConfigDict) -> List[Entry]:
  """Every entry of the published state_dict for `model_config`, in the published key order."""
  cfg = model_config
  if (cfg.coupling != 'denseflow' or not cfg.augment or cfg.noise != 'preconditioned'
      or cfg.dequantization != 'variational' or cfg.conv1x1 != 'full'
      or cfg.attention_layout != 'published'):
    raise OfficialCheckpointError(
        'the published checkpoints exist only for the published architecture: coupling='
        "'denseflow', augment=True, noise='preconditioned', dequantization='variational', "
        f"conv1x1='full', attention_layout='published' (got coupling={cfg.coupling!r}, "
        f'augment={cfg.augment!r}, noise={cfg.noise!r}, dequantization={cfg.dequantization!r}, '
        f'conv1x1={cfg.conv1x1!r}, attention_layout={cfg.attention_layout!r})')
  plan = plan_model(cfg)
  lay = _Layout()
  c_final = plan.latent_shape[-1]
  lay.param('base_dist.loc', (1, c_final, 1, 1), ('base_loc',), 'channel')
  lay.param('base_dist.log_scale', (1, c_final, 1, 1), ('base_log_scale',), 'channel')

  # Dequantization (transforms.0).
  c_img = cfg.num_channels
  c4, ctx, steps = 4 * c_img, cfg.deq_context_channels, cfg.deq_steps
  lay.buffer('transforms.0.ldj_per_dim', np.float32(log_bin_width(cfg.num_bits)))
  e, dq = 'transforms.0.encoder', ('dequantizer',)
  lay.param(f'{e}.base_dist.loc', (1, c4, 1, 1), dq + ('base_loc',), 'channel')
  lay.param(f'{e}.base_dist.log_scale', (1, c4, 1, 1), dq + ('base_log_scale',), 'channel')
  for k in range(steps + 1):
    lay.param(f'{e}.transforms.{2 * k}.weight', (c4, c4), dq + (f'mix_{k}', 'kernel'), 'flow')
    if k == steps:
      break
    net, path = f'{e}.transforms.{2 * k + 1}.coupling_net.0.transform', dq + (
        f'ConditionalCouplingNet_{k}',)
    c1 = c4 - c4 // 2
    lay.conv(f'{net}.0', 64, c1 + ctx, 1, path + ('proj',))
    lay.dense_block(f'{net}.1.dense', 64, 64, 4, 64, path + ('dense',))
    lay.conv(f'{net}.2', 2 * (c4 // 2), 64, 1, path + ('out',))
  lay.buffer(f'{e}.transforms.{2 * steps + 2}.temperature', np.ones((1,), np.float32))
  cn = dq + ('context_net',)
  lay.dense_block(f'{e}.context_init.1', c_img, ctx, 4, 16, cn + ('dense_in',))
  lay.conv(f'{e}.context_init.2', ctx, ctx, 2, cn + ('down',))
  lay.dense_block(f'{e}.context_init.3', ctx, ctx, 4, 16, cn + ('dense_out',))

  lay.buffer('transforms.1._shift', np.float32(-0.5))
  lay.buffer('transforms.1._scale', np.float32(1.0))

  g = cfg.growth_rate
  for b, bp in enumerate(plan.blocks):
    t = f'transforms.{3 + 2 * b}'
    m = cfg.mid_channels[b]
    cond = bp.in_channels  # channels the noise net g_j sees: block input + units 0..j-2
    for j in range(1, len(bp.unit_channels)):
      path = (f'blocks_{b}', f'noise_net_{j}')
      name = f'{t}.noise_params.{j - 1}.transformation'
      lay.conv(f'{name}.0', 4 * cond, cond, 3, path + ('conv_in',))
      lay.conv(f'{name}.2', 2 * g, 4 * cond, 1, path + ('conv_out',))
      cond += bp.unit_channels[j - 1]
    for j, cu in enumerate(bp.unit_channels):
      unit = (f'blocks_{b}', f'unit_{j}', 'modules')
      for l in range(cfg.layers_conf[b]):
        mod = f'{t}.blocks.{j}.transforms.{l}.transforms'
        lay.param(f'{mod}.0.shift', (1, cu, 1, 1), unit + ('actnorm', 'shift'), 'channel', l)
        lay.param(f'{mod}.0.log_scale', (1, cu, 1, 1), unit + ('actnorm', 'log_scale'), 'channel',
                  l)
        lay.buffer(f'{mod}.0.initialized', np.ones((1,), np.float32))
        lay.param(f'{mod}.1.weight', (cu, cu), unit + ('conv1x1', 'kernel'), 'flow', l)
        net, cn_path = f'{mod}.2.coupling_net.0.dn.transform', unit + ('coupling_net',)
        fu = cn_path + ('fusion',)
        lay.conv(f'{net}.0', m, cu - cu // 2, 1, cn_path + ('proj',), l)
        lay.dense_block(f'{net}.1.dense', m, m, cfg.dense_depth, cfg.dense_growth,
                        fu + ('dense',), l)
        lay.conv(f'{net}.1.mha.qkv', 3 * (m // 2), m, 1, fu + ('attention', 'qkv'), l)
        lay.conv(f'{net}.1.mha.out_transform', m, m // 2, 1, fu + ('attention', 'out_transform'), l)
        bn = f'{net}.1.mix_conv.0'
        lay.param(f'{bn}.weight', (2 * m,), fu + ('bn', 'scale'), 'same', l)
        lay.param(f'{bn}.bias', (2 * m,), fu + ('bn', 'bias'), 'same', l)
        lay.param(f'{bn}.running_mean', (2 * m,), fu + ('bn', 'mean'), 'same', l, 'batch_stats')
        lay.param(f'{bn}.running_var', (2 * m,), fu + ('bn', 'var'), 'same', l, 'batch_stats')
        lay.buffer(f'{bn}.num_batches_tracked', np.int64(0))
        lay.conv(f'{net}.1.mix_conv.2', m, 2 * m, 1, fu + ('mix',), l, bias=False)
        lay.conv(f'{net}.2', 2 * (cu // 2), m, 1, cn_path + ('out',), l)
    if b < len(plan.blocks) - 1:
      lay.buffer(f'transforms.{4 + 2 * b}.dist.buffer', np.zeros((1,), np.float32))
  return lay.entries


# Buffers whose value changes the function: they must hold the value our model hard-codes.
def _required_buffer_value(entry: Entry) -> Optional[np.ndarray]:
  for suffix in ('.initialized', '._shift', '._scale', '.temperature', '.ldj_per_dim'):
    if entry.name.endswith(suffix):
      return entry.default
  return None


def _fmt_shape(shape: Sequence[int]) -> str:
  return '(' + ', '.join(str(s) for s in shape) + (',)' if len(shape) == 1 else ')')


def import_state_dict(state_dict: Mapping[str, Any], model_config: ml_collections.ConfigDict,
                      source: str = 'state_dict') -> Tuple[Variables, Dict[str, np.ndarray]]:
  """Published state_dict -> `({'params', 'batch_stats'}, buffers)` for `DenseFlow(model_config)`.

  Raises one `OfficialCheckpointError` listing every missing, unexpected, mis-shaped or
  wrongly-valued key (`source` names the file in the message).
  """
  sd = _strip_module_prefix(state_dict)
  entries = state_dict_layout(model_config)
  expected = {e.name: e for e in entries}
  missing = [n for n in expected if n not in sd]
  unexpected = [n for n in sd if n not in expected]
  problems = []
  for name, e in expected.items():
    if name not in sd:
      continue
    v = np.asarray(sd[name])
    if tuple(v.shape) != e.shape:
      problems.append(f'{name}: shape {_fmt_shape(v.shape)}, expected {_fmt_shape(e.shape)}')
      continue
    is_count = name.endswith('num_batches_tracked')
    if is_count != np.issubdtype(v.dtype, np.integer) or not (
        is_count or np.issubdtype(v.dtype, np.floating)):
      problems.append(f'{name}: dtype {v.dtype}, expected '
                      f'{"an integer" if is_count else "a floating"} dtype')
      continue
    required = _required_buffer_value(e) if e.collection == 'buffer' else None
    if required is not None and not np.array_equal(v.astype(required.dtype), required):
      problems.append(f'{name}: value {v.tolist()}, but our model hard-codes {required.tolist()}')
    elif e.collection != 'buffer' and not np.all(np.isfinite(v)):
      problems.append(f'{name}: holds non-finite values')
  if missing or unexpected or problems:
    lines = [f'{source}: the state_dict does not match the architecture '
             f'(block_conf={tuple(model_config.block_conf)}, '
             f'layers_conf={tuple(model_config.layers_conf)}, '
             f'mid_channels={tuple(model_config.mid_channels)}, '
             f'growth_rate={model_config.growth_rate}, '
             f'image {model_config.image_size}x{model_config.image_size}x'
             f'{model_config.num_channels}):']
    for title, items in (('missing', missing), ('unexpected', unexpected),
                         ('wrong shape / dtype / value', problems)):
      if items:
        lines.append(f'  {len(items)} {title}:')
        lines.extend(f'    {i}' for i in items)
    raise OfficialCheckpointError('\n'.join(lines))

  variables: Variables = {'params': {}, 'batch_stats': {}}
  stacks: Dict[Tuple[str, Tuple[str, ...]], Dict[int, np.ndarray]] = {}
  buffers: Dict[str, np.ndarray] = {}
  for e in entries:
    value = np.asarray(sd[e.name])
    if e.collection == 'buffer':
      buffers[e.name] = np.array(value)
    elif e.index is None:
      _set(variables[e.collection], e.path, _to_ours(value, e.layout))
    else:
      stacks.setdefault((e.collection, e.path), {})[e.index] = _to_ours(value, e.layout)
  for (collection, path), parts in stacks.items():
    _set(variables[collection], path, np.stack([parts[i] for i in range(len(parts))]))
  return variables, buffers


def _set(tree: Dict[str, Any], path: Sequence[str], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: Mapping[str, Any], path: Sequence[str]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def export_state_dict(variables: Mapping[str, Any], model_config: ml_collections.ConfigDict,
                      buffers: Optional[Mapping[str, np.ndarray]] = None
                      ) -> 'collections.OrderedDict[str, np.ndarray]':
  """Our variables -> the published state_dict `{name: numpy array}`, in the published order.

  Arrays keep the dtype of our variables (float32 for a converted or trained model). Buffers
  come from `buffers` (as returned by `import_state_dict`) where present, else the published
  defaults. Raises `OfficialCheckpointError` listing every missing or mis-shaped variable.
  """
  buffers = dict(buffers or {})
  out: 'collections.OrderedDict[str, np.ndarray]' = collections.OrderedDict()
  problems = []
  for e in state_dict_layout(model_config):
    if e.collection == 'buffer':
      value = np.array(buffers.pop(e.name, e.default))
      if value.shape != e.shape:
        problems.append(f'buffer {e.name}: shape {_fmt_shape(value.shape)}, expected '
                        f'{_fmt_shape(e.shape)}')
      out[e.name] = value
      continue
    where = '/'.join((e.collection,) + e.path)
    try:
      leaf = np.asarray(_get(variables[e.collection], e.path))
    except (KeyError, TypeError):
      problems.append(f'{where}: missing (for {e.name})')
      continue
    if e.index is not None:
      if leaf.ndim == 0 or leaf.shape[0] <= e.index:
        problems.append(f'{where}: shape {_fmt_shape(leaf.shape)} has no module {e.index} '
                        f'(for {e.name})')
        continue
      leaf = leaf[e.index]
    value = _to_published(leaf, e.layout)
    if value.shape != e.shape:
      problems.append(f'{where}: gives {e.name} shape {_fmt_shape(value.shape)}, expected '
                      f'{_fmt_shape(e.shape)}')
      continue
    out[e.name] = value
  if buffers:
    problems.append(f'unknown buffers {sorted(buffers)}')
  if problems:
    raise OfficialCheckpointError('cannot export the variables as a published state_dict:\n'
                                  + '\n'.join(f'  {p}' for p in problems))
  return out
