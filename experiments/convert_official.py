"""Converts a published (PyTorch) DenseFlow model directory into our workdir layout.

  python experiments/convert_official.py --model MODEL --workdir OUT

`MODEL` is the authors' model directory (`args.pickle`, `check/checkpoint.pt`); torch is not
needed. `OUT` receives (see `denseflow_jax.official.save_converted`):

  OUT/config.json                   experiment config (model from args.pickle, data set, IWBO k)
  OUT/checkpoints/<step>/params/    orbax CheckpointManager items (StandardSave pytrees), the
  OUT/checkpoints/<step>/batch_stats/   layout of a training workdir without its training state
  OUT/official/buffers.npz          published buffers without a flax variable (bit-exact export)
  OUT/official/args.json            the published training command line
  OUT/official/source.json          source file, its sha256, epoch, state_dict size
  OUT/official/state_dict.npz       (--export_npz) our re-export under the published names

Before writing, the converted variables are exported back and compared with the file's
state_dict tensor by tensor (bit for bit); a mismatch aborts the conversion.
"""
import os

from absl import flags, logging
import numpy as np

from denseflow_jax import artifacts, cli, official  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_string('model', None, 'Published model directory (args.pickle, check/checkpoint.pt).')
flags.DEFINE_string('workdir', None, 'Output directory (our workdir layout).')
flags.DEFINE_integer('step', 0, 'Step number under which the checkpoint is written.')
flags.DEFINE_bool('overwrite', False, 'Replace an existing checkpoint at this step.')
flags.DEFINE_bool('allow_unknown_args', False,
                  'Ignore args.pickle fields the published training script does not have.')
flags.DEFINE_bool('export_npz', False,
                  'Also write OUT/official/state_dict.npz (our export, published names).')
flags.mark_flags_as_required(['model', 'workdir'])


def convert(model_dir: str, workdir: str, step: int = 0, overwrite: bool = False,
            allow_unknown_args: bool = False, export_npz: bool = False) -> str:
  """Converts `model_dir` into `workdir`; returns the checkpoint directory written.

  The arguments and the output are checked before anything is read (`cli.UsageError`).
  """
  cli.check_int('--step', step, 0)
  cli.check_input_dir('--model', model_dir, needs=('args.pickle', 'check/checkpoint.pt'))
  cli.check_output_dir('--workdir', workdir)
  ckpt_dir = os.path.join(os.path.abspath(workdir), 'checkpoints', str(step))
  if os.path.exists(ckpt_dir) and not overwrite:
    raise FileExistsError(f'{ckpt_dir} exists; pass --overwrite to replace it')
  for name in ('checkpoints', 'official'):
    if os.path.isfile(os.path.join(workdir, name)):
      raise cli.UsageError(f'--workdir={workdir!r}: {os.path.join(workdir, name)} is a file')
  loaded = official.load_official(model_dir, allow_unknown_args)
  state_dict = loaded.state_dict
  exported = official.export_state_dict(loaded.variables, loaded.config.model, loaded.buffers)
  differing = [k for k in state_dict
               if k not in exported or exported[k].dtype != state_dict[k].dtype
               or exported[k].shape != state_dict[k].shape
               or exported[k].tobytes() != state_dict[k].tobytes()]
  if differing or len(exported) != len(state_dict):
    raise RuntimeError(f'round trip check failed for {len(differing)} tensors: {differing[:10]}')
  if overwrite and os.path.exists(ckpt_dir):
    import shutil
    shutil.rmtree(ckpt_dir)
  n_params = sum(int(np.asarray(e.shape).prod()) for e in
                 official.state_dict_layout(loaded.config.model) if e.collection == 'params')
  source = {'checkpoint': os.path.abspath(loaded.checkpoint_path),
            'sha256': artifacts.file_sha256(loaded.checkpoint_path),
            'current_epoch': loaded.current_epoch, 'state_dict_entries': len(state_dict),
            'trainable_parameters': n_params, 'step': step}
  out = official.save_converted(workdir, loaded.config, loaded.variables, loaded.buffers,
                                args=loaded.args, step=step, source=source)
  if export_npz:
    official.save_state_dict_npz(os.path.join(workdir, 'official', 'state_dict.npz'), exported)
  m = loaded.config.model
  logging.info('Converted %s: dataset %s, block_conf %s, layers_conf %s, mid %s, growth %d, '
               '%d trainable parameters, %d state_dict entries (round trip exact) -> %s',
               model_dir, loaded.config.data.dataset, tuple(m.block_conf), tuple(m.layers_conf),
               tuple(m.mid_channels), m.growth_rate, n_params, len(state_dict), out)
  return out


def main(argv):
  del argv  # checked by cli.run
  convert(FLAGS.model, FLAGS.workdir, FLAGS.step, FLAGS.overwrite, FLAGS.allow_unknown_args,
          FLAGS.export_npz)


if __name__ == '__main__':
  cli.run(main)
