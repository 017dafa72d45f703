"""`manifest.json`: what a kood dataset directory holds. Written last, atomically."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import uuid
from typing import Any

from kood.errors import DataError, naming
from kood.records import ENCODINGS

FORMAT = "kood-tfrecord/1"
KINDS = ("real", "synthetic", "outlier", "ood")
ID_KINDS = ("real", "synthetic")  # kinds of labelled ID data (training, detector fitting); the others are unlabelled
MANIFEST = "manifest.json"
TASKS = "tasks"  # DIR/tasks/: per-task parts of a fanned-out conversion (kood.fanout), until merged


def shard_name(split: str, shard: int, num_shards: int) -> str:
    return f"{split}-{shard:05d}-of-{num_shards:05d}.tfrecord"


@dataclasses.dataclass
class Manifest:
    kind: str
    image_shape: list[int]
    num_classes: int
    class_names: list[str]
    splits: dict[str, dict[str, Any]]  # split -> {"count": n, "shards": [{"file", "count", "sha256"}]}
    mean: list[float]
    std: list[float]
    source: str = ""
    command: str = ""
    encoding: str = "png"
    created: str = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    format: str = FORMAT

    def split(self, name: str, path: str = "") -> dict[str, Any]:
        if name not in self.splits:
            raise DataError(f"{path or 'dataset'}: no split {name!r}; it has {sorted(self.splits)}")
        return self.splits[name]

    def shard_paths(self, directory: str, split: str) -> list[str]:
        return [os.path.join(directory, s["file"]) for s in self.split(split, directory)["shards"]]

    def count(self, split: str) -> int:
        return int(self.split(split)["count"])

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.image_shape)

    def validate(self, where: str) -> None:
        """Raises DataError naming `where` if a field is inconsistent."""
        def bad(msg: str):
            raise DataError(f"{where}: invalid manifest: {msg}")

        if self.format != FORMAT:
            bad(f"format {self.format!r}, expected {FORMAT!r}")
        if self.kind not in KINDS:
            bad(f"kind {self.kind!r} not in {KINDS}")
        if len(self.image_shape) != 3 or any(int(d) <= 0 for d in self.image_shape):
            bad(f"image_shape must be [H, W, C] > 0, got {self.image_shape}")
        if self.encoding not in ENCODINGS:
            bad(f"encoding {self.encoding!r} not in {ENCODINGS}")
        if self.num_classes < 0 or (self.class_names and len(self.class_names) != self.num_classes):
            bad(f"num_classes={self.num_classes} but {len(self.class_names)} class_names")
        c = self.image_shape[-1]
        if len(self.mean) != c or len(self.std) != c:
            bad(f"mean/std need {c} channels, got {len(self.mean)}/{len(self.std)}")
        if any(s <= 0 for s in self.std):
            bad(f"std must be > 0, got {self.std}")
        if not self.splits:
            bad("no splits")
        for name, split in self.splits.items():
            shards = split.get("shards", [])
            total = sum(int(s["count"]) for s in shards)
            if total != int(split.get("count", -1)):
                bad(f"split {name!r} count {split.get('count')} != sum of shard counts {total}")
            if total == 0:
                raise DataError(f"{where}: split {name!r} is empty (0 images)")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def read_manifest(directory: str) -> Manifest:
    """Reads and validates `directory/manifest.json`; DataError names what is wrong."""
    if not os.path.isdir(directory):
        what = "is a file, not a dataset directory" if os.path.exists(directory) else "dataset directory does not exist"
        raise DataError(f"{directory}: {what}")
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        if os.path.isdir(os.path.join(directory, TASKS)):
            raise DataError(f"{path}: no manifest.json, but {TASKS}/ holds parts of a conversion run with "
                            f"--num_tasks; when all tasks are done: python -m data_prep.merge {directory}")
        raise DataError(f"{path}: no manifest.json (not a kood dataset, or its conversion did not finish)")
    raw = read_json(path, "manifest")
    fields = {f.name for f in dataclasses.fields(Manifest)}
    unknown = set(raw) - fields
    missing = {f.name for f in dataclasses.fields(Manifest)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING} - set(raw)
    if unknown or missing:
        raise DataError(f"{path}: invalid manifest: unknown fields {sorted(unknown)}, missing fields {sorted(missing)}")
    manifest = Manifest(**raw)
    manifest.validate(path)
    return manifest


def write_manifest(directory: str, manifest: Manifest) -> str:
    """Validates and writes the manifest atomically (temp file + rename)."""
    path = os.path.join(directory, MANIFEST)
    manifest.validate(path)
    write_text_atomic(path, manifest.to_json())
    return path


def read_json(path: str, what: str):
    """Parsed JSON of `path`; a missing or corrupt file is a DataError naming it and `what` it is."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable {what}: {e}") from e


def read_manifest_of(source: str, directory: str) -> Manifest:
    """`read_manifest` whose errors start with the flag or role that named `directory`.

    Example:
        read_manifest_of("--aux_data=", "data/x")   # DataError: --aux_data=data/x: dataset directory does not exist
    """
    try:
        return read_manifest(directory)
    except DataError as e:
        raise DataError(naming(source, directory, e)) from e


def write_text_atomic(path: str, text: str) -> None:
    """Writes `text` to a temp file next to `path`, fsyncs, renames it to `path`.

    The temp file is opened like any new file (mode 0666 minus the umask, so
    0644 usually), not with mkstemp, whose 0600 would hide a dataset from
    other users and from jobs running under another account.
    """
    tmp = os.path.join(os.path.dirname(path) or ".",
                       f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "x") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def json_text(obj: Any) -> str:
    """Strict JSON (`jq`, JavaScript): a NaN or infinite metric becomes null instead of a bare NaN token.

    Example:
        json_text({"auroc": float("nan")})   # '{\\n  "auroc": null\\n}\\n'
    """
    def strict(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: strict(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [strict(v) for v in value]
        return value

    return json.dumps(strict(obj), indent=2, allow_nan=False) + "\n"


def fingerprint(manifest: Manifest) -> str:
    """A short hash of a dataset's records (every split's shard files, counts and sha256s).

    Example:
        fingerprint(read_manifest("data/cifar10"))   # the same for a copy; another after a reconversion
    """
    return hashlib.sha256(json.dumps(manifest.splits, sort_keys=True).encode()).hexdigest()[:16]


def same_dataset(dir_a: str, dir_b: str) -> bool | None:
    """Whether two dataset dirs hold the same records (same dir, or a copy: same shards and sha256s).

    None when either has no readable manifest here (e.g. a relative path from another working directory).

    Example:
        same_dataset("data/cifar10", "/mnt/copy/cifar10")   # True for a copy
    """
    if os.path.realpath(dir_a) == os.path.realpath(dir_b):
        return True
    try:
        return read_manifest(dir_a).splits == read_manifest(dir_b).splits
    except DataError:
        return None
