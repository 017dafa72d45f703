"""kood.models.layers.ReLU and GlobalAveragePool: Keras' values and first and second derivatives, with
fewer ops in the double backprop; other configurations fall back to Keras; save/load; bfloat16."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kood.models.layers import GlobalAveragePool, ReLU
from tests.model_helpers import double_backprop_terms, penalty_grad_op_types

SHAPE = (3, 6, 5, 4)
PAIRS = {"relu": (keras.layers.ReLU, ReLU, SHAPE), "gap": (keras.layers.GlobalAveragePooling2D, GlobalAveragePool,
                                                              (3, 4))}


def _data(shape, seed=0):
    rng = np.random.default_rng(seed)
    return tf.constant(rng.normal(size=SHAPE).astype("float32")), tf.constant(rng.normal(size=shape).astype("float32"))


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_values_and_derivatives_match_keras(name):
    keras_cls, kood_cls, out_shape = PAIRS[name]
    x, w = _data(out_shape)
    ref = double_backprop_terms(keras_cls(), x, w)
    got = double_backprop_terms(kood_cls(), x, w)
    for term, a, b in zip(["y", "dS/dx", "d penalty/dx"], ref, got):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a).max() > 1e-3, term
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=term)


def test_double_backprop_graphs_are_smaller_than_keras():
    relu, keras_relu = penalty_grad_op_types(ReLU(), SHAPE), penalty_grad_op_types(keras.layers.ReLU(), SHAPE)
    # TF's ReluGrad gradient also returns zeros for the features input, which then get added (AddN).
    assert relu.count("AddN") < keras_relu.count("AddN")
    assert relu.count("ReluGrad") == keras_relu.count("ReluGrad")
    gap, keras_gap = (penalty_grad_op_types(layer, SHAPE)
                      for layer in (GlobalAveragePool(), keras.layers.GlobalAveragePooling2D()))
    # Keras' mean divides by the count as a tensor; its double backward differentiates w.r.t. it too.
    assert gap.count("RealDiv") == 0 < keras_gap.count("RealDiv")


def test_other_configurations_fall_back_to_keras():
    x, _ = _data(SHAPE)
    for kwargs in (dict(max_value=0.5), dict(negative_slope=0.1), dict(threshold=0.2)):
        np.testing.assert_array_equal(ReLU(**kwargs)(x), keras.layers.ReLU(**kwargs)(x))
        assert "IdentityN" not in penalty_grad_op_types(ReLU(**kwargs), SHAPE)  # no custom gradient
    assert "IdentityN" in penalty_grad_op_types(ReLU(), SHAPE)
    np.testing.assert_array_equal(GlobalAveragePool(keepdims=True)(x),
                                  keras.layers.GlobalAveragePooling2D(keepdims=True)(x))
    channels_first = keras.layers.GlobalAveragePooling2D(data_format="channels_first")(x)
    np.testing.assert_array_equal(GlobalAveragePool(data_format="channels_first")(x), channels_first)


def test_bfloat16_average_accumulates_in_float32():
    x = tf.constant(np.random.default_rng(2).uniform(0.0, 1.0, (2, 32, 32, 3)).astype("float32"))
    got = GlobalAveragePool(dtype="mixed_bfloat16")(x)
    assert got.dtype == tf.bfloat16
    np.testing.assert_allclose(tf.cast(got, tf.float32), tf.reduce_mean(x, [1, 2]), rtol=8e-3)


def test_save_load_round_trip(tmp_path):
    inputs = keras.Input(SHAPE[1:])
    model = keras.Model(inputs, GlobalAveragePool()(ReLU()(inputs)))
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert [type(layer) for layer in loaded.layers[1:]] == [ReLU, GlobalAveragePool]
    x, _ = _data(SHAPE)
    np.testing.assert_array_equal(loaded(x), model(x))
