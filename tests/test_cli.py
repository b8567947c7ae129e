"""The entry points' error handling: one line `error: ...` naming the value or path, status 2.

The helpers of `denseflow_jax.cli` are tested directly; the scripts themselves only with
inputs refused before any model is built (each subprocess costs a few seconds of imports).
"""
import os
import pickle
import subprocess
import sys

from absl import app
import pytest

from denseflow_jax import checkpoint, cli, config_file

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFICIAL_MODEL = os.path.join(REPO_ROOT, '..', 'shared', 'official_tiny', 'model')


def script(name):
  return os.path.join(REPO_ROOT, 'experiments', name)


def run_cli(*command):
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)
  env.pop(cli.TRACEBACK_ENV, None)
  env['PYTHONPATH'] = REPO_ROOT + os.pathsep + env.get('PYTHONPATH', '')
  return subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True,
                        timeout=300, cwd=REPO_ROOT)


def assert_one_line_error(result, *fragments):
  """Status 2, no traceback, and one `error: ` line holding every fragment."""
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1, result.stderr[-3000:]
  for fragment in fragments:
    assert fragment in errors[0], (fragment, errors[0])


# ----------------------------------------------------------------------------- helpers


def test_value_checks():
  assert cli.check_int('--n', 3, 1) == 3
  for value in (5.7, 5.0, True, '3', -4, 0):
    with pytest.raises(cli.UsageError, match='--n=.* must be an integer >= 1'):
      cli.check_int('--n', value, 1)
  with pytest.raises(cli.UsageError, match=r'--bits=9 must be an integer >= 1 and <= 8'):
    cli.check_int('--bits', 9, 1, 8)
  assert cli.check_positive_finite('--t', 0.7) == 0.7
  for value in (float('inf'), float('nan'), -1.0, 0.0, True):
    with pytest.raises(cli.UsageError, match='--t=.* must be a finite number > 0'):
      cli.check_positive_finite('--t', value)


def test_path_checks(tmp_path):
  a_file = tmp_path / 'a_file'
  a_file.write_text('x')
  assert cli.check_output_dir('--out', str(tmp_path / 'new' / 'deeper')) == str(
      tmp_path / 'new' / 'deeper')
  assert not (tmp_path / 'new').exists()  # nothing is created
  with pytest.raises(cli.UsageError, match='is a file, not a directory'):
    cli.check_output_dir('--out', str(a_file))
  with pytest.raises(cli.UsageError, match=f'{a_file} is a file, not a directory'):
    cli.check_output_dir('--out', str(a_file / 'sub'))
  assert cli.check_output_file('--output', str(tmp_path / 'r.json')) == str(tmp_path / 'r.json')
  with pytest.raises(cli.UsageError, match=f'the directory {tmp_path / "missing"} does not '):
    cli.check_output_file('--output', str(tmp_path / 'missing' / 'r.json'))
  with pytest.raises(cli.UsageError, match='is a directory'):
    cli.check_output_file('--output', str(tmp_path))
  with pytest.raises(cli.UsageError, match='no such directory'):
    cli.check_input_dir('--model', str(tmp_path / 'missing'))
  with pytest.raises(cli.UsageError, match='is a file'):
    cli.check_input_dir('--model', str(a_file))
  with pytest.raises(cli.UsageError, match=r'lacks args.pickle, check/checkpoint.pt'):
    cli.check_input_dir('--model', str(tmp_path), needs=('args.pickle', 'check/checkpoint.pt'))


def test_one_line_messages():
  assert cli.one_line(ValueError('a\n  b\tc')) == 'a b c'
  assert cli.one_line(KeyError('no such key')) == 'no such key'  # no quotes added
  assert cli.one_line(FileNotFoundError(2, 'No such file or directory', '/x/y')) == (
      "[Errno 2] No such file or directory: '/x/y'")
  assert cli.one_line(RuntimeError('')) == 'RuntimeError'
  assert len(cli.one_line(ValueError('x' * 5000))) < 2100


@pytest.mark.parametrize('error,expected', [
    (ValueError('bad\nvalue'), 'error: bad value'),
    (checkpoint.CheckpointError('no checkpoints in /w'), 'error: no checkpoints in /w'),
    (pickle.UnpicklingError('refusing to load global os.system'),
     'error: refusing to load global os.system'),
    (PermissionError(13, 'Permission denied', '/ro/x'),
     "error: [Errno 13] Permission denied: '/ro/x'"),
    (app.UsageError('unknown'), 'error: unknown'),
])
def test_run_turns_expected_failures_into_one_line(error, expected, monkeypatch, capsys):
  monkeypatch.setattr(sys, 'argv', ['prog'])
  monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)

  def main(argv):
    del argv
    raise error

  with pytest.raises(SystemExit) as info:
    cli.run(main)
  assert info.value.code == 2
  assert capsys.readouterr().err.strip() == expected


def test_run_lets_bugs_raise(monkeypatch):
  monkeypatch.setattr(sys, 'argv', ['prog'])

  def main(argv):
    del argv
    raise ZeroDivisionError('a bug')

  with pytest.raises(ZeroDivisionError):
    cli.run(main)


# ----------------------------------------------------------------------------- the scripts


def test_evaluate_and_sample_refuse_bad_flags_and_outputs_before_loading(tmp_path):
  """No model is built here: every case fails in the flag checks (about a second each)."""
  a_file = tmp_path / 'a_file'
  a_file.write_text('x')
  workdir = tmp_path / 'run'  # the checks do not need a valid workdir, only a directory
  workdir.mkdir()
  evaluate, sample = script('evaluate.py'), script('sample.py')
  cases = [
      ((evaluate, f'--workdir={workdir}', '--k', '-3'), ['--k=-3 must be an integer >= 0']),
      ((evaluate, f'--workdir={workdir}', f'--output={tmp_path}/missing/x.json'),
       [f"--output='{tmp_path}/missing/x.json'", 'does not exist']),
      ((evaluate, f'--workdir={a_file}'), [f"--workdir='{a_file}' is a file"]),
      ((sample, f'--workdir={workdir}', f'--output_dir={a_file}'),
       [f"--output_dir='{a_file}' is a file, not a directory"]),
      ((sample, f'--workdir={workdir}', '--temperature=inf'),
       ['--temperature=inf must be a finite number > 0']),
      ((sample, f'--workdir={workdir}', '--num=0'), ['--num=0 must be an integer >= 1']),
      ((sample, f'--workdir={workdir}', 'extra'), ['unexpected arguments: extra']),
  ]
  for command, fragments in cases:
    assert_one_line_error(run_cli(*command), *fragments)
  assert not os.listdir(workdir)


def test_convert_official_refuses_bad_input_in_one_line(tmp_path):
  convert = script('convert_official.py')
  out = tmp_path / 'out'
  assert_one_line_error(run_cli(convert, f'--model={tmp_path}/nope', f'--workdir={out}'),
                        f"--model='{tmp_path}/nope': no such directory")
  assert_one_line_error(run_cli(convert, f'--model={tmp_path}', f'--workdir={out}',
                                '--step=-1'), '--step=-1 must be an integer >= 0')
  (out / 'checkpoints' / '0').mkdir(parents=True)
  model = tmp_path / 'model'
  (model / 'check').mkdir(parents=True)
  (model / 'check' / 'checkpoint.pt').write_bytes(b'')

  class Evil:
    def __reduce__(self):
      return (os.system, (f'touch {tmp_path}/ran',))

  (model / 'args.pickle').write_bytes(pickle.dumps(Evil()))
  assert_one_line_error(run_cli(convert, f'--model={model}', f'--workdir={out}'),
                        f'{out}/checkpoints/0 exists; pass --overwrite')
  result = run_cli(convert, f'--model={model}', f'--workdir={tmp_path}/out2')
  assert_one_line_error(result, f'{model}/args.pickle: refusing to load global')
  assert not (tmp_path / 'ran').exists()
  assert not (tmp_path / 'out2').exists()


def test_train_refuses_bad_values_workdir_and_init_from_in_one_line(tmp_path):
  train = script('train.py')
  quickstart = os.path.join(REPO_ROOT, 'configs', 'quickstart.py')
  workdir = tmp_path / 'run'
  result = run_cli(train, f'--config={quickstart}', f'--workdir={workdir}',
                   '--config.train.b1=1.5', '--config.train.batch_size=-4',
                   '--config.eval.temperature=-1', '--config.train.seed=-1')
  assert_one_line_error(result, 'train.b1=1.5 must be a finite number in [0, 1)',
                        'train.batch_size=-4 must be an integer >= 1',
                        'eval.temperature=-1.0 must be a finite number > 0',
                        'train.seed=-1 must be an integer in 0..4294967295')
  assert 'not divisible' not in result.stderr
  a_file = tmp_path / 'a_file'
  a_file.write_text('x')
  assert_one_line_error(run_cli(train, f'--config={quickstart}', f'--workdir={a_file}'),
                        f"--workdir='{a_file}' is a file, not a directory")
  # init_from: another model, then the same model with no checkpoint.
  from configs import quickstart as quickstart_config  # pylint: disable=g-import-not-at-top
  source = tmp_path / 'source'
  config = quickstart_config.get_config()
  config.model.growth_rate = 8
  config_file.save_config(config, str(source))
  (source / 'checkpoints' / '5').mkdir(parents=True)
  assert_one_line_error(run_cli(train, f'--config={quickstart}', f'--workdir={workdir}',
                                f'--config.train.init_from={source}'),
                        f"train.init_from='{source}' holds another model",
                        'model.growth_rate: 8 -> 4')
  config_file.save_config(quickstart_config.get_config(), str(source))
  os.rmdir(source / 'checkpoints' / '5')
  assert_one_line_error(run_cli(train, f'--config={quickstart}', f'--workdir={workdir}',
                                f'--config.train.init_from={source}'),
                        f'{source}/checkpoints holds no checkpoint')
  assert not workdir.exists()


@pytest.mark.parametrize('name', ['train.py', 'evaluate.py', 'sample.py', 'fid.py',
                                  'neighbours.py', 'convert_official.py'])
def test_help_exits_0(name):
  result = run_cli(script(name), '--help')
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'flags:' in result.stdout + result.stderr


def test_config_file_errors_are_one_line(tmp_path):
  result = run_cli(script('train.py'), '--config', 'configs/no_such.py', f'--workdir={tmp_path}')
  assert_one_line_error(result, "no such config file 'configs/no_such.py'")
  result = run_cli(script('train.py'), '--config=configs/cifar10.py:fine', f'--workdir={tmp_path}')
  assert_one_line_error(result, "unknown variant 'fine' of configs/cifar10.py")


def test_quiet_startup_silences_library_noise():
  code = ('from denseflow_jax import cli; cli.quiet_startup(); import logging; '
          'logging.basicConfig(level=logging.INFO); import tensorflow, jax; jax.devices()')
  env = dict(os.environ)
  for name in ('TF_CPP_MIN_LOG_LEVEL', 'TF_ENABLE_ONEDNN_OPTS', 'JAX_PLATFORMS'):
    env.pop(name, None)
  result = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  for noise in ('oneDNN', 'Unable to initialize backend', 'cpu_feature_guard'):
    assert noise not in result.stderr, result.stderr[-2000:]


# ----------------------------------------------------------------------------- saved-config overrides


def test_config_overrides_are_parsed_like_the_saved_values():
  from denseflow_jax import defaults
  config = defaults.get_config()
  out = cli.apply_config_overrides(config, [
      ('eval.batch_size', '12'), ('eval.at_start', 'true'), ('train.lr', '3e-4'),
      ('model.remat', 'yes' if isinstance(config.model.remat, bool) else 'full'),
      ('data.dataset', 'digits'), ('model.block_conf', '(1, 2)')])
  assert out.eval.batch_size == 12 and isinstance(out.eval.batch_size, int)
  assert out.eval.at_start is True and out.train.lr == 3e-4
  assert out.data.dataset == 'digits' and out.model.block_conf == (1, 2)
  assert config.eval.batch_size != 12 or config.data.dataset != 'digits'  # a copy: unchanged
  for bad, fragment in [(('eval.batch_size', 'x'), 'expected an integer'),
                        (('eval.at_start', 'maybe'), 'expected true or false'),
                        (('model.block_conf', '3'), 'expected a tuple'),
                        (('eval.no_such_field', '1'), "no field 'eval.no_such_field'"),
                        (('nosection.x', '1'), "no field 'nosection.x'"),
                        (('eval', '1'), "no field 'eval'")]:
    with pytest.raises(cli.UsageError, match=fragment):
      cli.apply_config_overrides(config, [bad])


def test_tools_take_overrides_of_the_saved_config_but_not_of_its_model(tmp_path, monkeypatch):
  from denseflow_jax import defaults
  workdir = str(tmp_path / 'run')
  config_file.save_config(defaults.get_config(), workdir)
  monkeypatch.setattr(cli, '_SAVED_CONFIG_OVERRIDES', [])
  assert cli._split_config_overrides(
      ['prog', '--workdir=w', '--config.eval.batch_size=5', '--config.eval.iwbo_k', '7']) == [
          'prog', '--workdir=w']
  assert cli._SAVED_CONFIG_OVERRIDES == [('eval.batch_size', '5'), ('eval.iwbo_k', '7')]
  config = cli.workdir_config(workdir)
  assert config.eval.batch_size == 5 and config.eval.iwbo_k == 7
  monkeypatch.setattr(cli, '_SAVED_CONFIG_OVERRIDES', [('model.growth_rate', '99')])
  with pytest.raises(cli.UsageError, match='would change the model.*model.growth_rate'):
    cli.workdir_config(workdir)


def test_evaluate_refuses_a_model_override_in_one_line(tmp_path):
  from denseflow_jax import defaults
  workdir = tmp_path / 'run'
  config_file.save_config(defaults.get_config(), str(workdir))
  result = run_cli(script('evaluate.py'), f'--workdir={workdir}', '--config.model.growth_rate=3')
  assert_one_line_error(result, 'would change the model', 'model.growth_rate')
  result = run_cli(script('evaluate.py'), f'--workdir={workdir}', '--config.eval.nope=3')
  assert_one_line_error(result, "no field 'eval.nope'")
