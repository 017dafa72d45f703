"""`manifest.json`: what a kood dataset directory holds. Written last, atomically."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any

from kood.errors import DataError
from kood.records import ENCODINGS

FORMAT = "kood-tfrecord/1"
KINDS = ("real", "synthetic", "outlier", "ood")
MANIFEST = "manifest.json"


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
        raise DataError(f"{directory}: dataset directory does not exist")
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        raise DataError(f"{path}: no manifest.json (not a kood dataset, or its conversion did not finish)")
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable manifest: {e}") from e
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
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(manifest.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
