"""kood.models.layers.Normalization: bit-identical to Keras' Normalization (values and input gradients),
computed over a flat axis; other configurations fall back to Keras; save/load; used by build_classifier."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kood.models import build_classifier
from kood.models.layers import Normalization


def _stats(channels, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 200, channels), rng.uniform(1, 90, channels) ** 2


def _images(shape, seed=1):
    return tf.constant(np.random.default_rng(seed).uniform(0, 255, shape).astype("float32"))


@pytest.mark.parametrize("shape", [(7, 32, 32, 3), (5, 8, 8, 1), (3, 4, 6, 2), (4, 10)])
def test_values_and_input_gradients_equal_keras_bit_for_bit(shape):
    mean, variance = _stats(shape[-1])
    x = _images(shape)
    results = []
    for cls in (keras.layers.Normalization, Normalization):
        layer = cls(mean=mean, variance=variance)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            total = tf.reduce_sum(tf.sin(y))
        results.append((y.numpy(), tape.gradient(total, x).numpy()))
    (ref_y, ref_g), (y, g) = results
    assert np.abs(ref_y).max() > 0.5
    np.testing.assert_array_equal(y, ref_y)
    np.testing.assert_array_equal(g, ref_g)


def test_flat_path_has_no_per_channel_broadcast():
    mean, variance = _stats(3)
    layer = Normalization(mean=mean, variance=variance)
    graph = tf.function(layer).get_concrete_function(tf.TensorSpec([None, 32, 32, 3])).graph
    subs = [op for op in graph.get_operations() if op.type == "Sub"]
    assert subs and all(op.inputs[1].shape.as_list() == [32 * 32 * 3] for op in subs)


def test_other_configurations_fall_back_to_keras():
    mean, variance = _stats(3)
    x = _images((2, 5, 6, 3))
    inputs = keras.Input((None, None, 3))  # unknown image size
    model = keras.Model(inputs, Normalization(mean=mean, variance=variance)(inputs))
    np.testing.assert_array_equal(model(x), keras.layers.Normalization(mean=mean, variance=variance)(x))
    inverted = Normalization(mean=mean, variance=variance, invert=True)(x)
    np.testing.assert_array_equal(inverted, keras.layers.Normalization(mean=mean, variance=variance, invert=True)(x))
    np.testing.assert_allclose(inverted, x.numpy() * np.sqrt(variance) + mean, rtol=1e-6)
    per_row = dict(axis=1, mean=np.arange(2.0), variance=np.arange(1.0, 3.0))
    z = _images((4, 2, 3), seed=3)
    np.testing.assert_array_equal(Normalization(**per_row)(z), keras.layers.Normalization(**per_row)(z))


def test_classifier_uses_it_and_save_load_keeps_it(tmp_path):
    model = build_classifier("small_cnn", input_shape=(8, 8, 3), num_classes=4, mean=[60.0, 70.0, 80.0],
                             std=[30.0, 40.0, 50.0], width=4)
    assert type(model.get_layer("normalize")) is Normalization
    x = _images((3, 8, 8, 3))
    np.testing.assert_array_equal(model.get_layer("normalize")(x),
                                  (x.numpy() - np.float32([60, 70, 80])) / np.float32([30, 40, 50]))
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.get_layer("normalize")) is Normalization
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
