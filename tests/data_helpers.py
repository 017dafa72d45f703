"""Shared test helpers: fake sources of every SRC form and small kood datasets in temp dirs.

Example:
    d = make_cifar10_dir(tmp_path / "cifar", num_train=20, num_test=10)
    ds_dir = make_kood_dataset(tmp_path / "ds", num_classes=3, counts={"train": 12, "test": 6})
    images, labels = read_split(ds_dir, "train")
"""

from __future__ import annotations

import os
import pickle

import numpy as np


def random_images(n: int, h: int = 32, w: int = 32, c: int = 3, seed: int = 0) -> np.ndarray:
    """uint8 `[n, h, w, c]` (c=0 gives `[n, h, w]`): smooth-ish random images (compressible like photos)."""
    rng = np.random.default_rng(seed)
    shape = (n, h, w) + ((c,) if c else ())
    base = rng.integers(0, 256, size=(n, 1, 1) + ((c,) if c else ()), dtype=np.int64)
    noise = rng.integers(-20, 21, size=shape)
    ramp = np.arange(h)[None, :, None] * 2
    if c:
        ramp = ramp[..., None]
    return np.clip(base + noise + ramp, 0, 255).astype(np.uint8)


def make_cifar10_dir(directory, num_train: int = 10, num_test: int = 5, seed: int = 0):
    """Writes a fake python-pickle CIFAR-10 dir; returns `(dir, {split: (images NHWC, labels)})`."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"class{i}" for i in range(10)]
    with open(os.path.join(directory, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in names], b"num_cases_per_batch": num_train}, f)
    x_train, x_test = random_images(num_train, seed=seed), random_images(num_test, seed=seed + 1)
    y_train, y_test = rng.integers(0, 10, num_train), rng.integers(0, 10, num_test)
    blocks = np.array_split(np.arange(num_train), 5)
    for i, block in enumerate(blocks, 1):
        _dump_cifar_batch(os.path.join(directory, f"data_batch_{i}"), x_train[block], y_train[block], b"labels")
    _dump_cifar_batch(os.path.join(directory, "test_batch"), x_test, y_test, b"labels")
    return str(directory), {"train": (x_train, y_train), "test": (x_test, y_test)}


def make_cifar100_dir(directory, num_train: int = 10, num_test: int = 5, seed: int = 0):
    """Writes a fake CIFAR-100 dir (train, test, meta; fine labels); returns `(dir, {split: (x, y)})`."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(os.path.join(directory, "meta"), "wb") as f:
        pickle.dump({b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                     b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}, f)
    out = {}
    for split, n in (("train", num_train), ("test", num_test)):
        x, y = random_images(n, seed=seed + len(out)), rng.integers(0, 100, n)
        _dump_cifar_batch(os.path.join(directory, split), x, y, b"fine_labels", coarse=rng.integers(0, 20, n))
        out[split] = (x, y)
    return str(directory), out


def _dump_cifar_batch(path, x, y, label_key, coarse=None):
    d = {b"data": x.transpose(0, 3, 1, 2).reshape(len(x), -1), label_key: [int(v) for v in y],
         b"batch_label": b"fake"}
    if coarse is not None:
        d[b"coarse_labels"] = [int(v) for v in coarse]
    with open(path, "wb") as f:
        pickle.dump(d, f)


def make_image_folder(directory, counts: dict[str, int] | int, size=(32, 32), mode: str = "RGB",
                      seed: int = 0, ext: str = ".png"):
    """Writes PNGs in class subfolders (`counts` dict) or flat (`counts` int).

    Returns `(dir, images [N,H,W,C] in sorted reading order, labels (or -1))`.
    """
    from PIL import Image

    os.makedirs(directory, exist_ok=True)
    c = 1 if mode == "L" else 3
    images, labels = [], []
    groups = counts.items() if isinstance(counts, dict) else [(None, counts)]
    for label, (name, n) in enumerate(sorted(groups, key=lambda g: g[0] or "")):
        sub = os.path.join(directory, name) if name else str(directory)
        os.makedirs(sub, exist_ok=True)
        x = random_images(n, size[0], size[1], c, seed=seed + label)
        for i in range(n):
            Image.fromarray(x[i, ..., 0] if c == 1 else x[i], mode).save(os.path.join(sub, f"img{i:04d}{ext}"))
        images.append(x)
        labels += [label if name else -1] * n
    return str(directory), np.concatenate(images), np.array(labels)


def make_npz(path, n: int = 12, shape=(32, 32, 3), num_classes: int = 4, images_key="x", labels_key="y",
             seed: int = 0):
    """Writes an npz with `images_key` (and `labels_key` unless None); returns `(path, images, labels)`.

    The labels are shuffled `0..num_classes-1`, each class present when `n >= num_classes`
    (a class id without images is an error).
    """
    x = random_images(n, *shape, seed=seed) if len(shape) == 3 else random_images(n, *shape, c=0, seed=seed)
    y = np.random.default_rng(seed).permutation(np.arange(n) % num_classes)
    arrays = {images_key: x}
    if labels_key:
        arrays[labels_key] = y
    np.savez(path, **arrays)
    return str(path), x, (y if labels_key else np.full(n, -1))


def make_npy(path, n: int = 12, shape=(32, 32, 3), seed: int = 0):
    """Writes an unlabelled `[n, *shape]` uint8 .npy; returns `(path, images)`."""
    x = random_images(n, *shape, seed=seed)
    np.save(path, x)
    return str(path), x


def make_svhn_mat(path, n: int = 12, seed: int = 0):
    """Writes an SVHN-style .mat (X 32x32x3xN, y in 1..10); returns `(path, images NHWC, digit labels 0..9)`."""
    import scipy.io

    x = random_images(n, seed=seed)
    digits = np.arange(n) % 10  # every digit, including 0 (stored as 10)
    scipy.io.savemat(path, {"X": x.transpose(1, 2, 3, 0), "y": np.where(digits == 0, 10, digits)[:, None]})
    return str(path), x, digits


def make_kood_dataset(directory, *, num_classes: int = 3, counts: dict[str, int] | None = None,
                      shape=(32, 32, 3), kind: str = "real", num_shards: int = 1, encoding: str = "png",
                      seed: int = 0):
    """Writes a small kood dataset via `kood.writer.write_arrays` (labels -1 for num_classes=0).

    Returns the directory (str).
    """
    from kood.writer import write_arrays

    counts = counts or {"train": 12, "test": 6}
    rng = np.random.default_rng(seed)
    splits = {}
    for i, (split, n) in enumerate(counts.items()):
        x = random_images(n, *shape, seed=seed + i)
        y = rng.integers(0, num_classes, n) if num_classes else np.full(n, -1)
        splits[split] = (x, y)
    write_arrays(str(directory), splits, kind=kind, num_classes=num_classes, num_shards=num_shards,
                 encoding=encoding)
    return str(directory)


def read_split(directory, split: str):
    """Reads a split back through `kood.records.parse_example`: `(images [N,H,W,C], labels, indices, confidences)`."""
    import tensorflow as tf

    from kood.manifest import read_manifest
    from kood.records import parse_example

    m = read_manifest(str(directory))
    ds = tf.data.TFRecordDataset(m.shard_paths(str(directory), split)).map(
        lambda s: parse_example(s, m.shape, m.encoding))
    recs = list(ds.as_numpy_iterator())
    return (np.stack([r["image"] for r in recs]), np.array([r["label"] for r in recs]),
            np.array([r["index"] for r in recs]), np.array([r["confidence"] for r in recs]))


def held_elsewhere(directory, owner="pid 4242 on elsewhere"):
    """A kood write lock on `directory` held through another open file, as another process would hold it."""
    import fcntl

    from kood.writer import LOCK_FILE

    os.makedirs(directory, exist_ok=True)
    f = open(os.path.join(directory, LOCK_FILE), "w")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    f.write(owner + "\n")
    f.flush()
    return f
