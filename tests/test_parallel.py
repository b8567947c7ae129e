"""Data parallelism: 4 (virtual CPU) devices against 1 on the same global batch, the sharded
model helpers, and a two-process run over `jax.distributed` on localhost.

The 4-device runs happen in subprocesses (`--xla_force_host_platform_device_count=4`). The
in-process tests use every device this process has, so they pass with 1 device and with
XLA_FLAGS=--xla_force_host_platform_device_count=4 (run both).
"""
import json
import math
import os
import socket
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest

from denseflow_jax import checkpoint, parallel
from denseflow_jax.model import DenseFlow, init_variables
from test_model import images, small_config
from test_reliability import MICRO_CONFIG, REPO_ROOT, TRAIN

FOUR_DEVICE_SCRIPT = r'''
import json, sys
import flax, jax, numpy as np
from denseflow_jax import optim, parallel, train
from denseflow_jax.data import make_data
from denseflow_jax.model import DenseFlow
import micro

def max_diff(a, b):
  return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

config = micro.get_config()
assert jax.device_count() == 4, jax.devices()
data = make_data(config)
batches = [b for _, b in zip(range(20), data.train_batches(0))]
out = {}
for name, mesh in (('four', parallel.make_mesh()), ('one', parallel.make_mesh(jax.devices()[:1]))):
  model = DenseFlow(config.model)
  tx = optim.make_optimizer(config)
  schedule = optim.learning_rate_schedule(config, data.steps_per_epoch)
  init_fn = train.make_init_fn(model, tx, config, mesh)
  step_fn = train.make_train_step(model, tx, schedule, mesh)
  state = init_fn(parallel.shard_batch(batches[0], mesh))
  record = {'init': jax.tree.map(np.array, state.params), 'loss': [], 'grad_norm': []}
  for i, batch in enumerate(batches):
    state, metrics = step_fn(state, parallel.shard_batch(batch, mesh))
    record['loss'].append(float(metrics['loss']))
    record['grad_norm'].append(float(metrics['grad_norm']))
    if i == 1:  # step 0 has lr 0 (warm-up)
      record['step2'] = jax.tree.map(np.array, (state.params, state.batch_stats))
    if i == 5 and name == 'one':  # what experiments/train.py does in 6 steps on one device
      flat = flax.traverse_util.flatten_dict(state.variables(), sep='/')
      np.savez(sys.argv[2], **{k: np.asarray(v) for k, v in flat.items()})
  record['step20'] = flax.traverse_util.flatten_dict(jax.tree.map(np.array, {
      'params': state.params, 'batch_stats': state.batch_stats}), sep='/')
  record['state_sharding'] = str(jax.tree.leaves(state.params)[0].sharding.spec)
  if name == 'four':
    sharded = parallel.ShardedModel(model, mesh)
    variables = state.variables()
    key = jax.random.key(1)
    lp = sharded.log_prob(variables, batches[0], key)
    out['log_prob'] = [list(lp.shape), bool(np.all(np.isfinite(np.asarray(lp))))]
    out['log_prob_sharding'] = str(lp.sharding.spec)
    # encode / decode / bits_per_dim on 4 devices against the model on one device.
    host = parallel.to_host(variables)
    reference = jax.jit(lambda v, xb, k: (
        model.apply(v, xb, rngs={'noise': k}, method=DenseFlow.bits_per_dim),
        model.apply(v, xb, rngs={'noise': k}, method=DenseFlow.encode)))
    ref_bpd, ref_latents = reference(host, batches[0], key)
    bpd = sharded.bits_per_dim(variables, batches[0], key)
    latents = sharded.encode(variables, batches[0], key)
    decoded = sharded.decode(variables, latents)
    out['vs_unsharded'] = {
        'bpd': float(np.max(np.abs(np.asarray(bpd) - np.asarray(ref_bpd)))),
        'latents': max_diff(parallel.to_host(latents), ref_latents),
        'decode_exact': bool(np.array_equal(parallel.to_host(decoded), batches[0])),
        'shardings': sorted({str(a.sharding.spec) for a in jax.tree.leaves((bpd, latents,
                                                                            decoded))})}
    samples = sharded.sample(variables, jax.random.key(2), 8, 0.7)
    out['sample'] = [list(samples.shape), str(samples.dtype), str(samples.sharding.spec),
                     int(np.asarray(samples).max())]
    try:
      sharded.sample(variables, jax.random.key(2), 6)
    except ValueError as e:
      out['sample_error'] = str(e)
    try:
      bad = micro.get_config()
      bad.train.batch_size = 6
      train.validate_config(bad)
    except ValueError as e:
      out['batch_error'] = str(e)
  out[name] = record

result = {k: max_diff(out['four'][k], out['one'][k]) for k in ('init', 'step2')}
four, one = out['four']['step20'], out['one']['step20']
result['step20'] = {k: [float(np.max(np.abs(four[k] - one[k]))), float(np.max(np.abs(one[k])))]
                    for k in one}
result['loss'] = max(abs(a - b) for a, b in zip(out['four']['loss'], out['one']['loss']))
result['grad_norm'] = max(abs(a / b - 1) for a, b in zip(out['four']['grad_norm'],
                                                         out['one']['grad_norm']))
result['step2_changed'] = max_diff(out['one']['init'], out['one']['step2'][0])
result['batch_stats_nonzero'] = max(float(np.max(np.abs(v))) for k, v in one.items()
                                    if k.startswith('batch_stats'))
for key in ('sample', 'sample_error', 'batch_error', 'log_prob', 'log_prob_sharding',
            'vs_unsharded'):
  result[key] = out[key]
result['state_sharding'] = out['four']['state_sharding']
print('RESULT ' + json.dumps(result))
'''


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  environ = dict(os.environ)
  environ.pop('XLA_FLAGS', None)
  environ['DENSEFLOW_JAX_CACHE'] = str(tmp_path_factory.getbasetemp() / 'xla_cache')
  environ['PYTHONPATH'] = REPO_ROOT + os.pathsep + environ.get('PYTHONPATH', '')
  return environ


@pytest.fixture(scope='module')
def config_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('parallel_configs')
  (path / 'micro.py').write_text(MICRO_CONFIG.format(num_steps=6, checkpoint_every=0))
  return str(path)


@pytest.fixture(scope='module')
def device_runs(env, config_dir, tmp_path_factory):
  """Runs FOUR_DEVICE_SCRIPT once: (results, path of the 1-device variables after 6 steps)."""
  reference = str(tmp_path_factory.mktemp('parallel_reference') / 'one_device_step6.npz')
  environ = dict(env, XLA_FLAGS='--xla_force_host_platform_device_count=4',
                 PYTHONPATH=config_dir + os.pathsep + env['PYTHONPATH'])  # for `import micro`
  result = subprocess.run([sys.executable, '-c', FOUR_DEVICE_SCRIPT, config_dir, reference],
                          env=environ, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  lines = [l for l in result.stdout.splitlines() if l.startswith('RESULT ')]
  return json.loads(lines[-1][len('RESULT '):]), reference


# Leaves driven by rounding noise: the biases that feed a BatchNorm (the dense block's gate
# conv and the attention's output projection) and the running means that track them.
# BatchNorm cancels a per-channel shift, so their gradient is zero up to rounding noise, which
# Adamax (update ~ lr * g / max|g|) turns into steps of up to lr whose sign depends on the
# reduction order: they drift apart by <= lr per step while the losses stay equal.
NOISE_DRIVEN = ('gate/conv/bias', 'out_transform/bias', 'bn/mean')


def test_four_devices_match_one_device(device_runs):
  r, _ = device_runs
  assert r['init'] < 1e-5         # ActNorm data-dependent init over the global batch
  assert r['step2'] < 1e-5        # params and BatchNorm statistics after two steps
  assert r['step2_changed'] > 5e-5 and r['batch_stats_nonzero'] > 0
  assert r['loss'] < 1e-5         # every one of the 20 steps
  assert r['grad_norm'] < 1e-4    # relative: gradients are global-batch means, not sums
  # After 20 steps every parameter and statistic is within 1e-5 except NOISE_DRIVEN ones.
  lr, steps = 1e-3, 20
  for name, (diff, scale) in r['step20'].items():
    if name.endswith(NOISE_DRIVEN):
      assert diff <= 2 * lr * steps, name
    else:
      assert diff < 1e-5 * max(1.0, scale), (name, diff)
  assert r['log_prob'] == [[16], True]
  assert r['state_sharding'] == 'P()'
  assert r['log_prob_sharding'] == "P('data',)"
  vs = r['vs_unsharded']
  assert vs['bpd'] < 1e-5 and vs['latents'] < 1e-5, vs
  assert vs['decode_exact'] and vs['shardings'] == ["P('data',)"], vs
  assert r['sample'] == [[8, 8, 8, 1], 'uint8', "P('data',)", r['sample'][3]]
  assert r['sample'][3] <= 31
  assert r['sample_error'] == ('number of samples 6 is not divisible by the device count 4 '
                               '(every device needs the same number of examples)')
  assert 'train.batch_size=6 is not divisible by the device count 4' in r['batch_error']


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_match_single_process(env, config_dir, device_runs, tmp_path):
  """Two processes x 1 CPU device with gloo collectives == one device on the same batches."""
  config_file = os.path.join(config_dir, 'micro.py')
  workdir = str(tmp_path / 'multi')
  address = f'127.0.0.1:{_free_port()}'
  processes = []
  for pid in range(2):
    log = open(tmp_path / f'process{pid}.txt', 'w')
    processes.append((subprocess.Popen(
        [sys.executable, TRAIN, f'--config={config_file}', f'--workdir={workdir}',
         f'--coordinator_address={address}', '--num_processes=2', f'--process_id={pid}'],
        env=env, stdout=log, stderr=subprocess.STDOUT), log))
  try:
    codes = [p.wait(timeout=600) for p, _ in processes]
  finally:
    for p, log in processes:
      if p.poll() is None:
        p.kill()
      log.close()
  logs = [(tmp_path / f'process{pid}.txt').read_text() for pid in range(2)]
  assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
  for pid in range(2):
    assert f'jax.distributed: process {pid} of 2, 1 local / 2 global devices' in logs[pid]
  assert '2 devices, 2 processes; global batch 16' in logs[0]
  step, variables = checkpoint.load_variables(workdir)
  assert step == 6
  multi = flax.traverse_util.flatten_dict(jax.tree.map(np.asarray, variables), sep='/')
  with np.load(device_runs[1]) as single:
    assert sorted(single.files) == sorted(multi)
    for name in single.files:
      diff = float(np.max(np.abs(single[name] - multi[name])))
      assert diff < (2e-3 if name.endswith(NOISE_DRIVEN) else 1e-5), (name, diff)
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [r['step'] for r in rows if 'train_bpd' in r] == [6]  # written once, by process 0


def test_check_divisible_and_process_local_sharding():
  mesh = parallel.make_mesh()
  n = jax.device_count()
  assert mesh.devices.size == n
  with pytest.raises(ValueError, match=f'batch size 0 is not divisible by the device count {n} '):
    parallel.check_divisible(0, mesh)
  parallel.check_divisible(2 * n, mesh)
  if n > 1:
    with pytest.raises(ValueError, match=f'batch size {2 * n + 1} is not divisible by the '
                                         f'device count {n} '):
      parallel.check_divisible(2 * n + 1, mesh)
  x = np.arange(2 * n * 3).reshape(2 * n, 3)
  global_x = parallel.shard_batch(x, mesh)
  assert global_x.shape == (2 * n, 3) and global_x.sharding == parallel.batch_sharding(mesh)
  assert len(global_x.addressable_shards) == n
  assert {s.data.shape for s in global_x.addressable_shards} == {(2, 3)}
  np.testing.assert_array_equal(parallel.to_host(global_x), x)
  replicated = parallel.replicate({'a': np.float32(2)}, mesh)['a']
  assert replicated.sharding.is_fully_replicated and len(replicated.addressable_shards) == n
  assert float(replicated) == 2.0
  if n > 1:  # every row count divides over one device
    with pytest.raises(ValueError, match=f'per-process batch {n + 1} is not divisible by the '
                                         f'{n} local devices'):
      parallel.shard_batch(np.zeros((n + 1, 3)), mesh)


def test_typed_keys_are_sharded_replicated_and_fetched():
  mesh = parallel.make_mesh()
  n = jax.device_count()
  key = jax.random.key(3)
  replicated = parallel.replicate({'rng': key}, mesh)['rng']
  assert jax.dtypes.issubdtype(replicated.dtype, jax.dtypes.prng_key)
  assert replicated.sharding == parallel.replicated_sharding(mesh)
  np.testing.assert_array_equal(jax.random.key_data(replicated), jax.random.key_data(key))
  rbg = jax.random.key(3, impl='unsafe_rbg')
  assert jax.random.key_impl(parallel.replicate(rbg, mesh)) == jax.random.key_impl(rbg)
  keys = jax.random.split(key, 2 * n)
  sharded = parallel.shard_batch(keys, mesh)
  assert sharded.shape == (2 * n,) and sharded.sharding == parallel.batch_sharding(mesh)
  back = parallel.to_host({'keys': sharded})['keys']
  assert jax.dtypes.issubdtype(back.dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(back), jax.random.key_data(keys))


@pytest.fixture(scope='module')
def small_flow():
  """The small digits-shape model of test_model (variational dequantization), 8 images."""
  cfg = small_config()
  model = DenseFlow(cfg)
  x = images(cfg, 8)
  variables = init_variables(model, jax.random.key(0, impl='unsafe_rbg'), x)
  return cfg, model, variables, x


def test_sharded_model_matches_the_unsharded_model(small_flow):
  """ShardedModel on every device of this process == `model.apply` on one, same key."""
  cfg, model, variables, x = small_flow
  mesh = parallel.make_mesh()
  sharded = parallel.ShardedModel(model, mesh)
  assert sharded.num_devices == jax.device_count()
  v = sharded.variables(variables)
  key = jax.random.key(7)

  def reference(vv, xb, k):
    rngs = {'noise': k}
    return (model.apply(vv, xb, rngs=rngs, method=model.log_prob),
            model.apply(vv, xb, rngs=rngs, method=model.bits_per_dim),
            model.apply(vv, xb, rngs=rngs, method=model.encode))

  ref_lp, ref_bpd, ref_latents = jax.jit(reference)(variables, x, key)
  data = parallel.batch_sharding(mesh)
  lp = sharded.log_prob(v, x, key)
  bpd = sharded.bits_per_dim(v, x, key)
  latents = sharded.encode(v, x, key)
  decoded = sharded.decode(v, latents)
  for out in jax.tree.leaves((lp, bpd, latents, decoded)):
    assert out.sharding == data
  np.testing.assert_allclose(lp, ref_lp, rtol=1e-6)
  np.testing.assert_allclose(bpd, ref_bpd, rtol=1e-6)
  np.testing.assert_allclose(bpd, -np.asarray(lp) / (8 * 8 * math.log(2)), rtol=1e-6)
  assert len(latents['dropped']) == len(ref_latents['dropped']) == 1
  for got, want in zip(jax.tree.leaves(parallel.to_host(latents)), jax.tree.leaves(ref_latents)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert decoded.dtype == np.uint8
  np.testing.assert_array_equal(parallel.to_host(decoded), x)
  # Latents given as this process's rows (numpy), e.g. from the unsharded model.
  np.testing.assert_array_equal(
      parallel.to_host(sharded.decode(v, jax.tree.map(np.asarray, ref_latents))), x)
  # Another key gives other latents; a raw uint32 key with the same data gives the same draws.
  other = sharded.encode(v, x, jax.random.key(8))
  assert float(np.max(np.abs(parallel.to_host(other['z']) - ref_latents['z']))) > 1e-3
  np.testing.assert_array_equal(sharded.log_prob(v, x, jax.random.key_data(key)), lp)
  np.testing.assert_array_equal(sharded.log_prob(v, x, parallel.replicate(key, mesh)), lp)
