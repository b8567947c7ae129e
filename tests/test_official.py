"""Tests for denseflow_jax.official: the torch-free reader, weight conversion and parity with the
published model on the reference fixture `../shared/official_tiny` (skipped when absent).

Parity runs in float64 (`jax.enable_x64`) with the fixture's own noise (common random numbers):
the log-likelihood, every log-det, the latents and every sub-network input/output pair must match
the reference computed by the authors' code in float64.
"""
import collections
import json
import os
import pickle
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from denseflow_jax import checkpoint, config_file, official
from denseflow_jax.official import reference as official_reference
from denseflow_jax.bijectors.coupling import bounded_log_scale
from denseflow_jax.model import DenseFlow
from denseflow_jax.nets import (ConditionalCouplingNet, ContextNet, DenseAttentionFusion,
                                DenseBlock, DenseFlowCouplingNet, NoiseNet, NystromAttention)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.normpath(os.path.join(REPO_ROOT, '..', 'shared', 'official_tiny'))
MODEL_DIR = os.path.join(FIXTURE, 'model')
CHECKPOINT = os.path.join(MODEL_DIR, 'check', 'checkpoint.pt')
ARGS = os.path.join(MODEL_DIR, 'args.pickle')

# Tests that read the fixture skip when it is absent; the others (synthetic files) always run.
needs_fixture = pytest.mark.skipif(
    not all(os.path.exists(p) for p in (os.path.join(FIXTURE, 'reference.npz'),
                                        os.path.join(FIXTURE, 'reference.json'), CHECKPOINT,
                                        ARGS)),
    reason=f'reference fixture not found at {FIXTURE} (../shared/official_tiny from the repo root)')

# Tolerances. The fixture's doc: a faithful port matches to ~1e-13 (we see <= 1e-13 relative).
LL_RTOL = 1e-12
LDJ_RTOL, LDJ_ATOL = 1e-10, 1e-8     # relative, or absolute (nats) for log-dets near 0
IO_TOL = 1e-10                       # max |ours - ref| / max |ref| per sub-network output
Z_ATOL = 1e-10


def nhwc(a):
  return np.ascontiguousarray(np.asarray(a).transpose(0, 2, 3, 1))


def max_rel(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(ours - ref) / np.abs(ref)))


def max_abs(ours, ref):
  return float(np.max(np.abs(np.asarray(ours, np.float64) - np.asarray(ref, np.float64))))


@pytest.fixture(scope='module')
def loaded():
  return official.load_official(MODEL_DIR)


@pytest.fixture(scope='module')
def reference():
  with np.load(os.path.join(FIXTURE, 'reference.npz')) as z:
    return {k: z[k] for k in z.files}


@pytest.fixture(scope='module')
def reference_json():
  with open(os.path.join(FIXTURE, 'reference.json')) as f:
    return json.load(f)


@pytest.fixture(scope='module')
def raw_state_dict():
  return official.read_state_dict(CHECKPOINT)


# ------------------------------------------------------------------------------------ reader

@needs_fixture
def test_reader_reads_every_tensor(raw_state_dict, reference_json):
  sd = raw_state_dict
  assert len(sd) == 437
  listed = [(name, tuple(shape)) for name, shape, _ in reference_json['state_dict']]
  assert sorted(listed) == sorted((k, v.shape) for k, v in sd.items())
  for k, v in sd.items():
    if k.endswith('num_batches_tracked'):
      assert v.dtype == np.int64 and v.shape == () and int(v) == 4  # 4 BN-statistics passes
    else:
      assert v.dtype == np.float32, k
  assert sd['transforms.0.ldj_per_dim'] == np.float32(-5.545177459716797)
  assert sd['transforms.1._shift'].shape == () and float(sd['transforms.1._shift']) == -0.5
  # The whole checkpoint: metrics, optimizer and schedulers come back as plain containers.
  ckpt = official.read_torch_checkpoint(CHECKPOINT)
  assert set(ckpt) == {'current_epoch', 'train_metrics', 'eval_metrics', 'eval_epochs', 'model',
                       'optimizer', 'scheduler_iter', 'scheduler_epoch'}
  assert ckpt['optimizer']['param_groups'][0]['betas'] == (0.9, 0.999)


@needs_fixture
def test_args_and_config(loaded):
  args = official.read_args(ARGS)
  assert list(vars(args)) == list(official.KNOWN_ARGS)
  m = loaded.config.model
  assert (tuple(m.block_conf), tuple(m.layers_conf), tuple(m.mid_channels), m.growth_rate) == (
      (2, 2, 1), (1, 1, 2), (16, 16, 16), 4)
  assert (m.image_size, m.num_channels, m.num_bits) == (32, 3, 8)
  assert loaded.config.data.dataset == 'cifar10' and loaded.config.eval.iwbo_k == 1000
  n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(loaded.variables['params']))
  assert n == 10_148_504


@needs_fixture
def test_variables_match_model_tree(loaded):
  model = DenseFlow(loaded.config.model)
  shapes = jax.eval_shape(lambda: model.init(
      {'params': jax.random.key(0), 'noise': jax.random.key(1)},
      jnp.zeros((1, 32, 32, 3), jnp.uint8)))
  for col in ('params', 'batch_stats'):
    ours = jax.tree.map(lambda a: a.shape, loaded.variables[col])
    assert ours == jax.tree.map(lambda a: a.shape, shapes[col]), col


def test_layout_sizes_of_published_configs():
  """State_dict sizes and trainable counts of DenseFlow-74-10 / 45-6 (OFFICIAL_CHECKPOINTS 2.4)."""
  from configs import denseflow_45_6, denseflow_74_10
  for cfg, entries, params in ((denseflow_74_10.get_config().model, 3725, 130_647_294),
                               (denseflow_45_6.get_config().model, 2325, 75_020_522)):
    layout = official.state_dict_layout(cfg)
    assert len(layout) == entries
    assert sum(int(np.prod(e.shape)) for e in layout if e.collection == 'params') == params
  # Every variable of our DenseFlow-45-6 (5 units in block 0: noise nets g_1..g_4) is covered
  # exactly once, with the right shape (shapes only: nothing is allocated).
  cfg = denseflow_45_6.get_config().model
  shapes = jax.eval_shape(lambda: DenseFlow(cfg).init(
      {'params': jax.random.key(0), 'noise': jax.random.key(1)},
      jnp.zeros((1, 32, 32, 3), jnp.uint8)))
  ours = {(col,) + tuple(k.key for k in path): leaf.shape
          for col in ('params', 'batch_stats')
          for path, leaf in jax.tree_util.tree_leaves_with_path(shapes[col])}
  covered = collections.defaultdict(set)
  for e in official.state_dict_layout(cfg):
    if e.collection == 'buffer':
      continue
    s = e.shape
    mapped = {'conv': lambda: (s[2], s[3], s[1], s[0]), 'conv1x1': lambda: (s[1], s[0]),
              'flow': lambda: (s[1], s[0]), 'channel': lambda: (s[1],), 'same': lambda: s}
    key = (e.collection,) + e.path
    assert key in ours, e.name
    leaf = ours[key] if e.index is None else ours[key][1:]
    assert leaf == mapped[e.layout](), (e.name, leaf)
    covered[key].add(e.index)
  assert set(covered) == set(ours)
  for key, indices in covered.items():
    assert indices == ({None} if len(indices) == 1 and None in indices
                       else set(range(ours[key][0]))), key


# -------------------------------------------------------------------------- float64 parity

@pytest.fixture(scope='module')
def trace64(loaded, reference):
  """One float64 pass with the fixture's noise: (ll, intermediates, io outputs)."""
  cfg = loaded.config.model
  ref = reference
  with jax.enable_x64(True):
    v = jax.tree.map(lambda a: np.asarray(a, np.float64), loaded.variables)
    x = official_reference.reference_images(ref)
    noise = official_reference.reference_noise(ref)
    model = DenseFlow(cfg)
    ll, state = jax.jit(lambda v, x, n: model.apply(
        v, x, noise=n, method=model.log_prob, mutable=['intermediates']))(v, x, noise)
    assert ll.dtype == jnp.float64

    p, bs = v['params'], v['batch_stats']
    first = lambda t: jax.tree.map(lambda a: a[0], t)   # module 0 of a scanned unit
    cp = first(p['blocks_0']['unit_0']['modules']['coupling_net'])
    cb = first(bs['blocks_0']['unit_0']['modules']['coupling_net'])
    pre = 'io/transforms.3.blocks.0.transforms.0.transforms.2.coupling_net'
    mid = pre + '.0.dn.transform.1'
    m = cfg.mid_channels[0]
    io_out = {}
    out = DenseFlowCouplingNet(12, m).apply({'params': cp, 'batch_stats': cb},
                                            nhwc(ref[pre + '/in']))
    n, h, w, c = out.shape   # interleaved (s, t) -> (N, C/2, H, W, 2) as published
    io_out[pre + '/out'] = np.asarray(out).reshape(n, h, w, c // 2, 2).transpose(0, 3, 1, 2, 4)
    io_out[mid + '/out'] = nhwc_back(DenseAttentionFusion(m).apply(
        {'params': cp['fusion'], 'batch_stats': cb['fusion']}, nhwc(ref[mid + '/in'])))
    io_out[mid + '.mha/out'] = nhwc_back(NystromAttention(m).apply(
        {'params': cp['fusion']['attention']}, nhwc(ref[mid + '.mha/in'])))
    io_out[mid + '.dense/out'] = nhwc_back(DenseBlock(m, 7, 64).apply(
        {'params': cp['fusion']['dense']}, nhwc(ref[mid + '.dense/in'])))
    g = np.asarray(NoiseNet(cfg.growth_rate).apply({'params': p['blocks_0']['noise_net_1']},
                                                   nhwc(ref['io/transforms.3.noise_params.0/in'])))
    k = cfg.growth_rate
    io_out['io/transforms.3.noise_params.0/out0'] = nhwc_back(g[..., :k])
    io_out['io/transforms.3.noise_params.0/out1'] = nhwc_back(bounded_log_scale(g[..., k:]))
    ctx_in = nhwc(ref['io/transforms.0.encoder.context_init/in']).astype(np.uint8)
    io_out['io/transforms.0.encoder.context_init/out'] = nhwc_back(ContextNet(8, 64).apply(
        {'params': p['dequantizer']['context_net']}, ctx_in, jnp.float64))
    cc = 'io/transforms.0.encoder.transforms.1.coupling_net'
    out = np.asarray(ConditionalCouplingNet(12).apply(
        {'params': p['dequantizer']['ConditionalCouplingNet_0']}, nhwc(ref[cc + '/in'])))
    io_out[cc + '/out'] = out.reshape(n, h, w, 6, 2).transpose(0, 3, 1, 2, 4)
    to_np = lambda t: jax.tree.map(np.asarray, t)
    return np.asarray(ll), to_np(state['intermediates']), io_out


def nhwc_back(a):
  return np.asarray(a).transpose(0, 3, 1, 2)


def our_log_dets(intermediates, cfg):
  """Our log-dets keyed by the published module names of `ldj/<module>`."""
  it = intermediates
  stages = it['stage_log_dets'][0]
  ours = {'transforms.0': stages['dequantization'], 'transforms.1': np.zeros(4),
          'transforms.2': np.zeros(4)}
  for k, ld in enumerate(it['dequantizer']['step_log_dets'][0]):
    ours[f'transforms.0.encoder.transforms.{k}'] = ld
  for b, units in enumerate(cfg.block_conf):
    t = 3 + 2 * b
    ours[f'transforms.{t}'] = stages[f'block{b}']
    if b < len(cfg.block_conf) - 1:
      ours[f'transforms.{t + 1}'] = stages[f'transition{b}']
    block = it[f'blocks_{b}']
    for u in range(units):
      ours[f'transforms.{t}.blocks.{u}'] = block[f'unit_{u}_log_det'][0]
      per_module = block[f'unit_{u}']['module_log_dets'][0]   # (modules, 3, N)
      for l in range(per_module.shape[0]):
        for i in range(3):
          ours[f'transforms.{t}.blocks.{u}.transforms.{l}.transforms.{i}'] = per_module[l, i]
  return ours


@needs_fixture
def test_ll_matches_reference_float64(trace64, reference, reference_json):
  ll = trace64[0]
  assert max_rel(ll, reference['ll']) <= LL_RTOL, (ll, reference['ll'])
  np.testing.assert_allclose(ll, reference_json['trace_ll'], rtol=LL_RTOL)
  assert abs(ll[0] - (-16934.872619)) < 1e-6   # the fixture's headline number


@needs_fixture
def test_every_log_det_matches_reference(trace64, loaded, reference):
  _, it, _ = trace64
  ours = our_log_dets(it, loaded.config.model)
  keys = [k[len('ldj/'):] for k in reference if k.startswith('ldj/')]
  assert set(keys) == set(ours)   # every published log-det has a counterpart
  bad = []
  for name in keys:
    ref = reference['ldj/' + name]
    err = np.abs(np.asarray(ours[name]) - ref)
    if not np.all((err <= LDJ_RTOL * np.abs(ref)) | (err <= LDJ_ATOL)):
      bad.append((name, float(err.max())))
  assert not bad, bad
  # Cross-unit couplings: block log-det minus its units (the published per-unit entries exclude it).
  for b in range(len(loaded.config.model.block_conf) - 1):
    t = 3 + 2 * b
    aug = reference[f'ldj/transforms.{t}'] - sum(
        reference[f'ldj/transforms.{t}.blocks.{u}']
        for u in range(loaded.config.model.block_conf[b]))
    assert max_rel(it[f'blocks_{b}']['augment_1_log_det'][0], aug) <= LDJ_RTOL
  assert max_rel(it['base_log_prob'][0], reference['base_log_prob']) <= LDJ_RTOL
  assert max_rel(it['dequantizer']['log_q'][0], reference['deq/log_q_u']) <= LDJ_RTOL


@needs_fixture
def test_latents_match_reference(trace64, loaded, reference):
  _, it, _ = trace64
  assert max_abs(it['dequantizer']['u'][0], nhwc(reference['deq/u'])) <= Z_ATOL
  for b, units in enumerate(loaded.config.model.block_conf):
    t = 3 + 2 * b
    for u in range(units):
      ref = nhwc(reference[f'z/transforms.{t}.blocks.{u}'])
      assert max_abs(it[f'blocks_{b}'][f'unit_{u}_z'][0], ref) <= Z_ATOL, (b, u)
    # A block's output is its last unit's output (the last block's is the final latent).
    np.testing.assert_array_equal(reference[f'z/transforms.{t}'],
                                  reference[f'z/transforms.{t}.blocks.{units - 1}'])


@needs_fixture
def test_subnetwork_io_pairs(trace64, reference):
  io_out = trace64[2]
  assert len(io_out) == sum(1 for k in reference if k.startswith('io/') and '/out' in k) == 8
  for key, ours in io_out.items():
    ref = reference[key]
    assert ours.shape == ref.shape, key
    err = max_abs(ours, ref) / float(np.max(np.abs(ref)))
    assert err <= IO_TOL, (key, err)


# ------------------------------------------------------------------- float32, our own rng

@needs_fixture
def test_elbo_draws_agree_with_reference_statistics(loaded, reference, reference_json):
  """32 float32 ELBO draws per image with our rng: means within 4 combined standard errors."""
  draws = 32
  x = official_reference.reference_images(reference)
  n = x.shape[0]
  model = DenseFlow(loaded.config.model)
  ll = jax.jit(lambda v, x, key: model.apply(v, x, rngs={'noise': key}, method=model.log_prob))(
      loaded.variables, np.tile(x, (draws, 1, 1, 1)), jax.random.key(2024))
  ll = np.asarray(ll, np.float64).reshape(draws, n)
  assert np.all(np.isfinite(ll))
  for i, stats in enumerate(reference_json['per_image']):
    ours_mean = ll[:, i].mean()
    ours_se = ll[:, i].std(ddof=1) / np.sqrt(draws)
    bound = 4 * np.hypot(ours_se, stats['elbo_sem_nats'])
    assert abs(ours_mean - stats['elbo_mean_nats']) <= bound, (i, ours_mean, stats)
    # The spread of the draws is the same too (loosely: sample stds of 32 draws).
    assert 0.5 < ll[:, i].std(ddof=1) / stats['elbo_std_nats'] < 2.0


# ----------------------------------------------------------------------- export / import

def assert_trees_identical(a, b):
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), path


@needs_fixture
def test_export_of_import_reproduces_the_file_bit_for_bit(loaded, raw_state_dict):
  exported = official.export_state_dict(loaded.variables, loaded.config.model, loaded.buffers)
  assert list(exported) == list(raw_state_dict)   # published key order, buffers included
  for k, v in raw_state_dict.items():
    assert exported[k].dtype == v.dtype and exported[k].shape == v.shape, k
    assert exported[k].tobytes() == v.tobytes(), k


@needs_fixture
def test_export_then_import_gives_identical_variables(loaded, tmp_path):
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32),
                           loaded.variables)
  exported = official.export_state_dict(variables, loaded.config.model)   # default buffers
  path = str(tmp_path / 'state_dict.npz')
  official.save_state_dict_npz(path, exported)
  back, buffers = official.import_state_dict(official.load_state_dict_npz(path),
                                             loaded.config.model)
  assert_trees_identical(back, variables)
  assert float(buffers['transforms.3.blocks.0.transforms.0.transforms.0.initialized'][0]) == 1.0
  assert int(buffers['transforms.7.blocks.0.transforms.1.transforms.2.coupling_net.0.dn.'
                     'transform.1.mix_conv.0.num_batches_tracked']) == 0
  # The module. prefix of DataParallel checkpoints is accepted.
  prefixed = {'module.' + k: v for k, v in exported.items()}
  back2, _ = official.import_state_dict(prefixed, loaded.config.model)
  assert_trees_identical(back2, variables)


@needs_fixture
def test_converter_writes_a_loadable_workdir(loaded, tmp_path):
  out = tmp_path / 'converted'
  script = os.path.join(REPO_ROOT, 'experiments', 'convert_official.py')
  proc = subprocess.run([sys.executable, script, f'--model={MODEL_DIR}', f'--workdir={out}'],
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (out / 'config.json').exists()
  assert (out / 'checkpoints' / '0' / 'params').is_dir()
  assert (out / 'checkpoints' / '0' / 'batch_stats').is_dir()
  config, variables, buffers = official.load_converted(str(out))
  assert_trees_identical(variables, loaded.variables)
  # The workdir reader of evaluate / sample reads it the same way.
  step, restored = checkpoint.load_variables(str(out))
  assert step == 0
  assert_trees_identical(jax.tree.map(np.asarray, restored), loaded.variables)
  assert checkpoint.verify_manifest(str(out / 'checkpoints' / '0'))
  assert set(buffers) == set(loaded.buffers)
  assert tuple(config.model.block_conf) == (2, 2, 1)
  # A second conversion into the same step refuses to overwrite.
  again = subprocess.run([sys.executable, script, f'--model={MODEL_DIR}', f'--workdir={out}'],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert again.returncode != 0 and '--overwrite' in again.stderr
  # config.json builds the model these variables belong to (parity is tested above).
  model = DenseFlow(config.model)
  shapes = jax.eval_shape(lambda: model.init(
      {'params': jax.random.key(0), 'noise': jax.random.key(1)},
      jnp.zeros((1, 32, 32, 3), jnp.uint8)))
  assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(lambda a: a.shape, variables)


# -------------------------------------------------------------------- converted workdirs

def _tiny_variables(seed):
  rng = np.random.default_rng(seed)
  return {'params': {'dense': {'kernel': rng.normal(size=(3, 4)).astype(np.float32),
                               'bias': rng.normal(size=(4,)).astype(np.float32)}},
          'batch_stats': {'bn': {'mean': rng.normal(size=(4,)).astype(np.float32)}}}


def _listing(root):
  return sorted(os.path.relpath(os.path.join(d, n), root)
                for d, dirs, files in os.walk(root) for n in dirs + files)


def _damage(step_dir):
  """Flips a byte of the largest params file (the manifest catches it)."""
  files = [os.path.join(d, n) for d, _, names in os.walk(os.path.join(step_dir, 'params'))
           for n in names]
  victim = max(files, key=os.path.getsize)
  data = bytearray(open(victim, 'rb').read())
  data[len(data) // 2] ^= 0xFF
  open(victim, 'wb').write(bytes(data))


def test_load_converted_walks_back_like_any_workdir(tmp_path, caplog):
  workdir = str(tmp_path / 'converted')
  config = config_file.config_from_json('{}')
  first, second = _tiny_variables(0), _tiny_variables(1)
  buffers = {'x.initialized': np.ones(1, np.float32)}
  official.save_converted(workdir, config, first, buffers, step=0)
  official.save_converted(workdir, config, second, buffers, step=1)
  with pytest.raises(checkpoint.CheckpointError, match='exists; not overwriting'):
    official.save_converted(workdir, config, second, step=1)
  _, variables, _ = official.load_converted(workdir)
  assert_trees_identical(variables, second)
  # A corrupt newest step: skipped with one warning, the workdir left as it was.
  _damage(os.path.join(workdir, 'checkpoints', '1'))
  before = _listing(workdir)
  _, variables, buffers = official.load_converted(workdir)
  assert_trees_identical(variables, first)
  assert set(buffers) == {'x.initialized'}
  assert f'skipping corrupt checkpoint {workdir}/checkpoints/1 (checksum manifest' in caplog.text
  assert _listing(workdir) == before
  # Nothing readable: the same error as for a training workdir.
  _damage(os.path.join(workdir, 'checkpoints', '0'))
  with pytest.raises(checkpoint.CheckpointError, match='no readable checkpoint') as converted:
    official.load_converted(workdir)
  with pytest.raises(checkpoint.CheckpointError) as direct:
    checkpoint.load_variables(workdir)
  assert str(converted.value) == str(direct.value)
  assert _listing(workdir) == before
  with pytest.raises(checkpoint.CheckpointError, match='no checkpoint for step 5'):
    official.load_converted(workdir, step=5)


def test_save_converted_writes_config_json_atomically(tmp_path, monkeypatch):
  workdir = str(tmp_path / 'converted')
  config = config_file.config_from_json('{}')
  official.save_converted(workdir, config, _tiny_variables(0), step=0)
  path = os.path.join(workdir, 'config.json')
  saved = open(path).read()
  assert config_file.load_config(workdir).to_json() == config.to_json()
  calls = []
  real = config_file.save_config
  monkeypatch.setattr(config_file, 'save_config',
                      lambda c, w: (calls.append(w), real(c, w))[1])
  official.save_converted(workdir, config, _tiny_variables(1), step=1)
  assert calls == [os.path.abspath(workdir)]   # the writer training uses
  monkeypatch.undo()
  # A write that fails half-way leaves the previous config.json whole, and no temporary file.
  def failing_to_json(self, *args, **kwargs):
    raise OSError(28, 'No space left on device')
  monkeypatch.setattr(type(config), 'to_json', failing_to_json)
  with pytest.raises(OSError, match='No space left'):
    official.save_converted(workdir, config, _tiny_variables(2), step=2)
  assert open(path).read() == saved
  assert sorted(os.listdir(workdir)) == ['checkpoints', 'config.json', 'official']


# -------------------------------------------------------------------------------- bad input

def _checkpoint_zip(path, payload: bytes, folder='archive', storages=None):
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr(f'{folder}/data.pkl', payload)
    zf.writestr(f'{folder}/byteorder', 'little')
    for key, data in (storages or {}).items():
      zf.writestr(f'{folder}/data/{key}', data)
  return str(path)


class _WritesMarker:
  """Unpickling this calls `open(marker, 'w')`: it creates the marker file."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, 'w'))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
  payload = pickle.dumps({'model': collections.OrderedDict(w=_WritesMarker(
      str(tmp_path / 'marker')))}, protocol=2)
  # Control: an ordinary unpickler would run it.
  control = tmp_path / 'control'
  pickle.loads(pickle.dumps(_WritesMarker(str(control)), protocol=2)).close()
  assert control.exists()

  path = _checkpoint_zip(tmp_path / 'evil.pt', payload)
  with pytest.raises(official.UnsafePickleError, match=r'builtins\.open|io\.open'):
    official.read_torch_checkpoint(path)
  with pytest.raises(official.UnsafePickleError):
    official.read_state_dict(path)
  args_path = tmp_path / 'args.pickle'
  args_path.write_bytes(pickle.dumps(_WritesMarker(str(tmp_path / 'marker')), protocol=4))
  with pytest.raises(official.UnsafePickleError, match='refusing to load global'):
    official.read_args(str(args_path))
  # A torch global outside the allowed set is refused as well (named in the error).
  sneaky = pickle.dumps(1, protocol=2).replace(b'K\x01', b'ctorch\nload\n)R')
  with pytest.raises(official.UnsafePickleError, match=r'torch\.load'):
    official.read_torch_checkpoint(_checkpoint_zip(tmp_path / 'sneaky.pt', sneaky))
  assert not (tmp_path / 'marker').exists()


def test_reader_builds_strided_and_zero_d_tensors(tmp_path):
  """A hand-written checkpoint: a transposed (strided) float tensor with an offset, a 0-d long."""
  floats = np.arange(10, dtype='<f4')
  longs = np.array([7, 42], dtype='<i8')

  payload = _torch_like_pickle(
      {'t': ('0', 'FloatStorage', 10, 1, (2, 3), (1, 2)),   # offset 1, size (2, 3), stride (1, 2)
       'n': ('1', 'LongStorage', 2, 1, (), ())})
  path = _checkpoint_zip(tmp_path / 'ok.pt', payload,
                         storages={'0': floats.tobytes(), '1': longs.tobytes()})
  obj = official.read_torch_checkpoint(path)
  expected = np.lib.stride_tricks.as_strided(floats[1:], (2, 3), (4, 8))
  np.testing.assert_array_equal(obj['t'], expected)
  assert obj['t'].dtype == np.float32 and obj['t'].flags.c_contiguous
  assert obj['n'].shape == () and obj['n'].dtype == np.int64 and int(obj['n']) == 42
  # A storage shorter than its declared size, and a tensor reaching past its storage.
  bad = _checkpoint_zip(tmp_path / 'short.pt', payload,
                        storages={'0': floats[:5].tobytes(), '1': longs.tobytes()})
  with pytest.raises(official.OfficialCheckpointError, match='data/0'):
    official.read_torch_checkpoint(bad)
  far = _torch_like_pickle({'t': ('0', 'FloatStorage', 10, 5, (2, 3), (1, 2))})
  with pytest.raises(official.OfficialCheckpointError, match='reaches element'):
    official.read_torch_checkpoint(_checkpoint_zip(tmp_path / 'far.pt', far,
                                                   storages={'0': floats.tobytes()}))


def _torch_like_pickle(tensors):
  """Protocol-2 pickle bytes of `OrderedDict(name -> _rebuild_tensor_v2(storage, ...))`.

  `tensors`: name -> (storage key, storage type name, numel, offset, size, stride). Written
  opcode by opcode so that no torch (or stand-in class) is needed to produce it.
  """
  out = [b'\x80\x02', b'ccollections\nOrderedDict\n', b')R']   # OrderedDict()
  for name, (key, kind, numel, offset, size, stride) in tensors.items():
    out.append(pickle.dumps(name, protocol=2)[2:-1])            # the key (a str)
    out.append(b'ctorch._utils\n_rebuild_tensor_v2\n(')
    # persistent id tuple ('storage', torch.<kind>, key, 'cuda:0', numel)
    out.append(b'(' + pickle.dumps('storage', protocol=2)[2:-1]
               + f'ctorch\n{kind}\n'.encode()
               + pickle.dumps(key, protocol=2)[2:-1] + pickle.dumps('cuda:0', protocol=2)[2:-1]
               + pickle.dumps(numel, protocol=2)[2:-1] + b'tQ')
    for v in (offset, size, stride, False):
      out.append(pickle.dumps(v, protocol=2)[2:-1])
    out.append(b'ccollections\nOrderedDict\n)Rt')             # backward_hooks, close args
    out.append(b'Rs')                                           # call, setitem
  out.append(b'.')
  return b''.join(out)


@needs_fixture
def test_truncated_or_corrupt_checkpoint_names_the_file(tmp_path):
  data = open(CHECKPOINT, 'rb').read()
  truncated = tmp_path / 'truncated.pt'
  truncated.write_bytes(data[:len(data) // 2])
  with pytest.raises(official.OfficialCheckpointError, match='truncated.pt'):
    official.read_state_dict(str(truncated))
  # Keep the zip directory but damage a tensor's bytes: the CRC check names file and member.
  with zipfile.ZipFile(CHECKPOINT) as zf:
    info = zf.getinfo('checkpoint/data/0')
  header = data[info.header_offset:info.header_offset + 30]   # local header: its own lengths
  name_len, extra_len = int.from_bytes(header[26:28], 'little'), int.from_bytes(header[28:30],
                                                                               'little')
  start = info.header_offset + 30 + name_len + extra_len
  damaged = bytearray(data)
  damaged[start:start + 4] = bytes(b ^ 0xFF for b in damaged[start:start + 4])
  path = tmp_path / 'damaged.pt'
  path.write_bytes(bytes(damaged))
  with pytest.raises(official.OfficialCheckpointError, match=r'damaged\.pt.*checkpoint/data/0'):
    official.read_state_dict(str(path))
  with pytest.raises(official.OfficialCheckpointError, match='no such file'):
    official.read_state_dict(str(tmp_path / 'absent.pt'))


@needs_fixture
def test_mismatched_state_dict_lists_every_problem_in_one_error(loaded, raw_state_dict):
  sd = dict(raw_state_dict)
  gone = 'transforms.5.blocks.1.transforms.0.transforms.1.weight'
  del sd[gone]
  sd['transforms.9.extra.weight'] = np.zeros((3,), np.float32)
  wrong = 'transforms.3.noise_params.0.transformation.0.weight'
  sd[wrong] = np.zeros((48, 12, 1, 1), np.float32)
  bad_flag = 'transforms.7.blocks.0.transforms.1.transforms.0.initialized'
  sd[bad_flag] = np.zeros((1,), np.float32)
  with pytest.raises(official.OfficialCheckpointError) as info:
    official.import_state_dict(sd, loaded.config.model, source='fixture.pt')
  msg = str(info.value)
  for needle in ('fixture.pt', gone, 'transforms.9.extra.weight', wrong, '(48, 12, 3, 3)',
                 bad_flag, '1 missing', '1 unexpected'):
    assert needle in msg, (needle, msg)
  # A single missing key on its own.
  sd = dict(raw_state_dict)
  del sd['base_dist.loc']
  with pytest.raises(official.OfficialCheckpointError, match=r'missing:\n\s+base_dist\.loc'):
    official.import_state_dict(sd, loaded.config.model)


def _args(**changes):
  args = official.read_args(ARGS)
  for k, v in changes.items():
    setattr(args, k, v)
  return args


@needs_fixture
def test_unsupported_architecture_flags_are_named():
  with pytest.raises(official.OfficialCheckpointError, match=r"dataset = 'mnist'"):
    official.model_config_from_args(_args(dataset='mnist'))
  with pytest.raises(official.OfficialCheckpointError, match='coupling_type'):
    official.model_config_from_args(_args(coupling_type='glow'))
  assert official.model_config_from_args(_args(coupling_type='glow'), allow_unknown=True)
  with pytest.raises(official.OfficialCheckpointError, match='layer_mid_chnls'):
    official.model_config_from_args(_args(layer_mid_chnls=[15, 16, 16]))
  with pytest.raises(official.OfficialCheckpointError, match='layers_conf'):
    official.model_config_from_args(_args(layers_conf='1,1,2'))
  args = _args()
  del args.growth_rate
  with pytest.raises(official.OfficialCheckpointError, match='growth_rate'):
    official.model_config_from_args(args)
  m = official.model_config_from_args(_args(dataset='imagenet64', checkpointing=True))
  assert (m.image_size, m.remat) == (64, 'full')


def test_official_noise_mapping():
  eps = np.arange(2 * 12 * 16 * 16, dtype=np.float64).reshape(2, 12, 16, 16)
  eta = np.ones((2, 4, 8, 8))
  noise = official_reference.official_noise(eps, {'transforms.5.unit1': eta})
  assert set(noise) == {'dequantization', 'block1_unit1'}
  assert noise['dequantization'][1, 3, 5, 7] == eps[1, 7, 3, 5]
  assert noise['block1_unit1'].shape == (2, 8, 8, 4)
  with pytest.raises(ValueError, match='transforms.4.unit1'):
    official_reference.official_noise(None, {'transforms.4.unit1': eta})


def test_reader_refuses_size_bombs_before_allocating(tmp_path):
  """A stride-0 view far larger than its storage, a storage member that inflates far beyond its
  compressed size, and a storage that declares more bytes than its member holds: each is refused
  from the sizes alone, before anything is inflated or allocated."""
  one = np.zeros(1, '<f4').tobytes()
  bomb = _torch_like_pickle({'t': ('0', 'FloatStorage', 1, 0, (65536, 65536), (0, 0))})
  path = _checkpoint_zip(tmp_path / 'stride0.pt', bomb, storages={'0': one})
  with pytest.raises(official.OfficialCheckpointError, match=r'16\.00 GiB.*max_bytes'):
    official.read_torch_checkpoint(path)
  # A legitimate stride-0 (expanded) tensor of modest size still reads.
  small = _torch_like_pickle({'t': ('0', 'FloatStorage', 1, 0, (3, 4), (0, 0))})
  obj = official.read_torch_checkpoint(_checkpoint_zip(tmp_path / 'small.pt', small,
                                                       storages={'0': one}))
  assert obj['t'].shape == (3, 4) and not obj['t'].any()

  # 64 MiB of zeros deflate to ~64 KiB: refused from the member's header, never inflated.
  numel = 16 << 20
  payload = _torch_like_pickle({'t': ('0', 'FloatStorage', numel, 0, (numel,), (1,))})
  zipped = tmp_path / 'zipbomb.pt'
  with zipfile.ZipFile(zipped, 'w') as zf:
    zf.writestr('archive/data.pkl', payload)
    zf.writestr('archive/data/0', bytes(4 * numel), compress_type=zipfile.ZIP_DEFLATED)
  assert os.path.getsize(zipped) < 1 << 20
  with pytest.raises(official.OfficialCheckpointError, match='zip bomb'):
    official.read_torch_checkpoint(str(zipped))
  # A declared storage larger than the cap is refused before its member is looked at.
  with pytest.raises(official.OfficialCheckpointError, match='max_bytes'):
    official.read_torch_checkpoint(str(zipped), max_bytes=1 << 20)
  # The declared element count must match the member's size exactly.
  short = _torch_like_pickle({'t': ('0', 'FloatStorage', 8, 0, (8,), (1,))})
  with pytest.raises(official.OfficialCheckpointError, match='holds 4 bytes, expected 32'):
    official.read_torch_checkpoint(_checkpoint_zip(tmp_path / 'short8.pt', short,
                                                   storages={'0': one}))


def _legacy_file(path, payload: bytes, storages, keys=None, little_endian=True):
  """A legacy (non-zip) torch.save file: magic, protocol, sys info, object, keys, storages."""
  with open(path, 'wb') as f:
    for header in (0x1950a86a20f9469cfc6c, 1001,
                   {'protocol_version': 1001, 'little_endian': little_endian,
                    'type_sizes': {'short': 2, 'int': 4, 'long': 4}}):
      f.write(pickle.dumps(header, protocol=2))
    f.write(payload)
    f.write(pickle.dumps(list(storages) if keys is None else keys, protocol=2))
    for data, itemsize in storages.values():
      f.write((len(data) // itemsize).to_bytes(8, 'little'))
      f.write(data)
  return str(path)


def test_legacy_format_reads_and_checks_sizes(tmp_path):
  floats = np.arange(10, dtype='<f4')
  payload = _torch_like_pickle({'t': ('0', 'FloatStorage', 10, 1, (2, 3), (1, 2))})
  obj = official.read_torch_checkpoint(_legacy_file(tmp_path / 'ok.pt', payload,
                                                    {'0': (floats.tobytes(), 4)}))
  np.testing.assert_array_equal(obj['t'], np.lib.stride_tricks.as_strided(floats[1:], (2, 3),
                                                                           (4, 8)))
  # Fewer elements stored than declared, a truncated file, a key list naming another storage.
  with pytest.raises(official.OfficialCheckpointError, match='declares 10 elements'):
    official.read_torch_checkpoint(_legacy_file(tmp_path / 'few.pt', payload,
                                                {'0': (floats[:4].tobytes(), 4)}))
  good = open(tmp_path / 'ok.pt', 'rb').read()
  (tmp_path / 'cut.pt').write_bytes(good[:-8])
  with pytest.raises(official.OfficialCheckpointError, match='storage 0'):
    official.read_torch_checkpoint(str(tmp_path / 'cut.pt'))
  with pytest.raises(official.OfficialCheckpointError, match=r"\['0'\] are used but not stored"):
    official.read_torch_checkpoint(_legacy_file(tmp_path / 'keys.pt', payload,
                                                {'0': (floats.tobytes(), 4)}, keys=['9']))
  # A malicious object pickle in the legacy layout is refused like in a zip.
  evil = pickle.dumps(collections.OrderedDict(w=_WritesMarker(str(tmp_path / 'marker'))),
                      protocol=2)
  with pytest.raises(official.UnsafePickleError, match='refusing to load global'):
    official.read_torch_checkpoint(_legacy_file(tmp_path / 'evil.pt', evil, {}))
  assert not (tmp_path / 'marker').exists()
  (tmp_path / 'text.pt').write_text('not a checkpoint')
  with pytest.raises(official.OfficialCheckpointError, match='not a torch.save file'):
    official.read_torch_checkpoint(str(tmp_path / 'text.pt'))
