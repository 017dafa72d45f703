"""kood.data: evaluation reader, augmentation, train reader basics and bad input."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from kood import data
from kood.errors import ConfigError, DataError
from kood.writer import write_arrays


def _images(n, shape=(8, 8, 3), seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def _write(directory, n=50, shape=(8, 8, 3), num_classes=5, num_shards=3, encoding="png", labels=None, **kw):
    x = _images(n, shape)
    y = np.arange(n) % num_classes if labels is None else labels
    write_arrays(str(directory), {"train": (x, y), "test": (x, y)}, num_classes=num_classes,
                 num_shards=num_shards, encoding=encoding, **kw)
    return x, y


def _collect(ds):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    return np.concatenate(xs), np.concatenate(ys)


# ---- evaluation reader


@pytest.mark.parametrize("encoding", ["png", "raw"])
def test_eval_is_exact_in_order_and_unaugmented(tmp_path, encoding):
    x, y = _write(tmp_path / "d", n=50, encoding=encoding)
    ds = data.eval_dataset(str(tmp_path / "d"), "test", batch_size=16)
    images, labels = _collect(ds)
    assert images.dtype == np.float32 and labels.dtype == np.int64
    np.testing.assert_array_equal(images, x.astype(np.float32))  # no augmentation, source order over 3 shards
    np.testing.assert_array_equal(labels, y)
    images2, labels2 = _collect(ds)  # a second pass is identical
    np.testing.assert_array_equal(images2, images)
    np.testing.assert_array_equal(labels2, labels)
    assert [b[0].shape[0] for b in ds] == [16, 16, 16, 2]


def test_eval_limit_is_a_seeded_spread_subset_in_file_order(tmp_path):
    # stored sorted by class, as a set converted from class folders: the first 20 images are 2 classes
    labels = np.repeat(np.arange(10), 10)
    x, _ = _write(tmp_path / "d", n=100, num_classes=10, labels=labels)
    ds = data.eval_dataset(str(tmp_path / "d"), batch_size=8, limit=20)
    images, got = _collect(ds)
    assert len(images) == 20 and int(ds.cardinality()) == 3  # a known length (Keras progress)
    assert len(np.unique(got)) >= 6  # spread over the classes, not the first 2
    keep = data.limit_indices(100, 20)
    assert np.all(np.diff(keep) > 0)  # file order
    np.testing.assert_array_equal(images, x[keep])
    np.testing.assert_array_equal(got, labels[keep])
    again, _ = _collect(data.eval_dataset(str(tmp_path / "d"), batch_size=8, limit=20))
    np.testing.assert_array_equal(again, images)  # the same subset every run
    whole, _ = _collect(data.eval_dataset(str(tmp_path / "d"), batch_size=8, limit=500))
    np.testing.assert_array_equal(whole, x)  # a limit above the count reads everything


def test_eval_shape_mismatch_is_an_error_unless_resize_asked(tmp_path):
    d = str(tmp_path / "d")
    x, _ = _write(d, n=10, shape=(12, 12, 1), num_classes=0, labels=-np.ones(10, np.int64), kind="ood")
    with pytest.raises(DataError, match=f"{d}.*resize"):
        data.eval_dataset(d, image_size=(8, 8, 3))
    resized, labels = _collect(data.eval_dataset(d, image_size=(8, 8, 3), resize="resize"))
    assert resized.shape == (10, 8, 8, 3) and (labels == -1).all()
    np.testing.assert_array_equal(resized[..., 0], resized[..., 2])  # grey copied to RGB
    cropped, _ = _collect(data.eval_dataset(d, image_size=(8, 8), resize="center_crop"))
    np.testing.assert_array_equal(cropped, x[:, 2:10, 2:10, :])
    with pytest.raises(DataError, match="smaller"):
        data.eval_dataset(d, image_size=(16, 16), resize="center_crop")
    with pytest.raises(ConfigError, match="resize"):
        data.eval_dataset(d, image_size=(8, 8), resize="stretch")


# ---- augmentation


def test_flip_equals_fliplr_of_the_original():
    x = _images(64, (6, 7, 3))
    out = data.augment_batch(tf.constant(x), tf.constant([3, 5]), pad=0, flip=True).numpy()
    flipped = [np.array_equal(o, np.fliplr(i)) for o, i in zip(out, x)]
    same = [np.array_equal(o, i) for o, i in zip(out, x)]
    assert all(f != s for f, s in zip(flipped, same))  # each image is either flipped or untouched
    assert 10 < sum(flipped) < 54
    again = data.augment_batch(tf.constant(x), tf.constant([3, 5]), pad=0, flip=True).numpy()
    np.testing.assert_array_equal(again, out)  # seeded


def test_crop_is_a_window_of_the_zero_padded_image():
    pad, x = 2, _images(40, (5, 6, 1), seed=1)
    out = data.augment_batch(tf.constant(x), tf.constant([0, 1]), pad=pad, flip=False).numpy()
    offsets = set()
    for o, i in zip(out, x):
        padded = np.pad(i, [(pad, pad), (pad, pad), (0, 0)])
        hits = [(r, c) for r in range(2 * pad + 1) for c in range(2 * pad + 1)
                if np.array_equal(padded[r:r + 5, c:c + 6], o)]
        assert hits, "crop is not a window of the zero-padded image"
        offsets.add(hits[0])
    assert len(offsets) > 5  # offsets vary per image


def test_train_augmentation_is_seeded_and_eval_has_none(tmp_path):
    d = str(tmp_path / "d")
    x, _ = _write(d, n=40)
    first = [next(iter(data.train_dataset(d, batch_size=8, seed=3)[0]))[0].numpy() for _ in range(2)]
    np.testing.assert_array_equal(first[0], first[1])
    plain = next(iter(data.train_dataset(d, batch_size=8, seed=3, augment=False)[0]))[0].numpy()
    source = {img.tobytes() for img in x.astype(np.float32)}
    assert all(img.tobytes() in source for img in plain)
    assert not all(img.tobytes() in source for img in first[0])


# ---- bad input


def test_missing_directory_manifest_split_and_shard(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.eval_dataset(str(tmp_path / "nope"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(DataError, match="no manifest.json"):
        data.train_dataset(str(tmp_path / "empty"), batch_size=4)
    d = str(tmp_path / "d")
    _write(d, n=20)
    with pytest.raises(DataError, match="no split 'val'"):
        data.eval_dataset(d, "val")
    os.remove(os.path.join(d, "train-00001-of-00003.tfrecord"))
    with pytest.raises(DataError, match="train-00001-of-00003.tfrecord.*missing"):
        data.train_dataset(d, batch_size=4)


def test_empty_split_is_an_error(tmp_path):
    d = str(tmp_path / "d")
    _write(d, n=20)
    path = os.path.join(d, "manifest.json")
    with open(path) as f:
        raw = json.load(f)
    raw["splits"]["test"] = {"count": 0, "shards": []}
    with open(path, "w") as f:
        json.dump(raw, f)
    with pytest.raises(DataError, match="empty"):
        data.eval_dataset(d)


def test_unlabelled_set_cannot_be_trained_on(tmp_path):
    d = str(tmp_path / "d")
    _write(d, n=20, num_classes=0, labels=-np.ones(20, np.int64), kind="outlier")
    with pytest.raises(DataError, match=f"{d}.*no classes"):
        data.train_dataset(d, batch_size=4)


@pytest.mark.parametrize("reader", ["train", "eval"])
def test_label_out_of_range_names_the_directory(tmp_path, reader):
    d = str(tmp_path / "d")
    labels = np.arange(20) % 3
    labels[7] = 3
    _write(d, n=20, num_classes=3, labels=labels)
    ds = data.train_dataset(d, batch_size=4)[0] if reader == "train" else data.eval_dataset(d, batch_size=4)
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"{d}: label out of range"):
        for _ in ds.take(10):
            pass


def test_corrupt_record_raises_a_tf_data_error(tmp_path):
    d = str(tmp_path / "d")
    _write(d, n=20, num_shards=1)
    shard = os.path.join(d, "test-00000-of-00001.tfrecord")
    raw = bytearray(open(shard, "rb").read())
    raw[len(raw) // 2] ^= 0xFF
    open(shard, "wb").write(bytes(raw))
    # What the user sees (documented in kood.data): TF's own error; it cannot name the shard.
    with pytest.raises(tf.errors.DataLossError, match="corrupted record"):
        list(data.eval_dataset(d, batch_size=4))


def test_bad_raw_record_names_the_shard(tmp_path):
    d = str(tmp_path / "d")
    _write(d, n=20, num_shards=2, encoding="raw")
    path = os.path.join(d, "manifest.json")
    with open(path) as f:
        raw = json.load(f)
    raw["image_shape"] = [8, 8, 1]  # records now have 3x the bytes the manifest says
    raw["mean"], raw["std"] = raw["mean"][:1], raw["std"][:1]
    with open(path, "w") as f:
        json.dump(raw, f)
    with pytest.raises(tf.errors.InvalidArgumentError, match="test-00000-of-00002.tfrecord"):
        list(data.eval_dataset(d, batch_size=4))


@pytest.mark.parametrize("kwargs, flag", [({"batch_size": 0}, "batch_size"), ({"batch_size": 4, "pad": -1}, "pad")])
def test_bad_arguments(tmp_path, kwargs, flag):
    d = str(tmp_path / "d")
    _write(d, n=10)
    with pytest.raises(ConfigError, match=flag):
        data.train_dataset(d, **kwargs)
