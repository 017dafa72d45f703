"""ReAct: rectified activations (Sun, Guo & Li, "ReAct: Out-of-distribution Detection With Rectified
Activations", NeurIPS 2021)."""

from __future__ import annotations

import numpy as np

from kood.detectors.base import Detector, check_percentile, check_positive, energy


def react_score(features: np.ndarray, weight: np.ndarray, bias: np.ndarray, clip: float,
                temperature: float = 1.0) -> np.ndarray:
    """Energy of the logits recomputed from features clipped at `clip` (higher = more OOD).

    Example:
        react_score(h, W, b, clip=np.percentile(h_id, 90))
    """
    return energy(np.minimum(np.asarray(features, np.float64), clip) @ weight + bias, temperature)


class React(Detector):
    """Clips penultimate activations at the `percentile`-th percentile of ID fit features (paper: 90),
    recomputes the logits through the classifier Dense and scores their energy.

    Example:
        det = React(model, percentile=90).fit(id_train)
    """

    name = "react"
    needs_fit = True

    def __init__(self, model, percentile: float = 90.0, temperature: float = 1.0):
        check_percentile(self.name, "percentile", percentile)
        check_positive(self.name, "temperature", temperature)
        super().__init__(model)
        self.percentile, self.temperature, self.clip = float(percentile), float(temperature), None

    def hyperparams(self):
        return {"percentile": self.percentile, "temperature": self.temperature, "clip": self.clip}

    def _fit(self, outputs):
        self.clip = float(np.percentile(outputs["features"], self.percentile))

    def score_outputs(self, outputs):
        self._check_fitted()
        return react_score(outputs["features"], self.weight, self.bias, self.clip, self.temperature)
