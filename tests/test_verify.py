"""kood.verify / data_prep.verify: every kind of damage is found and named (file, record index)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kood.manifest import read_manifest
from kood.verify import verify_dataset
from tests import data_helpers as dh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _verify(d):
    return verify_dataset(str(d), show_progress=False)


def _edit_manifest(d, fn):
    path = os.path.join(d, "manifest.json")
    with open(path) as f:
        raw = json.load(f)
    fn(raw)
    with open(path, "w") as f:
        json.dump(raw, f)


def _record_offsets(path):
    """Byte offset of each record in a TFRecord file (u64 length, u32 crc, data, u32 crc)."""
    data, offsets, pos = open(path, "rb").read(), [], 0
    while pos < len(data):
        offsets.append(pos)
        pos += 8 + 4 + int.from_bytes(data[pos:pos + 8], "little") + 4
    return offsets


@pytest.mark.parametrize("encoding", ["png", "raw"])
def test_intact_dataset_passes(tmp_path, encoding):
    d = dh.make_kood_dataset(tmp_path / "ds", num_shards=2, encoding=encoding)
    report = _verify(d)
    assert report.ok, report.problems
    assert report.records == {"train": 12, "test": 6}


def test_flipped_byte_is_found_with_file_and_record(tmp_path):
    d = dh.make_kood_dataset(tmp_path / "ds", counts={"train": 8})
    shard = read_manifest(d).shard_paths(d, "train")[0]
    offsets = _record_offsets(shard)
    data = bytearray(open(shard, "rb").read())
    data[offsets[5] + 40] ^= 0xFF  # inside record 5's payload
    open(shard, "wb").write(bytes(data))
    problems = _verify(d).problems
    assert any(p.startswith(f"{shard}: sha256") for p in problems)
    assert any(p.startswith(f"{shard}: record 5: unreadable") for p in problems), problems


def test_truncated_shard_is_found(tmp_path):
    d = dh.make_kood_dataset(tmp_path / "ds", counts={"train": 8})
    shard = read_manifest(d).shard_paths(d, "train")[0]
    offsets = _record_offsets(shard)
    with open(shard, "r+b") as f:
        f.truncate(offsets[6] + 20)  # record 6 cut in half
    problems = _verify(d).problems
    assert any(p.startswith(f"{shard}: record 6: unreadable") for p in problems), problems
    assert any("6 records, manifest says 8" in p for p in problems), problems


def test_checksum_mismatch_alone(tmp_path):
    d = dh.make_kood_dataset(tmp_path / "ds")
    _edit_manifest(d, lambda m: m["splits"]["test"]["shards"][0].update(sha256="0" * 64))
    problems = _verify(d).problems
    assert len(problems) == 1 and "test-00000-of-00001.tfrecord: sha256" in problems[0]
    assert "0" * 64 in problems[0]


def test_label_out_of_range_and_missing_shard(tmp_path):
    from kood.writer import write_arrays

    x = dh.random_images(4)
    write_arrays(str(tmp_path / "ds"), {"train": (x, np.array([0, 2, 7, 1]))}, num_classes=3)
    problems = _verify(tmp_path / "ds").problems
    assert len(problems) == 1
    assert "record 2 (source index 2): label 7 out of range [0, 3)" in problems[0]

    d = dh.make_kood_dataset(tmp_path / "ds2", num_shards=2)
    missing = read_manifest(d).shard_paths(d, "train")[1]
    os.remove(missing)
    assert _verify(d).problems == [f"{missing}: shard listed in the manifest is missing"]


def test_undecodable_image_in_a_valid_record(tmp_path):
    import tensorflow as tf

    from kood.records import encode_example
    from kood.writer import sha256_file

    d = dh.make_kood_dataset(tmp_path / "ds", counts={"train": 3}, shape=(8, 8, 3))
    shard = read_manifest(d).shard_paths(d, "train")[0]
    good = list(tf.data.TFRecordDataset(shard).as_numpy_iterator())
    bad = encode_example(np.zeros((4, 4, 3), np.uint8), 0, 99, "png")  # right codec, wrong size
    with tf.io.TFRecordWriter(shard) as w:
        for rec in (good[0], bad, good[2]):
            w.write(rec)
    _edit_manifest(d, lambda m: m["splits"]["train"]["shards"][0].update(sha256=sha256_file(shard)))
    problems = _verify(d).problems
    assert len(problems) == 1
    assert problems[0].startswith(f"{shard}: record 1 (source index 99): image does not decode")


def test_no_manifest_and_cli_exit_codes(tmp_path):
    (tmp_path / "half").mkdir()
    assert "no manifest.json" in _verify(tmp_path / "half").problems[0]
    good = dh.make_kood_dataset(tmp_path / "good", counts={"train": 3})
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    r = subprocess.run([sys.executable, "-m", "data_prep.verify", good, str(tmp_path / "half")], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert f"OK {good}: train=3" in r.stdout
    assert f"FAILED {tmp_path / 'half'}" in r.stdout and "no manifest.json" in r.stdout
