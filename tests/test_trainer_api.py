"""OODTrainer used as a library on a user's own Keras models (not kood's registry)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from kood.errors import ConfigError
from kood.methods import method_config
from kood.trainer import OODTrainer


def _own_model(*, before=None, normalize=None, features_flat=True, head_activation=None):
    """A user's functional model: [before] -> normalize -> conv -> features -> classifier."""
    inputs = keras.Input((8, 8, 1))
    x = before(inputs) if before is not None else inputs
    x = (normalize or keras.layers.Normalization(mean=[30.0], variance=[900.0], name="normalize"))(x)
    x = keras.layers.Conv2D(4, 3, activation="relu", name="features" if not features_flat else None)(x)
    x = keras.layers.GlobalAveragePooling2D(name="features" if features_flat else None)(x)
    return keras.Model(inputs, keras.layers.Dense(3, activation=head_activation, name="classifier")(x))


def _own_model_under(policy: str):
    """`_own_model()` built under a global Keras dtype policy (restored after)."""
    keras.mixed_precision.set_global_policy(policy)
    try:
        return _own_model()
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _one_batch():
    """8 made-up 8x8x1 images and a dataset of one ((x_id, y_id), x_aux) batch of them."""
    x = np.random.default_rng(0).uniform(0, 255, (8, 8, 8, 1)).astype("float32")
    return x, tf.data.Dataset.from_tensors(((x, np.arange(8) % 3), x))


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.normalize = keras.layers.Normalization(mean=[30.0], variance=[900.0], name="normalize")
        self.features = keras.layers.GlobalAveragePooling2D(name="features")
        self.classifier = keras.layers.Dense(3, name="classifier")

    def call(self, x):
        return self.classifier(self.features(self.normalize(x)))


def _with_softmax_after_the_classifier():
    model = _own_model()
    return keras.Model(model.inputs, keras.layers.Softmax()(model.outputs[0]))


def test_a_users_functional_model_with_the_named_layers_trains():
    model = _own_model()
    trainer = OODTrainer(model, method_config("greg"))
    trainer.compile(optimizer="adam")
    x, ds = _one_batch()
    assert np.isfinite(trainer.fit(ds, verbose=0).history["loss"][-1])


def test_a_users_mixed_bfloat16_model_trains():
    # Keras < 3.10 puts an autocast Cast op between the input and a bfloat16 'normalize' layer.
    model = _own_model_under("mixed_bfloat16")
    trainer = OODTrainer(model, method_config("greg"))
    trainer.compile(optimizer="adam")
    x, ds = _one_batch()
    assert np.isfinite(trainer.fit(ds, verbose=0).history["loss"][-1])


@pytest.mark.parametrize("make, message", [
    (lambda: keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(3)]),
     "no layer named ['normalize', 'features', 'classifier']"),
    (lambda: _own_model(before=keras.layers.Rescaling(1 / 255.0)), "must take the model's (single) input directly"),
    (lambda: _own_model(normalize=keras.layers.Rescaling(1 / 255.0, name="normalize")), "`variance`"),
    (lambda: _own_model(features_flat=False), "must output a [B, D] vector"),
    (lambda: _own_model(head_activation="softmax"), "must output logits"),
    (lambda: _Subclassed(), "subclassed keras.Model"),
    (lambda: _with_softmax_after_the_classifier(), "logits must be the model's (single) output"),
])
def test_a_model_the_trainer_cannot_train_is_a_config_error_saying_what_to_change(make, message):
    with pytest.raises(ConfigError) as e:
        OODTrainer(make(), method_config("greg"))
    assert message in str(e.value)
    assert "named 'normalize'" in str(e.value) and "Received:" in str(e.value)


def test_fit_on_arrays_without_y_and_a_batch_of_unknown_structure():
    rng = np.random.default_rng(0)
    x_id, y_id, x_aux = (rng.uniform(0, 255, (16, 8, 8, 1)).astype("float32"), np.arange(16) % 3,
                         rng.uniform(0, 255, (16, 8, 8, 1)).astype("float32"))
    trainer = OODTrainer(_own_model(), method_config("energy"))
    trainer.compile(optimizer="adam")
    # Keras hands arrays given as x alone to train_step as the 1-tuple (x,).
    history = trainer.fit(x=((x_id, y_id), x_aux), batch_size=8, epochs=1, verbose=0).history
    assert np.isfinite(history["energy_loss"][-1])
    ce = OODTrainer(_own_model(), method_config("ce"))
    ce.compile(optimizer="adam")
    assert np.isfinite(ce.fit(x=(x_id, y_id), batch_size=8, epochs=1, verbose=0).history["loss"][-1])
    with pytest.raises(ConfigError, match=r"fit takes batches of \(x_id, y_id\).*Received: a batch of structure"):
        ce.fit(x=x_id, batch_size=8, epochs=1, verbose=0)


def test_images_of_another_shape_than_the_model_input_are_named():
    from kood.models import build_classifier

    model = build_classifier("small_cnn", input_shape=(8, 8, 3), num_classes=3, mean=[0.0] * 3, std=[1.0] * 3)
    trainer = OODTrainer(model, method_config("greg"))
    trainer.compile(optimizer="adam")
    x1 = np.zeros((4, 8, 8, 1), np.float32)
    x3 = np.zeros((4, 8, 8, 3), np.float32)
    with pytest.raises(ConfigError, match=r"ID images must have the classifier's input shape \(8, 8, 3\).*\(4, 8, 8, 1\)"):
        trainer.fit(tf.data.Dataset.from_tensors(((x1, np.zeros(4)), x3)), verbose=0)
    with pytest.raises(ConfigError, match=r"auxiliary images .*Received: auxiliary batch shape \(4, 8, 8, 1\)"):
        trainer.fit(tf.data.Dataset.from_tensors(((x3, np.zeros(4)), x1)), verbose=0)


@pytest.mark.parametrize("override, message", [
    (dict(m_in="-25"), "--m_in: must be a number. Received: m_in='-25'"),
    (dict(pool_factor=None), "--pool_factor: must be a number"),
    (dict(cluster_k=2.5), "--cluster_k: must be an integer. Received: cluster_k=2.5"),
    (dict(kmeans_iters=2.5), "--kmeans_iters: must be an integer"),
    (dict(two_way="no"), "--two_way: must be True or False. Received: two_way='no'"),
    (dict(grad_weight=True), "--grad_weight: must be a number"),
])
def test_method_hyperparameters_of_the_wrong_type_are_config_errors(override, message):
    with pytest.raises(ConfigError) as e:
        method_config("greg_plus", **override)
    assert message in str(e.value)


def test_method_hyperparameters_accept_ints_for_floats_and_numpy_numbers():
    cfg = method_config("greg_plus", m_in=-25, m_out=np.float32(-7.0), cluster_k=np.int64(8), pool_factor=4,
                        two_way=np.bool_(False))
    assert cfg.cluster_k == 8 and not cfg.two_way


def test_a_model_computing_in_float16_is_refused():
    model = _own_model_under("mixed_float16")
    with pytest.raises(ConfigError, match=r"float16 would need loss scaling.*Received: layers computing in float16: "
                                          r"\['normalize'"):
        OODTrainer(model, method_config("greg"))


def test_a_trainer_saves_and_loads_with_its_classifier_method_and_optimizer(tmp_path):
    x, ds = _one_batch()
    trainer = OODTrainer(_own_model(), method_config("greg", grad_weight=0.5), seed=3)
    trainer.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    trainer.fit(ds, verbose=0)
    path = str(tmp_path / "trainer.keras")
    keras.saving.save_model(trainer, path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, OODTrainer) and loaded.config == trainer.config and loaded.seed == 3
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), trainer.predict(x, verbose=0))
    assert loaded.optimizer.iterations.numpy() == 1
    # trainer views of the classifier's layers are not saved or listed twice
    assert [layer.name for layer in loaded.layers] == [trainer.classifier.name]
    assert loaded.count_params() == trainer.classifier.count_params()
    loaded.fit(ds, verbose=0)  # and trains on
    assert loaded.optimizer.iterations.numpy() == 2


def test_a_saved_greg_plus_trainer_loads_after_import_kood_and_trains_on_as_the_original(tmp_path):
    """`import kood` registers kood>OODTrainer (as it does kood's layers); a fresh process resumes exactly."""
    import os
    import subprocess
    import sys

    from kood.models import build_classifier

    keras.utils.set_random_seed(0)
    model = build_classifier("small_cnn", input_shape=(8, 8, 1), num_classes=3, mean=[100.0], std=[60.0], width=4)
    config = method_config("greg_plus", pool_factor=4, cluster_k=4)  # the sampler's seed uses the step counter
    trainer = OODTrainer(model, config, seed=7)
    trainer.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    rng = np.random.default_rng(0)
    x, x_aux = rng.uniform(0, 255, (8, 8, 8, 1)).astype("float32"), rng.uniform(0, 255, (32, 8, 8, 1)).astype("float32")
    np.savez(tmp_path / "data.npz", x=x, x_aux=x_aux)
    ds = tf.data.Dataset.from_tensors(((x, np.arange(8) % 3), x_aux)).repeat(2)
    trainer.fit(ds.take(1), verbose=0)
    trainer.save(str(tmp_path / "trainer.keras"))
    expected = trainer.fit(ds, verbose=0).history["loss"][-1]
    script = ("import sys, numpy as np, tensorflow as tf, keras, kood\n"
              "t = keras.models.load_model(sys.argv[1])\n"
              "d = np.load(sys.argv[2])\n"
              "ds = tf.data.Dataset.from_tensors(((d['x'], np.arange(8) % 3), d['x_aux'])).repeat(2)\n"
              "print('LOSS', repr(t.fit(ds, verbose=0).history['loss'][-1]), int(t.optimizer.iterations.numpy()))\n")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "trainer.keras"), str(tmp_path / "data.npz")],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": repo, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("LOSS"))
    assert line == f"LOSS {expected!r} 3"
