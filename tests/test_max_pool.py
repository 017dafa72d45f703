"""kood.models.layers.MaxPool: Keras' max-pool values and first derivatives, and TF's second derivative
(MaxPoolGradGrad) from a cheaper closed form, ties included; other configurations fall back to Keras."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kood.models.layers import MaxPool
from tests.model_helpers import double_backprop_terms, penalty_grad_op_types


def _inputs(shape, relu, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype("float32")
    if relu:  # ties: windows of zeros, as after conv-BN-ReLU in small_cnn
        x = np.maximum(x - 0.5, 0.0)
    return tf.constant(x)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("size", [2, 3])
def test_values_and_derivatives_match_keras(relu, size):
    shape = (3, 6 * size, 4 * size, 5)
    x = _inputs(shape, relu)
    w = tf.constant(np.random.default_rng(1).normal(size=(3, 6, 4, 5)).astype("float32"))
    ref = double_backprop_terms(keras.layers.MaxPooling2D(size), x, w)
    got = double_backprop_terms(MaxPool(size), x, w)
    for name, a, b in zip(["y", "dS/dx", "d penalty/dx"], ref, got):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a).max() > 1e-3, name
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=name)
    if relu:
        assert float(tf.reduce_mean(tf.cast(x == 0, tf.float32))) > 0.5  # the tie case was exercised


def test_fast_path_replaces_max_pool_grad_grad_and_other_configs_fall_back():
    assert "MaxPoolGradGrad" not in penalty_grad_op_types(MaxPool(2), (2, 8, 8, 3))
    assert "MaxPoolGradGrad" in penalty_grad_op_types(MaxPool(3, strides=2, padding="same"), (2, 8, 8, 3))
    assert "MaxPoolGradGrad" in penalty_grad_op_types(MaxPool(2), (2, 7, 8, 3))  # a row left over: Keras' layer
    x = _inputs((2, 7, 7, 3), relu=False)
    np.testing.assert_array_equal(MaxPool(3, strides=2, padding="same")(x),
                                  keras.layers.MaxPooling2D(3, strides=2, padding="same")(x))


def test_save_load_round_trip(tmp_path):
    inputs = keras.Input((8, 8, 2))
    model = keras.Model(inputs, MaxPool(2)(inputs))
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.layers[-1], MaxPool)
    x = _inputs((2, 8, 8, 2), relu=False)
    np.testing.assert_array_equal(loaded(x), model(x))
