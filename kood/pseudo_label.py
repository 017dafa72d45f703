"""Label an unlabelled (e.g. unconditionally generated) image set with a trained classifier.

SIO needs labelled synthetic ID images; for unconditional generators the SIO
paper labels them with a classifier trained on the real data (argmax). Each
kept record gets `label` = argmax of the logits and `confidence` = max softmax
probability; images below `min_confidence` are dropped. Output shards mirror
the source shards (one output shard per source shard), streamed, so memory does
not grow with the set's size. Labels already in the source are replaced.

Example:
    pseudo_label("data/gan_raw", "data/gan_labelled", "runs/ce/best.keras", min_confidence=0.5)
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Sequence

import numpy as np

from kood.errors import ConfigError, DataError
from kood.manifest import Manifest, read_manifest
from kood.progress import Progress

if TYPE_CHECKING:
    import keras


def load_model(model_path: str) -> keras.Model:
    """Loads a classifier: a `.keras` file or a model dir with `best.keras` (kood.models.load_classifier)."""
    from kood.models import load_classifier

    return load_classifier(model_path)


def fits_input(model: keras.Model, shape: Sequence[int | None]) -> bool:
    """True if images of `shape` `(H, W, C)` fit the model's input; a None in `shape` matches anything."""
    model_shape = tuple(model.input_shape[1:])
    return len(model_shape) == 3 and all(m is None or d is None or int(m) == d for m, d in zip(model_shape, shape))


def model_num_classes(model) -> int:
    """Units of the Dense layer named `classifier`, else the last output dimension."""
    try:
        return int(model.get_layer("classifier").units)
    except ValueError:  # no layer of that name: a model that does not follow the kood layer names
        return int(model.output_shape[-1])


def pseudo_label(src_dir: str, out_dir: str, model_path: str, *, min_confidence: float = 0.0,
                 batch_size: int = 256, overwrite: bool = False, real_dir: str | None = None,
                 command: str | None = None, model: keras.Model | None = None,
                 name: str | None = None) -> Manifest:
    """Writes a labelled copy (kind=synthetic) of every split of `src_dir`.

    Args:
        src_dir: unlabelled kood dataset dir (labels -1), all splits are labelled.
        out_dir: output dataset dir.
        model_path: a `.keras` classifier (float32 pixels -> logits) or a model dir with `best.keras`.
        min_confidence: drop images whose max softmax probability is below this, in [0, 1].
        batch_size: inference batch size.
        overwrite: replace an existing complete dataset at `out_dir`.
        real_dir: optional real kood dataset whose `class_names` to use (its
            num_classes must equal the model's); default names "0".."K-1".
        command: recorded in the manifest (default: this process's command line).
        model: the classifier at `model_path` if already loaded (`load_model`), so it is not loaded twice.
        name: how errors name the images (default `src_dir`), e.g. the user's `--source=...`.

    Returns:
        The written manifest; `extra` holds model_path, min_confidence, kept,
        dropped, per_class (counts) and per_split (kept/dropped).

    Example:
        m = pseudo_label("raw", "labelled", "runs/ce/best.keras", min_confidence=0.9)
    """
    import tensorflow as tf

    from kood.records import parse_example
    from kood.writer import DatasetWriter, write_shard

    if not 0.0 <= min_confidence <= 1.0:
        raise ConfigError(f"min_confidence must be in [0, 1]. Received: min_confidence={min_confidence}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1. Received: batch_size={batch_size}")
    manifest = read_manifest(src_dir)
    model = model if model is not None else load_model(model_path)
    if not fits_input(model, manifest.shape):
        raise DataError(f"{src_dir}: image shape {manifest.shape} does not match the input shape "
                        f"{tuple(model.input_shape[1:])} of the model {model_path}")
    num_classes = model_num_classes(model)
    class_names = None
    if real_dir is not None:
        real = read_manifest(real_dir)
        if real.num_classes != num_classes:
            raise DataError(f"{real_dir}: has {real.num_classes} classes but the model {model_path} "
                            f"predicts {num_classes}")
        class_names = real.class_names

    writer = DatasetWriter(out_dir, kind="synthetic", image_shape=manifest.shape, num_classes=num_classes,
                           class_names=class_names, encoding=manifest.encoding, overwrite=overwrite)
    shape, encoding = manifest.shape, manifest.encoding
    per_class = np.zeros(num_classes, np.int64)
    per_split = {}
    total = sum(int(s["count"]) for s in manifest.splits.values())
    with Progress("pseudo-label", total=total) as bar:
        for split in manifest.splits:
            paths = manifest.shard_paths(src_dir, split)
            infos, seen = [], 0
            for i, path in enumerate(paths):
                if not os.path.exists(path):
                    raise DataError(f"{path}: shard listed in {src_dir}/manifest.json is missing")
                ds = tf.data.TFRecordDataset(path).map(lambda s: parse_example(s, shape, encoding)).batch(batch_size)
                items = _labelled_items(ds, model, min_confidence, per_class, bar, path)
                infos.append(write_shard(out_dir, split, i, len(paths), items, shape, encoding))
                seen += int(manifest.splits[split]["shards"][i]["count"])
            kept = sum(info["count"] for info in infos)
            if kept == 0:
                for info in infos:
                    os.remove(os.path.join(out_dir, info["file"]))
                raise DataError(f"{name or src_dir}: no image of split {split!r} reaches "
                                f"min_confidence={min_confidence}; nothing to write")
            writer.add_split(split, infos)
            per_split[split] = {"kept": kept, "dropped": seen - kept}
    kept = sum(s["kept"] for s in per_split.values())
    print(class_summary(writer.class_names, per_class), file=sys.stderr)
    extra = {"model_path": os.path.abspath(model_path), "min_confidence": float(min_confidence),
             "kept": kept, "dropped": total - kept, "per_class": per_class.tolist(), "per_split": per_split,
             "source_dir": os.path.abspath(src_dir), "source_kind": manifest.kind}
    return writer.finish(source=f"pseudo_label:{os.path.abspath(src_dir)}", command=command, extra=extra)


def class_summary(class_names: list[str], per_class) -> str:
    """Kept images per class, and a warning naming the classes that got none (a lopsided set is easy to miss)."""
    text = "pseudo-labels per class: " + ", ".join(f"{n}={int(c)}" for n, c in zip(class_names, per_class))
    empty = [n for n, c in zip(class_names, per_class) if c == 0]
    if empty:
        text += (f"\nwarning: no image was labelled as class(es) {empty} ({len(empty)} of {len(class_names)}); "
                 f"lower --min_confidence, add images, or check the model")
    return text


def _labelled_items(ds, model, min_confidence: float, per_class: np.ndarray, bar: Progress, path: str):
    """Yields `(image, label, index, confidence)` for every kept image of one shard."""
    import tensorflow as tf

    try:
        for batch in ds:
            images = batch["image"].numpy()
            logits = model(tf.cast(batch["image"], tf.float32), training=False)
            probs = tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1).numpy()
            labels, conf = probs.argmax(-1), probs.max(-1)
            for j in np.flatnonzero(conf >= min_confidence):
                per_class[labels[j]] += 1
                yield images[j], int(labels[j]), int(batch["index"][j]), float(conf[j])
            bar.update(len(images))
    except tf.errors.OpError as e:
        raise DataError(f"{path}: cannot read records: {e.message}") from e
