"""Atomic, sharded writing of a kood dataset directory.

Shards are written under temporary names and renamed when complete; the
manifest is written last. A directory without `manifest.json` is never a
complete dataset, so an interrupted run cannot leave output that looks done.
A writer holds an exclusive lock on its directory (`WriteLock`), so a second
conversion into the same directory is refused instead of mixing shards.

Example:
    w = DatasetWriter(out, kind="real", image_shape=(32, 32, 3), num_classes=10)
    w.write_split("train", ((img, label, i) for i, (img, label) in ...), num_shards=4)
    w.finish(source="npz:x.npz")
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import glob
import hashlib
import os
import re
import shlex
import shutil
import socket
import sys
import weakref
from typing import Iterable, Iterator

import numpy as np
import tensorflow as tf

from kood.errors import DataError, check_output_dir
from kood.manifest import KINDS, MANIFEST, TASKS, Manifest, shard_name, write_manifest
from kood.progress import Progress
from kood.records import ENCODINGS, encode_example

# raw, by bench/bench_encoding.py (docs/data_format.md): at 32x32x3 raw decodes 1.5-4x faster in tf.data
# and encodes for free, PNG saves only ~20-45%; lossless either way. png stays available per dataset.
DEFAULT_ENCODING = "raw"

# (image uint8 [H,W,C], label, index[, confidence])
Item = tuple

LOCK_FILE = ".kood-writing.lock"
# what remove_stale_shards may delete: kood's own shard names (manifest.shard_name) and their temporary files
_SHARD_FILE = re.compile(r"^\.?.+-\d{5}-of-\d{5}\.tfrecord(\.tmp)?$")


class WriteLock:
    """An exclusive lock on a dataset directory while this process writes it (`LOCK_FILE` inside it).

    Two conversions into one directory would write shards under the same names and the one that
    finishes last would write a manifest over records the other replaced. The lock is an OS file lock
    (flock), so it goes away with its process, even on SIGKILL, and a killed run never blocks the
    next one. It is re-entrant within a process and released by `release()`, when the object is
    garbage-collected, or at exit; releasing removes the lock file. kood.train and kood.bench lock
    their output directories the same way, with their own `activity` and `advice` in the error.

    Raises:
        DataError: another process holds the lock, naming its pid and host.

    Example:
        lock = WriteLock("data/cifar10")
        ...  # write shards, then the manifest
        lock.release()
    """

    _held: dict[str, list] = {}  # realpath -> [open lock file, holders in this process]

    def __init__(self, directory: str, activity: str = "writing a dataset into this directory",
                 advice: str = "wait for it to finish or stop it, or write to another --out. Two writers into "
                               "one directory would mix their shards"):
        self.path = os.path.join(os.path.realpath(directory), LOCK_FILE)
        if self.path in self._held:
            self._held[self.path][1] += 1
        else:
            self._held[self.path] = [_acquire(self.path, directory, activity, advice), 1]
        self._release = weakref.finalize(self, WriteLock._drop, self.path)

    def release(self) -> None:
        self._release()

    @classmethod
    def release_all_in(cls, directory: str) -> None:
        """Releases this process's lock on `directory` whatever holds it (a failed run about to remove it)."""
        path = os.path.join(os.path.realpath(directory), LOCK_FILE)
        if path in cls._held:
            cls._held[path][1] = 1
            cls._drop(path)

    @classmethod
    def _drop(cls, path: str) -> None:
        entry = cls._held.get(path)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del cls._held[path]
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)  # while still locked: see _acquire
            entry[0].close()


def _acquire(path: str, directory: str, activity: str, advice: str):
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read().strip() or "another process"
            f.close()
            raise DataError(f"{directory}: {owner} is {activity} ({LOCK_FILE}); {advice}") from None
        # A holder that finished removed the file after we opened it: our lock is on a dead inode; retry.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                f.seek(0)
                f.truncate()
                f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
                f.flush()
                return f
        f.close()


def abandoned(parent: str, prefix: str, keep: str | None = None) -> Iterator[str]:
    """Yields the directories `parent/PREFIX*` other than `keep` that no process holds (`WriteLock`): the
    temporary directories of killed runs. Each is locked by this process while the caller deals with it."""
    for name in sorted(os.listdir(parent)):
        path = os.path.join(parent, name)
        if not name.startswith(prefix) or not os.path.isdir(path) or (keep and os.path.samefile(path, keep)):
            continue
        try:
            lock = WriteLock(path)
        except DataError:
            continue  # another run's, in use
        try:
            yield path
        finally:
            lock.release()


def remove_abandoned(parent: str, prefix: str, keep: str, what: str) -> None:
    """Removes the `abandoned` directories `parent/PREFIX*`; `what` names them in the note (e.g. "a temporary set")."""
    for path in abandoned(parent, prefix, keep):
        print(f"note: removing {path}, {what} left by an interrupted run", file=sys.stderr)
        shutil.rmtree(path, ignore_errors=True)


def _refuse_running_tasks(directory: str) -> None:
    """DataError if a fanned-out task (`kood.fanout`, locking only its own DIR/tasks/ part) is writing into `directory`."""
    tasks = os.path.join(directory, TASKS)
    for name in sorted(os.listdir(tasks)) if os.path.isdir(tasks) else []:
        part = os.path.join(tasks, name)
        if os.path.isfile(os.path.join(part, LOCK_FILE)):
            try:
                WriteLock(part).release()
            except DataError:
                with open(os.path.join(part, LOCK_FILE)) as f:
                    owner = f.read().strip() or "another process"
                message = (f"{directory}: a task of a fanned-out conversion ({owner}) is writing into {part}; wait "
                           f"for the tasks and merge them (data_prep.merge), or write to another --out")
                raise DataError(message) from None


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_shard(directory: str, split: str, shard: int, num_shards: int, items: Iterable[Item],
                image_shape: tuple[int, int, int], encoding: str, progress: Progress | None = None) -> dict:
    """Writes one shard atomically; returns its info plus pixel sums for mean/std.

    Safe to call from worker processes (returns plain Python data).
    """
    name = shard_name(split, shard, num_shards)
    final, tmp = os.path.join(directory, name), os.path.join(directory, f".{name}.tmp")
    count, total, total_sq = 0, np.zeros(image_shape[-1]), np.zeros(image_shape[-1])
    try:
        with tf.io.TFRecordWriter(tmp) as w:
            for item in items:
                image, label, index = item[0], item[1], item[2]
                confidence = item[3] if len(item) > 3 else 1.0
                if tuple(image.shape) != tuple(image_shape):
                    raise DataError(f"{split} image with source index {index}: shape {tuple(image.shape)} "
                                    f"differs from {tuple(image_shape)} (use --image_size to resize)")
                w.write(encode_example(image, label, index, encoding, confidence))
                pixels = image.reshape(-1, image_shape[-1]).astype(np.float64)
                total += pixels.sum(0)
                total_sq += (pixels ** 2).sum(0)
                count += 1
                if progress is not None:
                    progress.update(1)
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return {"file": name, "count": count, "sha256": sha256_file(final),
            "sum": total.tolist(), "sum_sq": total_sq.tolist()}


def command_line() -> str:
    """This process's command line, shell-quoted (what manifests record by default)."""
    return " ".join(shlex.quote(a) for a in sys.argv)


def class_names_for(class_names: list[str] | None, num_classes: int) -> list[str]:
    """The manifest's class names: the given ones, else "0", "1", ...; none for an unlabelled set."""
    if not num_classes:
        return []
    return list(class_names) if class_names else [str(i) for i in range(num_classes)]


def check_out_dir(directory: str, overwrite: bool) -> None:
    """Raises DataError if `directory` cannot be claimed (see `claim_directory`), before any slow work."""
    check_output_dir(directory, "--out")
    if not overwrite and os.path.exists(os.path.join(directory, MANIFEST)):
        raise DataError(f"{directory}: already holds a complete dataset; pass --overwrite to replace it")


def claim_directory(directory: str, overwrite: bool) -> None:
    """Creates `directory`; a file there, or an existing complete dataset unless `overwrite`, is an error.

    With `overwrite` the manifest goes first, so from here on the directory no
    longer looks complete. Tolerates a concurrent removal (fanned-out tasks).
    """
    check_out_dir(directory, overwrite)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(directory, MANIFEST))
    os.makedirs(directory, exist_ok=True)


@contextlib.contextmanager
def locked_output(directory: str, flag: str, **wording) -> Iterator[None]:
    """Holds the `WriteLock` of output directory `directory` (created if needed) for the block.

    kood.train, kood.bench and pseudo-labelling write under it: a second writer into the same directory
    is a DataError before anything is changed (`wording`: `WriteLock`'s `activity` and `advice`; `flag`
    names the directory's flag when it is a file). A directory the block created and left empty is
    removed on failure.
    """
    check_output_dir(directory, flag)
    with removed_if_left_empty(directory):
        os.makedirs(directory, exist_ok=True)
        lock = WriteLock(directory, **wording)
        try:
            yield
        finally:
            lock.release()


@contextlib.contextmanager
def removed_if_left_empty(directory: str) -> Iterator[None]:
    """On an exception in the block, removes `directory` (and its parents) if the block created it and it is empty.

    A failed run should not leave an empty output directory behind; a directory
    that existed before, or holds anything (user files, finished shards), stays.
    """
    created = []  # deepest first
    path = os.path.abspath(directory)
    while not os.path.exists(path):
        created.append(path)
        path = os.path.dirname(path)
    try:
        yield
    except BaseException:
        for path in created:
            WriteLock.release_all_in(path)
            with contextlib.suppress(OSError):  # not empty (or already gone): keep it and its parents
                os.rmdir(path)
        raise


def mean_std(count: int, total, total_sq, image_shape) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of `count` images from their pixel sums and sums of squares.

    Sums (not means) are what shards and task parts store, so any split of the
    work combines exactly.
    """
    pixels = count * image_shape[0] * image_shape[1]
    mean = np.asarray(total, np.float64) / pixels
    std = np.sqrt(np.maximum(np.asarray(total_sq, np.float64) / pixels - mean ** 2, 0.0))
    std = np.where(std < 1e-6, 1.0, std)  # a constant channel would divide by zero
    return [float(v) for v in mean], [float(v) for v in std]


def remove_stale_shards(directory: str, keep: set[str]) -> None:
    """Removes shards of earlier runs that are not in `keep`, and their temporary files (a killed run's).

    Only kood's shard names (`SPLIT-NNNNN-of-NNNNN.tfrecord`): other files, e.g. a user's own
    `*.tfrecord` in an existing output directory, stay.
    """
    for path in glob.glob(os.path.join(directory, "*.tfrecord")) + glob.glob(os.path.join(directory, ".*.tmp")):
        name = os.path.basename(path)
        if name not in keep and _SHARD_FILE.match(name):
            os.remove(path)


class DatasetWriter:
    """Writes splits as shards, then the manifest (see module docstring).

    Args:
        directory: output dataset directory (created if missing).
        kind: one of `real`, `synthetic`, `outlier`, `ood`.
        image_shape: `(H, W, C)` of every image.
        num_classes: number of classes (0 for unlabelled sets).
        class_names: optional names, `num_classes` long.
        encoding: `png` or `raw`.
        overwrite: replace an existing complete dataset. An incomplete one
            (no manifest) is always replaced.
    """

    def __init__(self, directory: str, *, kind: str, image_shape: tuple[int, int, int], num_classes: int,
                 class_names: list[str] | None = None, encoding: str = DEFAULT_ENCODING, overwrite: bool = False):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}. Received: kind={kind!r}")
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}. Received: encoding={encoding!r}")
        self.directory, self.kind, self.encoding = directory, kind, encoding
        self.image_shape = tuple(int(d) for d in image_shape)
        self.num_classes = int(num_classes)
        self.class_names = class_names_for(class_names, self.num_classes)
        self.splits: dict[str, dict] = {}
        self._sums: dict[str, tuple] = {}
        check_out_dir(directory, overwrite)
        os.makedirs(directory, exist_ok=True)
        self._lock = WriteLock(directory)  # before claiming: --overwrite must not remove a running writer's work
        _refuse_running_tasks(directory)
        claim_directory(directory, overwrite)

    def write_split(self, split: str, items: Iterable[Item], num_shards: int = 1, total: int | None = None,
                    show_progress: bool = True) -> None:
        """Writes `items` in contiguous blocks over `num_shards` shards (all in shard 0 if `total` is unknown)."""
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1. Received: num_shards={num_shards}")
        items = iter(items)
        bar = Progress(f"write {split}", total=total) if show_progress else None
        per_shard = None if total is None else -(-total // num_shards)
        infos = []
        for shard in range(num_shards):
            chunk = _take(items, per_shard) if per_shard is not None else items
            infos.append(write_shard(self.directory, split, shard, num_shards, chunk, self.image_shape,
                                     self.encoding, bar))
            if per_shard is None:  # unknown total: everything went to the first shard
                for rest in range(1, num_shards):
                    infos.append(write_shard(self.directory, split, rest, num_shards, iter(()),
                                             self.image_shape, self.encoding))
                break
        if bar is not None:
            bar.__exit__()
        self.add_split(split, infos)

    def add_split(self, split: str, shard_infos: list[dict]) -> None:
        """Registers shards written by `write_shard` (e.g. by worker processes)."""
        shard_infos = sorted(shard_infos, key=lambda s: s["file"])
        count = sum(s["count"] for s in shard_infos)
        if count == 0:
            raise DataError(f"{self.directory}: split {split!r} is empty (0 images)")
        self._sums[split] = (count, np.sum([s["sum"] for s in shard_infos], 0),
                             np.sum([s["sum_sq"] for s in shard_infos], 0))
        self.splits[split] = {"count": count, "shards": [
            {k: s[k] for k in ("file", "count", "sha256")} for s in shard_infos]}

    def finish(self, *, source: str = "", command: str | None = None, extra: dict | None = None,
               stats_split: str = "train") -> Manifest:
        """Writes the manifest last; removes stale shards from earlier runs."""
        if not self.splits:
            raise DataError(f"{self.directory}: nothing was written")
        stats = stats_split if stats_split in self._sums else next(iter(self._sums))
        mean, std = mean_std(*self._sums[stats], self.image_shape)
        manifest = Manifest(
            kind=self.kind, image_shape=list(self.image_shape), num_classes=self.num_classes,
            class_names=self.class_names, splits=self.splits,
            mean=mean, std=std, source=source,
            command=command if command is not None else command_line(),
            encoding=self.encoding, created=datetime.datetime.now(datetime.timezone.utc).isoformat(),
            extra=extra or {})
        remove_stale_shards(self.directory, {sh["file"] for sp in self.splits.values() for sh in sp["shards"]})
        write_manifest(self.directory, manifest)
        self._lock.release()
        return manifest


def _take(it: Iterator, n: int) -> Iterator:
    for _ in range(n):
        try:
            yield next(it)
        except StopIteration:
            return


def write_arrays(directory: str, splits: dict[str, tuple[np.ndarray, np.ndarray]], *, kind: str = "real",
                 class_names: list[str] | None = None, num_classes: int | None = None, num_shards: int = 1,
                 encoding: str = DEFAULT_ENCODING, overwrite: bool = False, source: str = "arrays",
                 extra: dict | None = None, show_progress: bool = False) -> Manifest:
    """Writes in-memory arrays `{split: (images uint8 [N,H,W,C], labels [N])}` as a dataset."""
    first = next(iter(splits.values()))[0]
    if num_classes is None:
        labels = np.concatenate([np.asarray(l) for _, l in splits.values()])
        num_classes = len(class_names) if class_names else (int(labels.max()) + 1 if (labels >= 0).any() else 0)
    w = DatasetWriter(directory, kind=kind, image_shape=first.shape[1:], num_classes=num_classes,
                      class_names=class_names, encoding=encoding, overwrite=overwrite)
    for split, (images, labels) in splits.items():
        w.write_split(split, ((images[i], int(labels[i]), i) for i in range(len(images))),
                      num_shards=num_shards, total=len(images), show_progress=show_progress)
    return w.finish(source=source, extra=extra)
