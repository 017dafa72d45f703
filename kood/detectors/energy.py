"""Energy score (Liu et al., "Energy-based Out-of-distribution Detection", NeurIPS 2020)."""

from __future__ import annotations

import numpy as np

from kood.detectors.base import Detector, check_positive, energy


def energy_score(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """S(x) = -T * logsumexp(logits / T) (higher = more OOD); the score GReg trains.

    Example:
        energy_score(np.array([[0.0, 0.0]]))   # [-log 2]
    """
    return energy(logits, temperature)


class Energy(Detector):
    """Energy score with temperature `temperature` (paper: T = 1); no fit.

    Example:
        scores = Energy(model, temperature=1.0).score(images)
    """

    name = "energy"

    def __init__(self, model, temperature: float = 1.0):
        check_positive(self.name, "temperature", temperature)
        super().__init__(model)
        self.temperature = float(temperature)

    def hyperparams(self):
        return {"temperature": self.temperature}

    def score_outputs(self, outputs):
        return energy_score(outputs["logits"], self.temperature)
