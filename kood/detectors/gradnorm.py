"""GradNorm (Huang, Geng & Li, "On the Importance of Gradients for Detecting Distributional Shifts in
the Wild", NeurIPS 2021).

The score is the L1 norm of the gradient, w.r.t. the classifier Dense weights, of the KL divergence
between the uniform distribution and softmax(logits / T). For the last layer that gradient is the
outer product `h (softmax - 1/K)^T`, so its L1 norm is `||h||_1 * ||softmax - 1/K||_1` in closed form
(no backward pass needed). The paper's method uses the weight gradient only (not the bias).
"""

from __future__ import annotations

import numpy as np

from kood.detectors.base import Detector, check_positive, probabilities


def gradnorm_score(features: np.ndarray, logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """-||h||_1 * ||softmax(logits/T) - 1/K||_1 (higher = more OOD; ID has larger gradients).

    Example:
        gradnorm_score(h, z)
    """
    p = probabilities(logits, temperature)
    return -(np.abs(np.asarray(features, np.float64)).sum(axis=1) * np.abs(p - 1.0 / p.shape[1]).sum(axis=1)
             / temperature)


class GradNorm(Detector):
    """Gradient norm of the KL to uniform at the classifier Dense (paper: T = 1); no fit.

    Example:
        scores = GradNorm(model).score(images)
    """

    name = "gradnorm"

    def __init__(self, model, temperature: float = 1.0):
        check_positive(self.name, "temperature", temperature)
        super().__init__(model)
        self.temperature = float(temperature)

    def hyperparams(self):
        return {"temperature": self.temperature}

    def score_outputs(self, outputs):
        return gradnorm_score(outputs["features"], outputs["logits"], self.temperature)
