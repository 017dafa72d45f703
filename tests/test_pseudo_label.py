"""Pseudo-labelling: argmax labels equal the model's own predictions; min_confidence drops exactly the low ones."""

import keras
import numpy as np
import pytest

from kood.errors import ConfigError, DataError
from kood.manifest import read_manifest
from kood.pseudo_label import pseudo_label
from kood.synthesize import read_split
from kood.writer import write_arrays

SHAPE = (8, 8, 1)


def _tiny_classifier(path, num_classes=3, shape=SHAPE):
    """A kood-style classifier (normalize/features/classifier) with random weights, saved to `path`."""
    inputs = keras.Input(shape)
    x = keras.layers.Normalization(mean=100.0, variance=50.0 ** 2, name="normalize")(inputs)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(16, activation="relu", name="features")(x)
    logits = keras.layers.Dense(num_classes, name="classifier")(x)
    model = keras.Model(inputs, logits)
    model.save(path)
    return model


@pytest.fixture
def unlabelled(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (70,) + SHAPE).astype(np.uint8)
    test = rng.integers(0, 256, (25,) + SHAPE).astype(np.uint8)
    d = str(tmp_path / "raw")
    write_arrays(d, {"train": (train, -np.ones(70, np.int64)), "test": (test, -np.ones(25, np.int64))},
                 kind="synthetic", num_classes=0, num_shards=3)
    return d, {"train": train, "test": test}


def _expected(model, images):
    probs = keras.ops.convert_to_numpy(keras.ops.softmax(model.predict(images.astype(np.float32), verbose=0)))
    return probs.argmax(-1), probs.max(-1)


def test_labels_are_model_argmax(unlabelled, tmp_path):
    src, images = unlabelled
    model = _tiny_classifier(str(tmp_path / "m.keras"))
    out = str(tmp_path / "out")
    m = pseudo_label(src, out, str(tmp_path / "m.keras"), batch_size=16)
    assert read_manifest(out).to_json() == m.to_json()
    assert m.kind == "synthetic" and m.num_classes == 3 and m.class_names == ["0", "1", "2"]
    assert len(m.splits["train"]["shards"]) == 3
    total_per_class = np.zeros(3, int)
    for split, x in images.items():
        _, got_x, got_y = read_split(out, split)
        want_y, _ = _expected(model, x)
        np.testing.assert_array_equal(got_x, x)  # order and pixels preserved
        np.testing.assert_array_equal(got_y, want_y)
        total_per_class += np.bincount(want_y, minlength=3)
    assert (total_per_class > 0).sum() >= 2  # the model is not constant, so the comparison means something
    assert m.extra["per_class"] == total_per_class.tolist()
    assert m.extra["kept"] == 95 and m.extra["dropped"] == 0


def test_min_confidence_drops_exactly_the_low_ones(unlabelled, tmp_path):
    import tensorflow as tf

    from kood.records import parse_example

    src, images = unlabelled
    model = _tiny_classifier(str(tmp_path / "m.keras"))
    _, conf = _expected(model, images["train"])
    threshold = float(np.median(conf))
    out = str(tmp_path / "out")
    m = pseudo_label(src, out, str(tmp_path / "m.keras"), min_confidence=threshold)
    man = read_manifest(out)
    shape = man.shape
    ds = tf.data.TFRecordDataset(man.shard_paths(out, "train")).map(lambda s: parse_example(s, shape, man.encoding))
    records = list(ds.as_numpy_iterator())
    kept_index = [int(r["index"]) for r in records]
    assert kept_index == np.flatnonzero(conf >= threshold).tolist()
    np.testing.assert_allclose([r["confidence"] for r in records], conf[conf >= threshold], rtol=1e-5)
    assert m.extra["per_split"]["train"] == {"kept": len(kept_index), "dropped": int((conf < threshold).sum())}
    assert m.extra["min_confidence"] == threshold
    assert m.extra["kept"] + m.extra["dropped"] == 95


def test_class_names_from_real_set_and_model_dir(unlabelled, tmp_path):
    src, _ = unlabelled
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    _tiny_classifier(str(model_dir / "best.keras"))
    real = str(tmp_path / "real")
    write_arrays(real, {"train": (np.zeros((3,) + SHAPE, np.uint8), np.arange(3))}, class_names=["x", "y", "z"])
    m = pseudo_label(src, str(tmp_path / "out"), str(model_dir), real_dir=real)
    assert m.class_names == ["x", "y", "z"]


def test_bad_input(unlabelled, tmp_path):
    src, _ = unlabelled
    _tiny_classifier(str(tmp_path / "wrong.keras"), shape=(16, 16, 1))
    with pytest.raises(DataError, match=r"\(8, 8, 1\).*\(16, 16, 1\)"):
        pseudo_label(src, str(tmp_path / "out"), str(tmp_path / "wrong.keras"))
    _tiny_classifier(str(tmp_path / "m.keras"))
    with pytest.raises(ConfigError, match="min_confidence=1.5"):
        pseudo_label(src, str(tmp_path / "out"), str(tmp_path / "m.keras"), min_confidence=1.5)
    with pytest.raises(DataError, match="no image"):
        pseudo_label(src, str(tmp_path / "out2"), str(tmp_path / "m.keras"), min_confidence=1.0)
    real4 = str(tmp_path / "real4")
    write_arrays(real4, {"train": (np.zeros((4,) + SHAPE, np.uint8), np.arange(4))})
    with pytest.raises(DataError, match="4 classes"):
        pseudo_label(src, str(tmp_path / "out3"), str(tmp_path / "m.keras"), real_dir=real4)


def test_classes_without_images_are_named_on_stderr(unlabelled, tmp_path, capsys):
    src, _ = unlabelled
    model = _tiny_classifier(str(tmp_path / "m.keras"))
    kernel, _ = model.get_layer("classifier").get_weights()
    model.get_layer("classifier").set_weights([kernel * 0, np.array([0.0, 5.0, 0.0])])  # always class 1
    model.save(str(tmp_path / "m.keras"))
    m = pseudo_label(src, str(tmp_path / "out"), str(tmp_path / "m.keras"))
    assert m.extra["per_class"] == [0, 95, 0]
    err = capsys.readouterr().err
    assert "pseudo-labels per class: 0=0, 1=95, 2=0" in err
    assert "warning: no image was labelled as class(es) ['0', '2'] (2 of 3)" in err
