"""Image data for DenseFlow: sources, deterministic training batches, padded eval batches.

Every source is a random-access sequence of uint8 images of shape (H, W, C), channels last,
with values in [0, 2^num_bits - 1]. Datasets (`config.data.dataset`):

- `cifar10`: TFDS `cifar10`, splits train / test. 32x32x3, 8 bits.
- `imagenet32`, `imagenet64`: TFDS `imagenet_resized/32x32` and `imagenet_resized/64x64`,
  splits train / validation (used as the test split). This is the box-resized "downsampled
  ImageNet" of Chrabaszcz et al. 2017 (image-net.org's Imagenet32/Imagenet64 files) that the
  DenseFlow authors trained on, not van den Oord et al.'s 2016 variant (TFDS
  `downsampled_imagenet`), which is different data.
- `celeba`: TFDS `celeb_a`, official train / validation / test partition (test = 'test').
  Each 218x178 aligned image is cropped to the 148x148 box with top-left corner (row 40,
  column 15) and resized to 64x64 with PIL's bilinear filter (as the public DenseFlow code).
  The paper augments CelebA by horizontal flips only: `configs/celeba.py` sets translate 0.
- `npz`: local files; array `images` uint8 (N, H, W, C) or (N, H, W) (grey, C = 1 added),
  optional scalar array `num_bits` (default: `config.model.num_bits`). `train_npz`, and
  either `test_npz` or `holdout` (the last `holdout` images of the train file are the test
  split). Relative paths resolve against the current directory.
- `digits`: the offline default, scikit-learn's bundled 8x8 digits (1797 images, grey levels
  0..16; no network). Levels are mapped to 5 bits by x = floor(v * 31 / 16 + 0.5), which
  keeps the order and spreads the 17 levels over 0..31; shape (8, 8, 1). Fixed split: the
  first 1500 images are train, the last 297 are test.

TFDS datasets are read with `tfds.data_source` (array_record files, random access, no
tf.data, no TensorFlow). They must be prepared beforehand (`download_and_prepare`, which needs
TensorFlow: the `prepare` extra); without prepared data we fail at once with the command that
prepares them (a default `tfds.data_source` call would try to download).

Training batches come from a `grain.MapDataset` (`train_dataset`), read by index: no
tf.data and no TensorFlow at train time, and any step can be rebuilt directly, which makes
resuming cheap and exact. Element `s` is this host's slice of global batch `s`. The
permutation of epoch `e` depends only on (seed, e) (grain's index shuffle); each epoch drops
its remainder, so `steps_per_epoch = num_train // global_batch`. The augmentation of global
row `r` of step `s` uses `np.random.default_rng((tag, seed, s, r))` (explicit, rather than
grain's internal `random_map` seeding), so `train_batches(start_step=k)` yields exactly what
an uninterrupted run sees from step k on, and the hosts' slices of a step concatenate to the
single-host batch.
"""
from __future__ import annotations

import dataclasses
import math
import os
import zipfile
import zlib
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import grain
import numpy as np

# dataset name -> (TFDS name, train split, test split).
TFDS_DATASETS = {
    'cifar10': ('cifar10', 'train', 'test'),
    'imagenet32': ('imagenet_resized/32x32', 'train', 'validation'),
    'imagenet64': ('imagenet_resized/64x64', 'train', 'validation'),
    'celeba': ('celeb_a', 'train', 'test'),
}
KNOWN_DATASETS = tuple(TFDS_DATASETS) + ('npz', 'digits')

CELEBA_BOX = (40, 15, 148)  # (top row, left column, side) of the crop
CELEBA_SIZE = 64
DIGITS_NUM_TRAIN = 1500
DIGITS_NUM_BITS = 5
_AUGMENT_TAG = 0x417567    # separates the augmentation streams from other uses of the seed
_SHUFFLE_TAG = 0x5368756


class ImageSource:
  """Random-access uint8 images (H, W, C) of one split; `len()` and `source[i]`."""

  def __init__(self, name: str, split: str, read: Callable[[int], np.ndarray], length: int,
               shape: tuple[int, int, int], num_bits: int,
               array: np.ndarray | None = None):
    self.name, self.split, self.num_bits = name, split, int(num_bits)
    self.shape = tuple(int(d) for d in shape)
    self._read, self._length, self._array = read, int(length), array

  @classmethod
  def from_array(cls, name: str, split: str, images: np.ndarray, num_bits: int) -> ImageSource:
    """Wraps a uint8 array (N, H, W, C)."""
    return cls(name, split, images.__getitem__, len(images), images.shape[1:], num_bits,
               array=images)

  @property
  def image_size(self) -> int:
    """Height (= width) of the images."""
    return self.shape[0]

  @property
  def num_channels(self) -> int:
    """C of (H, W, C)."""
    return self.shape[2]

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> np.ndarray:
    """Image `index` as uint8 (H, W, C)."""
    index = int(index)
    if not 0 <= index < self._length:
      raise IndexError(f'index {index} out of range for {self!r}')
    return self._read(index)

  def read_batch(self, indices: Sequence[int]) -> np.ndarray:
    """Images at `indices` stacked as uint8 (len(indices), H, W, C)."""
    if self._array is not None:
      return self._array[np.asarray(indices, dtype=np.int64)]
    return np.stack([self[i] for i in indices]) if len(indices) else np.zeros(
        (0,) + self.shape, np.uint8)

  def take(self, n: int) -> ImageSource:
    """The first `n` images (all when n <= 0 or n >= len)."""
    if n <= 0 or n >= self._length:
      return self
    array = None if self._array is None else self._array[:n]
    return ImageSource(self.name, self.split, self._read, n, self.shape, self.num_bits, array)

  def __repr__(self) -> str:
    return (f'ImageSource({self.name!r}, split={self.split!r}, n={self._length}, '
            f'shape={self.shape}, num_bits={self.num_bits})')


# ----------------------------------------------------------------------------- sources


def celeba_crop(image: np.ndarray) -> np.ndarray:
  """Paper crop of a CelebA image: uint8 (218, 178, 3) -> uint8 (64, 64, 3)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  top, left, side = CELEBA_BOX
  box = np.asarray(image)[top:top + side, left:left + side]
  if box.shape[:2] != (side, side):
    raise ValueError(f'CelebA image of shape {np.shape(image)} is too small for the '
                     f'{side}x{side} crop at (row {top}, col {left})')
  return np.asarray(Image.fromarray(box).resize((CELEBA_SIZE, CELEBA_SIZE), Image.BILINEAR))


# Preparing (download_and_prepare: image encoding, tf.train.Example) needs TensorFlow, which is
# not part of the base install; reading prepared array_record data needs none.
PREPARE_EXTRA = "pip install 'denseflow-jax[prepare]', or in a checkout: pip install -e '.[prepare]'"


def _prepare_command(tfds_name: str, data_dir: str) -> str:
  where = f', data_dir={data_dir!r}' if data_dir else ''
  return ('python -c "import tensorflow_datasets as tfds; '
          f"tfds.builder('{tfds_name}'{where}).download_and_prepare(file_format='array_record')\"")


def tfds_source(dataset: str, split: str, data_dir: str = '') -> ImageSource:
  """A prepared TFDS split as an ImageSource (uint8 (H, W, C)); fails fast if not prepared.

  `dataset` is one of our names (cifar10, imagenet32, imagenet64, celeba) or a TFDS name.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  by_tfds_name = {v[0]: k for k, v in TFDS_DATASETS.items()}
  if dataset not in TFDS_DATASETS and dataset not in by_tfds_name:
    raise ValueError(f'unknown TFDS dataset {dataset!r}; expected one of '
                     f'{sorted(TFDS_DATASETS)} or {sorted(by_tfds_name)}')
  name = by_tfds_name.get(dataset, dataset)
  tfds_name = TFDS_DATASETS[name][0]
  data_dir = os.path.expanduser(data_dir) if data_dir else None
  how = ('Prepare it on a machine with internet access (array_record format is required '
         f'for random access) with: {_prepare_command(tfds_name, data_dir or "")} '
         'and point config.data.data_dir at that directory. Preparing needs TensorFlow '
         f'({PREPARE_EXTRA}); reading prepared data does not.')
  # Building the builder only reads local metadata: it cannot download or hang.
  builder = tfds.builder(tfds_name, data_dir=data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(f"TFDS dataset '{tfds_name}' is not prepared in "
                            f'{builder.data_path} (data_dir={data_dir!r}). {how}')
  formats = builder.info.available_file_formats()
  if not formats & tfds.core.FileFormat.with_random_access():
    raise RuntimeError(f"TFDS dataset '{tfds_name}' in {builder.data_path} is stored as "
                       f"{sorted(f.value for f in formats)}, but random access needs "
                       f"array_record. {how}")
  if split not in builder.info.splits:
    raise ValueError(f"TFDS dataset '{tfds_name}' has no split {split!r}; available: "
                     f'{sorted(builder.info.splits)}')
  examples = tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=False)
  if name == 'celeba':
    read = lambda i: celeba_crop(examples[i]['image'])
    shape = (CELEBA_SIZE, CELEBA_SIZE, 3)
  else:
    read = lambda i: np.asarray(examples[i]['image'], np.uint8)
    shape = tuple(builder.info.features['image'].shape)
  return ImageSource(name, split, read, len(examples), shape, num_bits=8)


def _as_image_array(images: Any, origin: str) -> np.ndarray:
  """Validates uint8 (N, H, W[, C]) and returns uint8 (N, H, W, C)."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f"{origin}: 'images' has dtype {images.dtype}, expected uint8")
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4:
    raise ValueError(f"{origin}: 'images' has shape {images.shape} (rank {images.ndim}), "
                     'expected (N, H, W, C) or (N, H, W)')
  if images.shape[1] != images.shape[2]:
    raise ValueError(f"{origin}: images are {images.shape[1]}x{images.shape[2]}, expected "
                     'square images (H == W)')
  return images


def _check_range(images: np.ndarray, num_bits: int, origin: str) -> None:
  top = 2**num_bits - 1
  if images.size and int(images.max()) > top:
    raise ValueError(f'{origin}: value {int(images.max())} is outside [0, {top}] '
                     f'(num_bits={num_bits})')


_ZIP_MAGIC = (b'PK\x03\x04', b'PK\x05\x06')  # a zip with members / an empty zip
_NPY_MAGIC = b'\x93NUMPY'


def _npz_num_bits(value: np.ndarray, origin: str) -> int:
  """The stored `num_bits`: an integer scalar in 1..8 (a float or an array is refused)."""
  if value.shape != () or not np.issubdtype(value.dtype, np.integer):
    got = (f'{value.dtype} {value.item()!r}' if value.shape == () else
           f'{value.dtype} array of shape {value.shape}')
    raise ValueError(f"{origin}: 'num_bits' must be an integer scalar, got {got}")
  bits = int(value)
  if not 1 <= bits <= 8:
    raise ValueError(f"{origin}: 'num_bits' = {bits} must be in 1..8 (images are uint8)")
  return bits


def load_npz(path: str, num_bits: int = 8) -> tuple[np.ndarray, int]:
  """Reads `images` uint8 -> (N, H, W, C) and num_bits (the file's `num_bits` if present).

  Every problem with the file (missing, not an npz archive, truncated, no `images`, wrong
  dtype or shape, bad `num_bits`) is a ValueError or FileNotFoundError naming it.
  """
  full = os.path.abspath(os.path.expanduser(path))
  if not path or not os.path.isfile(full):
    raise FileNotFoundError(f'npz file {path!r} not found (resolved to {full}; relative '
                            f'paths resolve against the current directory {os.getcwd()})')
  origin = f'npz file {path!r}'
  with open(full, 'rb') as f:
    head = f.read(6)
  if head == _NPY_MAGIC:
    raise ValueError(f'{origin} is a .npy file (one array), not an .npz archive; write it with '
                     "np.savez(path, images=images)")
  if head[:4] not in _ZIP_MAGIC:
    raise ValueError(f'{origin} is not an .npz archive (no zip header: {head!r}); write it '
                     'with np.savez(path, images=images)')
  try:
    with np.load(full, allow_pickle=False) as npz:
      if 'images' not in npz.files:
        raise ValueError(f"{origin} has no array 'images' (arrays: {sorted(npz.files)})")
      images = _as_image_array(npz['images'], origin)
      if 'num_bits' in npz.files:
        num_bits = _npz_num_bits(npz['num_bits'], origin)
  except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    raise ValueError(f'{origin} cannot be read (truncated or corrupt?): {type(e).__name__}: '
                     f'{e}') from None
  except ValueError as e:
    if str(e).startswith(origin):
      raise
    raise ValueError(f'{origin} cannot be read (truncated or corrupt?): {e}') from None
  _check_range(images, num_bits, origin)
  return images, num_bits


def digits_images() -> np.ndarray:
  """All 1797 scikit-learn digits as uint8 (1797, 8, 8, 1) with 5-bit values in 0..31."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  levels = load_digits().images  # float (1797, 8, 8), integers 0..16
  return np.floor(levels * 31.0 / 16.0 + 0.5).astype(np.uint8)[..., None]


def digits_source(split: str) -> ImageSource:
  """The offline default: 'train' = first 1500 digits, 'test' = last 297; uint8 (8, 8, 1)."""
  images = digits_images()
  if split == 'train':
    images = images[:DIGITS_NUM_TRAIN]
  elif split == 'test':
    images = images[DIGITS_NUM_TRAIN:]
  else:
    raise ValueError(f"digits has splits 'train' and 'test', got {split!r}")
  return ImageSource.from_array('digits', split, np.ascontiguousarray(images), DIGITS_NUM_BITS)


def load_sources(data_config: Any, num_bits: int = 8) -> tuple[ImageSource, ImageSource | None]:
  """(train, test) sources for `config.data`; test is None for npz with no test split.

  `num_bits` is the default bit depth of npz files that do not store one.
  """
  dataset = data_config.dataset
  if dataset in TFDS_DATASETS:
    _, train_split, test_split = TFDS_DATASETS[dataset]
    data_dir = data_config.data_dir
    return (tfds_source(dataset, train_split, data_dir),
            tfds_source(dataset, test_split, data_dir))
  if dataset == 'digits':
    return digits_source('train'), digits_source('test')
  if dataset == 'npz':
    if not data_config.train_npz:
      raise ValueError("dataset 'npz' needs config.data.train_npz (got '')")
    images, bits = load_npz(data_config.train_npz, num_bits)
    holdout = int(data_config.holdout)
    test_npz = data_config.test_npz
    test = None
    if test_npz and holdout:
      raise ValueError(f'set either test_npz ({test_npz!r}) or holdout ({holdout}), not both')
    if holdout:
      if not 0 < holdout < len(images):
        raise ValueError(f'holdout={holdout} must be in [1, {len(images) - 1}] for '
                         f'{len(images)} images in {data_config.train_npz!r}')
      test = ImageSource.from_array('npz', 'holdout', images[-holdout:], bits)
      images = images[:-holdout]
    elif test_npz:
      test_images, test_bits = load_npz(test_npz, num_bits)
      if test_images.shape[1:] != images.shape[1:] or test_bits != bits:
        raise ValueError(f'test_npz {test_npz!r} has images {test_images.shape[1:]} with '
                         f'{test_bits} bits, expected {images.shape[1:]} with {bits} bits '
                         'as in train_npz')
      test = ImageSource.from_array('npz', 'test', test_images, test_bits)
    return ImageSource.from_array('npz', 'train', images, bits), test
  raise ValueError(f'unknown dataset {dataset!r}; expected one of {list(KNOWN_DATASETS)}')


def source_from_spec(spec: str, data_dir: str = '') -> ImageSource:
  """An ImageSource named by a data spec, the syntax every tool's `--data` flag takes.

  - `npz:PATH`: the `images` of a local `.npz` (with its `num_bits`, default 8);
  - `digits:train` / `digits:test`: the embedded offline digits;
  - `tfds:NAME:SPLIT` or `NAME:SPLIT` for our TFDS names (cifar10, imagenet32, imagenet64,
    celeba); the split defaults to the test split (`cifar10` = `cifar10:test`).
  """
  if not isinstance(spec, str) or not spec:
    raise ValueError(f'empty data spec; expected npz:PATH, digits:SPLIT or NAME:SPLIT with '
                     f'NAME in {sorted(TFDS_DATASETS)}')
  kind, _, rest = spec.partition(':')
  if kind == 'npz':
    images, bits = load_npz(rest)
    return ImageSource.from_array('npz', os.path.basename(rest), images, bits)
  if kind == 'digits':
    return digits_source(rest or 'test')
  if kind == 'tfds':
    kind, _, rest = rest.partition(':')
  if kind in TFDS_DATASETS:
    return tfds_source(kind, rest or TFDS_DATASETS[kind][2], data_dir)
  raise ValueError(f'data spec {spec!r}: expected npz:PATH, digits:SPLIT, or [tfds:]NAME[:SPLIT] '
                   f'with NAME in {sorted(TFDS_DATASETS)}')


def source_for_model(spec: str, config: Any, split: str = 'test', data_dir: str = '') -> ImageSource:
  """The images a tool runs a trained model on: the data spec `spec` (see `source_from_spec`),
  or for an empty spec the run's own `split` ('train' or 'test') of `config.data`. ValueError
  unless the images have the model's shape and bit depth."""
  model = config.model
  if spec:
    source = source_from_spec(spec, data_dir or config.data.data_dir)
  else:
    if data_dir:
      config = config.copy_and_resolve_references()
      config.data.data_dir = data_dir
    train, test = load_sources(config.data, num_bits=int(model.num_bits))
    source = train if split == 'train' else test
    if source is None:
      raise ValueError(f'the run has no {split} split (dataset {config.data.dataset!r}); name '
                       'the images with --data (npz:PATH, digits:SPLIT, [tfds:]NAME[:SPLIT])')
  want = (int(model.image_size), int(model.image_size), int(model.num_channels))
  if source.shape != want or source.num_bits != int(model.num_bits):
    raise ValueError(f'{spec or config.data.dataset}: images {source.shape} with '
                     f'{source.num_bits} bits, but the model takes {want} with '
                     f'{int(model.num_bits)} bits')
  return source


# ----------------------------------------------------------------------------- augmentation


def augment_image(image: np.ndarray, rng: np.random.Generator, hflip: bool = True,
                  translate: float = 0.0) -> np.ndarray:
  """Random flip and edge-padded translation of uint8 (H, W, C); returns uint8 (H, W, C).

  The translation is an integer shift (dy, dx), each uniform in [-m, m] with
  m = round(translate * size): edge-pad by m, then crop the (H, W) window at (m + dy, m + dx).
  """
  if hflip and rng.random() < 0.5:
    image = image[:, ::-1]
  height, width = image.shape[:2]
  margin = int(round(translate * max(height, width)))
  if margin > 0:
    dy, dx = rng.integers(-margin, margin + 1, size=2)
    padded = np.pad(image, ((margin, margin), (margin, margin), (0, 0)), mode='edge')
    image = padded[margin + dy:margin + dy + height, margin + dx:margin + dx + width]
  return np.ascontiguousarray(image)


def augment_rng(seed: int, step: int, row: int) -> np.random.Generator:
  """The generator for global row `row` of global step `step`."""
  return np.random.default_rng((_AUGMENT_TAG, seed, step, row))


# ----------------------------------------------------------------------------- pipelines


def _check_sharding(batch_size: int, process_index: int, process_count: int, what: str):
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must be in [0, process_count='
                     f'{process_count})')
  if batch_size <= 0:
    raise ValueError(f'{what} {batch_size} must be positive')
  if batch_size % process_count:
    raise ValueError(f'{what} {batch_size} is not divisible by process_count={process_count}')


def train_dataset(source: Sequence[np.ndarray], *, global_batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1, hflip: bool = True,
                  translate: float = 0.0) -> grain.MapDataset:
  """Infinite grain MapDataset; element s = uint8 (B / P, H, W, C), rows [p B/P, (p+1) B/P)
  of global batch s (B = global_batch_size, P = process_count, p = process_index)."""
  num_train = len(source)
  if num_train == 0:
    raise ValueError(f'training set {source!r} is empty (0 images)')
  _check_sharding(global_batch_size, process_index, process_count, 'global batch size')
  if global_batch_size > num_train:
    raise ValueError(f'global batch size {global_batch_size} is larger than the training '
                     f'set ({num_train} images)')
  if not 0 <= seed < 2**32:
    raise ValueError(f'seed {seed} must be in [0, 2^32)')
  steps_per_epoch = num_train // global_batch_size
  host_batch = global_batch_size // process_count
  shuffle_seed = int(np.random.SeedSequence((_SHUFFLE_TAG, seed)).generate_state(1)[0])

  def augment(index: int, image: np.ndarray) -> np.ndarray:
    step, row = divmod(index, global_batch_size)  # index = step * B + row
    return augment_image(image, augment_rng(seed, step, row), hflip, translate)

  ds = grain.MapDataset.source(source).shuffle(seed=shuffle_seed)
  ds = ds[:steps_per_epoch * global_batch_size]  # epoch e reads shuffle indices e*N + j
  if hflip or translate > 0:
    ds = ds.map_with_index(augment)
  ds = ds.batch(host_batch, drop_remainder=True)  # element s*P + p: host p's rows of step s
  return ds[process_index::process_count].repeat()


def train_batches(source: Sequence[np.ndarray], *, global_batch_size: int, seed: int,
                  start_step: int = 0, process_index: int = 0, process_count: int = 1,
                  hflip: bool = True, translate: float = 0.0, read_threads: int = 4,
                  prefetch: int = 8) -> Iterator[np.ndarray]:
  """Endless uint8 batches (global_batch_size / process_count, H, W, C) from `start_step` on.

  Batch k of the iterator is this host's slice of global step start_step + k; it equals
  what an uninterrupted run from step 0 yields at that step.
  """
  if start_step < 0:
    raise ValueError(f'start_step {start_step} must be >= 0')
  ds = train_dataset(source, global_batch_size=global_batch_size, seed=seed,
                     process_index=process_index, process_count=process_count,
                     hflip=hflip, translate=translate)
  options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
  return iter(ds[start_step:].to_iter_dataset(options))


class EvalBatch(NamedTuple):
  """images uint8 (b, H, W, C) and mask bool (b,): False rows are padding."""
  images: np.ndarray
  mask: np.ndarray


def eval_batches(source: ImageSource, batch_size: int, max_examples: int = 0, *,
                 process_index: int = 0, process_count: int = 1) -> Iterator[EvalBatch]:
  """The split in order, no augmentation, as EvalBatch(images, mask) of fixed shape.

  `batch_size` is global; each host gets rows [p b, (p+1) b) of every global batch,
  b = batch_size / process_count. The last batch is padded with copies of the last image
  (mask False), so every batch has shape (b, H, W, C). `max_examples` > 0 limits the split.
  """
  _check_sharding(batch_size, process_index, process_count, 'eval batch size')
  num = len(source) if max_examples <= 0 else min(max_examples, len(source))
  if num == 0:
    raise ValueError(f'evaluation split {source!r} is empty (0 images)')
  host_batch = batch_size // process_count
  rows = np.arange(host_batch) + process_index * host_batch

  def read(step: int) -> EvalBatch:
    index = step * batch_size + rows
    return EvalBatch(source.read_batch(np.minimum(index, num - 1).tolist()), index < num)

  num_batches = math.ceil(num / batch_size)
  return iter(grain.MapDataset.range(num_batches).map(read).to_iter_dataset(
      grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)))


# ----------------------------------------------------------------------------- from config


@dataclasses.dataclass(frozen=True)
class Data:
  """Everything the training loop needs from `config.data` (see `make_data`)."""
  train: ImageSource
  test: ImageSource | None
  image_size: int
  num_channels: int
  num_bits: int
  global_batch_size: int
  per_host_batch_size: int
  steps_per_epoch: int
  seed: int
  hflip: bool
  translate: float
  eval_batch_size: int
  process_index: int = 0
  process_count: int = 1
  read_threads: int = 4
  prefetch: int = 8

  @property
  def num_train(self) -> int:
    """Training images used (after max_train_examples)."""
    return len(self.train)

  @property
  def num_test(self) -> int:
    """Test images (0 when there is no test split)."""
    return 0 if self.test is None else len(self.test)

  def train_batches(self, start_step: int = 0) -> Iterator[np.ndarray]:
    """This host's uint8 (per_host_batch_size, H, W, C) batches from global step `start_step`."""
    return train_batches(self.train, global_batch_size=self.global_batch_size, seed=self.seed,
                         start_step=start_step, process_index=self.process_index,
                         process_count=self.process_count, hflip=self.hflip,
                         translate=self.translate, read_threads=self.read_threads,
                         prefetch=self.prefetch)

  def eval_batches(self, max_examples: int = 0, batch_size: int = 0) -> Iterator[EvalBatch]:
    """This host's padded EvalBatch(images, mask) over the test split, in order."""
    if self.test is None:
      raise ValueError('no test split: set config.data.test_npz or config.data.holdout')
    return eval_batches(self.test, batch_size or self.eval_batch_size, max_examples,
                        process_index=self.process_index, process_count=self.process_count)


def make_data(config: Any, process_index: int = 0, process_count: int = 1) -> Data:
  """Builds the sources and pipelines from `config` and checks them against `config.model`."""
  data_config, model = config.data, config.model
  train, test = load_sources(data_config, num_bits=int(model.num_bits))
  train = train.take(int(data_config.max_train_examples))
  if test is not None:
    test = test.take(int(data_config.max_test_examples))
  provided = {'image_size': train.image_size, 'num_channels': train.num_channels,
              'num_bits': train.num_bits}
  for field, value in provided.items():
    if int(model[field]) != value:
      raise ValueError(f'config.model.{field}={model[field]} but dataset '
                       f"{data_config.dataset!r} provides {field}={value}")
  batch = int(config.train.batch_size)
  if len(train) == 0:
    raise ValueError(f'dataset {data_config.dataset!r}: training split is empty (0 images)')
  _check_sharding(batch, process_index, process_count, 'config.train.batch_size')
  if batch > len(train):
    raise ValueError(f'config.train.batch_size={batch} is larger than the training set '
                     f'({len(train)} images of {data_config.dataset!r})')
  eval_batch = int(config.eval.batch_size)
  _check_sharding(eval_batch, process_index, process_count, 'config.eval.batch_size')
  return Data(
      train=train, test=test, seed=int(config.train.seed),
      global_batch_size=batch, per_host_batch_size=batch // process_count,
      steps_per_epoch=len(train) // batch, eval_batch_size=eval_batch,
      hflip=bool(data_config.hflip),
      translate=float(data_config.translate),
      process_index=process_index, process_count=process_count,
      read_threads=int(data_config.read_threads),
      prefetch=int(data_config.prefetch), **provided)
