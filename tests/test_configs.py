"""Experiment configs: every file plans and validates, the SPEC section-5 training facts, the
Table-4 ablation rows, and experiments/train.py's handling of overrides and bad configs."""
import importlib
import os
import subprocess
import sys

import pytest

from denseflow_jax import config_file, defaults, train
from denseflow_jax.config_check import plan_model
from denseflow_jax.data import make_data

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = (('default',), ('tiny',), ('quickstart',), ('cifar10',), ('imagenet32',),
           ('imagenet64',), ('celeba',), ('denseflow_45_6',), ('denseflow_74_10',),
           ('ablation_small',)) + tuple(('table4', v) for v in defaults.TABLE4)


def load(name, *args):
  return importlib.import_module(f'configs.{name}').get_config(*args)


def _fields(config, prefix=''):
  out = set()
  for key, value in config.items():
    out |= _fields(value, f'{prefix}{key}.') if hasattr(value, 'items') else {prefix + key}
  return out


@pytest.mark.parametrize('spec', CONFIGS, ids=':'.join)
def test_config_plans_and_validates(spec):
  config = load(*spec)
  plan_model(config.model)
  if spec[0] != 'ablation_small':  # its npz path is relative to the repository root
    train.validate_config(config, num_devices=1)
  extra = _fields(config) - _fields(defaults.get_config())
  # Every field the library reads is declared in the schema; only the ablation adds a section.
  assert all(f.startswith('ablation.') for f in extra), sorted(extra)


def test_locked_config_sets_declared_data_fields():
  config = load('quickstart')
  config.lock()
  config.data.read_threads, config.data.prefetch = 2, 3  # declared: a locked config takes them
  data = make_data(config)
  assert (data.read_threads, data.prefetch) == (2, 3)
  with pytest.raises(AttributeError):
    config.data.no_such_field = 1


def test_the_library_does_not_import_the_top_level_configs():
  code = ('import sys; import denseflow_jax, denseflow_jax.train, denseflow_jax.official, '
          'denseflow_jax.checkpoint, denseflow_jax.config_file, denseflow_jax.data; '
          'print([m for m in sys.modules if m == "configs" or m.startswith("configs.")])')
  env = dict(os.environ, PYTHONPATH=REPO_ROOT)
  out = subprocess.run([sys.executable, '-c', code], cwd=os.path.dirname(REPO_ROOT), env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == '[]'


def test_config_files_do_not_import_jax():
  """Reading a config (e.g. for --help) costs no JAX import."""
  code = ('import sys; from configs import cifar10, table4; cifar10.get_config(); '
          'table4.get_config("glow_aug"); print("jax" in sys.modules)')
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == 'False'


@pytest.mark.parametrize('name,batch,epochs,gamma,k,size,translate', [
    ('cifar10', 64, 580, 0.9975, 1000, 32, 0.04),
    ('imagenet32', 64, 20, 0.95, 200, 32, 0.04),
    ('imagenet64', 32, 10, 0.95, 200, 64, 0.04),
    ('celeba', 32, 50, 0.95, 200, 64, 0.0),
])
def test_spec_training_facts(name, batch, epochs, gamma, k, size, translate):
  config = load(name)
  t = config.train
  assert (t.batch_size, t.num_epochs, t.decay_rate, t.num_steps) == (batch, epochs, gamma, 0)
  assert (t.lr, t.b1, t.b2, t.warmup_steps) == (1e-3, 0.9, 0.999, 5000)
  assert config.eval.iwbo_k == k and config.data.dataset == name
  assert config.model.image_size == size and config.data.hflip
  assert config.data.translate == translate
  assert tuple(config.model.block_conf) == (6, 4, 1)  # DenseFlow-74-10
  assert plan_model(config.model).latent_shape == (size // 8, size // 8, 308)


@pytest.mark.parametrize('name,extra_epochs', [('cifar10', 70), ('imagenet32', 2),
                                               ('imagenet64', 1), ('celeba', 5)])
def test_finetune_variants(name, extra_epochs, tmp_path):
  config = load(name, 'finetune')
  t = config.train
  assert (t.lr, t.warmup_steps, t.decay_rate, t.num_epochs) == (2e-5, 0, 1.0, extra_epochs)
  with pytest.raises(ValueError, match='train.init_from must be set for fine-tuning'):
    train.validate_config(config, num_devices=1)
  config.train.init_from = str(tmp_path)
  with pytest.raises(ValueError, match='has no checkpoints/ directory'):
    train.validate_config(config, num_devices=1)
  os.makedirs(tmp_path / 'checkpoints')
  train.validate_config(config, num_devices=1)
  with pytest.raises(ValueError, match="unknown variant 'fine'"):
    load(name, 'fine')


@pytest.mark.parametrize('name,coupling,augment,noise', [
    ('glow_noaug', 'glow', False, None),
    ('glow_aug', 'glow', True, 'plain'),
    ('glow_aug_precond', 'glow', True, 'preconditioned'),
    ('denseflow_noaug', 'denseflow', False, None),
    ('denseflow_aug', 'denseflow', True, 'plain'),
    ('denseflow_aug_precond', 'denseflow', True, 'preconditioned'),
])
def test_table4_rows(name, coupling, augment, noise):
  config = load('table4', name)
  m = config.model
  assert (tuple(m.block_conf), tuple(m.layers_conf), m.growth_rate) == ((5, 3, 1), (3, 5, 15), 6)
  assert (m.coupling, m.augment) == (coupling, augment)
  if noise:
    assert m.noise == noise
  assert config.train.num_epochs == 300 and config.data.dataset == 'cifar10'
  channels = plan_model(m).latent_shape[-1]
  assert channels == (168 if augment else 48)


def test_table4_needs_a_known_variant():
  for bad in ('', 'glow'):
    with pytest.raises(ValueError, match="of configs/table4.py; expected one of"):
      load('table4', bad)


def test_quickstart_fits_the_digits():
  config = load('quickstart')
  data = make_data(config)
  assert (data.image_size, data.num_channels, data.num_bits) == (8, 1, 5)
  plan = plan_model(config.model)
  assert [b.size for b in plan.blocks] == [4, 2]  # two blocks: 4x4 and 2x2 (4 landmarks)
  assert not config.data.hflip and config.eval.at_start


def _train_cli(*args):
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)
  return subprocess.run([sys.executable, os.path.join(REPO_ROOT, 'experiments', 'train.py'),
                         '--config', os.path.join(REPO_ROOT, 'configs', 'quickstart.py'),
                         *args], env=env, capture_output=True, text=True, timeout=300)


def test_cli_rejects_unknown_field(tmp_path):
  result = _train_cli(f'--workdir={tmp_path}', '--config.train.no_such_field=1')
  assert result.returncode != 0
  assert 'no_such_field' in result.stderr
  assert not os.path.exists(tmp_path / 'config.json')


def test_cli_override_reaches_validation(tmp_path):
  result = _train_cli(f'--workdir={tmp_path}', '--config.train.batch_size=4096')
  assert result.returncode == 2
  assert ('error: config.train.batch_size=4096 is larger than the training set (1500 images '
          "of 'digits')") in result.stderr
  assert not os.path.exists(tmp_path / 'config.json')


def test_cli_refuses_workdir_of_another_model(tmp_path):
  config_file.save_config(load('quickstart'), str(tmp_path))
  result = _train_cli(f'--workdir={tmp_path}', '--config.model.growth_rate=8')
  assert result.returncode == 2
  assert ('holds a run with a different model (model.growth_rate: 4 -> 8); resume with the '
          'saved config or use a new --workdir') in result.stderr


@pytest.mark.parametrize('field,value,fragment', [
    ('train.b1', 1.5, 'train.b1=1.5 must be a finite number in [0, 1)'),
    ('train.b2', 1.0, 'train.b2=1.0 must be a finite number in [0, 1)'),
    ('train.b1', float('nan'), 'train.b1=nan must be a finite number in [0, 1)'),
    ('train.lr', float('inf'), 'train.lr=inf must be a finite number > 0'),
    ('eval.temperature', -1.0, 'eval.temperature=-1.0 must be a finite number > 0'),
    ('eval.temperature', float('inf'), 'eval.temperature=inf must be a finite number > 0'),
    ('train.seed', -1, 'train.seed=-1 must be an integer in 0..4294967295'),
    ('train.batch_size', -4, 'train.batch_size=-4 must be an integer >= 1'),
    ('eval.batch_size', 0, 'eval.batch_size=0 must be an integer >= 1'),
    ('train.warmup_steps', 2.5, 'train.warmup_steps=2.5 must be an integer >= 0'),
    ('model.num_bits', 5.7, 'model.num_bits = 5.7; expected an integer >= 1'),
    ('model.num_bits', 9, 'model.num_bits=9 must be an integer in 1..8 (images are uint8)'),
    ('model.dense_depth', 0, 'model.dense_depth = 0; expected an integer >= 1'),
    ('model.deq_steps', 0, 'model.deq_steps = 0; expected an integer >= 1'),
    ('model.dense_growth', 0, 'model.dense_growth = 0; expected an integer >= 1'),
    ('model.deq_context_channels', 0, 'model.deq_context_channels = 0; expected an integer'),
    ('model.block_conf', (2.5, 1), 'model.block_conf = (2.5, 1); expected integers'),
    ('model.bn_momentum', 1.0, 'model.bn_momentum = 1.0'),
])
def test_validate_config_refuses_wrong_values(field, value, fragment):
  """Values that used to be accepted and trained wrongly (or failed late with a traceback)."""
  config = load('quickstart')
  if field.startswith('model.deq_'):
    config.model.dequantization = 'variational'  # the fields the variational dequantizer reads
  section, name = field.split('.')
  with config.unlocked():
    del config[section][name]  # a ConfigDict keeps the type of a field: replace it
    config[section][name] = value
  with pytest.raises(ValueError) as info:
    train.validate_config(config, num_devices=1)
  assert fragment in str(info.value), str(info.value)
  assert 'not divisible' not in str(info.value)


def test_unused_model_fields_are_not_checked():
  config = load('quickstart')
  config.model.dequantization = 'uniform'
  config.model.deq_steps = 0  # no variational dequantizer: the field is unused
  train.validate_config(config, num_devices=1)
