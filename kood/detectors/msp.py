"""MSP: maximum softmax probability (Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and
Out-of-Distribution Examples in Neural Networks", ICLR 2017)."""

from __future__ import annotations

import numpy as np

from kood.detectors.base import Detector, probabilities


def msp_score(logits: np.ndarray) -> np.ndarray:
    """-max_k softmax(logits)_k (higher = more OOD).

    Example:
        msp_score(np.array([[3.0, 0.0], [0.0, 0.0]]))   # [-0.95, -0.5]
    """
    return -probabilities(logits).max(axis=1)


class Msp(Detector):
    """Maximum softmax probability; no hyperparameters, no fit.

    Example:
        scores = Msp(model).score(images)
    """

    name = "msp"

    def score_outputs(self, outputs):
        return msp_score(outputs["logits"])
