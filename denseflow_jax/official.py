"""The published (PyTorch) DenseFlow checkpoints: a torch-free reader, weight conversion, export.

The authors' training script leaves a model directory `MODEL/` with `args.pickle` (the command
line, a pickled `argparse.Namespace`) and `check/checkpoint.pt` (a `torch.save` zip whose
`model` entry is the state_dict). This module reads both without importing torch, turns them
into our config and flax variables, and writes our variables back out under the published
names. Everything here is numpy; nothing is compiled.

Reading (restricted unpickling, `denseflow_jax.torch_reader`, re-exported here)
  `read_torch_checkpoint(path)` unpickles `<dir>/data.pkl` from the zip with an unpickler whose
  `find_class` only resolves the globals a checkpoint needs: `torch._utils._rebuild_tensor_v2`,
  `collections.OrderedDict` and the typed storage names (`torch.FloatStorage`,
  `torch.LongStorage`, ...), each mapped to a small stand-in of ours that builds numpy arrays
  (little-endian storage bytes from `<dir>/data/<key>`, honouring offset, size and stride).
  Any other global is refused before it is called (`UnsafePickleError`, naming the global), so a
  malicious file cannot run code. `read_args(path)` reads `args.pickle` the same way, allowing
  only `argparse.Namespace`. `read_state_dict(path)` returns the checkpoint's `model` entry.

Config
  `model_config_from_args(args)` maps `block_conf`, `layers_conf`, `layer_mid_chnls`,
  `growth_rate`, `num_bits`, `dataset` (cifar10 / imagenet32: 32x32x3, imagenet64 / celeba:
  64x64x3) and `checkpointing` (-> `remat`) onto `configs/default.py`'s model config;
  `config_from_args` returns a full experiment config (data set, IWBO k) around it. Unknown
  fields or an architecture our model cannot build raise `OfficialCheckpointError` naming the
  field.

Weights
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
  given, else the published defaults (`initialized` 1, `num_batches_tracked` 0, `dist.buffer` 0,
  `temperature` 1, `_shift` -0.5, `_scale` 1, `ldj_per_dim`). Importing an export gives the same
  variables; exporting an import (with its buffers) gives the same tensors bit for bit.
  `save_state_dict_npz` writes it as an `.npz` keyed by the published names.

Common random numbers
  The published code draws two kinds of noise per pass: the dequantizer's standard-normal base
  draw `eps` `(N, 4C, H/2, W/2)` and, before unit u >= 1 of the block at top-level index T
  (T = 3, 5, 7, ... for our blocks b = 0, 1, 2, ...: T = 3 + 2b), the cross-unit draw `eta`
  `(N, growth_rate, H_b, W_b)`, both channels-first. `official_noise(eps, etas)` turns them
  into the `noise` dict of `DenseFlow.log_prob` / `encode`:
  `{'dequantization': eps.transpose(0, 2, 3, 1), 'block{b}_unit{u}': eta.transpose(0, 2, 3, 1)}`
  (the squeezed channel order `4c + 2i + j` is the same in both codes, so only the axes move).
  With the same weights and the same draws, both codes compute the same number:

    variables, buffers = import_state_dict(read_state_dict(ckpt), model_cfg)
    noise = official_noise(eps_nchw, {'transforms.3.unit1': eta_nchw, ...})
    ll = DenseFlow(model_cfg).apply(variables, x_nhwc_uint8, noise=noise)

  `reference_noise(npz)` does this for the `noise/...` entries of a reference trace.

Converted model directories
  `save_converted(workdir, config, variables, buffers, ...)` writes the training workdir layout
  without the training state: `workdir/config.json` (the experiment config) and
  `workdir/checkpoints/<step>/{params,batch_stats}/` (orbax `CheckpointManager` items, each a
  `StandardSave` pytree), plus `workdir/official/{buffers.npz, args.json, source.json}`;
  `load_converted(workdir)` reads them back. `experiments/convert_official.py` is the
  command-line entry point.
"""
import argparse
import collections
import dataclasses
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import ml_collections
import numpy as np

from denseflow_jax import defaults
from denseflow_jax.artifacts import file_sha256
from denseflow_jax.bijectors.dequantize import log_bin_width
from denseflow_jax.config_check import plan_model
from denseflow_jax.torch_reader import (OfficialCheckpointError, UnsafePickleError, read_args,
                                        read_torch_checkpoint)

Variables = Dict[str, Any]
__all__ = ['OfficialCheckpointError', 'UnsafePickleError', 'read_args', 'read_torch_checkpoint',
           'read_state_dict', 'model_config_from_args', 'config_from_args', 'Entry',
           'state_dict_layout', 'import_state_dict', 'export_state_dict', 'save_state_dict_npz',
           'load_state_dict_npz', 'official_noise', 'reference_noise', 'reference_images',
           'OfficialModel', 'load_official', 'save_converted', 'load_converted', 'file_sha256']


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _strip_module_prefix(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
  keys = list(state_dict)
  if keys and all(k.startswith('module.') for k in keys):
    return {k[len('module.'):]: v for k, v in state_dict.items()}
  return dict(state_dict)


def _state_dict_of(obj: Any, path: str) -> Dict[str, np.ndarray]:
  sd = obj.get('model') if isinstance(obj, Mapping) and 'model' in obj else obj
  if not isinstance(sd, Mapping) or not all(
      isinstance(k, str) and isinstance(v, np.ndarray) for k, v in sd.items()):
    top = list(obj)[:20] if isinstance(obj, Mapping) else type(obj).__name__
    raise OfficialCheckpointError(f'{path}: expected a dict with a "model" state_dict of '
                                  f'tensors, found {top}')
  return _strip_module_prefix(sd)


def read_state_dict(path: str) -> Dict[str, np.ndarray]:
  """The model state_dict of a published `checkpoint.pt` as `{name: numpy array}`.

  Takes the checkpoint's `model` entry (or the whole object if it is itself a state_dict);
  strips a `module.` prefix (DataParallel). Optimizer and scheduler states are ignored.
  """
  return _state_dict_of(read_torch_checkpoint(path), os.fspath(path))


# ----------------------------------------------------------------------------------------------
# args.pickle -> config
# ----------------------------------------------------------------------------------------------

#: The fields of the published training script's command line (30, in its order).
KNOWN_ARGS = ('epochs', 'seed', 'device', 'parallel', 'resume', 'name', 'project', 'eval_every',
              'check_every', 'log_tb', 'log_wandb', 'dataset', 'num_bits', 'batch_size',
              'num_workers', 'pin_memory', 'augmentation', 'num_classes', 'growth_rate',
              'checkpointing', 'block_conf', 'layer_mid_chnls', 'layers_conf', 'optimizer', 'lr',
              'warmup', 'momentum', 'momentum_sqr', 'gamma', 'use_grad_norm')
_ARCH_ARGS = ('dataset', 'num_bits', 'growth_rate', 'block_conf', 'layer_mid_chnls',
              'layers_conf')
#: Published data set name -> (image size, channels).
DATASETS = {'cifar10': (32, 3), 'imagenet32': (32, 3), 'imagenet64': (64, 3),
            'celeba': (64, 3)}


def _int_tuple(args: argparse.Namespace, field: str) -> Tuple[int, ...]:
  v = getattr(args, field)
  if isinstance(v, (list, tuple)) and v and all(_is_int(i) for i in v):
    return tuple(int(i) for i in v)
  raise OfficialCheckpointError(f'args.{field} = {v!r}: expected a non-empty list of ints')


def model_config_from_args(args: argparse.Namespace,
                           allow_unknown: bool = False) -> ml_collections.ConfigDict:
  """Our model config (`denseflow_jax.defaults` fields) for the published command line `args`.

  Raises `OfficialCheckpointError` naming the field for a missing architecture field, an
  unknown data set, an architecture our model cannot build, or (unless `allow_unknown`) a field
  the published script does not have (it might change the architecture).
  """
  fields = vars(args)
  unknown = sorted(set(fields) - set(KNOWN_ARGS))
  if unknown and not allow_unknown:
    raise OfficialCheckpointError(
        f'args.pickle has field(s) {unknown} that the published training script (whose 30 '
        f'fields this converter maps) does not have; they may change the architecture. '
        f'Pass allow_unknown=True (--allow_unknown_args) to ignore them')
  missing = [f for f in _ARCH_ARGS if f not in fields]
  if missing:
    raise OfficialCheckpointError(f'args.pickle lacks the architecture field(s) {missing}')
  if args.dataset not in DATASETS:
    raise OfficialCheckpointError(f'args.dataset = {args.dataset!r} is not supported; expected '
                                  f'one of {sorted(DATASETS)}')
  if not _is_int(args.num_bits) or not _is_int(args.growth_rate):
    raise OfficialCheckpointError(f'args.num_bits = {args.num_bits!r}, args.growth_rate = '
                                  f'{args.growth_rate!r}: expected ints')
  size, channels = DATASETS[args.dataset]
  m = defaults.get_model_config()
  m.image_size, m.num_channels = size, channels
  m.num_bits = int(args.num_bits)
  m.block_conf = _int_tuple(args, 'block_conf')
  m.layers_conf = _int_tuple(args, 'layers_conf')
  m.mid_channels = _int_tuple(args, 'layer_mid_chnls')
  m.growth_rate = int(args.growth_rate)
  m.remat = bool(fields.get('checkpointing', False))
  try:
    plan_model(m)
  except ValueError as e:
    raise OfficialCheckpointError(
        f'args.pickle describes an architecture this port cannot build (block_conf='
        f'{m.block_conf}, layers_conf={m.layers_conf}, layer_mid_chnls={m.mid_channels}, '
        f'growth_rate={m.growth_rate}, dataset={args.dataset}): {e}') from None
  return m


def config_from_args(args: argparse.Namespace,
                     allow_unknown: bool = False) -> ml_collections.ConfigDict:
  """A full experiment config (`denseflow_jax.defaults`) for the published command line `args`.

  Model from `model_config_from_args`; `data.dataset` from `args.dataset` (CelebA without the
  random translation); `eval.iwbo_k` 1000 for CIFAR-10, 200 otherwise (paper protocol).
  """
  config = defaults.get_config()
  config.model = model_config_from_args(args, allow_unknown)
  config.data.dataset = args.dataset
  if args.dataset == 'celeba':
    config.data.translate = 0.0
  config.eval.iwbo_k = 1000 if args.dataset == 'cifar10' else 200
  if _is_int(getattr(args, 'seed', None)):
    config.train.seed = int(args.seed)
  return config


# ----------------------------------------------------------------------------------------------
# State_dict layout
# ----------------------------------------------------------------------------------------------

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


def save_state_dict_npz(path: str, state_dict: Mapping[str, np.ndarray]) -> None:
  """Writes a state_dict as an uncompressed `.npz` keyed by the published names."""
  with open(path, 'wb') as f:
    np.savez(f, **state_dict)


def load_state_dict_npz(path: str) -> 'collections.OrderedDict[str, np.ndarray]':
  """Reads a `save_state_dict_npz` file (no pickles allowed)."""
  with np.load(path, allow_pickle=False) as z:
    return collections.OrderedDict((k, z[k]) for k in z.files)


# ----------------------------------------------------------------------------------------------
# Noise and reference traces
# ----------------------------------------------------------------------------------------------

def _nhwc(a: np.ndarray, what: str) -> np.ndarray:
  a = np.asarray(a)
  if a.ndim != 4:
    raise ValueError(f'{what}: expected a channels-first (N, C, H, W) array, got shape {a.shape}')
  return np.ascontiguousarray(a.transpose(0, 2, 3, 1))


def official_noise(eps_deq: Optional[np.ndarray] = None,
                   etas: Optional[Mapping[str, np.ndarray]] = None) -> Dict[str, np.ndarray]:
  """Published-layout noise -> the `noise` dict of `DenseFlow.log_prob` / `encode`.

  `eps_deq`: the dequantizer's base draw `(N, 4C, H/2, W/2)`. `etas`: `{'transforms.T.unit{u}':
  (N, growth_rate, H_b, W_b)}`, the cross-unit draw before unit u of the block at top-level
  index T = 3 + 2b. Returns `{'dequantization': ..., 'block{b}_unit{u}': ...}`, channels last.
  """
  noise = {}
  if eps_deq is not None:
    noise['dequantization'] = _nhwc(eps_deq, 'eps_deq')
  for key, eta in (etas or {}).items():
    parts = key.split('.')
    if (len(parts) != 3 or parts[0] != 'transforms' or not parts[1].isdigit()
        or not parts[2].startswith('unit') or not parts[2][4:].isdigit()):
      raise ValueError(f"official_noise: key {key!r} is not of the form 'transforms.T.unit<u>'")
    t, u = int(parts[1]), int(parts[2][4:])
    if t < 3 or t % 2 == 0 or u < 1:
      raise ValueError(f'official_noise: {key!r} names no cross-unit coupling (blocks sit at odd '
                       f'T >= 3, couplings before units u >= 1)')
    noise[f'block{(t - 3) // 2}_unit{u}'] = _nhwc(eta, key)
  return noise


def reference_noise(reference: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """The `noise/eps_deq` and `noise/eta/...` entries of a reference trace as our `noise` dict."""
  etas = {k[len('noise/eta/'):]: reference[k] for k in reference if k.startswith('noise/eta/')}
  return official_noise(reference['noise/eps_deq'] if 'noise/eps_deq' in reference else None,
                        etas)


def reference_images(reference: Mapping[str, np.ndarray]) -> np.ndarray:
  """The reference trace's images `x` `(N, C, H, W)` (float) as uint8 `(N, H, W, C)`."""
  x = np.asarray(reference['x'])
  if not np.array_equal(x, np.round(x)) or x.min() < 0 or x.max() > 255:
    raise ValueError('reference x: expected integer pixel values in [0, 255]')
  return _nhwc(x, 'x').astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Model directories
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class OfficialModel:
  """A published model directory, converted.

  `config`: our experiment config; `variables`: `{'params', 'batch_stats'}`; `buffers`: the
  left-over published buffers; `args`: the raw command line; `state_dict`: the file's
  state_dict as read (published names and layouts, `module.` prefix stripped).
  """
  config: ml_collections.ConfigDict
  variables: Variables
  buffers: Dict[str, np.ndarray]
  args: argparse.Namespace
  state_dict: Dict[str, np.ndarray]
  checkpoint_path: str
  current_epoch: Optional[int] = None


def load_official(model_dir: str, allow_unknown_args: bool = False) -> OfficialModel:
  """Reads `model_dir/args.pickle` and `model_dir/check/checkpoint.pt` and converts them."""
  args_path = os.path.join(model_dir, 'args.pickle')
  ckpt_path = os.path.join(model_dir, 'check', 'checkpoint.pt')
  args = read_args(args_path)
  config = config_from_args(args, allow_unknown_args)
  obj = read_torch_checkpoint(ckpt_path)
  sd = _state_dict_of(obj, ckpt_path)
  variables, buffers = import_state_dict(sd, config.model, source=ckpt_path)
  epoch = obj.get('current_epoch') if isinstance(obj, Mapping) else None
  return OfficialModel(config, variables, buffers, args, sd, ckpt_path,
                       epoch if _is_int(epoch) else None)


def _jsonable(v: Any) -> Any:
  if isinstance(v, (str, bool, int, float)) or v is None:
    return v
  if isinstance(v, (list, tuple)):
    return [_jsonable(i) for i in v]
  if isinstance(v, Mapping):
    return {str(k): _jsonable(i) for k, i in v.items()}
  return repr(v)


def save_converted(workdir: str, config: ml_collections.ConfigDict, variables: Variables,
                   buffers: Optional[Mapping[str, np.ndarray]] = None,
                   args: Optional[argparse.Namespace] = None, step: int = 0,
                   source: Optional[Mapping[str, Any]] = None) -> str:
  """Writes a converted model into `workdir`; returns the checkpoint directory.

  Layout (the training workdir's, minus the training state):
    `workdir/config.json`                   the experiment config (`config.to_json`)
    `workdir/checkpoints/<step>/params/`    orbax `CheckpointManager` item (`StandardSave`)
    `workdir/checkpoints/<step>/batch_stats/`  same, BatchNorm running statistics
    `workdir/official/buffers.npz`          published buffers without a variable (bit-exact export)
    `workdir/official/args.json`            the published command line
    `workdir/official/source.json`          source file, sha256, epoch
  """
  import orbax.checkpoint as ocp
  workdir = os.path.abspath(workdir)
  os.makedirs(os.path.join(workdir, 'official'), exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json(indent=2, sort_keys=True))
  items = {'params': ocp.args.StandardSave(variables['params'])}
  if variables.get('batch_stats'):
    items['batch_stats'] = ocp.args.StandardSave(variables['batch_stats'])
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'))
  manager.save(int(step), args=ocp.args.Composite(**items), force=True)
  manager.wait_until_finished()
  manager.close()
  save_state_dict_npz(os.path.join(workdir, 'official', 'buffers.npz'), dict(buffers or {}))
  if args is not None:
    with open(os.path.join(workdir, 'official', 'args.json'), 'w') as f:
      json.dump(_jsonable(vars(args)), f, indent=2)
  if source is not None:
    with open(os.path.join(workdir, 'official', 'source.json'), 'w') as f:
      json.dump(_jsonable(source), f, indent=2)
  return os.path.join(workdir, 'checkpoints', str(int(step)))


def load_converted(workdir: str, step: Optional[int] = None
                   ) -> Tuple[ml_collections.ConfigDict, Variables, Dict[str, np.ndarray]]:
  """Reads what `save_converted` wrote: `(config, variables, buffers)` (newest step if None).

  Also reads a step directory that is itself one `{'params', 'batch_stats'}` pytree checkpoint.
  """
  import orbax.checkpoint as ocp
  workdir = os.path.abspath(workdir)
  with open(os.path.join(workdir, 'config.json')) as f:
    raw = json.load(f)
  # JSON turns the model's tuples (block_conf, ...) into lists; restore them.
  raw['model'] = {k: tuple(v) if isinstance(v, list) else v for k, v in raw['model'].items()}
  config = ml_collections.ConfigDict(raw)
  root = os.path.join(workdir, 'checkpoints')
  if step is None:
    steps = sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []
    if not steps:
      raise OfficialCheckpointError(f'{root}: no checkpoints')
    step = steps[-1]
  step_dir = os.path.join(root, str(int(step)))
  checkpointer = ocp.StandardCheckpointer()
  if os.path.isdir(os.path.join(step_dir, 'params')):
    variables = {'params': checkpointer.restore(os.path.join(step_dir, 'params'))}
    if os.path.isdir(os.path.join(step_dir, 'batch_stats')):
      variables['batch_stats'] = checkpointer.restore(os.path.join(step_dir, 'batch_stats'))
  else:
    variables = dict(checkpointer.restore(step_dir))
  variables = {k: _plain(v) for k, v in variables.items()}
  variables.setdefault('batch_stats', {})
  buffers_path = os.path.join(workdir, 'official', 'buffers.npz')
  buffers = dict(load_state_dict_npz(buffers_path)) if os.path.exists(buffers_path) else {}
  return config, variables, buffers


def _plain(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {k: _plain(v) for k, v in tree.items()}
  return np.asarray(tree)


