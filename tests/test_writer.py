"""kood.writer: the write lock on a dataset directory and what a finished write removes."""

import fcntl
import os

import numpy as np
import pytest

from kood.convert import convert, convert_and_pseudo_label
from kood.errors import DataError
from kood.fanout import merge_tasks
from kood.manifest import read_manifest
from kood.writer import LOCK_FILE, WriteLock, write_arrays
from tests import data_helpers as dh


def _arrays(n=4, value=0):
    return {"train": (np.full((n, 4, 4, 1), value, np.uint8), np.arange(n) % 2)}


def test_a_directory_another_writer_holds_is_refused_and_left_alone(tmp_path):
    out = tmp_path / "out"
    write_arrays(str(out), _arrays(value=1))
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    other = dh.held_elsewhere(str(out))
    with pytest.raises(DataError, match=f"{out}: pid 4242 on elsewhere is writing a dataset into this directory"):
        write_arrays(str(out), _arrays(value=2), overwrite=True)
    # --overwrite did not remove the manifest: the lock is taken before the directory is claimed
    assert {name: (out / name).read_bytes() for name in os.listdir(out) if name != LOCK_FILE} == before
    other.close()  # the other writer ends (its process exits: the OS drops the lock)
    m = write_arrays(str(out), _arrays(value=2), overwrite=True)
    assert m.count("train") == 4 and LOCK_FILE not in os.listdir(out)  # released and removed after finish


def test_a_stale_lock_file_from_a_killed_run_does_not_block(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).write_text("pid 1 on gone\n")  # SIGKILL leaves the file, not the lock
    assert write_arrays(str(out), _arrays()).count("train") == 4
    assert not (out / LOCK_FILE).exists()


def test_lock_is_reentrant_in_a_process_and_released_by_the_last_holder(tmp_path):
    a = WriteLock(str(tmp_path))
    b = WriteLock(str(tmp_path))
    a.release()
    assert (tmp_path / LOCK_FILE).exists()
    with pytest.raises(BlockingIOError):  # still held: another open file cannot lock it
        fcntl.flock(open(tmp_path / LOCK_FILE), fcntl.LOCK_EX | fcntl.LOCK_NB)
    b.release()
    b.release()  # idempotent
    assert not (tmp_path / LOCK_FILE).exists()
    c = WriteLock(str(tmp_path))
    assert (tmp_path / LOCK_FILE).read_text().startswith(f"pid {os.getpid()} on ")
    del c  # a dropped object (e.g. a failed writer's) releases its lock
    assert not (tmp_path / LOCK_FILE).exists() and str(tmp_path / LOCK_FILE) not in WriteLock._held


def test_finish_removes_only_kood_shards_and_temporary_files(tmp_path):
    out = tmp_path / "out"
    write_arrays(str(out), _arrays(n=6), num_shards=3)
    (out / "my_data.tfrecord").write_bytes(b"user's")
    (out / "notes-00001-of-00002.txt").write_text("keep")
    (out / ".train-00001-of-00008.tfrecord.tmp").write_bytes(b"killed run")
    m = write_arrays(str(out), _arrays(n=6), num_shards=2, overwrite=True)
    assert sorted(os.listdir(out)) == sorted([  # the 3 old shards and the killed run's .tmp are gone
        "manifest.json", "my_data.tfrecord", "notes-00001-of-00002.txt",
        *(s["file"] for s in m.splits["train"]["shards"])])


def test_the_same_fanned_out_task_twice_is_refused(tmp_path):
    path, _, _ = dh.make_npz(tmp_path / "a.npz", n=8)
    out = tmp_path / "out"
    task0 = out / "tasks" / "task-00000-of-00002"
    other = dh.held_elsewhere(str(task0))
    with pytest.raises(DataError, match="is writing a dataset into this directory"):
        convert(f"npz:{path}", str(out), num_shards=2, task_index=0, num_tasks=2, show_progress=False)
    other.close()
    for i in range(2):
        convert(f"npz:{path}", str(out), num_shards=2, task_index=i, num_tasks=2, show_progress=False)
    assert merge_tasks(str(out)).count("train") == 8
    assert LOCK_FILE not in os.listdir(out)


def test_pseudo_labelling_removes_temporary_sets_of_killed_runs_only(tmp_path, monkeypatch):
    from tests.test_convert import _tiny_classifier

    d, _, _ = dh.make_image_folder(tmp_path / "gen", 6)
    _tiny_classifier(str(tmp_path / "m.keras"))
    abandoned = tmp_path / ".syn.unlabelled.killed"
    abandoned.mkdir()
    (abandoned / "train-00000-of-00001.tfrecord").write_bytes(b"x")
    in_use = tmp_path / ".syn.unlabelled.running"
    other = dh.held_elsewhere(str(in_use))
    convert_and_pseudo_label(f"folder:{d}", str(tmp_path / "syn"), str(tmp_path / "m.keras"), show_progress=False)
    assert not abandoned.exists() and in_use.is_dir()
    other.close()
    assert read_manifest(str(tmp_path / "syn")).kind == "synthetic"
    assert sorted(os.listdir(tmp_path)) == [".syn.unlabelled.running", "gen", "m.keras", "syn"]


def test_pseudo_labelling_into_a_busy_out_is_refused_before_converting(tmp_path, monkeypatch):
    from kood import convert as convert_lib
    from tests.test_convert import _tiny_classifier

    d, _, _ = dh.make_image_folder(tmp_path / "gen", 6)
    _tiny_classifier(str(tmp_path / "m.keras"))
    converted = []
    monkeypatch.setattr(convert_lib, "convert", lambda *a, **k: converted.append(a) or convert(*a, **k))
    other = dh.held_elsewhere(str(tmp_path / "syn"))
    with pytest.raises(DataError, match="syn: pid 4242 on elsewhere is writing a dataset into this directory"):
        convert_and_pseudo_label(f"folder:{d}", str(tmp_path / "syn"), str(tmp_path / "m.keras"), show_progress=False)
    assert converted == [] and sorted(os.listdir(tmp_path)) == ["gen", "m.keras", "syn"]  # no temporary set
    other.close()
    os.remove(tmp_path / "syn" / LOCK_FILE)
    os.rmdir(tmp_path / "syn")
    convert_and_pseudo_label(f"folder:{d}", str(tmp_path / "fresh" / "syn"), str(tmp_path / "m.keras"),
                             show_progress=False)
    assert sorted(os.listdir(tmp_path / "fresh" / "syn")) == sorted(["manifest.json", *(
        f for f in os.listdir(tmp_path / "fresh" / "syn") if f.endswith(".tfrecord"))])  # lock released and removed


def test_a_plain_conversion_into_a_dir_with_running_tasks_is_refused(tmp_path):
    path, _, _ = dh.make_npz(tmp_path / "a.npz", n=8)
    out = tmp_path / "out"
    convert(f"npz:{path}", str(out), num_shards=2, task_index=0, num_tasks=2, show_progress=False)
    task1 = out / "tasks" / "task-00001-of-00002"
    other = dh.held_elsewhere(str(task1))  # task 1 is running
    with pytest.raises(DataError, match=f"{out}: a task of a fanned-out conversion \\(pid 4242 on elsewhere\\) is "
                                        f"writing into {task1}"):
        convert(f"npz:{path}", str(out), show_progress=False)
    assert sorted(os.listdir(out)) == ["tasks"]  # nothing written, the lock released
    other.close()
    convert(f"npz:{path}", str(out), num_shards=2, task_index=1, num_tasks=2, show_progress=False)
    assert merge_tasks(str(out)).count("train") == 8
