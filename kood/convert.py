"""Convert a source (see `kood.sources`) into a kood dataset directory.

source -> optional random subset (`limit`, `seed`) -> resize / center-crop /
channel conversion -> shards (optionally written by worker processes) ->
manifest (last, atomically; see `kood.writer`).

Example:
    convert("cifar:/data/cifar-10-batches-py", "data/cifar10", num_shards=4, workers=2)
    convert("npy:/data/300K_random_images.npy", "data/rand300k", kind="outlier", num_shards=16)
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import shutil
import sys
import tempfile
from typing import Iterator

import numpy as np

from kood.errors import ConfigError, DataError
from kood.fanout import TaskPart, finish_task, start_task, task_shards
from kood.manifest import KINDS, Manifest, read_manifest, write_manifest
from kood.progress import Progress
from kood.records import ENCODINGS, UNLABELLED
from kood.sources import Source, SplitSource, open_source
from kood.writer import (DEFAULT_ENCODING, DatasetWriter, WriteLock, check_out_dir, class_names_for, command_line,
                         locked_output, remove_abandoned, write_shard)

RESIZE_MODES = ("resize", "center_crop")
UNLABELLED_KINDS = ("outlier", "ood")


def prepare_image(image: np.ndarray, image_size: int | None = None, resize: str = "resize",
                  channels: int | None = None) -> np.ndarray:
    """Returns `image` (uint8 `[H, W, C]`) with `channels` channels and `image_size` sides.

    Args:
        image: uint8 `[H, W, C]`, C in 1, 3, 4.
        image_size: output side (square); None keeps the size.
        resize: `resize` (bilinear, antialiased, ignores aspect ratio) or `center_crop`
            (scale the shorter side to `image_size`, then cut the central square).
        channels: 1 (luminance) or 3 (gray repeated, alpha dropped); None keeps them.

    Example:
        prepare_image(np.zeros((28, 28, 1), np.uint8), 32, channels=3).shape  # (32, 32, 3)
    """
    from PIL import Image

    c = image.shape[-1]
    if channels is not None and c != channels:
        if channels == 3:
            image = np.repeat(image, 3, -1) if c == 1 else image[..., :3]
        else:
            image = np.asarray(Image.fromarray(np.ascontiguousarray(image[..., :3])).convert("L"))[..., None]
        c = channels
    if image_size is None or image.shape[:2] == (image_size, image_size):
        return image
    pil = Image.fromarray(image[..., 0] if c == 1 else np.ascontiguousarray(image))
    if resize == "resize":
        pil = pil.resize((image_size, image_size), Image.BILINEAR)
    else:
        w, h = pil.size
        scale = image_size / min(w, h)
        nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
        pil = pil.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - image_size) // 2, (nh - image_size) // 2
        pil = pil.crop((left, top, left + image_size, top + image_size))
    out = np.asarray(pil, np.uint8)
    return out[..., None] if out.ndim == 2 else out


def _check_args(kind, image_size, resize, channels, limit, num_shards, workers, encoding, task_index, num_tasks):
    if kind not in KINDS:
        raise ConfigError(f"--kind must be one of {KINDS}. Received: kind={kind!r}")
    if image_size is not None and image_size < 1:
        raise ConfigError(f"--image_size must be >= 1. Received: image_size={image_size}")
    if resize not in RESIZE_MODES:
        raise ConfigError(f"--resize must be one of {RESIZE_MODES}. Received: resize={resize!r}")
    if resize != "resize" and image_size is None:  # else it would be silently ignored
        raise ConfigError(f"--resize={resize} needs --image_size (the side of the square to crop to); without "
                          f"--image_size images keep their size. Received: resize={resize!r}, image_size=None")
    if channels not in (None, 1, 3):
        raise ConfigError(f"--channels must be 1 or 3. Received: channels={channels}")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be >= 1; limit={limit} would write an empty dataset. "
                          f"Received: limit={limit}")
    if num_shards < 1:
        raise ConfigError(f"--num_shards must be >= 1. Received: num_shards={num_shards}")
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1. Received: workers={workers}")
    if encoding not in ENCODINGS:
        raise ConfigError(f"--encoding must be one of {ENCODINGS}. Received: encoding={encoding!r}")
    if num_tasks < 1:
        raise ConfigError(f"--num_tasks must be >= 1. Received: num_tasks={num_tasks}")
    if not 0 <= task_index < num_tasks:
        raise ConfigError(f"--task_index must be in [0, --num_tasks={num_tasks}). Received: task_index={task_index}")


def _output_splits(src: Source, split: str | None, kind: str) -> dict[str, str]:
    """Maps output split name -> source split name."""
    if split is None:
        if src.named_splits:
            return {s: s for s in src.splits}
        return {"test" if kind == "ood" else "train": next(iter(src.splits))}
    if split in src.splits:
        return {split: split}
    if len(src.splits) == 1:
        return {split: next(iter(src.splits))}
    raise ConfigError(f"--split={split!r} is not a split of {src.spec}; it has {sorted(src.splits)}")


def _shard_items(split_src: SplitSource, indices, shape, labelled: bool, num_classes: int,
                 image_size, resize, channels) -> Iterator[tuple]:
    for index, image, label in split_src.read(indices):
        out = prepare_image(image, image_size, resize, channels)
        if out.shape != shape:
            hint = "pass --image_size (and --resize)" if out.shape[:2] != shape[:2] else "pass --channels"
            raise DataError(f"{split_src.describe(index)}: image shape {out.shape} differs from the first "
                            f"image's {shape}; {hint} to make them equal")
        if not labelled:
            label = UNLABELLED
        elif not 0 <= label < num_classes:
            raise DataError(f"{split_src.describe(index)}: label {label} out of range [0, {num_classes})")
        yield out, label, index


_WORKER_SOURCES: dict[tuple, Source] = {}


def _shard_job(job: dict) -> dict:
    """Writes one shard in a worker process.

    Sources hold open files and closures, so each worker opens its own, once
    (a cifar or npz source is read into memory when opened).
    """
    key = (job["spec"], job["images_key"], job["labels_key"])
    if key not in _WORKER_SOURCES:
        _WORKER_SOURCES[key] = open_source(job["spec"], images_key=job["images_key"], labels_key=job["labels_key"])
    src = _WORKER_SOURCES[key]
    split_src = src.splits[job["source_split"]]
    items = _shard_items(split_src, job["indices"], job["shape"], job["labelled"], job["num_classes"],
                         job["image_size"], job["resize"], job["channels"])
    return write_shard(job["directory"], job["split"], job["shard"], job["num_shards"], items,
                       job["shape"], job["encoding"])


def convert(source: str, out_dir: str, *, kind: str = "real", split: str | None = None,
            image_size: int | None = None, resize: str = "resize", channels: int | None = None,
            limit: int | None = None, seed: int = 0, num_shards: int = 1, workers: int = 1,
            encoding: str = DEFAULT_ENCODING, overwrite: bool = False, images_key: str | None = None,
            labels_key: str | None = None, allow_unlabelled: bool = False, command: str | None = None,
            show_progress: bool = True, task_index: int = 0, num_tasks: int = 1) -> Manifest | TaskPart:
    """Converts `source` into the kood dataset directory `out_dir` (or, with `num_tasks` > 1, one part of it).

    Args:
        source: a SRC string, see `kood.sources.open_source`.
        out_dir: output directory; replaced only with `overwrite` (an incomplete one always).
        kind: `real`, `synthetic`, `outlier` or `ood`. Outlier and OOD sets are written
            unlabelled (label -1, num_classes 0) whatever the source holds.
        split: output split name. For a single-split source it names the output split
            (default: the source's own name, else `test` for kind=ood and `train` otherwise);
            for a multi-split source (cifar train/test) it selects one split (default: all).
        image_size: square output side; None keeps the source size (all images must agree).
        resize: `resize` or `center_crop` (see `prepare_image`).
        channels: 1 or 3 to convert; None keeps the source's channels.
        limit: random subset of at most `limit` images per split (drawn with `seed`, kept in source order).
        seed: seed of the subset.
        num_shards: shards of the largest split; smaller splits get proportionally fewer (>= 1).
        workers: processes writing shards in parallel (each reopens the source).
        encoding: record image encoding, `png` or `raw`.
        overwrite: replace an existing complete dataset.
        images_key, labels_key: npz arrays to use.
        allow_unlabelled: write an unlabelled real/synthetic set (for pseudo-labelling later).
        command: recorded in the manifest (default: this process's command line).
        show_progress: print a progress line to stderr.
        task_index, num_tasks: fan the conversion out over `num_tasks` independent runs (machines,
            array jobs): this run writes only shards `kood.fanout.task_shards(.., task_index, num_tasks)`
            of each split into `out_dir/tasks/`; `kood.fanout.merge_tasks(out_dir)` then makes the
            dataset, equal to a single run's. Needs `num_shards >= num_tasks`.

    Returns:
        The written `Manifest`, or with `num_tasks` > 1 this task's `kood.fanout.TaskPart`.

    Example:
        m = convert("npz:digits.npz", "data/digits", image_size=32, channels=3, num_shards=2)
    """
    _check_args(kind, image_size, resize, channels, limit, num_shards, workers, encoding, task_index, num_tasks)
    check_out_dir(out_dir, overwrite)
    src = open_source(source, images_key=images_key, labels_key=labels_key)
    for note in src.notes:
        print(f"note: {note}", file=sys.stderr)
    splits = _output_splits(src, split, kind)
    labelled = src.labelled and kind not in UNLABELLED_KINDS
    if kind not in UNLABELLED_KINDS and not src.labelled and not allow_unlabelled:
        raise DataError(f"{source}: has no labels, but kind={kind!r} needs them. For a held-out OOD test set "
                        f"pass --kind=ood; convert auxiliary outliers with data_prep.outliers; label "
                        f"synthetic images with data_prep.synthetic --pseudo_label_model")
    num_classes = src.num_classes if labelled else 0

    rng = np.random.default_rng(seed)
    selected = {}
    for out_split, src_split in splits.items():
        count = src.splits[src_split].count
        if count == 0:
            raise DataError(f"{source}: split {src_split!r} has no images; the dataset would be empty")
        if limit is not None and limit < count:
            selected[out_split] = np.sort(rng.choice(count, size=limit, replace=False))
        else:
            selected[out_split] = np.arange(count)

    first_split = next(iter(splits))
    first_src = src.splits[splits[first_split]]
    _, first_image, _ = next(iter(first_src.read(selected[first_split][:1])))
    shape = prepare_image(first_image, image_size, resize, channels).shape

    largest = max(len(ix) for ix in selected.values())
    if num_shards > largest:
        print(f"note: --num_shards={num_shards} is more than the {largest} images of the largest split: writing "
              f"{largest} shards of one image each", file=sys.stderr)
    jobs, plan = [], {}
    for out_split, indices in selected.items():
        n_shards = max(1, min(len(indices), round(num_shards * len(indices) / largest)))
        plan[out_split] = {"count": len(indices), "num_shards": n_shards}
        for shard, block in enumerate(np.array_split(indices, n_shards)):
            jobs.append(dict(spec=source, images_key=images_key, labels_key=labels_key,
                             source_split=splits[out_split], indices=block.tolist(), shape=shape,
                             labelled=labelled, num_classes=num_classes, image_size=image_size,
                             resize=resize, channels=channels, directory=out_dir, split=out_split,
                             shard=shard, num_shards=n_shards, encoding=encoding))

    if num_tasks > 1:
        most = max(p["num_shards"] for p in plan.values())
        if num_tasks > most:
            raise ConfigError(f"--num_tasks={num_tasks} exceeds the {most} shard(s) of the largest split; each task "
                              f"writes whole shards, so pass --num_shards >= --num_tasks. "
                              f"Received: num_tasks={num_tasks}, num_shards={num_shards}")
        jobs = [j for j in jobs if j["shard"] in task_shards(j["num_shards"], task_index, num_tasks)]
        write_dir, task_lock = start_task(out_dir, task_index, num_tasks, overwrite)
        for job in jobs:
            job["directory"] = write_dir
    else:
        writer = DatasetWriter(out_dir, kind=kind, image_shape=shape, num_classes=num_classes,
                               class_names=src.class_names if labelled else None, encoding=encoding,
                               overwrite=overwrite)
        write_dir = out_dir
    total = sum(len(j["indices"]) for j in jobs)
    bar = Progress("convert", total=total) if show_progress else None
    infos: dict[str, list[dict]] = {s: [] for s in selected}
    if workers == 1:
        for job in jobs:
            split_src = src.splits[job["source_split"]]
            items = _shard_items(split_src, job["indices"], shape, labelled, num_classes,
                                 image_size, resize, channels)
            infos[job["split"]].append(write_shard(write_dir, job["split"], job["shard"], job["num_shards"],
                                                   items, shape, encoding, bar))
    else:
        # spawn, not fork: the parent has TensorFlow's threads running, which fork does not copy safely
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
            futures = {pool.submit(_shard_job, job): job for job in jobs}
            for fut in concurrent.futures.as_completed(futures):
                info = fut.result()
                infos[futures[fut]["split"]].append(info)
                if bar is not None:
                    bar.update(info["count"])
    if bar is not None:
        bar.__exit__()
    extra = {"conversion": {
        "splits": {out: src_split for out, src_split in splits.items()}, "image_size": image_size,
        "resize": resize if image_size else None, "channels": channels, "limit": limit,
        "seed": seed if limit else None, "source_labelled": src.labelled,
        "labels_dropped": src.labelled and not labelled}}
    if num_tasks > 1:
        part = TaskPart(
            task_index=task_index, num_tasks=num_tasks, kind=kind, image_shape=list(shape),
            num_classes=num_classes, class_names=class_names_for(src.class_names if labelled else None, num_classes),
            encoding=encoding, source=source, command=command if command is not None else command_line(), plan=plan,
            shards={s: sorted(shard_infos, key=lambda i: i["file"]) for s, shard_infos in infos.items()},
            extra=extra)
        return finish_task(part, out_dir, task_lock)
    for out_split, shard_infos in infos.items():
        writer.add_split(out_split, shard_infos)
    return writer.finish(source=source, command=command, extra=extra)


def convert_and_pseudo_label(source: str, out_dir: str, model_path: str, *, min_confidence: float = 0.0,
                             batch_size: int = 256, overwrite: bool = False, command: str | None = None,
                             **convert_kwargs) -> Manifest:
    """Converts an unlabelled source to a temporary sibling dir, then labels it with `model_path`.

    The output is kind=synthetic with labels = the model's argmax and `confidence`
    = its max softmax probability (see `kood.pseudo_label.pseudo_label`). The
    temporary directory is removed whether or not labelling succeeds.

    Args:
        source: an unlabelled (or labelled, whose labels are replaced) SRC string.
        out_dir: output directory.
        model_path: trained kood classifier (`.keras` file or model dir with `best.keras`).
        min_confidence: drop images whose confidence is below this, in [0, 1].
        batch_size: inference batch size.
        overwrite: replace an existing complete dataset at `out_dir`.
        command: recorded in the manifest.
        **convert_kwargs: passed to `convert` (image_size, limit, num_shards, ...).

    Example:
        convert_and_pseudo_label("folder:gan_samples", "data/syn", "runs/ce", min_confidence=0.9)
    """
    from kood.pseudo_label import load_model

    if not 0.0 <= min_confidence <= 1.0:
        raise ConfigError(f"--min_confidence must be in [0, 1]. Received: min_confidence={min_confidence}")
    if convert_kwargs.get("num_tasks", 1) != 1:
        raise ConfigError("--num_tasks > 1 is not supported with --pseudo_label_model (labelling runs on the "
                          f"whole converted set); use one task. Received: num_tasks={convert_kwargs['num_tasks']}")
    if not os.path.exists(model_path):
        raise ConfigError(f"--pseudo_label_model={model_path}: no such file or directory")
    check_out_dir(out_dir, overwrite)
    model = load_model(model_path)  # before the conversion: a bad model or image size fails fast
    size, channels = convert_kwargs.get("image_size"), convert_kwargs.get("channels")
    _check_model_input(model, (size, size, channels), source, model_path, size, channels)
    with locked_output(out_dir, "--out"):  # before the conversion's work: a busy --out is refused up front
        return _convert_and_label(source, out_dir, model_path, model, min_confidence, batch_size, overwrite,
                                  command, size, channels, convert_kwargs)


def _convert_and_label(source, out_dir, model_path, model, min_confidence, batch_size, overwrite, command, size,
                       channels, convert_kwargs) -> Manifest:
    """`convert_and_pseudo_label`'s work, with `out_dir` locked."""
    from kood.pseudo_label import pseudo_label

    parent = os.path.dirname(os.path.abspath(out_dir))
    prefix = f".{os.path.basename(os.path.abspath(out_dir))}.unlabelled."
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    tmp_lock = WriteLock(tmp)  # held until the temporary set is removed: marks it as in use
    remove_abandoned(parent, prefix, keep=tmp, what="a temporary set")
    try:
        unlabelled = convert(source, tmp, kind="synthetic", allow_unlabelled=True, overwrite=True,
                             command=command, **convert_kwargs)
        _check_model_input(model, unlabelled.image_shape, source, model_path, size, channels)
        pseudo_label(tmp, out_dir, model_path, min_confidence=min_confidence, batch_size=batch_size,
                     overwrite=overwrite, command=command, model=model, name=f"--source={source}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp_lock.release()
    # pseudo_label records the (now removed) temporary dir as its source; point at the real one
    manifest = read_manifest(out_dir)
    manifest.source = source
    manifest.extra = {"pseudo_label": {k: v for k, v in manifest.extra.items()
                                       if k not in ("source_dir", "source_kind")},
                      "conversion": unlabelled.extra["conversion"]}
    write_manifest(out_dir, manifest)
    return manifest


def _check_model_input(model, shape, source: str, model_path: str, image_size, channels) -> None:
    """Names the user's flags (not the temporary dir) when the converted images do not fit the model."""
    from kood.pseudo_label import fits_input

    if not fits_input(model, shape):
        shown = "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"
        raise DataError(f"--source={source} converts to images of shape {shown}, but the model "
                        f"--pseudo_label_model={model_path} takes {tuple(model.input_shape[1:])}; pass --image_size "
                        f"and --channels to match it. Received: image_size={image_size}, channels={channels}")
