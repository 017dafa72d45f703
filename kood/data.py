"""tf.data readers for kood dataset directories: evaluation, training (with SIO mixing), outliers.

Every reader reads and validates the directory's manifest first and raises
`DataError` / `ConfigError` naming the directory, file or flag on bad input.
Pipelines yield `float32` pixels in 0..255 (normalization is the model's first
layer) and `int64` labels.

Pipeline shape (train / outliers): shuffled shard list -> parallel interleave of
at most `MAX_OPEN_SHARDS` shards -> bounded shuffle buffer of *serialized*
records -> repeat (each pass visits every record once) -> parallel parse +
decode -> batch -> vectorised per-batch augmentation -> prefetch. Nothing is
cached, so memory does not grow with the size of a set.

Augmentation (`augment_batch`): random crop with `pad` pixels of **zero**
padding on each side (as torchvision's `RandomCrop(32, padding=4)` in the
papers' code) and a random horizontal flip, drawn with stateless RNG from
`(seed, batch number)`, so a run is reproducible.

Corrupt data: a missing shard file is a `DataError` when the reader is built.
Damage inside a shard only shows while iterating (tf.data reads lazily); the
user then sees TensorFlow's own error: `tf.errors.DataLossError: corrupted
record at <offset>` for a damaged TFRecord, or `tf.errors.InvalidArgumentError`
for an undecodable image, whose message names the shard file for `raw`
images (a size check) but not for `png`. Run `python -m data_prep.verify DIR` on the
directory to find the shard.

Example:
    ds, steps = train_dataset("data/cifar10", batch_size=128, syn_directory="data/syn", sio_ratio=0.8)
    for images, labels in ds.take(steps): ...
    aux = outlier_stream("data/300k", batch_size=6 * 128, image_shape=(32, 32, 3))
    test = eval_dataset("data/svhn", "test", image_size=(32, 32, 3), resize="resize")
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from kood.errors import ConfigError, DataError
from kood.manifest import Manifest, read_manifest
from kood.records import decode_image

AUTOTUNE = tf.data.AUTOTUNE
TRAIN_SHUFFLE_BUFFER = 10_000  # serialized records (~3 KB each at 32x32x3): ~30 MB
OUTLIER_SHUFFLE_BUFFER = 10_000
MAX_OPEN_SHARDS = 8  # interleave cycle length: bounds read buffers however many shards a set has
RESIZE_MODES = ("error", "resize", "center_crop")
# eval_dataset's `limit` subset: a fixed seed, so a limited evaluation scores the same images every run
LIMIT_SEED = 0

_FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
}


# ----------------------------------------------------------------------------------------------
# Building blocks


def _shard_files(directory: str, manifest: Manifest, split: str,
                 file_shard: tuple[int, int] | None = None) -> list[str]:
    files = manifest.shard_paths(directory, split)  # DataError naming the directory if no such split
    for path in files:
        if not os.path.isfile(path):
            raise DataError(f"{path}: shard listed in {directory}/manifest.json is missing")
    if file_shard is not None:  # one input pipeline of several (multi-worker training): its files only
        num, index = file_shard
        if not 0 <= index < num or len(files) < num:
            raise DataError(f"{directory}: split {split!r} has {len(files)} shard files, too few for input "
                            f"pipeline {index} of {num}; reconvert it with at least {num} shards")
        files = files[index::num]
    return files


def _records(files: list[str], *, shuffle: bool, seed: int, buffer: int, count: int) -> tf.data.Dataset:
    """Serialized records paired with their shard path; repeating and shuffled if `shuffle`."""
    names = tf.data.Dataset.from_tensor_slices(files)
    if shuffle:
        names = names.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)

    def read(path):
        return tf.data.TFRecordDataset(path).map(lambda r: (r, path))

    if not shuffle:  # evaluation: shards in manifest order, records in file order
        return names.flat_map(read)
    records = names.interleave(read, cycle_length=min(len(files), MAX_OPEN_SHARDS), block_length=1,
                               num_parallel_calls=min(len(files), MAX_OPEN_SHARDS), deterministic=True)
    # Shuffle, then repeat: each pass visits every record once (new shard order and shuffle each
    # pass). A buffer larger than the set would only waste memory.
    return records.shuffle(min(buffer, count), seed=seed, reshuffle_each_iteration=True).repeat()


def _parser(manifest: Manifest, directory: str, check_labels: bool):
    """Returns `fn(serialized, shard_path) -> (uint8 image, int64 label)` with the range check."""
    shape, encoding, k = manifest.shape, manifest.encoding, manifest.num_classes

    def parse(serialized, path):
        parsed = tf.io.parse_single_example(serialized, _FEATURES)
        data = parsed["image"]
        checks = []
        if encoding == "raw":  # name the shard when a raw record has the wrong size
            checks.append(tf.debugging.Assert(
                tf.equal(tf.strings.length(data), shape[0] * shape[1] * shape[2]),
                [f"{directory}: raw image record of the wrong size for image_shape {list(shape)} in shard", path]))
        label = parsed["label"]
        if check_labels:
            checks.append(tf.debugging.Assert(
                tf.logical_and(label >= 0, label < k),
                [f"{directory}: label out of range [0, {k}) in shard", path, "label:", label]))
        with tf.control_dependencies(checks):
            image = decode_image(data, shape, encoding)
            return image, tf.identity(label)

    return parse


def augment_batch(images: tf.Tensor, seed: tf.Tensor, *, pad: int = 4, flip: bool = True) -> tf.Tensor:
    """Random crop (zero padding `pad`) and horizontal flip of a batch, per image.

    Args:
        images: `[B, H, W, C]` batch (any dtype).
        seed: int32/int64 `[2]` stateless RNG seed; the same seed gives the same crops and flips.
        pad: pixels of zero padding on each side before cropping back to `H x W`; 0 = no crop.
        flip: flip each image left-right with probability 1/2.

    Returns:
        The augmented batch, same shape and dtype.

    Example:
        out = augment_batch(images, tf.constant([0, 7]), pad=4, flip=True)
    """
    if pad < 0:
        raise ConfigError(f"pad must be >= 0. Received: pad={pad}")
    seed = tf.cast(seed, tf.int64)
    shape = tf.shape(images)
    b, h, w = shape[0], shape[1], shape[2]
    if pad > 0:
        padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
        offsets = tf.random.stateless_uniform([2, b], seed=seed, minval=0, maxval=2 * pad + 1, dtype=tf.int32)
        rows = offsets[0][:, None] + tf.range(h)[None, :]
        cols = offsets[1][:, None] + tf.range(w)[None, :]
        images = tf.gather(padded, rows, axis=1, batch_dims=1)
        images = tf.gather(images, cols, axis=2, batch_dims=1)
    if flip:
        coin = tf.random.stateless_uniform([b], seed=seed + [0, 1], minval=0, maxval=2, dtype=tf.int32)
        images = tf.where(tf.equal(coin, 1)[:, None, None, None], tf.reverse(images, axis=[2]), images)
    return images


def _augment_and_cast(ds: tf.data.Dataset, *, augment: bool, seed: int, pad: int, flip: bool,
                      with_labels: bool) -> tf.data.Dataset:
    if augment and (pad > 0 or flip):
        def aug(step, batch):
            images = augment_batch(batch[0], tf.stack([tf.cast(seed, tf.int64), step]), pad=pad, flip=flip)
            return (images,) + tuple(batch[1:])
        ds = ds.enumerate().map(aug, num_parallel_calls=AUTOTUNE)
    if with_labels:
        return ds.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=AUTOTUNE)
    return ds.map(lambda x, y: tf.cast(x, tf.float32), num_parallel_calls=AUTOTUNE)


def _check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}. Received: {name}={value!r}")


def _labelled(manifest: Manifest, directory: str, role: str) -> None:
    if manifest.num_classes <= 0:
        raise DataError(f"{directory}: {role} set has no classes (num_classes=0, kind={manifest.kind!r}); "
                        "training needs labelled images")


# ----------------------------------------------------------------------------------------------
# Readers


def eval_dataset(directory: str, split: str = "test", *, batch_size: int = 256,
                 image_size: tuple[int, ...] | None = None, resize: str = "error",
                 limit: int | None = None) -> tf.data.Dataset:
    """Deterministic batches `(float32 images [B,H,W,C] in 0..255, int64 labels [B])`, no augmentation.

    Args:
        directory: kood dataset directory.
        split: split to read.
        batch_size: images per batch (the last batch may be smaller).
        image_size: the shape the model needs, `(H, W)` or `(H, W, C)`; None = the set's own shape.
        resize: what to do when the set's shape differs from `image_size`: `"error"` (DataError),
            `"resize"` (bilinear), `"center_crop"` (crop the centre; the set must be at least as large).
            A channel count of 1 <-> 3 is converted (grey to RGB by copying, RGB to grey by luminance).
        limit: read at most this many images: a random subset of the split, drawn with the fixed seed
            `LIMIT_SEED` (the same images every run) and kept in file order. Not the first `limit`: a set
            converted from class folders is stored sorted by class, so its first images are a few classes.
            Every record is still read (skipped ones are not decoded).

    Returns:
        A `tf.data.Dataset`; the same order on every iteration (shards in manifest order).

    Example:
        for images, labels in eval_dataset("data/svhn", "test", image_size=(32, 32, 3), resize="resize"): ...
    """
    _check_int("batch_size", batch_size)
    if limit is not None:
        _check_int("limit", limit)
    if resize not in RESIZE_MODES:
        raise ConfigError(f"resize must be one of {RESIZE_MODES}. Received: resize={resize!r}")
    manifest = read_manifest(directory)
    files = _shard_files(directory, manifest, split)
    target = _target_shape(directory, manifest.shape, image_size, resize)
    count = manifest.count(split)
    ds = _records(files, shuffle=False, seed=0, buffer=0, count=0)
    # A known length lets Keras show progress and fails loudly if the shards hold fewer records.
    ds = ds.apply(tf.data.experimental.assert_cardinality(count))
    if limit is not None and limit < count:
        keep = np.zeros(count, bool)
        keep[limit_indices(count, limit)] = True
        keep = tf.constant(keep)

        def kept(i, record):
            return keep[i]

        def drop_index(i, record):
            return record

        ds = ds.enumerate().filter(kept).map(drop_index)
        ds = ds.apply(tf.data.experimental.assert_cardinality(limit))
    ds = ds.map(_parser(manifest, directory, check_labels=manifest.num_classes > 0), num_parallel_calls=AUTOTUNE)
    ds = ds.batch(batch_size)
    if target != manifest.shape:
        ds = ds.map(lambda x, y: (_reshape_images(x, manifest.shape, target, resize), y),
                    num_parallel_calls=AUTOTUNE)
    ds = _augment_and_cast(ds, augment=False, seed=0, pad=0, flip=False, with_labels=True)
    return ds.prefetch(AUTOTUNE)


def limit_indices(count: int, limit: int) -> np.ndarray:
    """Sorted indices of the `min(limit, count)` records `eval_dataset(..., limit=limit)` reads of a split of `count`.

    Example:
        limit_indices(10_000, 200)   # 200 indices spread over the whole split, the same every call
    """
    if limit >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(LIMIT_SEED).choice(count, size=limit, replace=False))


def _target_shape(directory: str, shape: tuple[int, int, int], image_size, resize: str) -> tuple[int, int, int]:
    if image_size is None:
        return shape
    if len(image_size) not in (2, 3) or any(int(d) <= 0 for d in image_size):
        raise ConfigError(f"image_size must be (H, W) or (H, W, C) > 0. Received: image_size={image_size!r}")
    target = tuple(int(d) for d in image_size) + ((shape[2],) if len(image_size) == 2 else ())
    if target == shape:
        return shape
    if resize == "error":
        raise DataError(f"{directory}: images are {list(shape)} but {list(target)} is needed; "
                        "pass resize='resize' or 'center_crop' to convert them (CLI: --resize=resize or --resize=center_crop)")
    if shape[2] != target[2] and {shape[2], target[2]} != {1, 3}:
        raise DataError(f"{directory}: cannot convert {shape[2]} channels to {target[2]}. "
                        f"Received: image_size={image_size!r}")
    if resize == "center_crop" and (shape[0] < target[0] or shape[1] < target[1]):
        raise DataError(f"{directory}: images {list(shape)} are smaller than {list(target)}; "
                        "center_crop cannot enlarge them, use resize='resize'")
    return target


def _reshape_images(x: tf.Tensor, shape, target, resize: str) -> tf.Tensor:
    if shape[2] == 1 and target[2] == 3:
        x = tf.image.grayscale_to_rgb(x)
    elif shape[2] == 3 and target[2] == 1:
        x = tf.image.rgb_to_grayscale(x)
    if resize == "resize" and shape[:2] != target[:2]:
        x = tf.cast(tf.clip_by_value(tf.round(tf.image.resize(x, target[:2])), 0, 255), tf.uint8)
    elif resize == "center_crop":
        top, left = (shape[0] - target[0]) // 2, (shape[1] - target[1]) // 2
        x = x[:, top:top + target[0], left:left + target[1], :]
    return x


def train_dataset(directory: str, *, batch_size: int, split: str = "train", augment: bool = True, seed: int = 0,
                  syn_directory: str | None = None, sio_ratio: float = 1.0, pad: int = 4,
                  flip: bool = True, file_shard: tuple[int, int] | None = None) -> tuple[tf.data.Dataset, int]:
    """Infinite shuffled training batches, optionally mixing in synthetic images (SIO).

    Every batch holds exactly `r = int(batch_size * sio_ratio)` real and `batch_size - r` synthetic
    images at random positions. Real and synthetic streams repeat independently, so any set sizes
    work. Both get the same augmentation.

    Args:
        directory: real, labelled kood dataset directory.
        batch_size: images per batch (B).
        split: split of both the real and the synthetic set to read.
        augment: random crop + flip (see `augment_batch`).
        seed: seeds shard order, shuffle buffers, in-batch positions and augmentation.
        syn_directory: synthetic, labelled kood dataset (same image shape and classes); needed if sio_ratio < 1.
        sio_ratio: alpha in (0, 1], the fraction of real images per batch (--sio_ratio).
        pad: zero padding of the random crop (0 = no crop).
        flip: random horizontal flip.
        file_shard: `(num, index)`: read only shard files `index, index + num, ...` of the real and
            synthetic sets (one worker's input pipeline in multi-worker training).

    Returns:
        `(dataset of (float32 images [B,H,W,C], int64 labels [B]), steps_per_epoch)` where
        `steps_per_epoch = N_real // r`: an epoch is one pass over the real images.

    Example:
        ds, steps = train_dataset("data/cifar10", batch_size=128, syn_directory="data/syn", sio_ratio=0.8)
        model.fit(ds, steps_per_epoch=steps, epochs=200, shuffle=False)  # ds shuffles itself
    """
    _check_int("batch_size", batch_size)
    _check_int("pad", pad, minimum=0)
    if isinstance(sio_ratio, bool) or not isinstance(sio_ratio, (int, float)) or not 0.0 < sio_ratio <= 1.0:
        raise ConfigError(f"--sio_ratio must be in (0, 1]. Received: sio_ratio={sio_ratio!r}")
    num_real = int(batch_size * sio_ratio)
    if num_real == 0:
        raise ConfigError(f"--batch_size {batch_size} x --sio_ratio {sio_ratio} leaves 0 real images per batch; "
                          f"use a batch size of at least {int(-(-1 // sio_ratio))}. "
                          f"Received: batch_size={batch_size}, sio_ratio={sio_ratio}")
    num_syn = batch_size - num_real
    if num_syn > 0 and not syn_directory:
        raise ConfigError(f"--sio_ratio {sio_ratio} < 1 needs a synthetic dataset (--syn_data). "
                          f"Received: syn_directory={syn_directory!r}")

    manifest = read_manifest(directory)
    _labelled(manifest, directory, "real")
    files = _shard_files(directory, manifest, split, file_shard)
    steps_per_epoch = manifest.count(split) // num_real
    if steps_per_epoch == 0:
        raise DataError(f"{directory}: split {split!r} has {manifest.count(split)} images, fewer than the "
                        f"{num_real} real images of one batch (--batch_size {batch_size}, --sio_ratio {sio_ratio})")
    real = _records(files, shuffle=True, seed=seed, buffer=TRAIN_SHUFFLE_BUFFER, count=manifest.count(split))
    real = real.map(_parser(manifest, directory, check_labels=True), num_parallel_calls=AUTOTUNE)
    real = real.batch(num_real, drop_remainder=True)

    if num_syn == 0:
        ds = real
    else:
        syn_manifest = read_manifest(syn_directory)
        _check_synthetic(directory, manifest, syn_directory, syn_manifest)
        syn_files = _shard_files(syn_directory, syn_manifest, split, file_shard)
        syn = _records(syn_files, shuffle=True, seed=seed + 1, buffer=TRAIN_SHUFFLE_BUFFER,
                       count=syn_manifest.count(split))
        syn = syn.map(_parser(syn_manifest, syn_directory, check_labels=True), num_parallel_calls=AUTOTUNE)
        syn = syn.batch(num_syn, drop_remainder=True)

        def mix(step, pair):
            (xr, yr), (xs, ys) = pair
            # A seeded permutation, so real images do not always sit at the front of the batch.
            keys = tf.random.stateless_uniform([batch_size], seed=tf.stack([tf.cast(seed, tf.int64) + 7919, step]))
            order = tf.argsort(keys)
            return tf.gather(tf.concat([xr, xs], 0), order), tf.gather(tf.concat([yr, ys], 0), order)

        ds = tf.data.Dataset.zip((real, syn)).enumerate().map(mix, num_parallel_calls=AUTOTUNE)

    ds = _augment_and_cast(ds, augment=augment, seed=seed, pad=pad, flip=flip, with_labels=True)
    return ds.prefetch(AUTOTUNE), steps_per_epoch


def _check_synthetic(directory: str, manifest: Manifest, syn_directory: str, syn: Manifest) -> None:
    if syn.shape != manifest.shape:
        raise DataError(f"{syn_directory}: synthetic images are {list(syn.shape)} but the real images of "
                        f"{directory} are {list(manifest.shape)}; convert them to the same size")
    _labelled(syn, syn_directory, "synthetic")
    # A set converted from arrays has no class names ('0'..'K-1'): its ids are taken as the real set's.
    if syn.num_classes != manifest.num_classes or (list(syn.class_names) != list(manifest.class_names)
                                                   and not unnamed_classes(syn)):
        raise DataError(f"{syn_directory}: synthetic classes ({syn.num_classes}: {_some_names(syn)}) differ from "
                        f"the real classes of {directory} ({manifest.num_classes}: {_some_names(manifest)})")


def unnamed_classes(manifest: Manifest) -> bool:
    """True if the set's class names are only its ids ('0'..'K-1'), as for a set converted from label arrays."""
    return list(manifest.class_names) == [str(i) for i in range(manifest.num_classes)]


def _some_names(manifest: Manifest) -> str:
    names = list(manifest.class_names)
    return str(names) if len(names) <= 6 else f"{names[:3]} ... {names[-2:]}"


def outlier_stream(directory: str, *, batch_size: int, split: str = "train", augment: bool = True, seed: int = 0,
                   image_shape: tuple[int, int, int] | None = None, pad: int = 4, flip: bool = True,
                   shuffle_buffer: int = OUTLIER_SHUFFLE_BUFFER,
                   file_shard: tuple[int, int] | None = None) -> tf.data.Dataset:
    """Infinite, shuffled batches of `float32 images [batch_size, H, W, C]` from an outlier set (labels dropped).

    Memory does not depend on the set's size: shards are read in a shuffled order, at most
    `MAX_OPEN_SHARDS` at a time, through a shuffle buffer of `shuffle_buffer` serialized records.

    Args:
        directory: kood dataset directory (any kind; labels are ignored).
        batch_size: images per step (e.g. a GReg+ candidate pool of 6 x B).
        split: split to stream.
        augment: random crop + flip (see `augment_batch`).
        seed: seeds shard order, shuffling and augmentation.
        image_shape: the ID image shape; a different outlier shape is a DataError.
        pad: zero padding of the random crop.
        flip: random horizontal flip.
        shuffle_buffer: records held for shuffling (bounds memory).
        file_shard: `(num, index)`: read only shard files `index, index + num, ...`.

    Example:
        aux = outlier_stream("data/300k", batch_size=768, image_shape=(32, 32, 3))
        images = next(iter(aux))
    """
    _check_int("batch_size", batch_size)
    _check_int("pad", pad, minimum=0)
    _check_int("shuffle_buffer", shuffle_buffer)
    manifest = read_manifest(directory)
    if image_shape is not None and tuple(int(d) for d in image_shape) != manifest.shape:
        raise DataError(f"{directory}: outlier images are {list(manifest.shape)} but the ID images are "
                        f"{list(image_shape)}; convert the outlier set to the ID size")
    files = _shard_files(directory, manifest, split, file_shard)
    ds = _records(files, shuffle=True, seed=seed, buffer=shuffle_buffer, count=manifest.count(split))
    ds = ds.map(_parser(manifest, directory, check_labels=False), num_parallel_calls=AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = _augment_and_cast(ds, augment=augment, seed=seed, pad=pad, flip=flip, with_labels=False)
    return ds.prefetch(AUTOTUNE)
