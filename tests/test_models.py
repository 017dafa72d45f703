"""kood.models: registry, classifier assembly, sub-models sharing weights, save/load."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kood.errors import ConfigError, DataError
from kood.models import (build_classifier, load_classifier, model_precision, normalized_model,
                         outputs_model)
from tests.model_helpers import tiny_classifier, tiny_images

RGB = dict(input_shape=(32, 32, 3), mean=[125.0, 123.0, 114.0], std=[63.0, 62.0, 66.0])
# Reduced-width variants keep the forward tests fast; the full sizes are built in test_parameter_counts.
FAST = [
    ("small_cnn", dict(input_shape=(8, 8, 1), mean=[60.0], std=[80.0]), {}),
    ("small_cnn", dict(input_shape=(28, 28, 1), mean=[33.0], std=[78.0]), dict(width=8, depth=3)),
    ("small_cnn", RGB, dict(width=8, depth=3, blocks=2)),
    ("resnet18", RGB, dict(width=4)),
    ("resnet18", RGB, dict(width=4, stem="imagenet")),
    ("wrn40_2", RGB, dict(depth=10, widen=1, dropout=0.3)),
    ("densenet_bc_100", RGB, dict(depth=22, growth=4)),
]


def _round_trip(model, tmp_path, x):
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(model.predict(x, verbose=0), loaded.predict(x, verbose=0))
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    return loaded


@pytest.mark.parametrize("arch,data,kwargs", FAST)
def test_architecture_builds_predicts_and_round_trips(arch, data, kwargs, tmp_path):
    model = build_classifier(arch, num_classes=7, **data, **kwargs)
    assert [model.get_layer(n).name for n in ("normalize", "features", "classifier")]
    x = tiny_images(3, data["input_shape"])
    logits = model.predict(x, verbose=0)
    assert logits.shape == (3, 7) and np.all(np.isfinite(logits))
    assert not any(getattr(layer, "kernel_regularizer", None) for layer in model.layers)
    _round_trip(model, tmp_path, x)


def test_normalize_layer_uses_mean_and_std():
    model = tiny_classifier((8, 8, 1))
    x = tiny_images(2)
    np.testing.assert_allclose(model.get_layer("normalize")(x).numpy(), (x - 120.0) / 70.0, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "wrn40_2", "densenet_bc_100"])
def test_paper_architecture_forward_and_round_trip(arch, tmp_path):
    model = build_classifier(arch, num_classes=10, **RGB)
    x = tiny_images(2, (32, 32, 3))
    assert model.predict(x, verbose=0).shape == (2, 10)
    _round_trip(model, tmp_path, x)


@pytest.mark.slow
def test_densenet121_builds_with_imagenet_sized_features(tmp_path):
    model = build_classifier("densenet121", input_shape=(64, 64, 3), num_classes=10,
                             mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375])
    assert model.get_layer("features").output.shape[-1] == 1024
    x = tiny_images(2, (64, 64, 3))
    _round_trip(model, tmp_path, x)
    out = normalized_model(model)(model.get_layer("normalize")(x), training=False)
    np.testing.assert_allclose(out["logits"].numpy(), model(x, training=False).numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_parameter_counts():
    # Trainable counts of the paper architectures (PyTorch references: 11.17M, 2.24M, 0.77M).
    counts = {arch: sum(int(np.prod(w.shape)) for w in build_classifier(arch, num_classes=10, **RGB).trainable_weights)
              for arch in ("resnet18", "wrn40_2", "densenet_bc_100")}
    assert counts == {"resnet18": 11173962, "wrn40_2": 2243546, "densenet_bc_100": 769162}


def test_unknown_arch_and_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="Known: .*resnet18.*arch='resnet19'"):
        build_classifier("resnet19", num_classes=2, **RGB)
    with pytest.raises(ConfigError, match="stem"):
        build_classifier("resnet18", num_classes=2, stem="tiny", **RGB)
    with pytest.raises(ConfigError, match="dropout=1.5"):
        build_classifier("wrn40_2", num_classes=2, dropout=1.5, **RGB)
    with pytest.raises(ConfigError, match="6n \\+ 4"):
        build_classifier("wrn40_2", num_classes=2, depth=41, **RGB)
    with pytest.raises(ConfigError, match="small_cnn.*colour"):
        build_classifier("small_cnn", num_classes=2, colour=3, **RGB)
    with pytest.raises(ConfigError, match="depth=5"):
        build_classifier("small_cnn", input_shape=(8, 8, 1), num_classes=2, mean=[0.0], std=[1.0], depth=5)
    with pytest.raises(ConfigError, match="one value per channel"):
        build_classifier("small_cnn", input_shape=(8, 8, 3), num_classes=2, mean=[0.0], std=[1.0])
    with pytest.raises(ConfigError, match="std"):
        build_classifier("small_cnn", input_shape=(8, 8, 1), num_classes=2, mean=[0.0], std=[0.0])
    with pytest.raises(ConfigError, match="num_classes"):
        build_classifier("small_cnn", input_shape=(8, 8, 1), num_classes=0, mean=[0.0], std=[1.0])
    with pytest.raises(ConfigError, match="densenet121"):
        build_classifier("densenet121", input_shape=(8, 8, 1), num_classes=2, mean=[0.0], std=[1.0])


def test_sub_models_share_weights_and_agree_with_the_classifier():
    model = tiny_classifier((8, 8, 1), num_classes=4)
    x = tiny_images(6)
    outs = outputs_model(model)(x, training=False)
    net = normalized_model(model)
    norm = net(model.get_layer("normalize")(x), training=False)
    logits = model(x, training=False).numpy()
    np.testing.assert_allclose(outs["logits"].numpy(), logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(norm["logits"].numpy(), logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(norm["features"].numpy(), outs["features"].numpy(), rtol=1e-5, atol=1e-6)
    assert outs["features"].shape == (6, 8)
    assert {id(v) for v in net.weights} <= {id(v) for v in model.weights}
    # Training the classifier changes what the sub-model computes: one set of weights.
    kernel = model.get_layer("classifier").kernel
    kernel.assign(kernel + 1.0)
    assert not np.allclose(net(model.get_layer("normalize")(x), training=False)["logits"].numpy(), logits)


def test_batchnorm_in_normalized_model_training_vs_inference():
    model = tiny_classifier((8, 8, 1), num_classes=3)
    net = normalized_model(model)
    x = tiny_images(16, seed=1)
    x_norm = model.get_layer("normalize")(x)
    bn = next(layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization))
    before = bn.moving_mean.numpy().copy()
    inference = net(x_norm, training=False)["logits"].numpy()
    np.testing.assert_array_equal(bn.moving_mean.numpy(), before)
    train = net(x_norm, training=True)["logits"].numpy()
    # Batch statistics in training mode, and the shared moving averages move.
    assert not np.allclose(train, inference, atol=1e-3)
    assert not np.allclose(bn.moving_mean.numpy(), before)
    np.testing.assert_allclose(model(x, training=True).numpy(), train, rtol=1e-4, atol=1e-5)


def test_sub_models_reject_a_model_without_the_named_layers():
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ConfigError, match="normalize"):
        normalized_model(plain)


def test_load_classifier_file_and_model_dir(tmp_path):
    model = tiny_classifier((8, 8, 1))
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    model.save(str(model_dir / "best.keras"))
    x = tiny_images(2)
    for path in (str(model_dir), str(model_dir / "best.keras")):
        np.testing.assert_array_equal(load_classifier(path).predict(x, verbose=0), model.predict(x, verbose=0))


def test_load_classifier_errors_name_the_path(tmp_path):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(DataError, match="empty_run has no best.keras"):
        load_classifier(str(empty))
    with pytest.raises(DataError, match="nope.keras does not exist"):
        load_classifier(str(tmp_path / "nope.keras"))
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="broken.keras is not a readable .keras file"):
        load_classifier(str(broken))
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    plain.save(str(tmp_path / "plain.keras"))
    with pytest.raises(DataError, match="plain.keras is not a kood classifier"):
        load_classifier(str(tmp_path / "plain.keras"))


def test_load_classifier_is_strict_about_weights(tmp_path):
    """A .keras file whose weights do not fit its architecture fails instead of loading partially."""
    import zipfile

    small = tiny_classifier((8, 8, 1), num_classes=3)
    big = tiny_classifier((8, 8, 1), num_classes=5)
    small.save(str(tmp_path / "small.keras"))
    big.save(str(tmp_path / "big.keras"))
    # Frankenstein file: small's config with big's weights.
    with zipfile.ZipFile(tmp_path / "small.keras") as a, zipfile.ZipFile(tmp_path / "big.keras") as b, \
            zipfile.ZipFile(tmp_path / "mixed.keras", "w") as out:
        for name in a.namelist():
            out.writestr(name, (b if name.endswith(".h5") else a).read(name))
    with pytest.raises(DataError, match="mixed.keras"):
        load_classifier(str(tmp_path / "mixed.keras"))


def test_load_classifier_refuses_a_load_keras_only_warns_about(tmp_path, monkeypatch):
    import warnings

    model = tiny_classifier((8, 8, 1))
    model.save(str(tmp_path / "m.keras"))
    real_load = keras.models.load_model

    def warning_load(*args, **kwargs):
        warnings.warn("Skipping nested container at 'x': Affected layers will retain their freshly-initialized "
                      "weights.")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(keras.models, "load_model", warning_load)
    with pytest.raises(DataError, match="m.keras loaded only partially"):
        load_classifier(str(tmp_path / "m.keras"))


@pytest.mark.parametrize("arch,data,kwargs", [FAST[0], FAST[3], FAST[5]])
def test_mixed_bfloat16_computes_in_bfloat16_with_float32_weights_and_outputs(arch, data, kwargs, tmp_path):
    model = build_classifier(arch, num_classes=7, precision="mixed_bfloat16", **data, **kwargs)
    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored
    convs = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.Conv2D)]
    assert convs and all(layer.compute_dtype == "bfloat16" for layer in convs)
    assert all(w.dtype == "float32" for w in model.weights)
    assert [model.get_layer(n).compute_dtype for n in ("normalize", "features", "classifier")] == ["float32"] * 3
    x = tiny_images(3, data["input_shape"])
    out = outputs_model(model)(x)
    assert out["logits"].dtype == tf.float32 and out["features"].dtype == tf.float32
    reference = build_classifier(arch, num_classes=7, **data, **kwargs)
    reference.set_weights(model.get_weights())
    expected = reference(x).numpy()
    np.testing.assert_allclose(model(x).numpy(), expected, atol=0.05 * np.abs(expected).max())
    assert not np.array_equal(model(x).numpy(), expected)  # really computed in bfloat16
    assert model_precision(_round_trip(model, tmp_path, x)) == "mixed_bfloat16"
    assert model_precision(reference) == "float32"


def test_precision_errors_restore_the_global_policy():
    with pytest.raises(ConfigError, match="precision='mixed_float16'"):
        build_classifier("small_cnn", num_classes=2, precision="mixed_float16", **RGB)
    with pytest.raises(ConfigError, match="stem"):
        build_classifier("resnet18", num_classes=2, precision="mixed_bfloat16", stem="tiny", **RGB)
    assert keras.config.dtype_policy().name == "float32"


def test_load_classifier_refuses_non_finite_weights(tmp_path):
    model = build_classifier("small_cnn", input_shape=(8, 8, 1), num_classes=3, mean=[0.0], std=[1.0], width=4)
    bn = next(w for w in model.weights if "moving_variance" in w.path)
    bn.assign(np.full(bn.shape, np.nan, np.float32))  # what a diverged run leaves in BatchNorm statistics
    model.save(str(tmp_path / "nan.keras"))
    with pytest.raises(DataError, match=r"nan.keras has non-finite weights \(.*moving_variance"):
        load_classifier(str(tmp_path / "nan.keras"))


def test_densenet121_imagenet_weights_offline_is_a_config_error_saying_how_to_prefetch(monkeypatch):
    def offline(*args, **kwargs):  # what keras.utils.get_file raises without a network
        raise Exception("URL fetch failure on https://storage.googleapis.com/x.h5: None -- [Errno -2] Name or "
                        "service not known")

    monkeypatch.setattr(keras.applications, "DenseNet121", offline)
    with pytest.raises(ConfigError, match=r"weights=imagenet .* the download failed \(URL fetch failure.*fetch them "
                                          r"first where there is.*or pass --arch_kwargs=weights=none"):
        build_classifier("densenet121", input_shape=(32, 32, 3), num_classes=10, mean=[0.0] * 3, std=[1.0] * 3,
                         weights="imagenet")


def test_model_precision_ignores_a_global_mixed_policy_the_model_does_not_compute_in():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")  # a notebook's global setting
    try:
        model = build_classifier("small_cnn", input_shape=(8, 8, 1), num_classes=3, mean=[0.0], std=[1.0])
        mixed = build_classifier("small_cnn", input_shape=(8, 8, 1), num_classes=3, mean=[0.0], std=[1.0],
                                 precision="mixed_bfloat16")
    finally:
        keras.config.set_dtype_policy(previous)
    assert model_precision(model) == "float32"
    assert model_precision(mixed) == "mixed_bfloat16"


def test_import_kood_registers_its_layers_for_keras_load_model(tmp_path):
    import os
    import subprocess
    import sys

    from kood.models import build_classifier

    path = str(tmp_path / "m.keras")
    build_classifier("small_cnn", input_shape=(8, 8, 1), num_classes=3, mean=[1.0], std=[1.0]).save(path)
    code = f"import kood, keras; print(keras.models.load_model({path!r}).name)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path),
                         env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))})
    assert out.returncode == 0 and out.stdout.strip() == "small_cnn", out.stderr[-2000:]
