r"""Trains DenseFlow: `python experiments/train.py --config configs/quickstart.py --workdir DIR`.

Any config field can be overridden: `--config.train.batch_size=32`; a field that does not
exist is an error. Config variants: `--config configs/cifar10.py:finetune`. Rerunning the same
command resumes from the newest valid checkpoint in DIR. Every visible device is used (the
global batch is split over them). Several hosts: start one process per host with
`--coordinator_address=HOST0:PORT --num_processes=N --process_id=I` (or the environment
variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); on Cloud TPU, SLURM or
Open MPI, `--auto_distributed` lets jax.distributed detect them.

Like every entry point, it runs with one BLAS thread (`cli.run`, see
`denseflow_jax.cpu_tuning`). `--cpu_tuning` applies the XLA:CPU performance flags and glibc
malloc settings of `denseflow_jax.cpu_tuning` before JAX starts. Off by default: on the 8x8 quickstart
they ran at 12-15 steps/s against 16.4 without, and XLA:CPU cannot write the persistent
compilation cache with the flags on.

Exit status: 0 done, 2 invalid config, data or workdir (one line `error: ...` on stderr),
3 stopped on non-finite losses, 130 stopped by SIGINT/SIGTERM after saving a checkpoint.
"""
import sys

from absl import flags, logging
from ml_collections import config_flags

from denseflow_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics, samples.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', '',
                                   'host:port of process 0 for a multi-host run.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 0, 'Processes in a multi-host run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', -1, 'This process in a multi-host run.')
_AUTO_DISTRIBUTED = flags.DEFINE_bool('auto_distributed', False, 'Let jax.distributed detect a '
                                      'cluster (Cloud TPU, SLURM, Open MPI) without a coordinator.')
_VERBOSE_CHECKPOINTING = flags.DEFINE_bool('verbose_checkpointing', False,
                                           'Keep orbax INFO logs (hidden by default).')
_CPU_TUNING = flags.DEFINE_bool('cpu_tuning', False, 'On CPU, add the XLA:CPU performance flags '
                                 'and keep freed memory in glibc malloc (denseflow_jax.cpu_tuning'
                                 '). Off by default: it made the 8x8 quickstart slower and stops '
                                 'the compilation cache from storing programs.')
_CACHE = flags.DEFINE_bool('compilation_cache', True, 'Use the persistent XLA compilation '
                            'cache (DENSEFLOW_JAX_CACHE, default ~/.cache/denseflow_jax/xla).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv  # checked by cli.run
  if _CPU_TUNING.value:  # before JAX starts a backend
    from denseflow_jax import cpu_tuning  # pylint: disable=g-import-not-at-top
    cpu_tuning.apply()
  try:
    config, workdir = _CONFIG.value, _WORKDIR.value
    # A config file that failed to load raises on first use.
    config.model  # pylint: disable=pointless-statement
  except OSError as e:
    cli.fail(cli.one_line(e))
  from denseflow_jax import checkpoint, parallel  # pylint: disable=g-import-not-at-top
  if not _VERBOSE_CHECKPOINTING.value:
    checkpoint.quiet_orbax_logs()
  parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                  auto=_AUTO_DISTRIBUTED.value)
  if _CACHE.value:
    from denseflow_jax.model import enable_compilation_cache  # pylint: disable=g-import-not-at-top
    logging.info('persistent compilation cache: %s', enable_compilation_cache())
  from denseflow_jax import train  # pylint: disable=g-import-not-at-top
  cli.check_output_dir('--workdir', workdir)
  try:
    # Checks the config, the data, the workdir and init_from before compiling; its ValueErrors
    # end as one line with status 2 (cli.run).
    train.train_and_evaluate(config, workdir)
  except train.NonFiniteError as e:
    logging.error('%s', e)
    cli.fail(cli.one_line(e), status=3)
  except train.TrainingInterrupted as e:
    logging.warning('%s', e)
    print(str(e), file=sys.stderr)
    sys.exit(130)


if __name__ == '__main__':
  cli.run(main)
