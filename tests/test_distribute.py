"""kood.distribute and `--strategy`: TF_CONFIG checks, mirrored == one device, multi-worker runs and resumes.

The CPU is split into two logical devices for MirroredStrategy; that must happen before
TensorFlow initializes, so those runs happen in a fresh subprocess (`tests/distribute_compare.py`).
Multi-worker runs are two `python -m kood.train --strategy=multi_worker` processes on loopback.
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from kood import distribute
from kood.errors import ConfigError, DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Mirrored vs one device: the same math, summed in another order (two half-batch gradients
# all-reduced vs one full-batch gradient; BatchNorm moments from two partial sums). float32
# round-off (~1e-7 relative) grows over the 6 SGD steps, GReg's double backprop amplifying it
# most; observed gaps are ~1e-7 relative, so 1e-4 leaves margin yet catches any real
# difference (a missing 1/R loss scale would double every update; per-replica BatchNorm
# moves the losses by 0.2-1% from the first step on, see the slow test below).
LOSS_RTOL = 1e-4
WEIGHT_ATOL = 1e-4


def test_tf_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="TF_CONFIG.*not set"):
        distribute.parse_tf_config(None)
    with pytest.raises(ConfigError, match="not valid JSON"):
        distribute.parse_tf_config("{cluster:")
    with pytest.raises(ConfigError, match='"cluster" object and a "task"'):
        distribute.parse_tf_config(json.dumps({"cluster": {"worker": ["a:1"]}}))
    with pytest.raises(ConfigError, match="host:port"):
        distribute.parse_tf_config(json.dumps({"cluster": {"worker": ["nohost"]}, "task": {"type": "worker",
                                                                                          "index": 0}}))
    with pytest.raises(ConfigError, match="index into its list"):
        distribute.parse_tf_config(json.dumps({"cluster": {"worker": ["a:1", "b:2"]},
                                               "task": {"type": "worker", "index": 2}}))


def test_tf_config_chief_is_worker_0_unless_the_cluster_has_a_chief():
    workers = {"worker": ["a:1", "b:2", "c:3"]}
    roles = [distribute.parse_tf_config(json.dumps({"cluster": workers, "task": {"type": "worker", "index": i}}))
             for i in range(3)]
    assert [r.is_chief for r in roles] == [True, False, False]
    assert [r.task_id for r in roles] == [0, 1, 2] and {r.num_workers for r in roles} == {3}
    cluster = {"chief": ["c:0"], "worker": ["a:1", "b:2"]}
    chief = distribute.parse_tf_config(json.dumps({"cluster": cluster, "task": {"type": "chief", "index": 0}}))
    worker0 = distribute.parse_tf_config(json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 0}}))
    assert chief.is_chief and not worker0.is_chief
    assert (chief.task_id, worker0.task_id, worker0.num_workers) == (0, 1, 3)


def test_batch_and_shard_checks(tmp_path):
    distribute.check_batch(64, 4)
    with pytest.raises(ConfigError, match="global batch.*divisible by the 3 replicas"):
        distribute.check_batch(64, 3)
    from kood.manifest import read_manifest
    from kood.writer import write_arrays

    images = np.zeros((10, 4, 4, 1), np.uint8)
    write_arrays(str(tmp_path / "one"), {"train": (images, np.arange(10) % 2)}, num_classes=2)
    with pytest.raises(DataError, match="1 shard file.*2 workers"):
        distribute.check_shards(str(tmp_path / "one"), read_manifest(str(tmp_path / "one")), "train", 2, "id_data")


def test_file_shards_split_the_files_between_pipelines(tmp_path):
    from kood import data
    from kood.manifest import read_manifest
    from kood.writer import write_arrays

    images = np.zeros((12, 4, 4, 1), np.uint8)
    directory = str(tmp_path / "three")
    write_arrays(directory, {"train": (images, np.arange(12) % 2)}, num_classes=2, num_shards=3)
    manifest = read_manifest(directory)
    parts = [data._shard_files(directory, manifest, "train", (2, i)) for i in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(manifest.shard_paths(directory, "train"))
    assert not set(parts[0]) & set(parts[1])
    with pytest.raises(DataError, match="3 shard files, too few for input pipeline 0 of 4"):
        data._shard_files(directory, manifest, "train", (4, 0))


def test_unknown_strategy_is_a_config_error(tmp_path):
    from kood import run as run_lib

    cfg = run_lib.RunConfig(model_dir=str(tmp_path), id_data=str(tmp_path), method="ce", strategy="gpus")
    with pytest.raises(ConfigError, match="--strategy must be one of"):
        run_lib.validate(cfg)
    with pytest.raises(ConfigError, match="--strategy must be one of"):
        distribute.make_strategy("gpus")


def test_multi_worker_without_tf_config_and_tpu_without_a_tpu_are_config_errors(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="TF_CONFIG environment variable, which is not set"):
        distribute.make_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["localhost:1"]}, "task": {"type": "ps", "index": 0}}')
    with pytest.raises(ConfigError, match="task must name a job of the cluster"):
        distribute.make_strategy("multi_worker")
    with pytest.raises(ConfigError, match="--strategy=tpu: no TPU found"):  # this machine has none
        distribute.make_strategy("tpu")


# ----------------------------------------------------------------------------------------------
# MirroredStrategy over two logical CPUs vs one device (fresh subprocess: `tests/distribute_compare.py`).


def _subprocess(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-m", "tests.distribute_compare", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _compare(method: str, root: str, sync_batchnorm: bool = True) -> dict:
    out = os.path.join(root, f"{method}.json")
    proc = _subprocess("compare", method, root, out, str(int(sync_batchnorm)))
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out) as f:
        return json.load(f)


def _assert_same_trajectory(result: dict):
    one, mirrored = np.array(result["one_device"]["losses"]), np.array(result["mirrored"]["losses"])
    assert result["mirrored"]["replicas"] == 2 and result["one_device"]["replicas"] == 1
    assert len(one) == len(mirrored) == 6, (one, mirrored)
    np.testing.assert_allclose(mirrored, one, rtol=LOSS_RTOL)
    assert result["max_weight_diff"] < WEIGHT_ATOL, result["max_weight_diff"]
    assert result["max_weight_change"] > 100 * WEIGHT_ATOL  # the runs did move the weights


def test_mirrored_matches_one_device_greg_plus(tmp_path):
    """Per-replica sampler, double backprop and 1/R loss scaling in one ~20 s check."""
    _assert_same_trajectory(_compare("greg_plus", str(tmp_path)))


def test_mirrored_matches_one_device_with_a_bfloat16_pool(tmp_path):
    """kood.models.layers.compute_dtype switches layer policies while a replica traces its pool forward;
    replicas trace one at a time, so the other replica's float32 training graph is unaffected."""
    _assert_same_trajectory(_compare("greg_plus,pool_dtype=bfloat16", str(tmp_path)))


def test_mirrored_matches_one_device_in_mixed_bfloat16(tmp_path):
    """--precision=mixed_bfloat16 under MirroredStrategy: same trajectory as one device up to bfloat16
    rounding. Each replica's weight gradient is rounded to bfloat16 before the cross-replica sum (one
    device rounds the full-batch sum once), so the runs drift apart by ~2^-8 relative per step: the
    first step's loss agrees to 1e-7, after 6 steps the weights differ by ~1-3% of how far they moved
    (ce 1.7%, greg 0.9%, greg_plus 2.8% measured). A missing 1/R loss scale would be a 2x error."""
    result = _compare("greg_plus,pool_dtype=bfloat16,precision=mixed_bfloat16", str(tmp_path))
    one, mirrored = np.array(result["one_device"]["losses"]), np.array(result["mirrored"]["losses"])
    assert result["mirrored"]["replicas"] == 2 and len(one) == len(mirrored) == 6
    np.testing.assert_allclose(mirrored[0], one[0], rtol=1e-5)
    np.testing.assert_allclose(mirrored, one, rtol=2e-2)
    assert result["max_weight_diff"] < 0.05 * result["max_weight_change"], result


def test_a_resumed_mirrored_run_with_per_replica_batchnorm_ends_like_an_uninterrupted_one(tmp_path):
    """Each replica updates its own BatchNorm moving statistics; a checkpoint used to keep replica 0's
    only, so GReg+'s inference-mode pool forward saw other statistics after a resume (weights 0.03
    apart in this setting). Averaging them before each checkpoint makes the two runs identical."""
    out = str(tmp_path / "resume.json")
    proc = _subprocess("resume", "greg_plus", str(tmp_path), out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out) as f:
        assert json.load(f)["max_weight_diff"] == 0.0


def test_average_batchnorm_statistics_gives_every_replica_the_mean(tmp_path):
    out = str(tmp_path / "copies.json")
    proc = _subprocess("batchnorm_copies", out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out) as f:
        result = json.load(f)
    before, after = np.array(result["before"]), np.array(result["after"])
    assert result["averaged"] == 4  # moving mean and variance of small_cnn's two BatchNorm layers
    assert np.max(np.abs(before[0] - before[1])) > 1e-5  # other images per replica: the copies differ
    np.testing.assert_array_equal(after[0], after[1])
    np.testing.assert_allclose(after[0], before.mean(axis=0), rtol=1e-6, atol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ce", "greg"])
def test_mirrored_matches_one_device(method, tmp_path):
    _assert_same_trajectory(_compare(method, str(tmp_path)))


@pytest.mark.slow
def test_per_replica_batchnorm_differs_from_one_device(tmp_path):
    """Without --sync_batchnorm each replica normalizes by its own B/2 images: another model."""
    result = _compare("ce", str(tmp_path), sync_batchnorm=False)
    one, mirrored = np.array(result["one_device"]["losses"]), np.array(result["mirrored"]["losses"])
    assert one[0] == pytest.approx(mirrored[0], rel=5e-2)  # the same model and data...
    assert np.max(np.abs(mirrored - one) / np.abs(one)) > 10 * LOSS_RTOL  # ...other batch statistics


# ----------------------------------------------------------------------------------------------
# Two workers on loopback.


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _multi_worker_sets(root: str) -> dict[str, str]:
    """ID and aux sets with 2 shard files each (the workers split them by file)."""
    from kood.writer import write_arrays
    from tests.train_helpers import digits_arrays

    dirs = {"id": os.path.join(root, "id"), "aux": os.path.join(root, "aux")}
    x, y = digits_arrays([0, 1, 2, 3, 4])
    write_arrays(dirs["id"], {"train": (x[:600], y[:600]), "test": (x[600:], y[600:])}, num_classes=5,
                 num_shards=2)
    xa, _ = digits_arrays([5, 6, 7])
    write_arrays(dirs["aux"], {"train": (xa, -np.ones(len(xa), np.int64))}, kind="outlier", num_classes=0,
                 num_shards=2)
    return dirs


def _start_workers(dirs, model_dir: str, tmp_root: str, epochs: int, tag: str) -> list[subprocess.Popen]:
    ports = _free_ports(2)
    procs = []
    for index in range(2):
        tmpdir = os.path.join(tmp_root, f"tmp{index}")
        os.makedirs(tmpdir, exist_ok=True)
        tf_config = {"cluster": {"worker": [f"localhost:{p}" for p in ports]},
                     "task": {"type": "worker", "index": index}}
        env = dict(os.environ, TF_CONFIG=json.dumps(tf_config), TMPDIR=tmpdir, TF_CPP_MIN_LOG_LEVEL="2",
                   PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        log = open(os.path.join(tmp_root, f"{tag}-worker{index}.log"), "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "kood.train", "--strategy=multi_worker", "--method=greg",
             f"--id_data={dirs['id']}", f"--aux_data={dirs['aux']}", f"--model_dir={model_dir}",
             f"--epochs={epochs}", "--steps_per_epoch=3", "--batch_size=16", "--lr=0.05", "--verbose=2"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
        log.close()
    return procs


def _wait(procs, tmp_root: str, tag: str, timeout: float = 600) -> None:
    for index, proc in enumerate(procs):
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            code = "timeout"
        with open(os.path.join(tmp_root, f"{tag}-worker{index}.log")) as f:
            log = f.read()
        assert code == 0, f"worker {index} exited with {code}:\n{log[-4000:]}"


def _log(tmp_root: str, tag: str, index: int) -> str:
    with open(os.path.join(tmp_root, f"{tag}-worker{index}.log")) as f:
        return f.read()


@pytest.mark.slow
def test_two_workers_train_greg_and_only_the_chief_writes(tmp_path):
    dirs = _multi_worker_sets(str(tmp_path / "data"))
    model_dir = str(tmp_path / "run")
    _wait(_start_workers(dirs, model_dir, str(tmp_path), epochs=2, tag="run"), str(tmp_path), "run")
    with open(os.path.join(model_dir, "ckpt", "epoch-00002", "state.json")) as f:
        state = json.load(f)
    assert state["epoch"] == 2 and state["finished"] and len(state["history"]) == 2
    assert sorted(os.listdir(os.path.join(model_dir, "ckpt"))) == ["epoch-00001", "epoch-00002", "latest"]
    # The recorded validation accuracy is that of the saved model on the whole test split.
    from kood import data
    from kood.models import load_classifier
    model = load_classifier(os.path.join(model_dir, "last.keras"))
    pairs = [(np.argmax(model(x, training=False), -1), y.numpy()) for x, y in data.eval_dataset(dirs["id"], "test")]
    accuracy = np.mean(np.concatenate([p == y for p, y in pairs]))
    assert state["history"][-1]["val_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    # One writer: one TensorBoard event file per log dir, nothing left in the other worker's temp dir.
    for sub in ("train", "epoch"):
        assert len(glob.glob(os.path.join(model_dir, "logs", sub, "events.out.tfevents.*"))) == 1
    assert os.listdir(tmp_path / "tmp1") == [], os.listdir(tmp_path / "tmp1")
    # Both workers took part: each logged the same epoch metrics (they are all-reduced).
    lines = [[l for l in _log(str(tmp_path), "run", i).splitlines() if l.startswith("3/3")] for i in range(2)]
    assert len(lines[0]) == 2 and [l.split(" - ", 3)[-1] for l in lines[0]] == [l.split(" - ", 3)[-1]
                                                                                 for l in lines[1]]
    # Same weights and (averaged) BatchNorm moving statistics on both: the same validation numbers.
    val = [[l for l in _log(str(tmp_path), "run", i).splitlines() if re.match(r"epoch \d+/2: \w+ accuracy", l)]
           for i in range(2)]
    assert len(val[0]) == 2 and val[0] == val[1], val
    # Only the chief reports results; the other worker points at them.
    assert "Model: " in _log(str(tmp_path), "run", 0)
    worker = _log(str(tmp_path), "run", 1)
    assert "Worker done; the run's model and results are the chief's" in worker and "Model: " not in worker


@pytest.mark.slow
def test_multi_worker_run_resumes_after_a_worker_is_killed(tmp_path):
    dirs = _multi_worker_sets(str(tmp_path / "data"))
    model_dir = str(tmp_path / "run")
    latest = os.path.join(model_dir, "ckpt", "latest")
    procs = _start_workers(dirs, model_dir, str(tmp_path), epochs=4, tag="first")
    deadline = time.time() + 600
    while not os.path.exists(latest) and time.time() < deadline and procs[0].poll() is None:
        time.sleep(0.2)
    assert os.path.exists(latest), _log(str(tmp_path), "first", 0)[-4000:]
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait()
    # The chief's collectives fail once the peer stops sending heartbeats (observed: ~15 s).
    assert procs[0].wait(timeout=300) == 3
    assert "lost another worker of the run" in _log(str(tmp_path), "first", 0)
    with open(latest) as f:
        done = int(f.read().strip().split("-")[1])
    assert 1 <= done < 4

    _wait(_start_workers(dirs, model_dir, str(tmp_path), epochs=4, tag="second"), str(tmp_path), "second")
    chief = _log(str(tmp_path), "second", 0)
    assert f"from {os.path.join(model_dir, 'ckpt', f'epoch-{done:05d}')} (epoch {done}/4)" in chief, chief[-3000:]
    with open(os.path.join(model_dir, "ckpt", "epoch-00004", "state.json")) as f:
        state = json.load(f)
    assert state["finished"] and [r["epoch"] for r in state["history"]] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------------------------
