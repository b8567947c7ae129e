"""Tests for denseflow_jax.data: sources, augmentation, deterministic resume, validation."""
import importlib
import itertools
import os
import re
import time

import numpy as np
import pytest

from denseflow_jax import data, defaults

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_TRAIN = os.path.join('..', 'shared', 'data', 'cifar10_train_subset.npz')

# our name -> (TFDS name, splits present in the prepared metadata, image shape we serve)
TFDS_CASES = {
    'cifar10': ('cifar10', ('train', 'test'), (32, 32, 3)),
    'imagenet32': ('imagenet_resized/32x32', ('train', 'validation'), (32, 32, 3)),
    'imagenet64': ('imagenet_resized/64x64', ('train', 'validation'), (64, 64, 3)),
    'celeba': ('celeb_a', ('train', 'validation', 'test'), (64, 64, 3)),
}


def make_config(dataset='digits', **data_fields):
  """The default config for 8x8 grey 5-bit images of `dataset`, batches of 16."""
  config = defaults.get_config()
  config.model.update(image_size=8, num_channels=1, num_bits=5)
  config.data.dataset = dataset
  config.data.update(data_fields)
  config.train.batch_size = config.eval.batch_size = 16
  return config


def write_npz(path, **arrays):
  np.savez(path, **arrays)
  return str(path)


def random_images(n, size=8, channels=3, seed=0, top=255):
  return np.random.default_rng(seed).integers(0, top + 1, (n, size, size, channels), np.uint8)


def take(iterator, n):
  return list(itertools.islice(iterator, n))


# ----------------------------------------------------------------------------- TFDS


def write_tfds_metadata(data_dir, tfds_name, splits, file_format='array_record', n=6):
  """Writes the dataset_info.json / features.json that a prepared dataset has (no records)."""
  import tensorflow_datasets as tfds
  builder = tfds.builder(tfds_name, data_dir=str(data_dir), file_format=file_format)
  infos = [tfds.core.SplitInfo(
      name=split, shard_lengths=[n], num_bytes=0,
      filename_template=tfds.core.ShardedFileTemplate(
          data_dir=builder.data_path, dataset_name=builder.name, split=split,
          filetype_suffix=file_format)) for split in splits]
  builder.info.set_splits(tfds.core.SplitDict(infos))
  os.makedirs(builder.data_path, exist_ok=True)
  builder.info.write_to_directory(builder.data_path)


@pytest.mark.parametrize('name', sorted(TFDS_CASES))
def test_tfds_sources_with_mock_data(tmp_path, name):
  # USE_FILES: the builder reads the metadata written above, so our is_prepared / format /
  # split checks and tfds.data_source run for real; only the array_record reader is mocked.
  import tensorflow_datasets as tfds
  tfds_name, splits, shape = TFDS_CASES[name]
  write_tfds_metadata(tmp_path, tfds_name, splits)
  _, train_split, test_split = data.TFDS_DATASETS[name]
  with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_FILES,
                              data_dir=str(tmp_path)):
    for split in (train_split, test_split):
      source = data.tfds_source(name, split, data_dir=str(tmp_path))
      assert len(source) == 5 and source.shape == shape and source.num_bits == 8
      image = source[4]
      assert image.shape == shape and image.dtype == np.uint8
      assert source.read_batch([0, 3]).shape == (2,) + shape
    config = importlib.import_module(f'configs.{name}').get_config()  # its data section
    config.data.data_dir = str(tmp_path)
    config.model.update(image_size=shape[0], num_channels=3, num_bits=8)
    config.train.batch_size = config.eval.batch_size = 2
    loaded = data.make_data(config)
    assert (loaded.num_train, loaded.num_test, loaded.steps_per_epoch) == (5, 5, 2)
    assert loaded.translate == (0.0 if name == 'celeba' else 0.04)
    batches = take(loaded.train_batches(), 3)
    assert all(b.shape == (2,) + shape and b.dtype == np.uint8 for b in batches)
    evals = list(loaded.eval_batches())
    assert [int(b.mask.sum()) for b in evals] == [2, 2, 1]


def test_tfds_not_prepared_fails_fast(tmp_path):
  for name, (tfds_name, _, _) in TFDS_CASES.items():
    start = time.monotonic()
    with pytest.raises(FileNotFoundError) as error:
      data.tfds_source(name, 'train', data_dir=str(tmp_path))
    assert time.monotonic() - start < 10
    message = str(error.value)
    assert f"'{tfds_name}' is not prepared" in message
    assert 'download_and_prepare' in message and "file_format='array_record'" in message
    assert str(tmp_path) in message


def test_tfds_tfrecord_format_rejected(tmp_path):
  write_tfds_metadata(tmp_path, 'cifar10', ('train', 'test'), file_format='tfrecord')
  with pytest.raises(RuntimeError, match=r"stored as \['tfrecord'\].*array_record"):
    data.tfds_source('cifar10', 'train', data_dir=str(tmp_path))


def test_tfds_missing_split(tmp_path):
  write_tfds_metadata(tmp_path, 'cifar10', ('train',))
  with pytest.raises(ValueError, match=r"no split 'test'; available: \['train'\]"):
    data.tfds_source('cifar10', 'test', data_dir=str(tmp_path))


def test_celeba_crop_box_and_resize():
  from PIL import Image
  image = np.zeros((218, 178, 3), np.uint8)
  image[40:188, 15:163] = np.random.default_rng(0).integers(0, 256, (148, 148, 3))
  out = data.celeba_crop(image)
  assert out.shape == (64, 64, 3) and out.dtype == np.uint8
  expected = np.asarray(Image.fromarray(image[40:188, 15:163]).resize((64, 64),
                                                                       Image.BILINEAR))
  np.testing.assert_array_equal(out, expected)
  image[40:188, 15:163] = 7  # everything outside the box is 0: the crop sees only 7s
  assert (data.celeba_crop(image) == 7).all()


# ----------------------------------------------------------------------------- npz / digits


def test_npz_train_and_test_files(tmp_path):
  train = write_npz(tmp_path / 'train.npz', images=random_images(40))
  test = write_npz(tmp_path / 'test.npz', images=random_images(9, seed=1))
  config = make_config('npz', train_npz=train, test_npz=test)
  config.model.update(num_channels=3, num_bits=8)
  loaded = data.make_data(config)
  assert (loaded.num_train, loaded.num_test, loaded.steps_per_epoch) == (40, 9, 2)
  np.testing.assert_array_equal(loaded.test[8], random_images(9, seed=1)[8])


def test_npz_grey_and_relative_path(tmp_path, monkeypatch):
  grey = random_images(20, channels=1, top=31)[..., 0]  # (N, H, W)
  write_npz(tmp_path / 'grey.npz', images=grey)
  monkeypatch.chdir(tmp_path)
  images, bits = data.load_npz('grey.npz', num_bits=5)
  assert images.shape == (20, 8, 8, 1) and bits == 5
  np.testing.assert_array_equal(images[..., 0], grey)


def test_npz_holdout_split(tmp_path):
  images = random_images(30, channels=1, top=31)
  path = write_npz(tmp_path / 'digits.npz', images=images, num_bits=np.int64(5))
  train, test = data.load_sources(make_config('npz', train_npz=path, holdout=10).data)
  assert (len(train), len(test), train.num_bits) == (20, 10, 5)
  np.testing.assert_array_equal(train.read_batch(range(20)), images[:20])
  np.testing.assert_array_equal(test.read_batch(range(10)), images[20:])
  train, test = data.load_sources(make_config('npz', train_npz=path).data, num_bits=5)
  assert len(train) == 30 and test is None


def test_shared_cifar10_subset():
  path = os.path.join(REPO_ROOT, SHARED_TRAIN)
  if not os.path.exists(path):
    pytest.skip(f'{SHARED_TRAIN} (relative to the repository root) is not present')
  config = make_config('npz', train_npz=path, holdout=1000)
  config.model.update(image_size=32, num_channels=3, num_bits=8)
  config.train.batch_size = 64
  loaded = data.make_data(config)
  assert (loaded.num_train, loaded.num_test, loaded.steps_per_epoch) == (4085, 1000, 63)
  batch = next(loaded.train_batches())
  assert batch.shape == (64, 32, 32, 3) and batch.dtype == np.uint8


def test_digits():
  train, test = data.digits_source('train'), data.digits_source('test')
  assert (len(train), len(test)) == (1500, 297)
  assert train.shape == (8, 8, 1) and train.num_bits == 5
  images = np.concatenate([train.read_batch(range(1500)), test.read_batch(range(297))])
  assert images.dtype == np.uint8 and images.min() == 0 and images.max() == 31
  assert len(np.unique(images)) == 17
  from sklearn.datasets import load_digits
  levels = load_digits().images  # mapping keeps the order of the 17 grey levels
  np.testing.assert_array_equal(images[..., 0], np.floor(levels * 31 / 16 + 0.5))
  np.testing.assert_array_equal(test[0], images[1500])
  loaded = data.make_data(make_config())
  assert (loaded.image_size, loaded.num_channels, loaded.num_bits) == (8, 1, 5)
  assert loaded.steps_per_epoch == 1500 // 16


# ----------------------------------------------------------------------------- augmentation


def test_augmentation_keeps_dtype_shape_range():
  image = random_images(1, size=32, top=31)[0]
  for seed in range(20):
    out = data.augment_image(image, np.random.default_rng(seed), hflip=True, translate=0.1)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert out.min() >= image.min() and out.max() <= image.max()


def test_flip_is_exact_mirror():
  image = random_images(1, size=8)[0]
  flipped = [data.augment_image(image, np.random.default_rng(s), hflip=True)
             for s in range(20)]
  assert any((f == image).all() for f in flipped)
  mirrored = [f for f in flipped if not (f == image).all()]
  assert mirrored and all((f == image[:, ::-1]).all() for f in mirrored)


def test_translate_uses_edge_padding():
  image = random_images(1, size=25)[0]
  margin = 1  # round(0.04 * 25)
  padded = np.pad(image, ((margin,) * 2, (margin,) * 2, (0, 0)), mode='edge')
  windows = {(dy, dx): padded[margin + dy:margin + dy + 25, margin + dx:margin + dx + 25]
             for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
  seen = set()
  for seed in range(60):
    out = data.augment_image(image, np.random.default_rng(seed), hflip=False, translate=0.04)
    match = [k for k, w in windows.items() if (w == out).all()]
    assert match, 'output is not an edge-padded shift of at most 1 pixel'
    seen.update(match)
  assert len(seen) == 9  # every shift in [-1, 1]^2 occurs
  shifted = windows[(1, 1)]  # content moved up-left; the last row/column repeat the edge
  np.testing.assert_array_equal(shifted[-1], shifted[-2])
  np.testing.assert_array_equal(shifted[:, -1], shifted[:, -2])


# ----------------------------------------------------------------------------- pipeline


def tagged_source(n=50, size=4):
  """Image i is constant i (uint8 (size, size, 1)): a batch's rows name their examples."""
  images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None],
                           (n, size, size, 1)).copy()
  return data.ImageSource.from_array('tagged', 'train', images, 8)


def test_epochs_are_permutations_with_dropped_remainder():
  source = tagged_source(50)
  batches = take(data.train_batches(source, global_batch_size=8, seed=1, hflip=False), 18)
  ids = np.stack([b[:, 0, 0, 0] for b in batches])  # 6 steps per epoch, 3 epochs
  epochs = ids.reshape(3, 48)
  for epoch in epochs:
    assert len(np.unique(epoch)) == 48  # no repeats within an epoch; 2 dropped
  assert not (epochs[0] == epochs[1]).all()
  other_seed = take(data.train_batches(source, global_batch_size=8, seed=2, hflip=False), 6)
  assert not all((a == b).all() for a, b in zip(batches, other_seed))


def test_determinism_and_exact_resume():
  source = tagged_source(50, size=12)
  kwargs = dict(global_batch_size=8, seed=5, hflip=True, translate=0.1)
  full = take(data.train_batches(source, **kwargs), 20)
  again = take(data.train_batches(source, **kwargs), 20)
  assert all((a == b).all() for a, b in zip(full, again))
  for start in (1, 6, 13):  # 6 steps per epoch: mid-epoch and epoch boundaries
    resumed = take(data.train_batches(source, start_step=start, **kwargs), 20 - start)
    assert all((a == b).all() for a, b in zip(resumed, full[start:]))


@pytest.mark.parametrize('process_count', [2, 4])
def test_multi_host_slices_concatenate(process_count):
  source = tagged_source(50, size=12)
  kwargs = dict(global_batch_size=8, seed=3, hflip=True, translate=0.1)
  single = take(data.train_batches(source, start_step=4, **kwargs), 5)
  hosts = [take(data.train_batches(source, start_step=4, process_index=p,
                                   process_count=process_count, **kwargs), 5)
           for p in range(process_count)]
  for step in range(5):
    assert hosts[0][step].shape[0] == 8 // process_count
    np.testing.assert_array_equal(np.concatenate([h[step] for h in hosts]), single[step])


def test_eval_batches_in_order_with_padding():
  source = tagged_source(11)
  batches = list(data.eval_batches(source, 4))
  assert [b.images.shape for b in batches] == [(4, 4, 4, 1)] * 3
  assert [b.mask.tolist() for b in batches][-1] == [True, True, True, False]
  valid = np.concatenate([b.images[b.mask][:, 0, 0, 0] for b in batches])
  np.testing.assert_array_equal(valid, np.arange(11))
  limited = list(data.eval_batches(source, 4, max_examples=5))
  assert len(limited) == 2 and int(sum(b.mask.sum() for b in limited)) == 5
  hosts = [list(data.eval_batches(source, 4, process_index=p, process_count=2))
           for p in range(2)]
  for k, batch in enumerate(batches):
    np.testing.assert_array_equal(
        np.concatenate([h[k].images for h in hosts])[batch.mask], batch.images[batch.mask])
    np.testing.assert_array_equal(np.concatenate([h[k].mask for h in hosts]), batch.mask)


# ----------------------------------------------------------------------------- validation


def test_validation_errors(tmp_path):
  source = tagged_source(10)
  with pytest.raises(ValueError, match='global batch size 16 is larger than the training set'
                                       r' \(10 images\)'):
    data.train_batches(source, global_batch_size=16, seed=0)
  with pytest.raises(ValueError, match='global batch size 6 is not divisible by '
                                       'process_count=4'):
    data.train_batches(source, global_batch_size=6, seed=0, process_count=4)
  with pytest.raises(ValueError, match=r'process_index=2 must be in \[0, process_count=2\)'):
    data.train_batches(source, global_batch_size=4, seed=0, process_index=2, process_count=2)
  with pytest.raises(ValueError, match='is empty'):
    empty = data.ImageSource.from_array('x', 'train', np.zeros((0, 4, 4, 1), np.uint8), 8)
    data.train_batches(empty, global_batch_size=1, seed=0)
  with pytest.raises(ValueError, match='start_step -1'):
    data.train_batches(source, global_batch_size=2, seed=0, start_step=-1)
  with pytest.raises(ValueError, match='eval batch size 3 is not divisible by process_count=2'):
    data.eval_batches(source, 3, process_count=2)
  with pytest.raises(ValueError, match=r"unknown dataset 'mnist'; expected one of \[.*"
                                       r"'cifar10'.*'digits'"):
    data.make_data(make_config('mnist'))


def test_npz_errors(tmp_path):
  missing = str(tmp_path / 'nope.npz')
  with pytest.raises(FileNotFoundError, match='nope.npz'):
    data.load_npz(missing)
  path = write_npz(tmp_path / 'a.npz', pixels=random_images(3))
  with pytest.raises(ValueError, match=r"a.npz' has no array 'images' \(arrays: \['pixels'\]\)"):
    data.load_npz(path)
  path = write_npz(tmp_path / 'b.npz', images=random_images(3).astype(np.float32))
  with pytest.raises(ValueError, match='dtype float32, expected uint8'):
    data.load_npz(path)
  path = write_npz(tmp_path / 'c.npz', images=np.zeros((3, 8), np.uint8))
  with pytest.raises(ValueError, match=r'shape \(3, 8\) \(rank 2\)'):
    data.load_npz(path)
  path = write_npz(tmp_path / 'd.npz', images=random_images(3))
  with pytest.raises(ValueError, match=r'value 255 is outside \[0, 31\] \(num_bits=5\)'):
    data.load_npz(path, num_bits=5)
  with pytest.raises(ValueError, match='holdout=3 must be in'):
    data.load_sources(make_config('npz', train_npz=path, holdout=3).data)
  with pytest.raises(ValueError, match="set either test_npz .* or holdout"):
    data.load_sources(make_config('npz', train_npz=path, test_npz=path, holdout=1).data)
  with pytest.raises(ValueError, match=r"needs config.data.train_npz \(got ''\)"):
    data.load_sources(make_config('npz').data)


def test_unreadable_npz_files_are_value_errors_naming_the_file(tmp_path):
  good = write_npz(tmp_path / 'good.npz', images=random_images(3) // 8)
  raw = open(good, 'rb').read()
  cases = {'truncated.npz': (raw[:len(raw) // 2], 'cannot be read'),
           'text.npz': (b'just some text\n' * 4, 'is not an .npz archive'),
           'empty.npz': (b'', 'is not an .npz archive')}
  npy = tmp_path / 'array.npy'
  np.save(npy, random_images(3))
  cases['npy.npz'] = (npy.read_bytes(), 'is a .npy file')
  for name, (content, fragment) in cases.items():
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError) as info:
      data.load_npz(str(tmp_path / name))
    assert f"npz file '{tmp_path / name}'" in str(info.value) and fragment in str(info.value)
    assert 'allow_pickle' not in str(info.value)
  for value, fragment in [(np.array([5, 5]), 'integer scalar, got int64 array of shape (2,)'),
                          (np.float64(5.7), 'integer scalar, got float64 5.7'),
                          (np.int64(9), "'num_bits' = 9 must be in 1..8")]:
    path = write_npz(tmp_path / 'bits.npz', images=random_images(3) // 8, num_bits=value)
    with pytest.raises(ValueError, match=re.escape(fragment)):
      data.load_npz(path)
  assert data.load_npz(write_npz(tmp_path / 'ok.npz', images=random_images(3) // 8,
                                 num_bits=np.int32(5)))[1] == 5


def test_make_data_errors(tmp_path):
  config = make_config()
  config.model.num_bits = 8
  with pytest.raises(ValueError, match=r"num_bits=8 but dataset 'digits' provides num_bits=5"):
    data.make_data(config)
  config = make_config()
  config.model.image_size = 32
  with pytest.raises(ValueError, match='image_size=32 but .* provides image_size=8'):
    data.make_data(config)
  config = make_config()
  config.model.num_channels = 3
  with pytest.raises(ValueError, match='num_channels=3 but .* provides num_channels=1'):
    data.make_data(config)
  config = make_config(max_train_examples=10)
  with pytest.raises(ValueError, match=r'batch_size=16 is larger than the training set '
                                       r"\(10 images"):
    data.make_data(config)
  with pytest.raises(ValueError, match='batch_size 16 is not divisible by process_count=3'):
    data.make_data(make_config(), process_count=3)
  path = write_npz(tmp_path / 'e.npz', images=np.zeros((0, 8, 8, 1), np.uint8))
  with pytest.raises(ValueError, match='training split is empty'):
    data.make_data(make_config('npz', train_npz=path))
