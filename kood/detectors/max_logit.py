"""MaxLogit (Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World Settings", ICML 2022)."""

from __future__ import annotations

import numpy as np

from kood.detectors.base import Detector


def max_logit_score(logits: np.ndarray) -> np.ndarray:
    """-max_k logits_k (higher = more OOD).

    Example:
        max_logit_score(np.array([[3.0, 1.0]]))   # [-3.0]
    """
    return -np.asarray(logits, np.float64).max(axis=1)


class MaxLogit(Detector):
    """Negative maximum logit; no hyperparameters, no fit.

    Example:
        scores = MaxLogit(model).score(images)
    """

    name = "max_logit"

    def score_outputs(self, outputs):
        return max_logit_score(outputs["logits"])
