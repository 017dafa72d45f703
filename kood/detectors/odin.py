"""ODIN (Liang, Li & Srikant, "Enhancing The Reliability of Out-of-distribution Image Detection in
Neural Networks", ICLR 2018): temperature scaling plus a small input perturbation.

The perturbation is `x - eps * sign(grad_x CE(f(x)/T, argmax))`, with `eps` in [0, 1] image units as
in the paper's code (which divides the gradient by the normalization std, i.e. steps eps in [0, 1]
pixel space); kood's inputs are 0..255 pixels, so the step is `255 * eps` pixels. The sign of the
gradient is the same w.r.t. pixels or normalized inputs (std > 0).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from kood.detectors.base import Detector, check_positive, model_images, probabilities
from kood.errors import ConfigError


def odin_score(logits: np.ndarray, temperature: float = 1000.0) -> np.ndarray:
    """-max softmax(logits / T) of the (already perturbed) inputs' logits (higher = more OOD)."""
    return -probabilities(logits, temperature).max(axis=1)


def gradient_sign(grad: tf.Tensor) -> tf.Tensor:
    """+1 where `grad >= 0`, else -1: the paper's code (`(ge(grad, 0) - 0.5) * 2`); `tf.sign` would not
    move pixels whose gradient is exactly 0."""
    return tf.where(grad >= 0, 1.0, -1.0)


class Odin(Detector):
    """Temperature `temperature` (paper: 1000) and input perturbation `eps` (paper: 0.0014 on CIFAR);
    needs the images (a gradient w.r.t. the input), no fit. `eps=0` is temperature-scaled MSP.

    Example:
        scores = Odin(model, temperature=1000, eps=0.0014).score(images)
    """

    name = "odin"
    uses_outputs = False

    def __init__(self, model, temperature: float = 1000.0, eps: float = 0.0014):
        check_positive(self.name, "temperature", temperature)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps < 0:
            raise ConfigError(f"odin: `eps` must be a number >= 0. Received: eps={eps!r}")
        super().__init__(model)
        self.temperature, self.eps = float(temperature), float(eps)
        self._perturbed_logits = tf.function(self._perturb_and_forward, reduce_retracing=True)

    def hyperparams(self):
        return {"temperature": self.temperature, "eps": self.eps}

    def _perturb_and_forward(self, x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            logits = self.model(x, training=False) / self.temperature
            loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
                tf.argmax(logits, axis=1), logits))
        x = x - (255.0 * self.eps) * gradient_sign(tape.gradient(loss, x))
        return self.model(x, training=False)

    def _score_batch(self, images) -> np.ndarray:
        logits = self._perturbed_logits(model_images(self.model, images, self.name)).numpy()
        return odin_score(logits, self.temperature)
