"""Conversion fanned out with --task_index/--num_tasks, then merged: equal to one task; bad parts refused."""

import json
import os
import re
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest

from kood.convert import convert
from kood.errors import ConfigError, DataError
from kood.fanout import TASK_FILE, merge_tasks, task_dir, task_shards
from kood.manifest import read_manifest
from kood.verify import verify_dataset
from tests import data_helpers as dh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = dict(limit=30, seed=1, num_shards=5)  # train 40 -> 30 in 5 shards, test 13 in 2 (task 0 has no test shard)


def _cli(module, *args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def source(tmp_path):
    x, xt = dh.random_images(40, seed=1), dh.random_images(13, seed=2)
    path = tmp_path / "src.npz"
    np.savez(path, x_train=x, y_train=np.arange(40) % 4, x_test=xt, y_test=np.arange(13) % 4)
    return f"npz:{path}"


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _task(source, out, i, n=3, **kw):
    return convert(source, str(out), task_index=i, num_tasks=n, show_progress=False, **{**FLAGS, **kw})


def test_task_shards_partition_every_shard_once():
    for num_shards in (1, 2, 5, 16):
        for n in range(1, num_shards + 1):
            runs = [list(task_shards(num_shards, i, n)) for i in range(n)]
            assert sum(runs, []) == list(range(num_shards))
            assert max(map(len, runs)) - min(map(len, runs)) <= 1


def test_three_tasks_merged_equal_one_task(tmp_path, source, umask_022):
    one = convert(source, str(tmp_path / "one"), show_progress=False, **FLAGS)
    out = tmp_path / "many"
    parts = [_task(source, out, i, command=f"task {i}") for i in (2, 0, 1)]  # any order, any machine
    assert [p.counts() for p in parts] == [{"train": 12, "test": 6}, {"train": 6, "test": 0},
                                           {"train": 12, "test": 7}]
    with pytest.raises(DataError, match="tasks/ holds parts .* python -m data_prep.merge"):
        read_manifest(str(out))  # nothing looks complete before the merge

    merged = merge_tasks(str(out), command="merge")
    assert read_manifest(str(out)) == merged and not os.path.exists(out / "tasks")
    # same shards byte for byte (sha256), same counts, same statistics
    assert merged.splits == one.splits
    assert (merged.kind, merged.image_shape, merged.class_names) == (one.kind, one.image_shape, one.class_names)
    np.testing.assert_allclose(merged.mean, one.mean, rtol=1e-12)
    np.testing.assert_allclose(merged.std, one.std, rtol=1e-12)
    assert merged.extra["conversion"] == one.extra["conversion"]
    assert merged.extra["fanout"] == {"num_tasks": 3, "merge_command": "merge"}
    assert merged.command == "task 0"
    for split in ("train", "test"):
        a, b = dh.read_split(tmp_path / "one", split), dh.read_split(out, split)
        for got, want in zip(b, a):
            np.testing.assert_array_equal(got, want)  # pixels, labels, source indices: same order
    assert verify_dataset(str(out), show_progress=False).ok
    # readable by other users / accounts (mkstemp's 0600 was not), shards too
    for name in ["manifest.json"] + [s["file"] for s in merged.splits["train"]["shards"]]:
        assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o644, name
    assert stat.S_IMODE(os.stat(tmp_path / "one" / "manifest.json").st_mode) == 0o644


def test_cli_task_then_merge_main(tmp_path, source, capsys):
    from data_prep import merge

    out = tmp_path / "out"
    r = _cli("data_prep.real", f"--source={source}", f"--out={out}", "--limit=30", "--seed=1", "--num_shards=5",
             "--task_index=0", "--num_tasks=2")
    assert r.returncode == 0, r.stderr
    assert "task 0 of 2 done (train=12, test=7)" in r.stdout and f"python -m data_prep.merge {out}" in r.stdout
    with pytest.raises(SystemExit, match="2"):
        merge.main(["merge", str(out)])
    assert re.search(r"error: .*task\(s\) 1 of 2 missing", capsys.readouterr().err)
    _task(source, out, 1, n=2)
    merge.main(["merge", str(out)])  # in-process: a second subprocess would double this test's time
    assert f"{out}: kind=real image_shape=[32, 32, 3] num_classes=4 encoding=raw train=30, test=13" \
        in capsys.readouterr().out
    manifest = read_manifest(str(out))
    assert manifest.command.startswith("python -m data_prep.real --source=npz:")  # task 0's
    assert manifest.command.endswith("--task_index=0 --num_tasks=2")
    assert verify_dataset(str(out), show_progress=False).ok
    # a scheduler's retry of a task after the merge: nothing to do (it asked for --overwrite, which would
    # have removed the merged set's manifest to write one task's part)
    before = (out / "manifest.json").read_bytes()
    r = _cli("data_prep.real", f"--source={source}", f"--out={out}", "--limit=30", "--seed=1", "--num_shards=5",
             "--task_index=1", "--num_tasks=2")
    assert r.returncode == 0, r.stderr
    assert "already holds the dataset this task is part of (merged from 2 tasks" in r.stderr
    assert (out / "manifest.json").read_bytes() == before and not (out / "tasks").exists()


def test_missing_and_unfinished_tasks_are_named(tmp_path, source):
    out = tmp_path / "out"
    _task(source, out, 0)
    _task(source, out, 2)
    with pytest.raises(DataError, match=r"task\(s\) 1 of 3 missing .*--task_index=I --num_tasks=3"):
        merge_tasks(str(out))
    os.makedirs(task_dir(str(out), 1, 3))  # started, never finished
    with pytest.raises(DataError, match=r"task\(s\) 1 of 3 did not finish: no .*task-00001-of-00003/task.json"):
        merge_tasks(str(out))
    assert not os.path.exists(out / "manifest.json") and os.path.exists(out / "tasks")
    _task(source, out, 1)  # the rerun completes it
    assert merge_tasks(str(out), command="merge").count("train") == 30


def test_mismatched_task_is_named(tmp_path, source):
    out = tmp_path / "out"
    for i in range(3):
        _task(source, out, i, seed=2 if i == 1 else 1)  # task 1 selected other records
    with pytest.raises(DataError, match=r"task-00001-of-00003/task.json: task 1 has extra.conversion.seed = 2, "
                                        r"task 0 .* has 1"):
        merge_tasks(str(out))
    _task(source, out, 1)
    _task(source, out, 2, image_size=16)
    with pytest.raises(DataError, match="task 2 has image_shape = \\[16, 16, 3\\], task 0 .* has \\[32, 32, 3\\]"):
        merge_tasks(str(out))
    assert not os.path.exists(out / "manifest.json")
    assert not any(n.endswith(".tfrecord") for n in os.listdir(out))  # nothing moved


def test_missing_shard_refused_and_interrupted_merge_resumes(tmp_path, source):
    out = tmp_path / "out"
    parts = [_task(source, out, i) for i in range(3)]
    first = parts[1].shards["train"][0]["file"]
    tdir = task_dir(str(out), 1, 3)
    os.rename(os.path.join(tdir, first), out / "elsewhere")
    with pytest.raises(DataError, match=f"{first}: shard listed in task 1's task.json is missing"):
        merge_tasks(str(out))
    # an interrupted merge moved this shard already: accepted since its sha256 matches
    os.rename(out / "elsewhere", out / first)
    manifest = merge_tasks(str(out))
    assert verify_dataset(str(out), show_progress=False).ok and manifest.count("test") == 13


def test_bad_fanout_flags(tmp_path, source):
    with pytest.raises(ConfigError, match="--task_index must be in \\[0, --num_tasks=3\\). Received: task_index=3"):
        _task(source, tmp_path / "a", 3)
    with pytest.raises(ConfigError, match="--num_tasks=6 exceeds the 5 shard"):
        _task(source, tmp_path / "a", 0, n=6)
    with pytest.raises(DataError, match="no task parts to merge"):
        merge_tasks(str(tmp_path))
    convert(source, str(tmp_path / "done"), show_progress=False, **FLAGS)
    with pytest.raises(DataError, match="already holds a complete dataset"):
        _task(source, tmp_path / "done", 0)
    with pytest.raises(DataError, match="already holds a complete dataset"):
        merge_tasks(str(tmp_path / "done"))


def test_parts_of_two_fanouts_refused(tmp_path, source):
    out = tmp_path / "out"
    _task(source, out, 0, n=2)
    _task(source, out, 0, n=3)
    with pytest.raises(DataError, match=r"different --num_tasks \[2, 3\]"):
        merge_tasks(str(out))
    shutil.rmtree(task_dir(str(out), 0, 2))
    part = json.load(open(os.path.join(task_dir(str(out), 0, 3), TASK_FILE)))
    assert part["plan"] == {"train": {"count": 30, "num_shards": 5}, "test": {"count": 13, "num_shards": 2}}


def test_a_merge_rerun_after_it_wrote_the_manifest_finishes_its_cleanup(tmp_path, source, monkeypatch):
    from kood import fanout

    out = tmp_path / "out"
    for i in range(3):
        _task(source, out, i)

    def killed(path, *a, **k):  # the merge is killed after the manifest, before removing tasks/
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(fanout.shutil, "rmtree", killed)
        with pytest.raises(KeyboardInterrupt):
            merge_tasks(str(out))
    assert (out / "manifest.json").exists() and (out / "tasks").is_dir()
    manifest = merge_tasks(str(out))  # the same command again: done, and the leftover parts removed
    assert manifest.count("train") == 30 and not (out / "tasks").exists()
    assert verify_dataset(str(out), show_progress=False).ok
    assert merge_tasks(str(out)).count("train") == 30  # and again: still nothing to do
