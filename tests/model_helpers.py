"""Tiny classifiers and data shared by tests (kood.models contract: normalize / features / classifier)."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from kood.models import build_classifier


def tiny_classifier(input_shape=(8, 8, 1), num_classes: int = 3, width: int = 4, depth: int = 2) -> keras.Model:
    """A small_cnn with BatchNorm, a few hundred weights; mean/std fit `tiny_images`."""
    channels = input_shape[-1]
    return build_classifier("small_cnn", input_shape=input_shape, num_classes=num_classes,
                            mean=[120.0] * channels, std=[70.0] * channels, width=width, depth=depth)


def linear_classifier(input_shape=(4, 4, 2), num_classes: int = 3, seed: int = 0) -> keras.Model:
    """logits = W flatten((x - mean) / std) + b with random W, b: input-gradients have a closed form.

    Follows the classifier contract (layers `normalize`, `features`, `classifier`) without BatchNorm.
    """
    rng = np.random.default_rng(seed)
    channels = input_shape[-1]
    inputs = keras.Input(shape=input_shape, name="pixels")
    x = keras.layers.Normalization(mean=rng.uniform(50, 150, channels), variance=rng.uniform(20, 80, channels) ** 2,
                                   name="normalize")(inputs)
    features = keras.layers.Activation("linear", name="features")(keras.layers.Flatten()(x))
    logits = keras.layers.Dense(num_classes, name="classifier")(features)
    model = keras.Model(inputs, logits)
    dim = int(np.prod(input_shape))
    model.get_layer("classifier").set_weights([rng.normal(0, 1.0, (dim, num_classes)).astype("float32"),
                                               rng.normal(0, 1.0, num_classes).astype("float32")])
    return model


def tiny_images(n: int, shape=(8, 8, 1), seed: int = 0) -> np.ndarray:
    """float32 [n, *shape] random pixel values in 0..255."""
    return np.random.default_rng(seed).uniform(0, 255, (n, *shape)).astype("float32")


def blobs(num_blobs: int, per_blob: int, dim: int = 8, spread: float = 0.05, seed: int = 0):
    """Well-separated Gaussian blobs: points [num_blobs * per_blob, dim] float32 and true labels."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1, (num_blobs, dim)) * 10
    labels = np.repeat(np.arange(num_blobs), per_blob)
    points = centers[labels] + rng.normal(0, spread, (len(labels), dim))
    order = rng.permutation(len(labels))
    return points[order].astype("float32"), labels[order]


def double_backprop_terms(layer, x, w):
    """y, dS/dx and d(sum (dS/dx)^2 * w2)/dx along the double-backprop path, S = sum(sin(y) * w).

    How the GReg penalty differentiates a layer: an input gradient, then its gradient again.
    """
    w2 = tf.reshape(tf.range(tf.size(x), dtype=tf.float32) % 7.0, x.shape)
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            y = layer(x)
            score = tf.reduce_sum(tf.sin(tf.cast(y, tf.float32)) * w)
        gx = inner.gradient(score, x)
        penalty = tf.reduce_sum(tf.square(gx) * w2)
    return y, gx, outer.gradient(penalty, x)


def penalty_grad_op_types(layer, shape, dtype=tf.float32) -> list[str]:
    """Op types (with repeats) of the graph of d(sum (dS/dx)^2)/dx for `layer`, S = sum(sin(layer(x)))."""

    @tf.function
    def penalty_grad(x):
        with tf.GradientTape() as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                score = tf.reduce_sum(tf.sin(layer(x)))
            penalty = tf.reduce_sum(tf.square(inner.gradient(score, x)))
        return outer.gradient(penalty, x)

    graph = penalty_grad.get_concrete_function(tf.TensorSpec(shape, dtype)).graph
    return [op.type for op in graph.get_operations()]
