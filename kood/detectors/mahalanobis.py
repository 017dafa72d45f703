"""Mahalanobis distance on penultimate features (Lee, Lee, Lee & Shin, "A Simple Unified Framework for
Detecting Out-of-Distribution Samples and Adversarial Attacks", NeurIPS 2018).

Class-conditional Gaussians with one tied covariance, on the penultimate layer only, without the
paper's input pre-processing and layer ensemble (OpenOOD's "MDS").
"""

from __future__ import annotations

import numpy as np

from kood.detectors.base import Detector
from kood.errors import DataError


def fit_gaussians(features: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Class means `[K, D]` and the pseudo-inverse of the tied (pooled) covariance `[D, D]`.

    Example:
        means, precision = fit_gaussians(h_id, y_id, 10)
    """
    h, y = np.asarray(features, np.float64), np.asarray(labels).reshape(-1)
    missing = [k for k in range(num_classes) if not np.any(y == k)]
    if missing:
        raise DataError(f"mahalanobis: the fit data has no samples of classes {missing}; every class needs "
                        "at least one to estimate its mean")
    means = np.stack([h[y == k].mean(axis=0) for k in range(num_classes)])
    centred = h - means[y]
    covariance = centred.T @ centred / len(h)
    return means, np.linalg.pinv(covariance, hermitian=True)


def mahalanobis_score(features: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """min_k (h - mu_k)^T P (h - mu_k) (higher = more OOD)."""
    h = np.asarray(features, np.float64)
    hp = h @ precision
    # (h-m)P(h-m) = hPh - 2 hPm + mPm, for all classes at once
    dist = np.sum(hp * h, axis=1)[:, None] - 2.0 * hp @ means.T + np.sum((means @ precision) * means, axis=1)[None]
    return dist.min(axis=1)


class Mahalanobis(Detector):
    """Minimum Mahalanobis distance to the class means (tied covariance); `fit` needs labelled ID data.

    Example:
        det = Mahalanobis(model).fit(id_train)
    """

    name = "mahalanobis"
    needs_fit = True
    needs_labels = True

    def __init__(self, model):
        super().__init__(model)
        self.means = self.precision = None

    def _fit(self, outputs):
        self.means, self.precision = fit_gaussians(outputs["features"], outputs["labels"], self.weight.shape[1])

    def score_outputs(self, outputs):
        self._check_fitted()
        return mahalanobis_score(outputs["features"], self.means, self.precision)
