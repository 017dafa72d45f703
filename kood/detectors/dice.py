"""DICE: directed sparsification (Sun & Li, "DICE: Leveraging Sparsification for Out-of-Distribution
Detection", ECCV 2022)."""

from __future__ import annotations

import numpy as np

from kood.detectors.base import Detector, check_percentile, energy


def dice_mask(weight: np.ndarray, mean_features: np.ndarray, sparsity: float) -> np.ndarray:
    """Keeps the weights whose contribution `mean_features[d] * W[d, k]` is above the `sparsity`-th
    percentile of all contributions; returns a 0/1 mask the shape of `W [D, K]`.

    Example:
        mask = dice_mask(W, h_id.mean(0), sparsity=90)    # keeps ~10% of the weights
    """
    contribution = np.asarray(mean_features, np.float64)[:, None] * weight
    return (contribution > np.percentile(contribution, sparsity)).astype(np.float64)


def dice_score(features: np.ndarray, weight: np.ndarray, bias: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Energy of the logits through the sparsified classifier `(W * mask)` (higher = more OOD)."""
    return energy(np.asarray(features, np.float64) @ (weight * mask) + bias)


class Dice(Detector):
    """Sparsifies the classifier Dense by contribution on ID fit data (paper: sparsity p = 90 %),
    then scores the energy.

    Example:
        det = Dice(model, sparsity=90).fit(id_train)
    """

    name = "dice"
    needs_fit = True

    def __init__(self, model, sparsity: float = 90.0):
        check_percentile(self.name, "sparsity", sparsity)
        super().__init__(model)
        self.sparsity, self.mask = float(sparsity), None

    def hyperparams(self):
        return {"sparsity": self.sparsity}

    def _fit(self, outputs):
        self.mask = dice_mask(self.weight, outputs["features"].mean(axis=0), self.sparsity)

    def score_outputs(self, outputs):
        self._check_fitted()
        return dice_score(outputs["features"], self.weight, self.bias, self.mask)
