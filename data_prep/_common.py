"""Flags shared by the conversion CLIs (data_prep.real, .synthetic, .outliers) and the call they make."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import sys
from typing import Iterator

from absl import flags

from kood.writer import DEFAULT_ENCODING, removed_if_left_empty

FLAGS = flags.FLAGS


def define_conversion_flags(default_kind: str, kinds: list[str]) -> None:
    """Defines the flags every conversion CLI takes; `default_kind` differs per CLI."""
    flags.DEFINE_string(
        "source", None,
        "What to convert, FORM:ARG. tfds:NAME[:SPLIT] (TensorFlow Datasets, data must be local); "
        "cifar:DIR (python-pickle CIFAR-10 or CIFAR-100 dir); folder:DIR (class subfolders = labelled, "
        "flat = unlabelled, SPLIT/CLASS subfolders such as train/cat/ and test/cat/ = one split each); "
        "npz:FILE (--images_key/--labels_key, default x/y or images/labels, or "
        "x_train/y_train/x_test/...); npy:FILE (unlabelled N x H x W x C uint8, memory-mapped); "
        "mat:FILE (SVHN *_32x32.mat).", required=True)
    flags.DEFINE_string("out", None, "Output dataset directory.", required=True)
    unlabelled = [k for k in kinds if k in ("outlier", "ood")]
    flags.DEFINE_enum("kind", default_kind, kinds, "Dataset kind" + (
        f"; {' and '.join(unlabelled)} sets are written unlabelled (label -1)." if unlabelled else "."))
    flags.DEFINE_string("split", None,
                        "Output split name for a single-split source (default: the source's own, else "
                        "'test' for --kind=ood and 'train' otherwise); selects one split of a "
                        "multi-split source such as cifar (default: all of them).")
    flags.DEFINE_integer("image_size", None, "Square output side in pixels (default: keep the source size).")
    flags.DEFINE_enum("resize", "resize", ["resize", "center_crop"],
                      "With --image_size: 'resize' (bilinear, ignores aspect ratio) or 'center_crop' "
                      "(shorter side to --image_size, then the central square).")
    flags.DEFINE_enum("channels", None, ["1", "3"],
                      "Convert to 1 (luminance) or 3 (gray repeated) channels (default: keep).")
    flags.DEFINE_integer("limit", None, "Keep a random subset of at most this many images per split.")
    flags.DEFINE_integer("seed", 0, "Seed of the --limit subset.")
    flags.DEFINE_integer("num_shards", 1, "Shards of the largest split (smaller splits get proportionally fewer).")
    flags.DEFINE_integer("workers", 1, "Processes writing shards in parallel.")
    flags.DEFINE_enum("encoding", DEFAULT_ENCODING, ["png", "raw"],
                      "Record image encoding (lossless): png (smaller) or raw (uint8 bytes).")
    flags.DEFINE_string("images_key", None, "npz: name of the images array.")
    flags.DEFINE_string("labels_key", None, "npz: name of the labels array.")
    flags.DEFINE_boolean("overwrite", False, "Replace an existing complete dataset at --out.")
    flags.DEFINE_integer("task_index", 0,
                         "With --num_tasks: which task this run is, in [0, --num_tasks) (e.g. "
                         "$SLURM_ARRAY_TASK_ID).")
    flags.DEFINE_integer("num_tasks", 1,
                         "Fan the conversion out over this many independent runs (machines, array jobs), "
                         "all with the same flags but --task_index. Each writes its own contiguous run of "
                         "shards into OUT/tasks/; then `python -m data_prep.merge OUT` makes the dataset "
                         "(equal to a single run's). Needs --num_shards >= --num_tasks.")


def conversion_kwargs() -> dict:
    """The `kood.convert.convert` keyword arguments from the parsed flags."""
    return dict(kind=FLAGS.kind, split=FLAGS.split, image_size=FLAGS.image_size, resize=FLAGS.resize,
                channels=int(FLAGS.channels) if FLAGS.channels else None, limit=FLAGS.limit, seed=FLAGS.seed,
                num_shards=FLAGS.num_shards, workers=FLAGS.workers, encoding=FLAGS.encoding,
                overwrite=FLAGS.overwrite, images_key=FLAGS.images_key, labels_key=FLAGS.labels_key,
                command=command_line(), task_index=FLAGS.task_index, num_tasks=FLAGS.num_tasks)


def command_line() -> str:
    return "python -m " + " ".join(shlex.quote(a) for a in [_module_name()] + sys.argv[1:])


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else sys.argv[0]


def report(manifest, out: str) -> None:
    """Prints what was written: the dataset, or one task's part of it (`kood.fanout.TaskPart`)."""
    if hasattr(manifest, "task_index"):
        counts = ", ".join(f"{name}={n}" for name, n in manifest.counts().items())
        print(f"{out}: task {manifest.task_index} of {manifest.num_tasks} done ({counts}); when all "
              f"{manifest.num_tasks} are: python -m data_prep.merge {shlex.quote(out)}")
        return
    splits = ", ".join(f"{name}={info['count']}" for name, info in manifest.splits.items())
    print(f"{out}: kind={manifest.kind} image_shape={manifest.image_shape} "
          f"num_classes={manifest.num_classes} encoding={manifest.encoding} {splits}")


def written_before(out: str) -> bool:
    """True, after saying so and printing what it holds, if `out` holds the complete dataset that this
    same command wrote: a rerun after a kill that came after the manifest (e.g. a scheduler's retry)
    succeeds without redoing the work. `--overwrite` converts again."""
    from kood.errors import DataError
    from kood.manifest import MANIFEST, read_manifest

    if FLAGS.overwrite or not os.path.isfile(os.path.join(out, MANIFEST)):
        return False
    try:
        manifest = read_manifest(out)
    except DataError:
        return False  # the conversion reports the damaged manifest
    same = manifest.command == command_line()
    if not same and not _merged_task(manifest):
        return False
    changed = _changed_since(manifest.created)
    if changed:
        print(f"note: {out} was written by this command, but {changed} changed after that ({manifest.created}); "
              f"converting again needs --overwrite", file=sys.stderr)
        return False
    if same:
        print(f"note: {out} already holds the dataset this command writes (its manifest.json records the same "
              f"command); nothing to do (--overwrite converts again)", file=sys.stderr)
    else:
        print(f"note: {out} already holds the dataset this task is part of (merged from "
              f"{manifest.extra['fanout']['num_tasks']} tasks of the same command); nothing to do (--overwrite on "
              f"every task, then data_prep.merge, converts again)", file=sys.stderr)
    report(manifest, out)
    return True


def _changed_since(created: str) -> str | None:
    """The first input path (--source, --real, --pseudo_label_model; files and everything in directories,
    but of a model dir only the best.keras it labels with) modified after the ISO time `created`, or None.
    Modified: its mtime or its ctime (a copy keeping an older mtime, cp -p / rsync -a, changes the ctime)."""
    import datetime

    try:
        since = datetime.datetime.fromisoformat(created).timestamp()
    except ValueError:
        return "the source (the manifest records no valid 'created' time)"
    paths = []
    for name in ("source", "real", "pseudo_label_model"):
        value = getattr(FLAGS, name, None)
        if value and name == "source":
            form, _, value = value.partition(":")
            value = None if form == "tfds" else value
        if value:
            value = os.path.expanduser(value)
            if name == "pseudo_label_model" and os.path.isdir(value):
                value = os.path.join(value, "best.keras")  # not the run's logs/ or an export written into it
            paths.append(value)
    for path in paths:
        for p in _path_and_below(path):
            with contextlib.suppress(OSError):
                st = os.stat(p)
                if max(st.st_mtime, st.st_ctime) > since:
                    return p
    return None


def _path_and_below(path: str) -> Iterator[str]:
    yield path
    for root, dirs, files in os.walk(path):  # nothing for a file
        yield from (os.path.join(root, name) for name in dirs + files)


def _merged_task(manifest) -> bool:
    """True if this command is one task of the fanned-out conversion that was merged into `manifest`."""
    fanout = manifest.extra.get("fanout")
    num_tasks = getattr(FLAGS, "num_tasks", 1)  # only the converting CLIs fan out
    return (bool(fanout) and num_tasks > 1 and fanout.get("num_tasks") == num_tasks
            and _without_task_index(manifest.command) == _without_task_index(command_line()))


def _without_task_index(command: str) -> str:
    return re.sub(r" --task_index(=| )\S+", "", command)


@contextlib.contextmanager
def cli_errors(out: str | None = None) -> Iterator[None]:
    """Bad input exits with one `error: ...` line and Ctrl-C with one line, without a traceback.

    With `out`: an output directory the block created and left empty is removed on failure.
    """
    from kood.errors import ConfigError, DataError, interruption

    try:
        with removed_if_left_empty(out) if out else contextlib.nullcontext():
            yield
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None  # as the kood.* commands
    except KeyboardInterrupt as e:
        how, code = interruption(e)
        newline = "\n" if sys.stderr.isatty() else ""  # leave the progress line a terminal shows
        print(f"{newline}interrupted ({how}): nothing was marked complete; rerun the same command", file=sys.stderr)
        raise SystemExit(code) from None


def convert_main(argv) -> None:
    """`main` of the plain conversion CLIs (real, outliers): convert `--source` into `--out`."""
    from absl import app

    from kood.convert import convert

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if written_before(FLAGS.out):
        return
    with cli_errors(FLAGS.out):
        manifest = convert(FLAGS.source, FLAGS.out, **conversion_kwargs())
    report(manifest, FLAGS.out)
