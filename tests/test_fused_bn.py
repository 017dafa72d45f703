"""kood.models.layers.FusedBatchNorm: same values, gradients and moving statistics as Keras' BatchNormalization,
an exact second derivative (double backprop), save/load, and the Keras fallback (synchronized, masks)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kood import losses
from kood.errors import ConfigError
from kood.models import build_classifier, normalized_model
from kood.models.layers import FusedBatchNorm, batch_norm, compute_dtype, use_batchnorm

SHAPE = (6, 5, 5, 4)  # N, H, W, C: 150 values per channel


def _pair(momentum=0.9, epsilon=1e-3, seed=0):
    """A Keras and a fused layer with the same random gamma/beta/moving statistics."""
    rng = np.random.default_rng(seed)
    weights = [rng.normal(1.0, 0.5, 4), rng.normal(0.0, 0.5, 4), rng.normal(0.0, 0.5, 4), rng.uniform(0.5, 2.0, 4)]
    layers = []
    for cls in (keras.layers.BatchNormalization, FusedBatchNorm):
        layer = cls(momentum=momentum, epsilon=epsilon)
        layer.build(SHAPE)
        layer.set_weights([w.astype("float32") for w in weights])
        layers.append(layer)
    return layers


def _data(seed=1):
    rng = np.random.default_rng(seed)
    x = tf.constant((rng.normal(size=SHAPE) * 2.0 + 1.0).astype("float32"))
    w = tf.constant(rng.normal(size=SHAPE).astype("float32"))
    return x, w


def _first_and_second(layer, x, w, training):
    """y, dS/dx, dS/dgamma and the gradients of a penalty on dS/dx w.r.t. gamma, beta and x (S = sum sin(y) w)."""
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            y = layer(x, training=training)
            score = tf.reduce_sum(tf.sin(tf.cast(y, tf.float32)) * w)
        gx, g_gamma, g_beta = inner.gradient(score, [x, layer.gamma, layer.beta])
        # As in losses.grad_norm_per_sample: the norm of each sample's input gradient; plus terms on the
        # weight gradients (a penalty on those also differentiates them again).
        penalty = (tf.reduce_sum(tf.sqrt(tf.reduce_sum(tf.square(gx), axis=[1, 2, 3])))
                   + tf.reduce_sum(tf.sin(g_gamma)) + 0.1 * tf.reduce_sum(tf.square(g_beta)))
    second = outer.gradient(penalty, [layer.gamma, layer.beta, x])
    return [y, gx, g_gamma] + second


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("epsilon", [1e-3, 1e-5])
def test_outputs_and_gradients_match_keras(training, epsilon):
    keras_bn, fused = _pair(epsilon=epsilon)
    x, w = _data()
    ref = _first_and_second(keras_bn, x, w, training)
    got = _first_and_second(fused, x, w, training)
    names = ["y", "dS/dx", "dS/dgamma", "d penalty/dgamma", "d penalty/dbeta", "d penalty/dx"]
    for name, a, b in zip(names, ref, got):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a).max() > 1e-3, name  # a real, non-vanishing quantity is compared
        if name == "d penalty/dx" and training:
            continue  # Keras' own second derivative w.r.t. x is not exact: see the next test
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max(), err_msg=name)


def test_training_second_derivative_in_x_is_exact():
    """The x-part of the double backprop against central finite differences of the first derivative.

    Keras' BatchNormalization takes moments with `tf.nn.moments`, whose variance stops the gradient
    through the mean: harmless for first derivatives, but its second derivative w.r.t. x is off
    (here by more than 1%); the fused layer's closed form is the exact one.
    """
    keras_bn, fused = _pair()
    x, _ = _data()
    rng = np.random.default_rng(2)
    dy = tf.constant(rng.normal(size=SHAPE).astype("float32"))  # fixed upstream gradient
    g = tf.constant(rng.normal(size=SHAPE).astype("float32"))
    direction = rng.normal(size=SHAPE)

    h_gamma = tf.constant(rng.normal(size=4).astype("float32"))

    def first(layer, x):  # <g, dx> + <h_gamma, dgamma>: the BN backward of dy at x
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        dx, dgamma = tape.gradient(y, [x, layer.gamma], output_gradients=dy)
        return tf.reduce_sum(g * dx) + tf.reduce_sum(h_gamma * dgamma)

    def second_along(layer):
        with tf.GradientTape() as tape:
            tape.watch(x)
            value = first(layer, x)
        return float(np.sum(tape.gradient(value, x).numpy() * direction))

    # Finite differences in float64 of the same first derivative (gamma * rstd * (dy - mean(dy) - xhat b)).
    gamma = fused.gamma.numpy().astype(np.float64)

    def first64(x):
        mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
        rstd = 1.0 / np.sqrt(var + fused.epsilon)
        xhat = (x - mean) * rstd
        d = dy.numpy().astype(np.float64)
        dx = gamma * rstd * (d - d.mean(axis=(0, 1, 2)) - xhat * (d * xhat).mean(axis=(0, 1, 2)))
        return np.sum(g.numpy() * dx) + np.sum(h_gamma.numpy() * (d * xhat).sum(axis=(0, 1, 2)))

    x64, h = x.numpy().astype(np.float64), 1e-5
    numeric = (first64(x64 + h * direction) - first64(x64 - h * direction)) / (2 * h)
    np.testing.assert_allclose(first(fused, x).numpy(), first64(x64), rtol=1e-5)
    assert second_along(fused) == pytest.approx(numeric, rel=1e-3)
    assert second_along(keras_bn) != pytest.approx(numeric, rel=1e-2)


def test_moving_statistics_update_like_keras():
    keras_bn, fused = _pair(momentum=0.8)
    for seed in range(3):
        x, _ = _data(seed)
        keras_bn(x, training=True)
        fused(x, training=True)
    for a, b in zip(keras_bn.get_weights(), fused.get_weights()):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    before = fused.moving_mean.numpy().copy()
    fused(x, training=False)
    np.testing.assert_array_equal(fused.moving_mean.numpy(), before)


def test_frozen_layer_uses_moving_statistics_in_training_mode():
    keras_bn, fused = _pair()
    keras_bn.trainable = fused.trainable = False
    x, _ = _data()
    np.testing.assert_allclose(fused(x, training=True), keras_bn(x, training=True), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fused.moving_mean.numpy(), keras_bn.moving_mean.numpy())


def test_greg_penalty_gradient_of_a_network_matches_keras_on_the_weights():
    """score_gradient_penalty through a small_cnn: penalty and energy-loss gradients agree on every weight."""
    x = tf.constant(np.random.default_rng(3).normal(size=(16, 8, 8, 1)).astype("float32"))
    grads = {}
    for kind in ("keras", "fused"):
        keras.utils.set_random_seed(0)
        with use_batchnorm(kind):
            model = build_classifier("small_cnn", input_shape=(8, 8, 1), num_classes=3, mean=[0.0], std=[1.0],
                                     width=4)
        net = normalized_model(model)
        with tf.GradientTape() as tape:
            res = losses.score_gradient_penalty(net, x, 8, 0.0, 0.0)
            loss = res["penalty"] + tf.reduce_mean(res["energies"])
        grads[kind] = [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]
    assert sum(isinstance(layer, FusedBatchNorm) for layer in model.layers) == 2
    for a, b in zip(grads["keras"], grads["fused"]):
        assert np.abs(a).max() > 0
        # Not bit-identical: the keras second derivative differs slightly (see above).
        np.testing.assert_allclose(b, a, rtol=0.05, atol=0.02 * np.abs(a).max())


def test_save_load_round_trip_keeps_the_fused_layer(tmp_path):
    model = build_classifier("small_cnn", input_shape=(8, 8, 1), num_classes=3, mean=[60.0], std=[80.0], width=4)
    x = np.random.default_rng(0).uniform(0, 255, (8, 8, 8, 1)).astype("float32")
    model(x, training=True)  # move the statistics away from their initial values
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in model.layers]
    bn = next(layer for layer in loaded.layers if isinstance(layer, FusedBatchNorm))
    assert bn.get_config()["momentum"] == pytest.approx(0.9)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_synchronized_and_masked_calls_fall_back_to_keras():
    keras_bn, fused = _pair()
    x, _ = _data()
    fused.synchronized = keras_bn.synchronized = True  # what kood.distribute.synchronize_batchnorm does
    np.testing.assert_allclose(fused(x, training=True), keras_bn(x, training=True), rtol=1e-5, atol=1e-5)
    graph = tf.function(lambda x: fused(x, training=True)).get_concrete_function(x).graph
    assert not any(op.type.startswith("FusedBatchNorm") for op in graph.get_operations())
    fused.synchronized = False
    graph = tf.function(lambda x: fused(x, training=True)).get_concrete_function(x).graph
    assert any(op.type == "FusedBatchNormV3" for op in graph.get_operations())


def test_batch_norm_helper_and_bad_kind():
    assert type(batch_norm(momentum=0.9, epsilon=1e-5)) is FusedBatchNorm
    with use_batchnorm("keras"):
        assert type(batch_norm(momentum=0.9, epsilon=1e-5)) is keras.layers.BatchNormalization
    assert type(batch_norm(momentum=0.9, epsilon=1e-5)) is FusedBatchNorm
    with pytest.raises(ConfigError, match="Received: kind='cudnn'"):
        with use_batchnorm("cudnn"):
            pass


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_inference_uses_the_fused_kernel(dtype):
    """Under `compute_dtype` (the GReg+ pool forward) inference takes half-precision activations in one
    fused kernel, close to float32."""
    _, fused = _pair()
    x, _ = _data()
    expected = fused(x, training=False)
    with compute_dtype(fused, dtype):
        graph = tf.function(lambda t: fused(t, training=False)).get_concrete_function(
            tf.TensorSpec(SHAPE, dtype)).graph
        got = fused(tf.cast(x, dtype), training=False)
    assert got.dtype == dtype
    np.testing.assert_allclose(tf.cast(got, tf.float32), expected, rtol=0.02, atol=0.02 * float(tf.reduce_max(
        tf.abs(expected))))
    assert [op.get_attr("T") for op in graph.get_operations() if op.type == "FusedBatchNormV3"] == [tf.as_dtype(dtype)]
    assert fused.dtype_policy.name == "float32"


def test_mixed_bfloat16_training_normalizes_in_float32_on_the_fused_path():
    """Under a mixed policy, training-mode BN casts the bfloat16 activations to float32 for the fused
    kernels (statistics and both derivatives), like Keras; results match float32 to bfloat16 rounding."""
    _, fused = _pair()
    mixed = FusedBatchNorm(momentum=0.9, epsilon=1e-3, dtype="mixed_bfloat16")
    mixed.build(SHAPE)
    mixed.set_weights(fused.get_weights())
    x, w = _data()
    ref = _first_and_second(fused, x, w, True)
    got = _first_and_second(mixed, x, w, True)
    assert got[0].dtype == tf.bfloat16
    names = ["y", "dS/dx", "dS/dgamma", "d penalty/dgamma", "d penalty/dbeta", "d penalty/dx"]
    for name, a, b in zip(names, ref, got):
        a, b = np.asarray(a, np.float32), np.asarray(tf.cast(b, tf.float32))
        np.testing.assert_allclose(b, a, atol=0.05 * np.abs(a).max(), err_msg=name)
    graph = tf.function(lambda t: mixed(t, training=True)).get_concrete_function(
        tf.TensorSpec(SHAPE, tf.bfloat16)).graph
    kernels = [op.get_attr("T") for op in graph.get_operations() if op.type == "FusedBatchNormV3"]
    assert kernels == [tf.float32]
    np.testing.assert_allclose(mixed.moving_mean.numpy(), fused.moving_mean.numpy(), rtol=0.02, atol=1e-3)
