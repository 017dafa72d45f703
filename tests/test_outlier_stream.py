"""kood.data.outlier_stream: shape, shuffling, repetition, shape check, bounded memory."""

import gc

import numpy as np
import psutil
import pytest

from kood import data
from kood.errors import DataError
from kood.writer import write_arrays


def _indexed_set(directory, n, shape=(8, 8, 1), num_shards=4, encoding="png"):
    """Unlabelled set whose image i has every pixel = i % 256 and first row encoding i // 256."""
    x = np.zeros((n, *shape), np.uint8)
    x[:] = (np.arange(n) % 256)[:, None, None, None]
    x[:, 0, 0, 0] = np.arange(n) // 256
    write_arrays(str(directory), {"train": (x, -np.ones(n, np.int64))}, kind="outlier", num_classes=0,
                 num_shards=num_shards, encoding=encoding)
    return str(directory)


def _ids(batch):
    b = batch.numpy().astype(np.int64)
    return b[:, 0, 0, 0] * 256 + b[:, 1, 1, 0]


def test_stream_is_shuffled_repeating_and_unlabelled(tmp_path):
    d = _indexed_set(tmp_path / "o", 300)
    ds = data.outlier_stream(d, batch_size=48, augment=False, seed=0)
    batches = list(ds.take(20))  # 960 images: more than 3 passes over the set
    assert all(b.shape == (48, 8, 8, 1) and b.dtype == "float32" for b in batches)  # images only, no labels
    ids = np.concatenate([_ids(b) for b in batches])
    assert set(ids) <= set(range(300))
    for start in (0, 300, 600):  # each pass visits every image once, in a new order
        assert sorted(ids[start:start + 300]) == list(range(300))
    assert not np.array_equal(ids[:300], ids[300:600])
    assert not np.array_equal(ids[:48], np.arange(48))  # not in file order
    other = np.concatenate([_ids(b) for b in data.outlier_stream(d, batch_size=48, augment=False, seed=1).take(2)])
    assert not np.array_equal(other, ids[:96])  # the seed matters
    same = np.concatenate([_ids(b) for b in data.outlier_stream(d, batch_size=48, augment=False, seed=0).take(2)])
    np.testing.assert_array_equal(same, ids[:96])  # and makes runs reproducible


def test_batch_larger_than_the_set(tmp_path):
    d = _indexed_set(tmp_path / "o", 30, num_shards=2)
    batch = next(iter(data.outlier_stream(d, batch_size=6 * 16, augment=True)))
    assert batch.shape == (96, 8, 8, 1)


def test_shape_must_match_the_id_shape(tmp_path):
    d = _indexed_set(tmp_path / "o", 30, shape=(8, 8, 1))
    with pytest.raises(DataError, match=f"{d}.*\\[8, 8, 1\\].*\\[8, 8, 3\\]"):
        data.outlier_stream(d, batch_size=4, image_shape=(8, 8, 3))
    assert data.outlier_stream(d, batch_size=4, image_shape=(8, 8, 1)) is not None


def test_memory_stays_bounded_on_a_set_30x_the_shuffle_buffer(tmp_path):
    n, buffer = 30_000, 1_000
    d = _indexed_set(tmp_path / "o", n, shape=(32, 32, 3), num_shards=10, encoding="raw")  # 88 MB of pixels
    set_mb = n * 32 * 32 * 3 / 2**20
    it = iter(data.outlier_stream(d, batch_size=256, seed=0, shuffle_buffer=buffer))
    for _ in range(10):  # warm up: buffers filled, graph built
        next(it)
    gc.collect()
    proc = psutil.Process()
    start = peak = proc.memory_info().rss
    for _ in range(3 * n // 2 // 256):  # one and a half passes
        next(it)
        peak = max(peak, proc.memory_info().rss)
    growth_mb = (peak - start) / 2**20
    # Caching the set would add >= set_mb; streaming adds some MB of allocator and autotune buffers.
    assert growth_mb < 35, f"RSS grew {growth_mb:.1f} MB while streaming a {set_mb:.0f} MB set"
