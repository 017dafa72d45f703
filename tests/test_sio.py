"""kood.data.train_dataset with SIO mixing: exact batch composition, epochs, bad input."""

import numpy as np
import pytest

from kood import data
from kood.errors import ConfigError, DataError
from kood.writer import write_arrays

REAL_PIXEL, SYN_PIXEL = 10, 200


def _constant_set(directory, n, pixel, num_classes=4, kind="real", shape=(8, 8, 3), class_names=None):
    """A set whose images are all `pixel`, so real and synthetic images are told apart by value."""
    x = np.full((n, *shape), pixel, np.uint8)
    y = np.arange(n) % num_classes
    write_arrays(str(directory), {"train": (x, y)}, kind=kind, num_classes=num_classes, num_shards=3,
                 class_names=class_names)
    return str(directory)


@pytest.fixture
def sets(tmp_path):
    return (_constant_set(tmp_path / "real", 103, REAL_PIXEL),
            _constant_set(tmp_path / "syn", 17, SYN_PIXEL, kind="synthetic"))


@pytest.mark.parametrize("batch_size, alpha", [(10, 0.7), (16, 0.5), (9, 0.9)])
def test_every_batch_has_exactly_int_b_alpha_real_images(sets, batch_size, alpha):
    real_dir, syn_dir = sets
    ds, steps = data.train_dataset(real_dir, batch_size=batch_size, syn_directory=syn_dir, sio_ratio=alpha,
                                   augment=True, pad=2, seed=1)
    num_real = int(batch_size * alpha)
    assert steps == 103 // num_real
    patterns = set()
    for images, labels in ds.take(50):  # more than an epoch of both sets: both streams repeat
        images, labels = images.numpy(), labels.numpy()
        assert images.shape == (batch_size, 8, 8, 3)
        centre = images[:, 4, 4, 0]  # pad 2 crops keep the centre pixel of an 8x8 image
        assert set(np.unique(centre)) <= {REAL_PIXEL, SYN_PIXEL}
        is_real = centre == REAL_PIXEL
        assert is_real.sum() == num_real
        assert ((labels >= 0) & (labels < 4)).all()
        patterns.add(tuple(is_real))
    assert len(patterns) >= min(10, batch_size)  # real images are shuffled into different positions


def test_alpha_one_needs_no_synthetic_set(sets):
    real_dir, _ = sets
    ds, steps = data.train_dataset(real_dir, batch_size=8, augment=False)
    assert steps == 103 // 8
    for images, _ in ds.take(30):
        assert (images.numpy() == REAL_PIXEL).all()


@pytest.mark.parametrize("n, batch_size, alpha, expected", [
    (103, 10, 0.7, 14), (103, 10, 1.0, 10), (7, 7, 1.0, 1), (50, 3, 0.5, 50), (1001, 128, 0.8, 9)])
def test_steps_per_epoch_counts_real_images(tmp_path, n, batch_size, alpha, expected):
    real_dir = _constant_set(tmp_path / "real", n, REAL_PIXEL)
    syn_dir = _constant_set(tmp_path / "syn", 5, SYN_PIXEL, kind="synthetic")
    _, steps = data.train_dataset(real_dir, batch_size=batch_size, syn_directory=syn_dir, sio_ratio=alpha)
    assert steps == expected == n // int(batch_size * alpha)


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5, float("nan"), "0.8"])
def test_sio_ratio_outside_0_1_names_the_flag(sets, alpha):
    real_dir, syn_dir = sets
    with pytest.raises(ConfigError, match="--sio_ratio"):
        data.train_dataset(real_dir, batch_size=8, syn_directory=syn_dir, sio_ratio=alpha)


def test_sio_without_synthetic_set(sets):
    with pytest.raises(ConfigError, match="--syn_data"):
        data.train_dataset(sets[0], batch_size=8, sio_ratio=0.8)


def test_batch_too_small_for_one_real_image(sets):
    with pytest.raises(ConfigError, match="0 real images.*at least 4"):
        data.train_dataset(sets[0], batch_size=3, syn_directory=sets[1], sio_ratio=0.3)


def test_real_set_smaller_than_one_batch(tmp_path, sets):
    small = _constant_set(tmp_path / "small", 5, REAL_PIXEL)
    with pytest.raises(DataError, match="fewer than"):
        data.train_dataset(small, batch_size=8, syn_directory=sets[1], sio_ratio=0.75)


def test_synthetic_shape_must_match(tmp_path, sets):
    syn = _constant_set(tmp_path / "syn16", 10, SYN_PIXEL, kind="synthetic", shape=(16, 16, 3))
    with pytest.raises(DataError, match=f"{syn}.*same size"):
        data.train_dataset(sets[0], batch_size=8, syn_directory=syn, sio_ratio=0.5)


def test_synthetic_classes_must_match(tmp_path, sets):
    fewer = _constant_set(tmp_path / "syn3", 10, SYN_PIXEL, num_classes=3, kind="synthetic")
    with pytest.raises(DataError, match=f"{fewer}.*classes"):
        data.train_dataset(sets[0], batch_size=8, syn_directory=fewer, sio_ratio=0.5)
    renamed = _constant_set(tmp_path / "synn", 10, SYN_PIXEL, kind="synthetic", class_names=list("abcd"))
    with pytest.raises(DataError, match=f"{renamed}.*classes"):
        data.train_dataset(sets[0], batch_size=8, syn_directory=renamed, sio_ratio=0.5)
    # a set converted from label arrays (names '0'..'K-1') next to a named real set (e.g. CIFAR's): ids match
    named = _constant_set(tmp_path / "named", 10, REAL_PIXEL, class_names=["cat", "dog", "emu", "fox"])
    unnamed = _constant_set(tmp_path / "unnamed", 10, SYN_PIXEL, kind="synthetic")
    data.train_dataset(named, batch_size=8, syn_directory=unnamed, sio_ratio=0.5)
    with pytest.raises(DataError, match=r"\(4: \['a', 'b', 'c', 'd'\]\) differ from the real classes of .* "
                                        r"\(4: \['cat', 'dog', 'emu', 'fox'\]\)"):
        data.train_dataset(named, batch_size=8, syn_directory=renamed, sio_ratio=0.5)
