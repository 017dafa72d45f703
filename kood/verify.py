"""Full re-read check of a kood dataset directory.

Checks, for every split and shard listed in the manifest: the file exists,
its sha256 matches, every record reads (TFRecord CRCs catch truncation and
flipped bytes, with the record index), parses, its image decodes to the
manifest's shape, its label is in [0, num_classes) (or -1 when num_classes
is 0), and the record count matches.

Example:
    report = verify_dataset("data/cifar10")
    if not report.ok: print("\\n".join(report.problems))
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import sys
from typing import Iterable

import numpy as np

from kood.errors import DataError
from kood.manifest import read_manifest
from kood.progress import Progress
from kood.records import UNLABELLED, parse_example_numpy
from kood.writer import sha256_file


@dataclasses.dataclass
class VerifyReport:
    """What `verify_dataset` found: `problems` (one line each, naming file and record) and counts read."""
    directory: str
    problems: list[str] = dataclasses.field(default_factory=list)
    records: dict[str, int] = dataclasses.field(default_factory=dict)  # split -> records read

    @property
    def ok(self) -> bool:
        return not self.problems


def _decode(data: bytes, shape: tuple[int, int, int], encoding: str) -> np.ndarray:
    if encoding == "raw":
        if len(data) != int(np.prod(shape)):
            raise ValueError(f"{len(data)} bytes, expected {int(np.prod(shape))} for shape {shape}")
        return np.frombuffer(data, np.uint8).reshape(shape)
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if im.format != "PNG":
            raise ValueError(f"image is {im.format}, expected PNG")
        arr = np.asarray(im)
    arr = arr[..., None] if arr.ndim == 2 else arr
    if arr.shape != shape or arr.dtype != np.uint8:
        raise ValueError(f"decoded {arr.dtype} shape {arr.shape}, expected uint8 {shape}")
    return arr


def _check_shard(path: str, expected: dict, shape, encoding: str, num_classes: int, problems: list[str],
                 bar: Progress | None, max_problems: int) -> int:
    """Reads one shard record by record; appends problems; returns the number of records read."""
    import tensorflow as tf

    n = 0
    it = iter(tf.data.TFRecordDataset(path))
    while len(problems) < max_problems:
        try:
            serialized = next(it)
        except StopIteration:
            break
        except tf.errors.OpError as e:  # DataLossError: truncated record or CRC mismatch
            problems.append(f"{path}: record {n}: unreadable ({type(e).__name__}: {e.message.splitlines()[0]})")
            break
        try:
            rec = parse_example_numpy(serialized.numpy())
        except Exception as e:  # noqa: BLE001 - protobuf raises DecodeError or KeyError for a bad example
            problems.append(f"{path}: record {n}: not a kood example ({type(e).__name__}: {e})")
        else:
            try:
                _decode(rec["image"], shape, encoding)
            except Exception as e:  # noqa: BLE001 - PIL raises many types on corrupt data; all mean "bad image"
                problems.append(f"{path}: record {n} (source index {rec['index']}): image does not decode: {e}")
            label = rec["label"]
            if num_classes == 0 and label != UNLABELLED:
                problems.append(f"{path}: record {n} (source index {rec['index']}): label {label}, "
                                f"expected -1 in an unlabelled set")
            elif num_classes > 0 and not 0 <= label < num_classes:
                problems.append(f"{path}: record {n} (source index {rec['index']}): label {label} "
                                f"out of range [0, {num_classes})")
        n += 1
        if bar is not None:
            bar.update(1)
    if n != int(expected["count"]) and len(problems) < max_problems:
        problems.append(f"{path}: {n} records, manifest says {expected['count']}")
    return n


def verify_dataset(directory: str, *, show_progress: bool = True, max_problems: int = 100) -> VerifyReport:
    """Re-reads every record of `directory` and reports every inconsistency found.

    Args:
        directory: a kood dataset directory.
        show_progress: print a progress line to stderr.
        max_problems: stop after this many problems (a badly broken set would print forever).

    Returns:
        A `VerifyReport`; `ok` is True only if everything holds.

    Example:
        assert verify_dataset("data/svhn_test").ok
    """
    report = VerifyReport(directory)
    try:
        manifest = read_manifest(directory)
    except DataError as e:
        report.problems.append(str(e))
        return report
    shape, encoding = manifest.shape, manifest.encoding
    total = sum(int(s["count"]) for s in manifest.splits.values())
    bar = Progress("verify", total=total) if show_progress else None
    for split, info in manifest.splits.items():
        read = 0
        for shard in info["shards"]:
            if len(report.problems) >= max_problems:
                break
            path = os.path.join(directory, shard["file"])
            if not os.path.isfile(path):
                report.problems.append(f"{path}: shard listed in the manifest is missing")
                continue
            digest = sha256_file(path)
            if digest != shard["sha256"]:
                report.problems.append(f"{path}: sha256 {digest} does not match the manifest's {shard['sha256']}")
            read += _check_shard(path, shard, shape, encoding, manifest.num_classes, report.problems, bar,
                                 max_problems)
        report.records[split] = read
    if len(report.problems) >= max_problems:
        report.problems.append(f"stopped after {max_problems} problems")
    if bar is not None:
        bar.__exit__()
    return report


# Messages of kood.data's per-record assertions (a record that disagrees with the manifest).
RECORD_CHECKS = ("label out of range [0, ", "raw image record of the wrong size")


def is_read_error(error: BaseException) -> bool:
    """True for the TensorFlow errors a damaged dataset raises while a pipeline reads it."""
    import tensorflow as tf

    return isinstance(error, tf.errors.DataLossError) or (
        isinstance(error, tf.errors.FailedPreconditionError) and "expected to contain" in str(error)) or (
        isinstance(error, tf.errors.InvalidArgumentError) and any(check in str(error) for check in RECORD_CHECKS))


def explain_read_error(error: BaseException, directories: Iterable[str | None]) -> DataError:
    """A DataError naming the damaged file behind a TF read error (whose message names none).

    Only called after a read failed: re-verifies each of `directories` until one shows a problem.

    Example:
        except tf.errors.DataLossError as e:
            raise explain_read_error(e, [id_dir, ood_dir]) from e
    """
    text = str(getattr(error, "message", error))
    # TF's own words ("corrupted record at 499156") sit inside graph/op decorations: keep just them.
    found = re.search(r"(corrupted|truncated) record at \d+|expected to contain \d+ elements but contained only "
                      r"\d+ elements|[^.\n]*less bytes than requested|label out of range \[0, \d+\)|raw image "
                      r"record of the wrong size", text)
    tf_message = found.group(0).strip() if found else (text.strip().splitlines() or ["?"])[0]
    directories = list(dict.fromkeys(d for d in directories if d))
    for directory in directories:
        print(f"reading the data failed ({tf_message}); checking {directory} ...", file=sys.stderr)
        report = verify_dataset(directory, show_progress=False, max_problems=3)
        if not report.ok:
            return DataError(f"{report.problems[0]} (`python -m data_prep.verify {directory}` lists every problem; "
                             f"reconvert the set)")
    return DataError(f"reading the data failed: {tf_message}. None of {directories} shows a damaged file now; "
                     f"check them with `python -m data_prep.verify DIR`")
