"""The training loop's one metrics path: TensorBoard event files and JSONL, without TensorFlow.

`create_writer(workdir)` on process 0 returns a `MultiWriter` of

- `TensorBoardWriter`: `<workdir>/events.out.tfevents.*`, written here record by record (the
  TFRecord framing with masked CRC-32C, and the `tensorboard` package's protos), in the layout
  TensorFlow 2's summary ops write: scalars as float32 tensors of the `scalars` plugin, images
  as PNG strings of the `images` plugin, hyperparameters as the `hparams` plugin's session
  start. TensorBoard reads these files as it reads TensorFlow's. Importing this module does not
  import TensorFlow (TensorBoard's own `EventFileWriter` would, when it is installed).
- `JsonlWriter`: `<workdir>/metrics.jsonl`, one JSON object `{"step": s, "<name>": value, ...}`
  per `write_scalars` call, appended at once (`artifacts.read_metrics` reads it back).

Every write is handed to the operating system before the call returns (no background thread:
the loop writes a few small records every `log_every` steps). Other processes write nothing:
`create_writer(workdir, host0=False)` is a `MultiWriter` of no writers.
"""
from __future__ import annotations

import io
import json
import os
import socket
import struct
import time
from typing import Any, Mapping, Sequence

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2
from tensorboard.compat.proto import types_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.plugins.scalar import metadata as scalar_metadata

from denseflow_jax import artifacts


class MetricWriter:
  """What the loop calls on a metrics writer; every method does nothing unless overridden."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Scalars `{name: number}` at `step`."""

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    """Images `{name: (N, H, W, C) or (H, W, C) array}` at `step` (C in 1, 3, 4)."""

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """The run's hyperparameters (a nested mapping; flattened to 'a.b.0' names)."""

  def flush(self) -> None:
    """Hands everything written so far to the operating system."""

  def close(self) -> None:
    """Flushes and releases the writer's files; idempotent."""


class MultiWriter(MetricWriter):
  """Forwards every call to each of `writers`, in order."""

  def __init__(self, writers: Sequence[MetricWriter]):
    self.writers = list(writers)

  def write_scalars(self, step, scalars):
    for w in self.writers:
      w.write_scalars(step, scalars)

  def write_images(self, step, images):
    for w in self.writers:
      w.write_images(step, images)

  def write_hparams(self, hparams):
    for w in self.writers:
      w.write_hparams(hparams)

  def flush(self):
    for w in self.writers:
      w.flush()

  def close(self):
    for w in self.writers:
      w.close()


class JsonlWriter(MetricWriter):
  """Scalars as JSON lines in `<workdir>/metrics.jsonl`; other kinds of values are ignored.

  Each `write_scalars` call appends one line and closes the file, so a crash loses at most a
  torn last line (which `artifacts.read_metrics` skips). The hyperparameters are in
  `<workdir>/config.json`.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, artifacts.METRICS_FILE)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    row = {'step': int(step)}
    row.update({k: float(v) for k, v in scalars.items()})
    with open(self.path, 'a') as f:
      f.write(json.dumps(row) + '\n')


# ----------------------------------------------------------------------------- TFRecord framing


def _crc32c_table() -> tuple[int, ...]:
  """The byte table of CRC-32C (Castagnoli; reflected polynomial 0x82F63B78)."""
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C of `data` (crc32c(b'123456789') == 0xE3069283)."""
  crc, table = 0xFFFFFFFF, _CRC32C_TABLE
  for byte in data:
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """The TFRecord checksum: CRC-32C rotated right by 15 bits plus 0xA282EAD8 (mod 2^32)."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
  """One TFRecord: uint64 length, masked CRC of the length, the data, masked CRC of the data
  (all little-endian)."""
  length = struct.pack('<Q', len(data))
  return (length + struct.pack('<I', masked_crc32c(length)) + data +
          struct.pack('<I', masked_crc32c(data)))


# ----------------------------------------------------------------------------- TensorBoard


def flatten_hparams(hparams: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """Nested mappings and lists -> {'a.b.0': value}; bool/int/float/str kept, others str()."""
  flat = {}
  items = hparams.items() if isinstance(hparams, Mapping) else enumerate(hparams)
  for key, value in items:
    name = f'{prefix}{key}'
    if isinstance(value, np.generic):
      value = value.item()
    if isinstance(value, Mapping) or (isinstance(value, (list, tuple)) and value):
      flat.update(flatten_hparams(value, name + '.'))
    elif isinstance(value, (bool, int, float, str)):
      flat[name] = value
    else:
      flat[name] = str(value)
  return flat


def _png(image: np.ndarray) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format='PNG')
  return buffer.getvalue()


def _as_uint8_images(name: str, value: Any) -> np.ndarray:
  """(N, H, W, C) uint8; floats are taken as [0, 1] (clipped) and scaled to 0..255."""
  images = np.asarray(value)
  if images.ndim == 3:
    images = images[None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
    raise ValueError(f'image {name!r}: shape {images.shape}, expected (N, H, W, C) or '
                     '(H, W, C) with C in 1, 3, 4')
  if images.dtype == np.uint8:
    return images
  if np.issubdtype(images.dtype, np.floating):
    return np.floor(np.clip(images, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
  if np.issubdtype(images.dtype, np.integer) and (images.size == 0 or (
      images.min() >= 0 and images.max() <= 255)):
    return images.astype(np.uint8)
  raise ValueError(f'image {name!r}: dtype {images.dtype} outside 0..255; expected uint8 or '
                   'floats in [0, 1]')


def _tensor(dtype: int, shape: Sequence[int], **values) -> tensor_pb2.TensorProto:
  dims = [tensor_shape_pb2.TensorShapeProto.Dim(size=int(d)) for d in shape]
  return tensor_pb2.TensorProto(dtype=dtype, tensor_shape=tensor_shape_pb2.TensorShapeProto(
      dim=dims), **values)


class TensorBoardWriter(MetricWriter):
  """One TensorBoard event file in `logdir`, written without TensorFlow.

  The file is `events.out.tfevents.<time>.<host>.<pid>.<n>.v2` (the name TensorFlow gives it),
  opened at construction with its `brain.Event:2` header.
  """

  _count = 0  # distinguishes two writers of one process opened in the same second

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    TensorBoardWriter._count += 1
    name = (f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.'
            f'{TensorBoardWriter._count}.v2')
    self.path = os.path.join(logdir, name)
    self._file = open(self.path, 'wb')
    self._write_event(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))

  def _write_event(self, event: event_pb2.Event) -> None:
    if self._file is None:
      raise ValueError(f'TensorBoard writer of {self.path} is closed')
    self._file.write(tfrecord(event.SerializeToString()))
    self._file.flush()

  def _write_summary(self, step: int, values: Sequence[summary_pb2.Summary.Value]) -> None:
    self._write_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                      summary=summary_pb2.Summary(value=list(values))))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    values = []
    for tag, value in scalars.items():
      value = np.asarray(value)
      if value.size != 1 or not np.issubdtype(value.dtype, np.number):
        raise ValueError(f'scalar {tag!r}: expected one number, got {value!r}')
      values.append(summary_pb2.Summary.Value(
          tag=tag, metadata=scalar_metadata.create_summary_metadata(display_name=tag,
                                                                    description=''),
          tensor=_tensor(types_pb2.DT_FLOAT, (), float_val=[float(value.reshape(()))])))
    self._write_summary(step, values)

  def write_images(self, step: int, images: Mapping[str, Any]):
    values = []
    for tag, value in images.items():
      batch = _as_uint8_images(tag, value)
      encoded = [str(batch.shape[2]).encode(), str(batch.shape[1]).encode()]  # width, height
      encoded += [_png(image) for image in batch]
      values.append(summary_pb2.Summary.Value(
          tag=tag, metadata=image_metadata.create_summary_metadata(display_name=tag,
                                                                   description=''),
          tensor=_tensor(types_pb2.DT_STRING, (len(encoded),), string_val=encoded)))
    self._write_summary(step, values)

  def write_hparams(self, hparams: Mapping[str, Any]):
    summary = hparams_summary.hparams_pb(flatten_hparams(hparams))
    self._write_event(event_pb2.Event(wall_time=time.time(), step=0, summary=summary))

  def flush(self):
    if self._file is not None:
      self._file.flush()

  def close(self):
    if self._file is not None:
      self._file.close()
      self._file = None


def create_writer(workdir: str, host0: bool = True) -> MultiWriter:
  """TensorBoard event file + JSONL in `workdir` on process 0.

  `host0=False`: a writer of nothing (processes other than 0).
  """
  writers = [TensorBoardWriter(workdir), JsonlWriter(workdir)] if host0 else []
  return MultiWriter(writers)
