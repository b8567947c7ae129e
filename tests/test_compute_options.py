"""The compute options of the model config, `model.remat` (a rematerialisation policy) and
`model.conv_backward` (which 3x3 convolution gradient): validation, old saved configs, the
workdir check, and that they change no value. The lowering side of `conv_backward` is in
test_export.py."""
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from denseflow_jax import config_check, config_file, defaults
from denseflow_jax.model import DenseFlow, Unit, remat_module

from conftest import init_key


def micro_config(**model_fields):
  """Every part of DenseFlow (dense block, attention, BatchNorm, cross-unit coupling, variational
  dequantization), two glow-like modules per unit so the scan loops, at 4x4x1."""
  config = defaults.get_config()
  m = config.model
  m.image_size, m.num_channels, m.num_bits = 4, 1, 5
  m.block_conf, m.layers_conf, m.mid_channels = (2,), (2,), (4,)
  m.growth_rate, m.dense_depth, m.dense_growth = 2, 1, 4
  m.deq_steps, m.deq_context_channels, m.pinv_iterations = 1, 4, 1
  m.update(model_fields)
  return config


def _loss_and_grads(model_config, variables, x, key):
  model = DenseFlow(model_config)

  def loss_fn(params):  # the loss of `train.make_train_step`
    bpd, updates = model.apply({'params': params, 'batch_stats': variables.get('batch_stats', {})},
                               x, train=True, rngs={'noise': key}, mutable=['batch_stats'],
                               method='bits_per_dim')
    return jnp.mean(bpd), updates.get('batch_stats', {})

  out = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables['params'])
  return jax.tree.map(np.asarray, out)


def _unit_loss_and_grads(remat, variables, h, r):
  """Loss and gradients (parameters and input) of one `Unit`: the `nn.scan` over two glow-like
  modules that `model.remat` rematerialises, with training-mode BatchNorm."""
  unit = Unit(micro_config(remat=remat).model, num_modules=2, mid_channels=4)

  def loss_fn(params, h):
    (out, log_det), updates = unit.apply(
        {'params': params, 'batch_stats': variables['batch_stats']}, h, train=True,
        mutable=['batch_stats'])
    return jnp.sum(out * r) + jnp.sum(log_det), updates['batch_stats']

  out = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))(variables['params'], h)
  return jax.tree.map(np.asarray, out)


# The distinct policies; the other names are aliases of these (checked below).
DISTINCT_POLICIES = ('full', 'everything_saveable', 'dots_saveable',
                     'dots_with_no_batch_dims_saveable')
ALIASES = {'nothing_saveable': 'full', 'checkpoint_dots': 'dots_saveable',
           'checkpoint_dots_with_no_batch_dims': 'dots_with_no_batch_dims_saveable'}


def test_every_remat_policy_gives_the_none_gradient():
  """Each policy only changes what the backward pass stores: the loss, BatchNorm statistics and
  gradients are those without rematerialisation, bit for bit. About 15-40 s on 2 shared cores
  (one compile per policy)."""
  h = jax.random.normal(jax.random.key(0), (4, 2, 2, 4))
  r = jax.random.normal(jax.random.key(1), (4, 2, 2, 4))
  unit = Unit(micro_config().model, num_modules=2, mid_channels=4)
  variables = jax.jit(lambda h: unit.init(init_key(0), h))(h)
  (loss, stats), grads = _unit_loss_and_grads('none', variables, h, r)
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads))
  assert scale > 0 and jax.tree.leaves(stats)
  for policy in DISTINCT_POLICIES:
    (loss_p, stats_p), grads_p = _unit_loss_and_grads(policy, variables, h, r)
    assert jax.tree.structure(grads_p) == jax.tree.structure(grads), policy
    # Bitwise on XLA:CPU (the recomputed forward is the same program as the stored one).
    np.testing.assert_array_equal(loss_p, loss, err_msg=policy)
    for a, b in zip(jax.tree.leaves((grads_p, stats_p)), jax.tree.leaves((grads, stats))):
      np.testing.assert_array_equal(a, b, err_msg=policy)


def test_remat_policy_reaches_the_scan():
  """The policy is applied inside the model: 'full' recomputes the modules in the backward
  pass (two `nn.scan` loops of the forward body instead of one stored pass), 'none' does not."""
  h = jnp.zeros((2, 2, 2, 4))
  texts = {}
  for remat in ('none', 'full', 'dots_saveable'):
    unit = Unit(micro_config(remat=remat).model, num_modules=2, mid_channels=4)
    variables = jax.eval_shape(lambda h: unit.init(init_key(0), h), h)
    loss = lambda p, h: jnp.sum(unit.apply({**variables, 'params': p}, h)[0])
    # The traced loss holds the rematerialised body with its policy, printed as the policy's
    # repr (a function in jax 0.12, a `DotsSaveable(...)` object for dots_saveable in 0.11).
    texts[remat] = jax.make_jaxpr(loss)(variables['params'], h).pretty_print()
  assert 'checkpoint' not in texts['none'] and 'remat' not in texts['none']
  for remat, policy in (('full', jax.checkpoint_policies.nothing_saveable),
                        ('dots_saveable', jax.checkpoint_policies.dots_saveable)):
    printed = 'policy=' + repr(policy).split(' at 0x')[0]
    assert 'remat' in texts[remat] and printed in texts[remat], (remat, printed)


def test_remat_names_map_to_jax_policies():
  class Body:  # stands in for a flax Module class: 'none' returns it unchanged
    pass
  assert remat_module(Body, 'none') is Body and remat_module(Body, False) is Body
  assert set(DISTINCT_POLICIES) | set(ALIASES) == set(config_check.REMAT_POLICIES) - {'none'}
  for name in config_check.REMAT_POLICIES[2:]:
    assert callable(getattr(jax.checkpoint_policies, name)), name
  for alias, name in ALIASES.items():
    target = 'nothing_saveable' if name == 'full' else name
    assert getattr(jax.checkpoint_policies, alias) is getattr(jax.checkpoint_policies, target)
  assert config_check.remat_policy(True) == 'full'
  assert config_check.remat_policy(False) == 'none'
  with pytest.raises(ValueError, match=r"model.remat = 'sometimes'; expected one of \('none'"):
    config_check.remat_policy('sometimes')


@pytest.mark.parametrize('field, value', [('remat', 'offload'), ('remat', 1),
                                          ('conv_backward', 'cudnn'), ('conv_backward', None)])
def test_plan_model_refuses_unknown_compute_options(field, value):
  m = micro_config().model.to_dict()
  m[field] = value  # a plain dict: any type, as a hand-written config could hold
  with pytest.raises(ValueError, match=rf'^model\.{field} = {value!r}; expected one of'):
    config_check.plan_model(ml_collections.ConfigDict(m))


def test_defaults_are_plain_and_tuned_on_cpu():
  m = defaults.get_model_config()
  assert (m.remat, m.conv_backward) == ('none', 'auto')
  config_check.plan_model(m)


def test_old_saved_configs_load_and_compute_options_do_not_change_the_model(tmp_path):
  config = micro_config()
  saved = json.loads(config.to_json())
  for legacy, name in ((True, 'full'), (False, 'none')):
    old = json.loads(json.dumps(saved))
    old['model']['remat'] = legacy  # as written before remat named a policy
    del old['model']['conv_backward']  # as written before the field existed
    loaded = config_file.config_from_json(json.dumps(old))
    assert loaded.model.remat == name and loaded.model.conv_backward == 'auto'
    config_check.plan_model(loaded.model)
    assert config_file.model_differences(loaded, config) == []
  workdir = str(tmp_path)
  old = json.loads(json.dumps(saved))
  old['model']['remat'] = True
  del old['model']['conv_backward']
  (tmp_path / config_file.CONFIG_FILE).write_text(json.dumps(old))
  current = micro_config(remat='dots_saveable', conv_backward='xla')
  config_file.check_and_save_config(current, workdir)  # compute options only: accepted
  reloaded = config_file.load_config(workdir)
  assert (reloaded.model.remat, reloaded.model.conv_backward) == ('dots_saveable', 'xla')
  with pytest.raises(ValueError, match='different model'):
    config_file.check_and_save_config(micro_config(growth_rate=4), workdir)


def test_conv_backward_changes_no_value_on_cpu():
  """Forward values are bitwise the same in every mode, gradients equal to rounding, and
  'tuned' is bitwise 'auto' on CPU."""
  glow = dict(coupling='glow', glow_hidden=8, augment=False, dequantization='uniform')
  config = micro_config(**glow)
  x = np.random.RandomState(1).randint(0, 32, (4, 4, 4, 1)).astype(np.uint8)
  variables = jax.jit(lambda x: DenseFlow(config.model).init(
      {'params': init_key(0), 'noise': init_key(1)}, x))(x)
  key = jax.random.PRNGKey(5)
  results = {mode: _loss_and_grads(micro_config(conv_backward=mode, **glow).model, variables,
                                  x, key)
             for mode in config_check.CONV_BACKWARD_MODES}
  (loss, _), grads = results['auto']
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads))
  for mode in ('tuned', 'xla'):
    (loss_m, _), grads_m = results[mode]
    np.testing.assert_array_equal(loss_m, loss)
    for a, b in zip(jax.tree.leaves(grads_m), jax.tree.leaves(grads)):
      if mode == 'tuned':
        np.testing.assert_array_equal(a, b)
      else:
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale)
