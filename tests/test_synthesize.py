"""The small class-conditional generator: counts, labels, balance, quality vs noise, bad input."""

import numpy as np
import pytest

from kood.demo_data import digits_images
from kood.errors import ConfigError, DataError
from kood.manifest import read_manifest
from kood.synthesize import class_counts, frechet_distance, generate, quality, read_split, synthesize
from kood.writer import write_arrays


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory):
    images, labels = digits_images(8)
    keep = labels < 4  # 4 classes keeps the test fast
    d = str(tmp_path_factory.mktemp("real"))
    write_arrays(d, {"train": (images[keep], labels[keep])}, kind="real", class_names=["a", "b", "c", "d"])
    return d


def test_class_counts():
    assert class_counts(10, 4) == [3, 3, 2, 2]
    assert sum(class_counts(1001, 7)) == 1001


@pytest.mark.parametrize("model", ["gmm", "vae"])
def test_writes_requested_balanced_labelled_set(real_dir, tmp_path, model):
    out = str(tmp_path / "syn")
    m = synthesize(real_dir, out, 203, model=model, epochs=15, seed=3)
    assert read_manifest(out).to_json() == m.to_json()
    assert m.kind == "synthetic" and m.image_shape == [8, 8, 1]
    assert m.num_classes == 4 and m.class_names == ["a", "b", "c", "d"]
    _, x, y = read_split(out, "train")
    assert x.shape == (203, 8, 8, 1) and x.dtype == np.uint8
    assert y.min() >= 0 and y.max() < 4
    assert sorted(np.bincount(y, minlength=4).tolist()) == [50, 51, 51, 51]
    q = m.extra["quality"]
    assert m.extra["generator"] == model
    # A real-trained classifier recognises the synthetic classes far above chance (0.25).
    assert q["real_classifier_accuracy_on_synthetic"] > 0.8


def test_quality_better_than_noise(real_dir):
    _, x, y = read_split(real_dir)
    syn_x, syn_y = generate(x, y, 4, 400, seed=0)
    noise = np.random.default_rng(0).integers(0, 256, syn_x.shape).astype(np.uint8)
    q_syn, q_noise = quality(x, y, syn_x, syn_y, 4), quality(x, y, noise, syn_y, 4)
    assert q_syn["real_classifier_accuracy_on_synthetic"] > q_noise["real_classifier_accuracy_on_synthetic"] + 0.4
    assert q_syn["frechet_pca"] * 5 < q_noise["frechet_pca"]
    # Real vs real is the reference floor: synthetic sits between it and noise.
    assert q_syn["frechet_pca_real_vs_real"] < q_noise["frechet_pca"]


def test_generate_deterministic(real_dir):
    _, x, y = read_split(real_dir)
    a, b, c = generate(x, y, 4, 50, seed=1), generate(x, y, 4, 50, seed=1), generate(x, y, 4, 50, seed=2)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_frechet_distance_of_shifted_gaussians():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((20000, 3))
    assert frechet_distance(a, a + np.array([2.0, 0, 0])) == pytest.approx(4.0, abs=1e-6)
    assert frechet_distance(a, rng.standard_normal((20000, 3))) < 0.01


def test_bad_input(real_dir, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        synthesize(str(tmp_path / "missing"), str(tmp_path / "o"), 10)
    unlabelled = str(tmp_path / "unlabelled")
    write_arrays(unlabelled, {"train": (np.zeros((4, 8, 8, 1), np.uint8), -np.ones(4, np.int64))}, kind="outlier")
    with pytest.raises(DataError, match="num_classes=0"):
        synthesize(unlabelled, str(tmp_path / "o"), 10)
    with pytest.raises(ConfigError, match="num_images=0"):
        synthesize(real_dir, str(tmp_path / "o"), 0)
    with pytest.raises(ConfigError, match="model='gan'"):
        synthesize(real_dir, str(tmp_path / "o"), 5, model="gan")


def test_existing_out_is_refused_before_fitting(real_dir, tmp_path, monkeypatch):
    import kood.synthesize as ks

    def fail(*args, **kwargs):
        raise AssertionError("the generator was fitted before --out was checked")

    monkeypatch.setattr(ks, "generate", fail)
    with pytest.raises(DataError, match="already holds a complete dataset; pass --overwrite"):
        synthesize(real_dir, real_dir, 10)  # real_dir is a complete dataset
    (tmp_path / "afile").write_text("")
    with pytest.raises(DataError, match="is a file, not a directory"):
        synthesize(real_dir, str(tmp_path / "afile"), 10)


def test_fewer_images_than_classes_warns_naming_the_empty_classes(real_dir, tmp_path, capsys):
    m = synthesize(real_dir, str(tmp_path / "syn"), 2, seed=0)
    assert m.count("train") == 2
    err = capsys.readouterr().err
    assert "warning: no image is generated for class(es) ['c', 'd'] (2 of 4): --num_images=2 is less than" in err
    synthesize(real_dir, str(tmp_path / "syn4"), 4, seed=0)
    assert "warning" not in capsys.readouterr().err
