"""`FusedBatchNorm`: Keras BatchNormalization computed with TensorFlow's fused kernels.

Keras 3 normalizes in training mode with `tf.nn.moments` + `tf.nn.batch_normalization`: a dozen
elementwise ops per layer, and their first and second derivatives are dozens more over every
activation tensor. The GReg penalty differentiates the input gradient again (double backprop), so
on small networks those elementwise ops cost as much as the convolutions. Here the forward is one
`FusedBatchNormV3` kernel, the backward one `FusedBatchNormGradV3` kernel, and the backward's own
gradient (the double backprop) is written out in closed form: one more `FusedBatchNormGradV3`
(the backward map is symmetric in the upstream gradient) plus five per-channel means and a few
elementwise ops. TF's registered second derivative would instead rebuild the backward from
elementwise ops and differentiate that.

The layer IS a `keras.layers.BatchNormalization` (same weights, config and moving-average rule),
so `isinstance` checks, `synchronized=True` (kood.distribute.synchronize_batchnorm) and saved
weights keep working. It falls back to the Keras computation whenever the fused kernel does not
apply: synchronized statistics, renorm, masks, no scale/center, non-4D inputs, channels not last,
a non-float32 dtype, or (on a GPU) an epsilon below cuDNN's minimum.
"""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf

from kood.errors import ConfigError

# cuDNN's CUDNN_BN_MIN_EPSILON: the GPU kernel cannot use a smaller epsilon (the CPU kernel can).
MIN_EPSILON = 1.001e-5
_AXES = [0, 1, 2]  # NHWC: statistics over batch and space, per channel


def _batch_norm_train(x: tf.Tensor, gamma: tf.Tensor, beta: tf.Tensor, epsilon: float):
    """Training-mode BN: (y, batch mean, biased batch variance), with fused first and second derivatives."""

    @tf.custom_gradient
    def forward(x, gamma, beta):
        empty = tf.constant([], x.dtype)
        y, mean, variance, r1, r2, r3 = tf.raw_ops.FusedBatchNormV3(
            x=x, scale=gamma, offset=beta, mean=empty, variance=empty, epsilon=epsilon,
            exponential_avg_factor=1.0, data_format="NHWC", is_training=True)
        # The kernel returns the Bessel-corrected variance; Keras (and the formulas below) use the biased one.
        count = tf.cast(tf.reduce_prod(tf.shape(x)[:3]), x.dtype)
        variance = variance * (count - 1.0) / tf.maximum(count, 1.0)
        rstd = tf.math.rsqrt(variance + epsilon)

        def fused_grad(dy, gamma):
            return tf.raw_ops.FusedBatchNormGradV3(
                y_backprop=dy, x=x, scale=gamma, reserve_space_1=r1, reserve_space_2=r2, reserve_space_3=r3,
                epsilon=epsilon, data_format="NHWC", is_training=True)[:3]

        @tf.custom_gradient
        def backward(dy, x, gamma):
            dx, dgamma, dbeta = fused_grad(dy, gamma)
            a, b = dbeta / count, dgamma / count  # mean(dy), mean(dy * xhat), xhat = (x - mean) * rstd

            def double_backward(g, g_gamma, g_beta):
                # dx = gamma * rstd * (dy - a - xhat * b) is linear and symmetric in dy, so the gradient
                # w.r.t. dy is the same fused map applied to g; it also returns sum(g * xhat) and sum(g).
                # The x-derivative (through xhat, rstd and b) and the gamma-derivative are the closed forms
                # of that expression, collected into per-channel coefficients so that only a few
                # elementwise ops run over the activations (xhat * v = rstd * v * x - rstd * v * mean).
                g_dy, g_xhat_sum, g_sum = fused_grad(g, gamma)
                c, mg = g_xhat_sum / count, g_sum / count
                mgdy = tf.reduce_mean(g * dy, _AXES)
                k = mgdy - a * mg - b * c
                gr2 = gamma * rstd * rstd
                coef_xhat = -gr2 * (k - 2.0 * b * c) - g_gamma * rstd * b
                coef_dy = -gr2 * c + g_gamma * rstd
                coef_g = -gr2 * b
                shift = gr2 * (c * a + b * mg) - g_gamma * rstd * a - coef_xhat * rstd * mean
                g_x = (coef_xhat * rstd) * x + coef_dy * dy + coef_g * g + shift
                g_dy = g_dy + (g_gamma * rstd) * x + (g_beta - g_gamma * rstd * mean)
                return g_dy, g_x, rstd * count * k

            return (dx, dgamma, dbeta), double_backward

        def grad(dy, unused_dmean, unused_dvariance):
            # The batch statistics only feed the moving averages: no gradient flows through them.
            return backward(dy, x, gamma)

        return (y, mean, variance), grad

    return forward(x, gamma, beta)


@keras.saving.register_keras_serializable(package="kood")
class FusedBatchNorm(keras.layers.BatchNormalization):
    """BatchNormalization over the last axis of NHWC tensors with TF's fused kernels.

    Same arguments, weights and results as `keras.layers.BatchNormalization` (to float tolerance),
    including the first and second derivatives; the moving statistics follow Keras' rule
    `moving = moving * momentum + batch_stat * (1 - momentum)` with the biased batch variance.

    Args:
        **kwargs: as `keras.layers.BatchNormalization` (momentum, epsilon, ...).

    Example:
        x = FusedBatchNorm(momentum=0.9, epsilon=1e-5)(keras.layers.Conv2D(16, 3)(inputs))
    """

    def _fused_applies(self, inputs, mask) -> bool:
        return (mask is None and not self.synchronized and not self.renorm and self.scale and self.center
                and len(inputs.shape) == 4 and self.axis in (-1, 3)
                and keras.backend.standardize_dtype(inputs.dtype) == "float32"
                and keras.backend.standardize_dtype(self.compute_dtype) == "float32"
                and (self.epsilon >= MIN_EPSILON or not tf.config.list_logical_devices("GPU")))

    def call(self, inputs, training=None, mask=None):
        if not self._fused_applies(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        gamma, beta = tf.convert_to_tensor(self.gamma), tf.convert_to_tensor(self.beta)
        if training and self.trainable:
            y, mean, variance = _batch_norm_train(inputs, gamma, beta, self.epsilon)
            self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
            return y
        return tf.raw_ops.FusedBatchNormV3(
            x=inputs, scale=gamma, offset=beta, mean=tf.convert_to_tensor(self.moving_mean),
            variance=tf.convert_to_tensor(self.moving_variance), epsilon=self.epsilon, exponential_avg_factor=1.0,
            data_format="NHWC", is_training=False)[0]


_BATCHNORM = {"fused": FusedBatchNorm, "keras": keras.layers.BatchNormalization}
_batchnorm_kind = ["fused"]


def batch_norm(*, momentum: float, epsilon: float) -> keras.layers.BatchNormalization:
    """The BatchNorm layer of kood's architectures: `FusedBatchNorm` (default) or Keras' own.

    Example:
        x = batch_norm(momentum=0.9, epsilon=1e-5)(x)
    """
    return _BATCHNORM[_batchnorm_kind[0]](momentum=momentum, epsilon=epsilon)


@contextlib.contextmanager
def use_batchnorm(kind: str):
    """Builds kood architectures with `kind` BatchNorm ("fused" or "keras") inside the block.

    For comparisons (bench/bench_step.py --bn); both give the same model and weights layout.

    Example:
        with use_batchnorm("keras"):
            model = build_classifier("small_cnn", input_shape=(32, 32, 3), num_classes=10, mean=[0.0] * 3,
                                     std=[1.0] * 3)
    """
    if kind not in _BATCHNORM:
        raise ConfigError(f"`kind` must be one of {sorted(_BATCHNORM)}. Received: kind={kind!r}")
    previous, _batchnorm_kind[0] = _batchnorm_kind[0], kind
    try:
        yield
    finally:
        _batchnorm_kind[0] = previous
