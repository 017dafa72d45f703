"""Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017) as a detector:
the MSP of logits / T with T fitted by minimising the NLL of labelled ID data."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from kood.detectors.base import Detector, probabilities


def fit_temperature(logits: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = (0.05, 100.0)) -> float:
    """The T in `bounds` minimising the mean NLL of softmax(logits / T) (1-D search over log T).

    Example:
        t = fit_temperature(val_logits, val_labels)
    """
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels).reshape(-1)

    def nll(log_t):
        return -np.mean(log_softmax(logits / np.exp(log_t), axis=1)[np.arange(labels.size), labels])

    res = minimize_scalar(nll, bounds=np.log(bounds), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(res.x))


def temp_scale_score(logits: np.ndarray, temperature: float) -> np.ndarray:
    """-max softmax(logits / T) (higher = more OOD)."""
    return -probabilities(logits, temperature).max(axis=1)


class TempScale(Detector):
    """MSP after temperature scaling; `fit` (labelled ID data) learns T.

    Example:
        det = TempScale(model).fit(id_train); scores = det.score(images); det.temperature
    """

    name = "temp_scale"
    needs_fit = True
    needs_labels = True

    def __init__(self, model):
        super().__init__(model)
        self.temperature = None

    def hyperparams(self):
        return {"temperature": self.temperature}

    def _fit(self, outputs):
        self.temperature = fit_temperature(outputs["logits"], outputs["labels"])

    def score_outputs(self, outputs):
        self._check_fitted()
        return temp_scale_score(outputs["logits"], self.temperature)
