"""GEN: generalized entropy (Liu, Lochman & Zach, "GEN: Pushing the Limits of Softmax-Based
Out-of-Distribution Detection", CVPR 2023)."""

from __future__ import annotations

import numpy as np

from kood.detectors.base import Detector, check_positive, probabilities


def gen_score(logits: np.ndarray, gamma: float = 0.1, top_m: int = 100) -> np.ndarray:
    """sum over the `top_m` largest probabilities of p^gamma * (1 - p)^gamma (higher = more OOD).

    Example:
        gen_score(np.array([[10.0, 0.0], [0.0, 0.0]]))   # the uniform row scores higher
    """
    p = probabilities(logits)
    m = min(int(top_m), p.shape[1])
    top = -np.sort(-p, axis=1)[:, :m]
    return np.sum(top ** gamma * (1.0 - top) ** gamma, axis=1)


class Gen(Detector):
    """Generalized entropy of the top-M softmax probabilities (paper: gamma = 0.1, M = 100); no fit.

    Example:
        scores = Gen(model, gamma=0.1, top_m=10).score(images)
    """

    name = "gen"

    def __init__(self, model, gamma: float = 0.1, top_m: int = 100):
        check_positive(self.name, "gamma", gamma)
        check_positive(self.name, "top_m", top_m)
        super().__init__(model)
        self.gamma, self.top_m = float(gamma), int(top_m)

    def hyperparams(self):
        return {"gamma": self.gamma, "top_m": self.top_m}

    def score_outputs(self, outputs):
        return gen_score(outputs["logits"], self.gamma, self.top_m)
