"""KL matching (Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World Settings",
ICML 2022): per predicted class k a template d_k = mean softmax of ID samples predicted as k;
the score is min_k KL(p(x) || d_k)."""

from __future__ import annotations

import numpy as np

from kood.detectors.base import Detector, probabilities
from kood.errors import DataError

EPS = 1e-12


def fit_templates(logits: np.ndarray) -> np.ndarray:
    """Templates `[M, K]`: one row per class k that some fit sample is predicted as, the mean softmax
    of those samples. A class no fit sample is predicted as has no template (the score is a min over
    templates, so it simply does not take part).

    Example:
        templates = fit_templates(val_logits)
    """
    p = probabilities(logits)
    predicted = p.argmax(axis=1)
    present = np.unique(predicted)
    if present.size == 0:
        raise DataError("kl_matching: the fit data is empty; templates need ID samples")
    return np.stack([p[predicted == k].mean(axis=0) for k in present])


def kl_matching_score(logits: np.ndarray, templates: np.ndarray) -> np.ndarray:
    """min_k KL(softmax(logits) || templates[k]) (higher = more OOD)."""
    p = np.maximum(probabilities(logits), EPS)
    log_d = np.log(np.maximum(templates, EPS))
    kl = np.sum(p * np.log(p), axis=1)[:, None] - p @ log_d.T
    return kl.min(axis=1)


class KlMatching(Detector):
    """KL divergence to the nearest class-posterior template; `fit` uses ID data (labels not needed).

    Example:
        det = KlMatching(model).fit(id_train)
    """

    name = "kl_matching"
    needs_fit = True

    def __init__(self, model):
        super().__init__(model)
        self.templates = None

    def _fit(self, outputs):
        self.templates = fit_templates(outputs["logits"])

    def score_outputs(self, outputs):
        self._check_fitted()
        return kl_matching_score(outputs["logits"], self.templates)
