"""The embedded demo: structure, disjoint classes, determinism."""

import os

import numpy as np
import pytest

from kood.demo_data import AUX_CLASSES, ID_CLASSES, OOD_CLASSES, build_demo, digits_images
from kood.errors import DataError
from kood.manifest import read_manifest
from kood.synthesize import read_split


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo(str(tmp_path_factory.mktemp("demo")), num_synthetic=300)


def _shard_hashes(dirs):
    return {role: [(s["file"], s["sha256"]) for split in read_manifest(d).splits.values() for s in split["shards"]]
            for role, d in dirs.items()}


def test_structure_and_counts(demo):
    _, labels = digits_images()
    m = {role: read_manifest(d) for role, d in demo.items()}
    assert {r: m[r].kind for r in m} == {"id": "real", "aux": "outlier", "ood": "ood", "syn": "synthetic"}
    assert all(mm.image_shape == [16, 16, 1] for mm in m.values())
    assert m["id"].num_classes == m["syn"].num_classes == len(ID_CLASSES)
    assert m["id"].class_names == m["syn"].class_names == [str(c) for c in ID_CLASSES]
    assert m["aux"].num_classes == m["ood"].num_classes == 0
    n_id = int(np.isin(labels, ID_CLASSES).sum())
    assert m["id"].count("train") + m["id"].count("test") == n_id
    assert abs(m["id"].count("test") - 0.2 * n_id) <= len(ID_CLASSES)
    assert m["aux"].count("train") == int(np.isin(labels, AUX_CLASSES).sum())
    assert m["ood"].count("test") == int(np.isin(labels, OOD_CLASSES).sum())
    assert m["syn"].count("train") == 300


def test_classes_disjoint_and_images_match_sources(demo):
    all_images, all_labels = digits_images()
    assert not set(ID_CLASSES) & set(AUX_CLASSES) and not set(AUX_CLASSES) & set(OOD_CLASSES)
    assert not set(ID_CLASSES) & set(OOD_CLASSES)
    _, train_x, train_y = read_split(demo["id"], "train")
    _, test_x, test_y = read_split(demo["id"], "test")
    assert set(np.unique(train_y)) == set(np.unique(test_y)) == set(range(len(ID_CLASSES)))
    # Every stored image is a real digit of its role's classes (and train/test do not overlap).
    lookup = {im.tobytes(): lab for im, lab in zip(all_images, all_labels)}
    for role, split, classes in (("aux", "train", AUX_CLASSES), ("ood", "test", OOD_CLASSES)):
        _, x, y = read_split(demo[role], split)
        assert (y == -1).all()
        assert {lookup[im.tobytes()] for im in x} <= set(classes)
    assert {lookup[im.tobytes()] for im in train_x} <= set(ID_CLASSES)
    assert not {im.tobytes() for im in train_x} & {im.tobytes() for im in test_x}
    _, syn_x, syn_y = read_split(demo["syn"], "train")
    assert np.bincount(syn_y).tolist() == [50] * 6


def test_deterministic_bytes(demo, tmp_path):
    again = build_demo(str(tmp_path / "again"), num_synthetic=300)
    assert _shard_hashes(again) == _shard_hashes(demo)
    other_seed = build_demo(str(tmp_path / "seed1"), seed=1, num_synthetic=300)
    assert _shard_hashes(other_seed)["id"] != _shard_hashes(demo)["id"]


def test_existing_needs_overwrite(tmp_path):
    out = str(tmp_path / "d")
    first = build_demo(out, num_synthetic=60)
    before = read_manifest(first["id"]).created
    with pytest.raises(DataError, match="pass --overwrite to rebuild") as e:
        build_demo(out, num_synthetic=60)
    assert "overwrite=True" not in str(e.value)  # the CLI user has only the flag
    build_demo(out, num_synthetic=60, overwrite=True)
    assert read_manifest(first["id"]).created != before
    assert not os.path.exists(os.path.join(out, ".building"))


def test_native_8x8(tmp_path):
    dirs = build_demo(str(tmp_path / "d"), image_size=8, num_synthetic=60)
    assert read_manifest(dirs["ood"]).image_shape == [8, 8, 1]
    _, x, _ = read_split(dirs["ood"], "test")
    images, labels = digits_images(8)
    np.testing.assert_array_equal(x, images[np.isin(labels, OOD_CLASSES)])
