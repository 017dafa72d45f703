"""A conversion fanned out over tasks (`--task_index/--num_tasks`), and the merge of their parts.

Every task computes the same plan: the `--limit/--seed` selection and the shard
boundaries depend only on the source and the flags, never on the task. Task I
writes only its own contiguous run of shards of each split (so a contiguous
slice of the selected records), under their final names, into
`DIR/tasks/task-IIIII-of-NNNNN/`, and `task.json` last: the shards' counts,
sha256 and per-channel pixel sums and sums of squares (sums, not means, so the
parts combine exactly). `merge_tasks` checks that all N parts exist and agree,
moves the shards into DIR, computes the train mean/std from the sums and writes
`manifest.json` last. Until then DIR has no manifest, so it never looks complete.
The merged directory equals a single-task conversion: same shards, same sha256.

Example:
    for i in range(3):  # on three machines, or as a scheduler's array job
        convert("npy:rand.npy", "data/rand", kind="outlier", num_shards=12, task_index=i, num_tasks=3)
    merge_tasks("data/rand")
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
from typing import Any

from kood.errors import DataError
from kood.manifest import MANIFEST, TASKS, Manifest, read_json, read_manifest, shard_name, write_text_atomic
from kood.writer import DatasetWriter, WriteLock, claim_directory, command_line, remove_stale_shards, sha256_file

TASK_FORMAT = "kood-task/1"
TASK_FILE = "task.json"
# what every part must share with task 0 (the command differs by --task_index, so it is not compared)
AGREE = ("kind", "image_shape", "num_classes", "class_names", "encoding", "source", "plan", "extra")
_TASK_DIR = re.compile(r"task-(\d{5})-of-(\d{5})")


@dataclasses.dataclass
class TaskPart:
    """What one task wrote (`DIR/tasks/task-IIIII-of-NNNNN/task.json`)."""
    task_index: int
    num_tasks: int
    kind: str
    image_shape: list[int]
    num_classes: int
    class_names: list[str]
    encoding: str
    source: str
    command: str
    plan: dict[str, dict[str, int]]  # split -> {"count", "num_shards"} of the whole conversion
    shards: dict[str, list[dict[str, Any]]]  # split -> this task's {"file", "count", "sha256", "sum", "sum_sq"}
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    format: str = TASK_FORMAT

    def counts(self) -> dict[str, int]:
        return {split: sum(s["count"] for s in shards) for split, shards in self.shards.items()}


def task_dir(directory: str, task_index: int, num_tasks: int) -> str:
    return os.path.join(directory, TASKS, f"task-{task_index:05d}-of-{num_tasks:05d}")


def task_shards(num_shards: int, task_index: int, num_tasks: int) -> range:
    """The contiguous run of shard numbers (of `num_shards`) that task `task_index` writes (may be empty).

    Example:
        [list(task_shards(5, i, 3)) for i in range(3)]  # [[0], [1, 2], [3, 4]]
    """
    return range(num_shards * task_index // num_tasks, num_shards * (task_index + 1) // num_tasks)


def start_task(directory: str, task_index: int, num_tasks: int, overwrite: bool) -> tuple[str, WriteLock]:
    """Prepares the task's directory and locks it (the same task running twice is refused).

    A rerun first makes its old part incomplete. Returns the directory and its lock, which
    `finish_task` releases.
    """
    claim_directory(directory, overwrite)
    tdir = task_dir(directory, task_index, num_tasks)
    os.makedirs(tdir, exist_ok=True)
    lock = WriteLock(tdir)
    if os.path.exists(os.path.join(tdir, TASK_FILE)):
        os.remove(os.path.join(tdir, TASK_FILE))
    return tdir, lock


def finish_task(part: TaskPart, directory: str, lock: WriteLock | None = None) -> TaskPart:
    """Removes stale shards from the task's directory and writes `task.json` last (then releases `lock`)."""
    tdir = task_dir(directory, part.task_index, part.num_tasks)
    remove_stale_shards(tdir, {s["file"] for shards in part.shards.values() for s in shards})
    write_text_atomic(os.path.join(tdir, TASK_FILE), json.dumps(dataclasses.asdict(part), indent=1))
    if lock is not None:
        lock.release()
    return part


def read_task_part(path: str) -> TaskPart:
    """Reads one `task.json`; DataError names the file and what is wrong."""
    raw = read_json(path, "task part")
    names = {f.name for f in dataclasses.fields(TaskPart)}
    if not isinstance(raw, dict) or raw.get("format") != TASK_FORMAT or not names.issuperset(raw) \
            or not {"task_index", "num_tasks", "plan", "shards"}.issubset(raw):
        raise DataError(f"{path}: not a kood task part (format {TASK_FORMAT!r})")
    return TaskPart(**raw)


def merge_tasks(directory: str, *, command: str | None = None) -> Manifest:
    """Merges the parts of a fanned-out conversion into the complete dataset `directory`.

    Args:
        directory: the `--out` every task was given.
        command: recorded in the manifest's `extra["fanout"]` (default: this process's command line).

    Returns:
        The written `Manifest` (its `command` is task 0's).

    Raises:
        DataError: naming the task when a part is missing, unfinished, disagrees
            with task 0, or lists a shard that is not there. Nothing is changed then.

    Example:
        merge_tasks("data/imagenet_train")
    """
    if os.path.exists(os.path.join(directory, MANIFEST)):
        return _merged_before(directory)
    parts, tdirs = _read_parts(directory)
    first = parts[0]
    for part, tdir in zip(parts[1:], tdirs[1:]):
        _check_agrees(first, part, tdirs[0], tdir)
    for part, tdir in zip(parts, tdirs):
        _check_shards(first.plan, part, tdir)
    moves = _shard_moves(directory, parts, tdirs)

    writer = DatasetWriter(directory, kind=first.kind, image_shape=first.image_shape,
                           num_classes=first.num_classes, class_names=first.class_names or None,
                           encoding=first.encoding)
    for src, dst in moves:
        os.replace(src, dst)
    for split in first.plan:
        writer.add_split(split, [s for part in parts for s in part.shards[split]])
    fanout = {"num_tasks": len(parts),
              "merge_command": command if command is not None else command_line()}
    manifest = writer.finish(source=first.source, command=first.command, extra=dict(first.extra, fanout=fanout))
    shutil.rmtree(os.path.join(directory, TASKS))
    return manifest


def _merged_before(directory: str) -> Manifest:
    """The manifest of a dataset an earlier merge completed (a rerun, e.g. a scheduler's retry after a kill
    that came after the manifest, removes the task parts it had left); any other complete dataset is an error."""
    manifest = read_manifest(directory)
    if "fanout" not in manifest.extra:
        raise DataError(f"{directory}: already holds a complete dataset (manifest.json) that no merge wrote; "
                        f"nothing to merge")
    leftover = os.path.join(directory, TASKS)
    if os.path.isdir(leftover):
        shutil.rmtree(leftover)
    print(f"note: {directory} was merged before (from {manifest.extra['fanout']['num_tasks']} tasks); "
          f"nothing to do", file=sys.stderr)
    return manifest


def _read_parts(directory: str) -> tuple[list[TaskPart], list[str]]:
    root = os.path.join(directory, TASKS)
    if not os.path.isdir(root):
        raise DataError(f"{root}: no task parts to merge; run the conversion with --task_index=I --num_tasks=N "
                        f"--out={directory} for every I in 0..N-1 first")
    found = [m for m in map(_TASK_DIR.fullmatch, sorted(os.listdir(root))) if m]
    fanouts = sorted({int(m[2]) for m in found})
    if not fanouts:
        raise DataError(f"{root}: no task-IIIII-of-NNNNN directories to merge")
    if len(fanouts) > 1:
        raise DataError(f"{root}: holds parts of conversions with different --num_tasks {fanouts}; "
                        f"remove the directories of the stale one")
    n = fanouts[0]
    tdirs = [task_dir(directory, i, n) for i in range(n)]
    missing = [i for i, d in enumerate(tdirs) if not os.path.isdir(d)]
    unfinished = [i for i, d in enumerate(tdirs) if os.path.isdir(d) and not os.path.exists(os.path.join(d, TASK_FILE))]
    if missing or unfinished:
        lines = []
        if missing:
            lines.append(f"task(s) {_some(missing)} of {n} missing (never started): no {tdirs[missing[0]]}")
        if unfinished:
            lines.append(f"task(s) {_some(unfinished)} of {n} did not finish: no "
                         f"{os.path.join(tdirs[unfinished[0]], TASK_FILE)}")
        raise DataError(f"{directory}: cannot merge: " + "; ".join(lines) +
                        f". Rerun the conversion with --task_index=I --num_tasks={n} for each of them")
    parts = []
    for i, tdir in enumerate(tdirs):
        part = read_task_part(os.path.join(tdir, TASK_FILE))
        if (part.task_index, part.num_tasks) != (i, n):
            raise DataError(f"{os.path.join(tdir, TASK_FILE)}: says task {part.task_index} of {part.num_tasks}, "
                            f"but its directory is task {i} of {n}")
        parts.append(part)
    return parts, tdirs


def _check_agrees(first: TaskPart, part: TaskPart, first_dir: str, tdir: str) -> None:
    for field in AGREE:
        diff = _first_difference(getattr(first, field), getattr(part, field), field)
        if diff is not None:
            where, ours, theirs = diff
            raise DataError(f"{os.path.join(tdir, TASK_FILE)}: task {part.task_index} has {where} = {theirs!r}, "
                            f"task 0 ({first_dir}) has {ours!r}; every task must run with the same source and "
                            f"flags (only --task_index differs); rerun task {part.task_index}")


def _first_difference(a, b, where: str):
    """`(key path, a's value, b's value)` of the first difference, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            diff = _first_difference(a.get(key), b.get(key), f"{where}.{key}")
            if diff is not None:
                return diff
        return None
    return None if a == b else (where, a, b)


def _check_shards(plan: dict, part: TaskPart, tdir: str) -> None:
    path = os.path.join(tdir, TASK_FILE)
    if set(part.shards) != set(plan):
        raise DataError(f"{path}: lists splits {sorted(part.shards)}, the plan has {sorted(plan)}")
    for split, info in plan.items():
        n = info["num_shards"]
        want = [shard_name(split, k, n) for k in task_shards(n, part.task_index, part.num_tasks)]
        got = sorted(s["file"] for s in part.shards[split])
        if got != want:
            raise DataError(f"{path}: split {split!r} lists shards {got}, expected {want} "
                            f"(task {part.task_index} of {part.num_tasks}, {n} shards)")


def _shard_moves(directory: str, parts: list[TaskPart], tdirs: list[str]) -> list[tuple[str, str]]:
    """(task shard, final path) pairs; a shard an interrupted merge already moved must match its sha256."""
    moves, problems = [], []
    for part, tdir in zip(parts, tdirs):
        for shards in part.shards.values():
            for shard in shards:
                src, dst = os.path.join(tdir, shard["file"]), os.path.join(directory, shard["file"])
                if os.path.isfile(src):
                    moves.append((src, dst))
                elif not (os.path.isfile(dst) and sha256_file(dst) == shard["sha256"]):
                    problems.append(f"{src}: shard listed in task {part.task_index}'s {TASK_FILE} is missing")
    for split in parts[0].plan:
        count = sum(s["count"] for p in parts for s in p.shards[split])
        if count != parts[0].plan[split]["count"]:
            problems.append(f"split {split!r}: the tasks wrote {count} records, the plan has "
                            f"{parts[0].plan[split]['count']}")
    if problems:
        raise DataError(f"{directory}: cannot merge: " + "; ".join(problems[:10]) +
                        (f"; ... ({len(problems) - 10} more)" if len(problems) > 10 else ""))
    return moves


def _some(indices: list[int], limit: int = 10) -> str:
    text = ", ".join(map(str, indices[:limit]))
    return text + (f", ... ({len(indices) - limit} more)" if len(indices) > limit else "")
