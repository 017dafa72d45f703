"""Layers with fast exact second derivatives (GReg's double backprop), and `compute_dtype`.

`FusedBatchNorm`: Keras BatchNormalization computed with TensorFlow's fused kernels.
Keras 3 normalizes in training mode with `tf.nn.moments` + `tf.nn.batch_normalization`: a dozen
elementwise ops per layer, and their first and second derivatives are dozens more over every
activation tensor. The GReg penalty differentiates the input gradient again (double backprop), so
on small networks those elementwise ops cost as much as the convolutions. Here the forward is one
`FusedBatchNormV3` kernel, the backward one `FusedBatchNormGradV3` kernel, and the backward's own
gradient (the double backprop) is written out in closed form: one more `FusedBatchNormGradV3`
(the backward map is symmetric in the upstream gradient), one per-channel mean and one XLA-fused
elementwise pass. TF's registered second derivative would instead rebuild the backward from
elementwise ops and differentiate that.

The layer IS a `keras.layers.BatchNormalization` (same weights, config and moving-average rule),
so `isinstance` checks, `synchronized=True` (kood.distribute.synchronize_batchnorm) and saved
weights keep working. It falls back to the Keras computation whenever the fused kernel does not
apply: synchronized statistics, renorm, masks, no scale/center, non-4D inputs, channels not last,
or (on a GPU) an epsilon below cuDNN's minimum. bfloat16/float16 activations (mixed precision)
are normalized in float32 in training and by the half-precision kernel in inference.

`MaxPool`: Keras MaxPooling2D whose backward's derivative (TF: the `MaxPoolGradGrad` kernel) is one
XLA-fused pass for non-overlapping windows.

`Normalization`: Keras' input normalization over a flat axis (TF's broadcast over 3 channels is slow).

`ReLU` and `GlobalAveragePool`: Keras' layers without the all-zero or discarded terms TF's registered
second derivatives compute (a zeros tensor added per ReLU; a derivative w.r.t. the element count of
a mean).

`compute_dtype(model, dtype)`: run a model's forward in another compute dtype (float32, bfloat16,
float16) without a weight copy (the GReg+ candidate pool, `--pool_dtype`).
"""

from __future__ import annotations

import contextlib
import math

import keras
import tensorflow as tf

from kood.errors import ConfigError

# cuDNN's CUDNN_BN_MIN_EPSILON: the GPU kernel cannot use a smaller epsilon (the CPU kernel can).
MIN_EPSILON = 1.001e-5
_AXES = [0, 1, 2]  # NHWC: statistics over batch and space, per channel


@tf.function(jit_compile=True)
def _affine3(x, dy, g, p, q, r, s):
    """p * x + q * dy + r * g + s with per-channel p, q, r, s: one pass under XLA (TF would run six)."""
    return p * x + q * dy + r * g + s


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

        def backward(dy, x, gamma):
            # One kernel gives dx, dgamma and dbeta; two wrappers give them separate second derivatives,
            # so a penalty on the input gradient alone (GReg) never builds the dgamma terms over the
            # activations (Keras passes zeros, not None, for an unused output's gradient).
            dx, dgamma, dbeta = (tf.stop_gradient(t) for t in fused_grad(dy, gamma))
            a, b = dbeta / count, dgamma / count  # mean(dy), mean(dy * xhat), xhat = (x - mean) * rstd

            @tf.custom_gradient
            def input_grad(dy, x, gamma):
                def double_backward(g):
                    # dx = gamma * rstd * (dy - a - xhat * b) is linear and symmetric in dy, so the gradient
                    # w.r.t. dy is the same fused map applied to g; it also returns sum(g * xhat) and sum(g).
                    # The x-derivative (through xhat, rstd and b) and the gamma-derivative are the closed
                    # forms of that expression, collected into per-channel coefficients so that only a few
                    # elementwise ops run over the activations (xhat * v = rstd * v * x - rstd * v * mean).
                    g_dy, g_xhat_sum, g_sum = fused_grad(g, gamma)
                    c, mg = g_xhat_sum / count, g_sum / count
                    k = tf.reduce_mean(g * dy, _AXES) - a * mg - b * c
                    gr2 = gamma * rstd * rstd
                    coef_xhat = -gr2 * (k - 2.0 * b * c)
                    shift = gr2 * (c * a + b * mg) - coef_xhat * rstd * mean
                    g_x = _affine3(x, dy, g, coef_xhat * rstd, -gr2 * c, -gr2 * b, shift)
                    return g_dy, g_x, rstd * count * k

                return tf.identity(dx), double_backward

            @tf.custom_gradient
            def param_grads(dy, x, gamma):
                def double_backward(g_gamma, g_beta):
                    # dgamma = sum(dy * xhat), dbeta = sum(dy); d dgamma / dx = dx / gamma.
                    g_dy = (g_gamma * rstd) * x + (g_beta - g_gamma * rstd * mean)
                    g_x = (g_gamma * rstd) * (dy - a) - (g_gamma * rstd * rstd * b) * (x - mean)
                    return g_dy, g_x, tf.zeros_like(gamma)

                return (tf.identity(dgamma), tf.identity(dbeta)), double_backward

            return (input_grad(dy, x, gamma), *param_grads(dy, x, gamma))

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
        dtypes = ("float32", "bfloat16", "float16")
        # Keras <= 3.12 has no `renorm` (no attribute at all): there it is never on.
        return (mask is None and not self.synchronized and not getattr(self, "renorm", False)
                and self.scale and self.center
                and len(inputs.shape) == 4 and self.axis in (-1, 3)
                and keras.backend.standardize_dtype(inputs.dtype) in dtypes
                and keras.backend.standardize_dtype(self.compute_dtype) in dtypes
                and (self.epsilon >= MIN_EPSILON or not tf.config.list_logical_devices("GPU")))

    def call(self, inputs, training=None, mask=None):
        batch_statistics = bool(training and self.trainable)
        if not self._fused_applies(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        gamma, beta = tf.convert_to_tensor(self.gamma), tf.convert_to_tensor(self.beta)
        if batch_statistics:
            # Statistics and both derivatives in float32 (as Keras does for bfloat16/float16 activations).
            y, mean, variance = _batch_norm_train(tf.cast(inputs, tf.float32), gamma, beta, self.epsilon)
            self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
            return tf.cast(y, inputs.dtype)
        # Inference takes bfloat16/float16 activations directly (float32 statistics).
        return tf.raw_ops.FusedBatchNormV3(
            x=inputs, scale=gamma, offset=beta, mean=tf.convert_to_tensor(self.moving_mean),
            variance=tf.convert_to_tensor(self.moving_variance), epsilon=self.epsilon, exponential_avg_factor=1.0,
            data_format="NHWC", is_training=False)[0]


@tf.function(jit_compile=True)
def _window_argmax_values(x: tf.Tensor, y: tf.Tensor, g: tf.Tensor, size: int) -> tf.Tensor:
    """g at the first (row-major) position of each size x size window of x that holds the window max y.

    The first maximum is the one TF's max-pool gradient kernels route to (ties included); XLA runs
    the whole selection in one pass (the unfused mask / multiply / pool ops took ~5x longer here).
    """
    shape = tf.shape(y)
    windows = [shape[0], shape[1], size, shape[2], size, shape[3]]
    x, g = tf.reshape(x, windows), tf.reshape(g, windows)
    taken, out = tf.zeros_like(y, tf.bool), tf.zeros_like(y)
    for i in range(size):
        for j in range(size):
            hit = tf.logical_and(tf.equal(x[:, :, i, :, j, :], y), tf.logical_not(taken))
            out = out + tf.where(hit, g[:, :, i, :, j, :], tf.zeros_like(y))
            taken = tf.logical_or(taken, hit)
    return out


def _max_pool(x: tf.Tensor, size: int) -> tf.Tensor:
    """Non-overlapping size x size max-pool (H, W divisible by size) whose backward has a cheap exact derivative."""
    ksize = [1, size, size, 1]

    @tf.custom_gradient
    def forward(x):
        y = tf.nn.max_pool2d(x, size, size, "VALID")

        def grad(dy):
            @tf.custom_gradient
            def backward(dy):
                # The backward routes each dy to its window's argmax, so its derivative (along g) gathers
                # g there; TF's MaxPoolGradGrad kernel computes the same, several times slower on a CPU.
                return (tf.raw_ops.MaxPoolGrad(orig_input=x, orig_output=y, grad=dy, ksize=ksize, strides=ksize,
                                               padding="VALID"),
                        lambda g: _window_argmax_values(x, y, g, size))

            return backward(dy)

        return y, grad

    return forward(x)


@keras.saving.register_keras_serializable(package="kood")
class MaxPool(keras.layers.MaxPooling2D):
    """`keras.layers.MaxPooling2D` with a fast exact second derivative for non-overlapping windows.

    When `pool_size` is square and equal to `strides`, with "valid" padding, channels last and a
    height and width divisible by the pool size, the backward's own gradient (GReg's double
    backprop) is one XLA-fused pass instead of TF's `MaxPoolGradGrad` kernel; values and first
    derivatives are TF's max-pool kernels. Other configurations run Keras' layer unchanged.

    Example:
        x = MaxPool(2)(x)
    """

    def call(self, inputs):
        size = self.pool_size[0]
        if (self.pool_size != (size, size) or tuple(self.strides) != (size, size) or self.padding != "valid"
                or self.data_format != "channels_last" or len(inputs.shape) != 4
                or any(d is None or d % size for d in inputs.shape[1:3])):
            return super().call(inputs)
        return _max_pool(inputs, size)


def _relu(x: tf.Tensor) -> tf.Tensor:
    """ReLU whose backward's derivative is `ReluGrad(g, y)` alone."""

    @tf.custom_gradient
    def forward(x):
        y = tf.nn.relu(x)

        def grad(dy):
            @tf.custom_gradient
            def backward(dy):
                # The backward is linear in dy and piecewise constant in x, so its derivative w.r.t. x is
                # zero almost everywhere; TF's registered one materializes those zeros and adds them.
                return (tf.raw_ops.ReluGrad(gradients=dy, features=y),
                        lambda g: tf.raw_ops.ReluGrad(gradients=g, features=y))

            return backward(dy)

        return y, grad

    return forward(x)


@keras.saving.register_keras_serializable(package="kood")
class ReLU(keras.layers.ReLU):
    """`keras.layers.ReLU` whose second derivative (GReg's double backprop) skips an all-zero term.

    Plain ReLU (no max_value, slope or threshold) only; other settings run Keras' layer unchanged.

    Example:
        x = ReLU()(x)
    """

    def call(self, inputs):
        if self.max_value is not None or self.negative_slope or self.threshold:
            return super().call(inputs)
        return _relu(inputs)


@keras.saving.register_keras_serializable(package="kood")
class GlobalAveragePool(keras.layers.GlobalAveragePooling2D):
    """`keras.layers.GlobalAveragePooling2D` whose backward's derivative is one cheap pass.

    Keras' mean divides by the element count as a tensor, so the gradient of its backward (GReg's
    double backprop) also differentiates w.r.t. that count: three extra passes over the activation,
    then discarded. Here the average is a sum times a Python constant (static H, W, channels last,
    no keepdims), so the backward is a broadcast of `dy * c` and its derivative a sum. Same values;
    other configurations run Keras' layer unchanged.

    Example:
        features = GlobalAveragePool()(x)
    """

    def call(self, inputs):
        height, width = inputs.shape[1:3] if len(inputs.shape) == 4 else (None, None)
        if self.data_format != "channels_last" or self.keepdims or height is None or width is None:
            return super().call(inputs)
        # float32 accumulation for half-precision activations, as Keras' mean does.
        total = tf.reduce_sum(tf.cast(inputs, tf.float32), axis=[1, 2])
        return tf.cast(total * (1.0 / (height * width)), inputs.dtype)


@keras.saving.register_keras_serializable(package="kood")
class Normalization(keras.layers.Normalization):
    """`keras.layers.Normalization` with a fixed per-channel mean/variance, computed ~8x faster.

    TF's broadcasting Sub and RealDiv over a last axis of 3 channels run element by element (about
    1.7 ms per 128 CIFAR images on one core, the cost of a small_cnn convolution). Here the mean and
    scale are broadcast to one image's size, so both ops run over a flat, vectorizable axis: the
    same elementwise formula `(x - mean) / max(sqrt(variance), epsilon)`, bit-identical values.
    Inputs with unknown image dimensions, `invert=True` or axes other than the last run Keras' code.

    Example:
        x = Normalization(mean=[125.3, 123.0, 113.9], variance=[63.0 ** 2, 62.1 ** 2, 66.7 ** 2])(inputs)
    """

    def call(self, inputs):
        shape = inputs.shape
        last_axis_only = tuple(self._keep_axis or ()) == (len(shape) - 1,)
        if self.invert or not last_axis_only or len(shape) < 3 or any(d is None for d in shape[1:]):
            return super().call(inputs)
        inputs = tf.cast(inputs, self.compute_dtype)
        image = [int(d) for d in shape[1:]]
        size = math.prod(image)
        mean = tf.cast(self.convert_weight(self.mean), inputs.dtype)
        scale = tf.maximum(tf.sqrt(tf.cast(self.convert_weight(self.variance), inputs.dtype)),
                           keras.backend.epsilon())
        flat = tf.reshape(inputs, [-1, size])
        out = (flat - tf.reshape(tf.broadcast_to(mean, [1, *image]), [size])) / tf.reshape(
            tf.broadcast_to(scale, [1, *image]), [size])
        return tf.reshape(out, tf.shape(inputs))


@contextlib.contextmanager
def compute_dtype(model: keras.Model, dtype: str):
    """Layers of `model` compute in `dtype` (float32 weights cast on use) while the block traces.

    For a forward in another precision without a copy of the weights (a float32 model's pool in
    bfloat16, or a mixed_bfloat16 model's in float32): the ops built inside the block (e.g. in a
    tf.function) use `dtype`; the policies are restored on exit. `dtype="bfloat16"` selects Keras'
    "mixed_bfloat16" policy, "float32" the "float32" one. Not thread-safe: keep the block to
    the one call (tf.distribute's replica threads build their graphs one at a time).

    Example:
        with compute_dtype(net, "bfloat16"):
            out = net(tf.cast(x, "bfloat16"), training=False)
    """
    layers = list(model._flatten_layers(include_self=True))  # also inside nested models, as in kood.distribute
    previous = [layer.dtype_policy for layer in layers]
    policy = "float32" if dtype == "float32" else f"mixed_{dtype}"
    try:
        for layer in layers:
            layer.dtype_policy = policy
        yield
    finally:
        for layer, old in zip(layers, previous):
            layer.dtype_policy = old


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
