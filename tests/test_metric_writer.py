"""Tests for denseflow_jax.metric_writer: TensorBoard event files written without TensorFlow,
read back with TensorBoard's own readers; the JSONL file; the process-0-only writer.

`read_events` is also what test_evaluation reads the training loop's event files with.
"""
import io
import json
import os
import struct
import sys
import types

import numpy as np
import pytest
from PIL import Image

# TensorBoard's readers use TensorFlow when it is importable (seconds to import); this marker
# makes them use TensorBoard's TF-free stub instead (which also checks every record's CRC).
sys.modules.setdefault('tensorboard.compat.notf', types.ModuleType('tensorboard.compat.notf'))

from tensorboard.backend.event_processing import event_accumulator  # noqa: E402
from tensorboard.backend.event_processing import event_file_loader  # noqa: E402
from tensorboard.compat.tensorflow_stub import pywrap_tensorflow as tb_stub  # noqa: E402
from tensorboard.plugins.hparams import metadata as hparams_metadata  # noqa: E402
from tensorboard.util import tensor_util  # noqa: E402

from denseflow_jax import artifacts, metric_writer  # noqa: E402


def event_files(workdir: str) -> list[str]:
  return sorted(os.path.join(workdir, f) for f in os.listdir(workdir)
                if f.startswith('events.out.tfevents.'))


def read_events(workdir: str) -> list[tuple[str, str, int, np.ndarray]]:
  """(tag, plugin, step, value) of every summary value in `workdir`'s event files (the
  tensor as an array; hparams values, which have no tensor, as None)."""
  out = []
  for path in event_files(workdir):
    for event in event_file_loader.EventFileLoader(path).Load():
      for value in event.summary.value:
        array = tensor_util.make_ndarray(value.tensor) if value.HasField('tensor') else None
        out.append((value.tag, value.metadata.plugin_data.plugin_name, event.step, array))
  return out


def test_crc32c_and_record_framing():
  assert metric_writer.crc32c(b'') == 0
  assert metric_writer.crc32c(b'123456789') == 0xE3069283  # the CRC-32C check value
  data = np.random.default_rng(0).bytes(1000)
  assert metric_writer.masked_crc32c(data) == tb_stub.masked_crc32c(data)
  record = metric_writer.tfrecord(data)
  (length,) = struct.unpack('<Q', record[:8])
  assert length == 1000 and len(record) == 8 + 4 + 1000 + 4
  assert struct.unpack('<I', record[8:12])[0] == tb_stub.masked_crc32c(record[:8])
  assert record[12:-4] == data
  assert struct.unpack('<I', record[-4:])[0] == tb_stub.masked_crc32c(data)


def test_flatten_hparams():
  flat = metric_writer.flatten_hparams(
      {'lr': 1e-3, 'model': {'block_conf': [6, 4], 'name': 'x', 'ok': True, 'empty': []},
       'none': None, 'n': np.int64(3)})
  assert flat == {'lr': 1e-3, 'model.block_conf.0': 6, 'model.block_conf.1': 4,
                  'model.name': 'x', 'model.ok': True, 'model.empty': '[]', 'none': 'None',
                  'n': 3}
  assert type(flat['n']) is int


def test_event_file_read_back_by_tensorboard(tmp_path):
  workdir = str(tmp_path)
  rng = np.random.default_rng(1)
  color = rng.integers(0, 256, (1, 5, 7, 3), np.uint8)  # height 5, width 7
  grey = rng.integers(0, 256, (2, 4, 4, 1), np.uint8)
  writer = metric_writer.create_writer(workdir)
  writer.write_hparams({'train': {'lr': 2e-3, 'batch_size': 32}, 'model': {'block_conf': [2, 2]},
                        'data': {'dataset': 'digits'}})
  writer.write_scalars(1, {'train_bpd': np.float32(4.25), 'learning_rate': 1e-3})
  writer.write_scalars(2, {'train_bpd': 3.5, 'steps': 7})
  writer.write_images(2, {'samples': color, 'grey': grey,
                          'float': np.array([[[0.0], [1.0]], [[0.5], [2.0]]])})
  writer.flush()
  writer.close()
  writer.close()  # idempotent

  (path,) = event_files(workdir)
  assert path.endswith('.v2') and str(os.getpid()) in os.path.basename(path)
  accumulator = event_accumulator.EventAccumulator(workdir, size_guidance={
      event_accumulator.TENSORS: 0})
  accumulator.Reload()
  tags = set(accumulator.Tags()[event_accumulator.TENSORS])
  assert {'train_bpd', 'learning_rate', 'steps', 'samples', 'grey', 'float'} <= tags

  def tensors(tag):
    return [(e.step, tensor_util.make_ndarray(e.tensor_proto)) for e in accumulator.Tensors(tag)]

  bpd = tensors('train_bpd')
  assert [s for s, _ in bpd] == [1, 2]
  assert [v.dtype for _, v in bpd] == [np.float32] * 2
  np.testing.assert_array_equal([float(v) for _, v in bpd], [4.25, 3.5])
  np.testing.assert_allclose(float(tensors('learning_rate')[0][1]), 1e-3, rtol=1e-7)
  assert accumulator.SummaryMetadata('train_bpd').plugin_data.plugin_name == 'scalars'

  def decoded(tag):
    ((step, value),) = tensors(tag)
    assert step == 2 and accumulator.SummaryMetadata(tag).plugin_data.plugin_name == 'images'
    width, height, *pngs = value
    return int(width), int(height), [np.asarray(Image.open(io.BytesIO(p))) for p in pngs]

  assert decoded('samples')[:2] == (7, 5)
  np.testing.assert_array_equal(decoded('samples')[2][0], color[0])  # PNG is lossless
  width, height, greys = decoded('grey')
  assert (width, height, len(greys)) == (4, 4, 2)
  np.testing.assert_array_equal(np.stack(greys)[..., None], grey)
  np.testing.assert_array_equal(decoded('float')[2][0], [[0, 255], [128, 255]])

  hparams = accumulator.PluginTagToContent(hparams_metadata.PLUGIN_NAME)
  content = hparams[hparams_metadata.SESSION_START_INFO_TAG]
  start = hparams_metadata.parse_session_start_info_plugin_data(content)
  assert start.hparams['train.lr'].number_value == 2e-3
  assert start.hparams['model.block_conf.1'].number_value == 2
  assert start.hparams['data.dataset'].string_value == 'digits'

  assert artifacts.read_metrics(workdir) == [
      {'step': 1, 'train_bpd': 4.25, 'learning_rate': 1e-3}, {'step': 2, 'train_bpd': 3.5,
                                                              'steps': 7.0}]
  assert [tag for tag, _, _, _ in read_events(workdir)].count('train_bpd') == 2


def test_writes_are_on_disk_before_close(tmp_path):
  """TensorBoard sees a running job's values: every write reaches the file at once."""
  writer = metric_writer.create_writer(str(tmp_path))
  writer.write_scalars(3, {'test_bpd': 2.5})
  assert [(t, s, float(v)) for t, _, s, v in read_events(str(tmp_path))] == [('test_bpd', 3, 2.5)]
  with open(tmp_path / artifacts.METRICS_FILE) as f:
    assert json.loads(f.read()) == {'step': 3, 'test_bpd': 2.5}
  writer.close()


def test_other_processes_write_nothing(tmp_path):
  writer = metric_writer.create_writer(str(tmp_path), host0=False)
  writer.write_hparams({'a': 1})
  writer.write_scalars(1, {'loss': 1.0})
  writer.write_images(1, {'samples': np.zeros((1, 2, 2, 3), np.uint8)})
  writer.flush()
  writer.close()
  assert os.listdir(tmp_path) == []


def test_bad_values_are_refused_clearly(tmp_path):
  writer = metric_writer.TensorBoardWriter(str(tmp_path))
  with pytest.raises(ValueError, match=r"scalar 'loss': expected one number"):
    writer.write_scalars(1, {'loss': [1.0, 2.0]})
  with pytest.raises(ValueError, match=r"image 'x': shape \(4, 4\), expected"):
    writer.write_images(1, {'x': np.zeros((4, 4), np.uint8)})
  with pytest.raises(ValueError, match=r"image 'x': dtype int32 outside 0..255"):
    writer.write_images(1, {'x': np.full((1, 2, 2, 3), 300, np.int32)})
  writer.close()
  with pytest.raises(ValueError, match='is closed'):
    writer.write_scalars(2, {'loss': 1.0})
