"""Per-component timing of DenseFlow's train step (microbenchmarks, not a profiler trace).

Usage: python experiments/profile_components.py --config=configs/tiny.py [--batch_sizes=8,64]
         [--xla_flags] [--out=/tmp/profile.json]

`jax.profiler` traces miss XLA:CPU's asynchronous dots and oneDNN calls, so this script times
each network of the model on its own, at the shapes and counts it has inside the train step:
forward alone and forward + backward (gradients for the parameters and the float input, as in
the train step; BatchNorm in train mode), each jitted separately, median of `--steps` calls.
The whole step is the library's (`denseflow_jax.train.make_train_step`, as the training loop
builds it). It prints, per batch size, a table with the FLOPs of every part (matmul + conv
FLOPs from the jaxpr, `denseflow_jax.benchmarking.flops`), the achieved GFLOP/s against the
matmul peak measured in the same process, and how much of the whole train step the parts
explain; plus per-op timings of the dense block's layers (1x1 matmuls, the 3x3 conv's forward
and its backward) and the minor page faults per train step.
"""
import json
import os
from typing import Any, Callable, Dict, List

from absl import app, flags
from ml_collections import config_flags

from denseflow_jax import cli
from denseflow_jax.benchmarking import measure

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', os.path.join(REPO_ROOT, 'configs', 'tiny.py'),
                                'Experiment config (model and train sections are used).')
flags.DEFINE_list('batch_sizes', ['8'], 'Batch sizes to profile.')
flags.DEFINE_integer('image_size', 0, 'Overrides config.model.image_size when > 0.')
flags.DEFINE_integer('steps', 7, 'Timed calls per measurement (the median is reported).')
flags.DEFINE_integer('warmup', 2, 'Untimed calls after the first call, before the timed ones.')
flags.DEFINE_integer('peak_n', 4096, 'Matrix size of the matmul peak measurement.')
flags.DEFINE_integer('peak_reps', 7, 'Timed matmuls of the peak measurement.')
flags.DEFINE_bool('xla_flags', False, f'Add {measure.PERF_XLA_FLAGS!r} to XLA_FLAGS.')
flags.DEFINE_bool('parts', True, 'Time the parts; false: only the whole train step and forward.')
flags.DEFINE_integer('seed', 0, 'Seed of the synthetic images, and config.train.seed.')
flags.DEFINE_string('out', '', 'JSON output path ("" = none).')
# The schedule's steps per epoch: only the learning-rate values depend on it, not the cost.
STEPS_PER_EPOCH = 1000


def _config():
  return measure.benchmark_config(FLAGS.config, FLAGS.image_size, FLAGS.seed)


def _median(fn: Callable[[], Any], steps: int, warmup: int) -> float:
  for _ in range(warmup + 1):
    fn()
  return measure.median_time(fn, steps)['median_s']


def _gflop(closed_jaxpr) -> float:
  from denseflow_jax.benchmarking import flops  # pylint: disable=g-import-not-at-top
  return flops.total(flops.count_flops(closed_jaxpr)) / 1e9


class Profiler:
  """Collects rows `{name, count, fwd_s, fwdbwd_s, gflop_fwdbwd, ...}` for one batch size."""

  def __init__(self, peak_gflop_s: float):
    self.peak = peak_gflop_s
    self.rows: List[Dict[str, Any]] = []

  def module(self, name: str, count: int, module, x, *, float_input: bool = True,
             train: bool = None, extra: Dict[str, Any] = None, parent: str = '') -> Dict:
    """Times `module.apply(variables, x, **extra)` forward and forward + backward."""
    import jax
    extra = dict(extra or {})
    if train is not None:
      extra['train'] = train
    rngs = {'params': jax.random.key(0), 'noise': jax.random.key(1)}
    variables = jax.jit(lambda x: module.init(rngs, x, **extra))(x)
    params = variables['params']
    rest = {k: v for k, v in variables.items() if k != 'params'}
    mutable = list(rest) if train else False

    def fwd(params, x):
      out = module.apply({'params': params, **rest}, x, rngs={'noise': jax.random.key(2)},
                         mutable=mutable, **extra)
      return out[0] if mutable else out

    out_shape = jax.eval_shape(fwd, params, x)
    cot = jax.tree_util.tree_map(
        lambda sd: jax.random.normal(jax.random.key(3), sd.shape, sd.dtype), out_shape)

    def fwdbwd(params, x, cot):  # the backward pass for a given output cotangent
      if float_input:
        return jax.vjp(fwd, params, x)[1](cot)
      return jax.vjp(lambda p: fwd(p, x), params)[1](cot)

    fb = jax.jit(fwdbwd)
    fw = jax.jit(fwd)
    gflop_fb = _gflop(jax.make_jaxpr(fwdbwd)(params, x, cot))
    gflop_f = _gflop(jax.make_jaxpr(fwd)(params, x))
    fw_c = fw.lower(params, x).compile()
    fb_c = fb.lower(params, x, cot).compile()
    t_f = _median(lambda: jax.block_until_ready(fw_c(params, x)), FLAGS.steps, FLAGS.warmup)
    t_fb = _median(lambda: jax.block_until_ready(fb_c(params, x, cot)), FLAGS.steps, FLAGS.warmup)
    return self.add(name, count, t_f, t_fb, gflop_f, gflop_fb, parent=parent,
                    shape=tuple(x.shape))

  def add(self, name, count, fwd_s, fwdbwd_s, gflop_f, gflop_fb, parent='', shape=()):
    row = {'name': name, 'count': count, 'parent': parent, 'shape': list(shape),
           'fwd_s': fwd_s, 'fwdbwd_s': fwdbwd_s, 'gflop_fwd': gflop_f,
           'gflop_fwdbwd': gflop_fb,
           'frac_peak_fwd': gflop_f / fwd_s / self.peak if fwd_s else None,
           'frac_peak_fwdbwd': gflop_fb / fwdbwd_s / self.peak if fwdbwd_s else None,
           'total_fwdbwd_s': count * fwdbwd_s}
    self.rows.append(row)
    print(f"  {name:<44} x{count:<2} fwd {1e3 * fwd_s:8.1f} ms  fwd+bwd {1e3 * fwdbwd_s:8.1f} ms "
          f"{gflop_fb:7.2f} GFLOP  {100 * (row['frac_peak_fwdbwd'] or 0):5.1f}% of peak",
          flush=True)
    return row


def dense_layer_ops(prof: Profiler, batch: int, size: int, mid: int, depth: int, growth: int):
  """Each dense layer's matmuls and convs alone, with donated outputs (no fresh buffers)."""
  import jax
  import jax.numpy as jnp
  from denseflow_jax.nets import conv3x3
  rows = []
  key = jax.random.key(0)
  p = batch * size * size
  for i in range(depth):
    c = mid + i * growth
    x2 = jax.random.normal(key, (p, c), jnp.float32)
    w1 = jax.random.normal(key, (c, c), jnp.float32) * 0.05
    x4 = x2.reshape(batch, size, size, c)
    w3 = jax.random.normal(key, (3, 3, c, growth), jnp.float32) * 0.05
    g4 = jax.random.normal(key, (batch, size, size, growth), jnp.float32)

    def timed(fn, args, out_like):
      f = jax.jit(lambda *a: fn(*a[:-1]), donate_argnums=(len(args),))
      buf = [jax.tree_util.tree_map(jnp.zeros_like, out_like)]
      comp = f.lower(*args, buf[0]).compile()

      def call():
        buf[0] = comp(*args, buf[0])
        jax.block_until_ready(buf[0])
      return _median(call, FLAGS.steps, FLAGS.warmup)

    mm = timed(lambda a, b: a @ b, (x2, w1), x2)                 # 1x1 fwd / input grad
    mm_w = timed(lambda a, g: a.T @ g, (x2, x2), w1)             # 1x1 weight grad
    cf = timed(conv3x3, (x4, w3), g4)                            # 3x3 fwd
    # 3x3 bwd: conv3x3's backward rule (the unused primal output is removed by XLA)
    cb = timed(lambda x, w, g: jax.vjp(conv3x3, x, w)[1](g), (x4, w3, g4), (x4, w3))
    f1 = 2.0 * p * c * c / 1e9
    f3 = 2.0 * p * 9 * c * growth / 1e9
    rows.append({'layer': i, 'channels': c, 'mm_fwd_s': mm, 'mm_wgrad_s': mm_w,
                 'conv_fwd_s': cf, 'conv_bwd_s': cb, 'gflop_1x1': f1, 'gflop_3x3': f3,
                 'ops_fwdbwd_s': 2 * mm + mm_w + cf + cb})
    print(f'    layer {i} c={c:<4} 1x1 fwd {1e3 * mm:6.1f} ms ({f1 / mm / prof.peak:4.0%})'
          f' wgrad {1e3 * mm_w:6.1f} ({f1 / mm_w / prof.peak:4.0%}) | 3x3 fwd {1e3 * cf:6.1f}'
          f' ({f3 / cf / prof.peak:4.0%}) bwd {1e3 * cb:6.1f} ({2 * f3 / cb / prof.peak:4.0%})',
          flush=True)
  return rows


def profile_batch(batch: int, peak: float) -> Dict[str, Any]:
  import jax
  import jax.numpy as jnp
  from denseflow_jax import optim, parallel, train
  from denseflow_jax.bijectors.dequantize import VariationalDequantization
  from denseflow_jax.config_check import plan_model
  from denseflow_jax.model import DenseFlow, Unit
  from denseflow_jax.nets import (ConditionalCouplingNet, ContextNet, DenseBlock,
                                  DenseFlowCouplingNet, NoiseNet, NystromAttention)

  config = _config()
  cfg = config.model
  plan = plan_model(cfg)
  prof = Profiler(peak)
  key = jax.random.key(0)
  print(f'batch {batch}', flush=True)

  # The whole train step (the library's, as the training loop builds it) and the forward pass.
  mesh = parallel.make_mesh()
  model = DenseFlow(cfg)
  tx = optim.make_optimizer(config)
  x_int = parallel.shard_batch(measure.synthetic_images(cfg, batch, FLAGS.seed), mesh)
  state = train.make_init_fn(model, tx, config, mesh)(x_int)
  train_step = train.make_train_step(model, tx, optim.learning_rate_schedule(
      config, STEPS_PER_EPOCH), mesh)
  traced = train_step.trace(state, x_int)
  gflop_step = _gflop(traced.jaxpr)
  step_c = traced.lower().compile()
  holder = [state]

  def call():
    holder[0], metrics = step_c(holder[0], x_int)
    jax.block_until_ready((holder[0], metrics))

  for _ in range(FLAGS.warmup + 1):
    call()
  f0 = measure.minor_faults()
  t_step = measure.median_time(call, FLAGS.steps)['median_s']
  faults = (measure.minor_faults() - f0) / max(FLAGS.steps, 1)
  state = holder[0]  # the earlier states were donated
  params, bstats, opt_state = state.params, state.batch_stats, state.opt_state

  def loss_fn(p, bs, x):
    bpd, _ = model.apply({'params': p, 'batch_stats': bs}, x, train=True, rngs={'noise': key},
                         mutable=['batch_stats'], method='bits_per_dim')
    return jnp.mean(bpd)

  fwd_c = jax.jit(loss_fn).lower(params, bstats, x_int).compile()
  gflop_fwd = _gflop(jax.make_jaxpr(loss_fn)(params, bstats, x_int))
  t_fwd = _median(lambda: jax.block_until_ready(fwd_c(params, bstats, x_int)), FLAGS.steps,
                  FLAGS.warmup)
  whole = prof.add('WHOLE train step (fwd+bwd+adamax)', 1, t_fwd, t_step, gflop_fwd,
                   gflop_step, shape=x_int.shape)
  whole['minor_faults_per_step'] = faults
  print(f'  minor page faults per train step: {faults:.0f} ({faults * 4096 / 2**20:.0f} MiB)')

  if not FLAGS.parts:
    return {'batch': batch, 'rows': prof.rows, 'step_s': t_step, 'minor_faults_per_step': faults}

  # The optimizer update alone (the config's optimizer on the parameter vector, as in the
  # train step).
  grads = optim.parameter_vector(jax.tree_util.tree_map(jnp.ones_like, params))
  upd = jax.jit(lambda g, o, p: optim.apply_update(tx, g, o, p)[::-1], donate_argnums=(1, 2))
  upd_c = upd.lower(grads, opt_state, params).compile()
  ost = [opt_state, params]

  def call_upd():
    p2, o2 = upd_c(grads, ost[0], ost[1])
    ost[0], ost[1] = o2, p2
    jax.block_until_ready((o2, p2))
  prof.add('adamax update', 1, 0.0, _median(call_upd, FLAGS.steps, FLAGS.warmup), 0.0, 0.0)

  # Dequantizer and its parts.
  h2, w2 = cfg.image_size // 2, cfg.image_size // 2
  c4 = 4 * cfg.num_channels
  eps = jax.random.normal(key, (batch, h2, w2, c4), jnp.float32)
  deq = VariationalDequantization(num_bits=cfg.num_bits, steps=cfg.deq_steps,
                                  context_channels=cfg.deq_context_channels)
  prof.module('dequantizer (all)', 1, deq, x_int, float_input=False, extra={'eps': eps})
  prof.module('  context net', 1, ContextNet(cfg.num_bits, cfg.deq_context_channels), x_int,
              float_input=False, parent='dequantizer (all)')
  ccn_in = jax.random.normal(key, (batch, h2, w2, c4 - c4 // 2 + cfg.deq_context_channels))
  prof.module('  conditional coupling net', cfg.deq_steps,
              ConditionalCouplingNet(2 * (c4 // 2)), ccn_in, parent='dequantizer (all)')

  # Flow units, their coupling nets (and the dense block and attention inside), noise nets.
  for b, bp in enumerate(plan.blocks):
    s, m, mods = bp.size, cfg.mid_channels[b], cfg.layers_conf[b]
    for j, cu in enumerate(bp.unit_channels):
      h = jax.random.normal(key, (batch, s, s, cu), jnp.float32)
      unit_name = f'block {b} unit {j}: {mods} modules at {s}x{s}x{cu}'
      prof.module(unit_name, 1, Unit(cfg, num_modules=mods, mid_channels=m), h, train=True)
      c1 = cu - cu // 2
      xc = jax.random.normal(key, (batch, s, s, c1), jnp.float32)
      net = DenseFlowCouplingNet(
          2 * (cu // 2), m, dense_depth=cfg.dense_depth, dense_growth=cfg.dense_growth,
          num_landmarks=cfg.num_landmarks, pinv_iterations=cfg.pinv_iterations,
          attention_layout=cfg.attention_layout)
      prof.module(f'  coupling net {s}x{s} {c1}->{2 * (cu // 2)}', mods, net, xc, train=True,
                  parent=unit_name)
      hm = jax.random.normal(key, (batch, s, s, m), jnp.float32)
      prof.module(f'    dense block {s}x{s} m={m}', mods,
                  DenseBlock(m, cfg.dense_depth, cfg.dense_growth), hm, parent='coupling net')
      prof.module(f'    attention {s}x{s} m={m}', mods,
                  NystromAttention(m, num_landmarks=cfg.num_landmarks,
                                   iterations=cfg.pinv_iterations,
                                   layout=cfg.attention_layout), hm, parent='coupling net')
      if j >= 1 and cfg.augment:
        cc = bp.in_channels + sum(bp.unit_channels[:j - 1])
        cond = jax.random.normal(key, (batch, s, s, cc), jnp.float32)
        prof.module(f'  noise net {s}x{s} {cc}->{2 * cfg.growth_rate}', 1,
                    NoiseNet(cfg.growth_rate), cond, parent='cross-unit')

  top = [r for r in prof.rows if not r['name'].startswith(' ') and not r['name'].startswith('W')]
  explained = sum(r['total_fwdbwd_s'] for r in top)
  print(f'  parts explain {explained * 1e3:.0f} of {t_step * 1e3:.0f} ms '
        f'({explained / t_step:.0%}); the rest is transitions, base density, loss, glue '
        'between parts, and the overlap the whole program gets from scheduling', flush=True)

  bp0 = plan.blocks[0]
  print(f'  dense block ops at {bp0.size}x{bp0.size}, m={cfg.mid_channels[0]}:', flush=True)
  ops = dense_layer_ops(prof, batch, bp0.size, cfg.mid_channels[0], cfg.dense_depth,
                        cfg.dense_growth)
  return {'batch': batch, 'rows': prof.rows, 'dense_layer_ops': ops, 'step_s': t_step,
          'explained_s': explained, 'minor_faults_per_step': faults}


def main(argv):
  del argv
  if FLAGS.xla_flags:
    os.environ['XLA_FLAGS'] = measure.with_perf_xla_flags(os.environ.get('XLA_FLAGS', ''))
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_enable_compilation_cache', False)
  peak = measure.matmul_peak(FLAGS.peak_n, FLAGS.peak_reps)
  print(f"matmul peak {peak['gflop_s']:.0f} GFLOP/s, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
        f', load {measure.load_avg():.2f}', flush=True)
  result = {'xla_flags': os.environ.get('XLA_FLAGS', ''), 'matmul_peak': peak,
            'machine': measure.machine_info(), 'device': measure.device_info(),
            'load_before': measure.load_avg(), 'batches': []}
  with measure.ResourceSampler(interval=1.0) as sampler:
    for b in [int(s) for s in FLAGS.batch_sizes]:
      result['batches'].append(profile_batch(b, peak['gflop_s']))
  result['load_after'] = measure.load_avg()
  result['load_during'] = sampler.load_summary()
  result['peak_rss_gib'] = measure.peak_rss_gib()
  print(f"load after {result['load_after']:.2f}")
  if FLAGS.out:
    with open(FLAGS.out, 'w') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)  # --help exits 0; bad flags are one line
