"""KNN: deep nearest neighbours (Sun, Ming, Zhu & Li, "Out-of-Distribution Detection with Deep Nearest
Neighbors", ICML 2022)."""

from __future__ import annotations

import numpy as np

from kood.detectors.base import Detector, check_positive
from kood.errors import ConfigError

CHUNK = 1024  # query rows per distance block: bounds memory at CHUNK * N_fit floats


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_score(features: np.ndarray, bank: np.ndarray, k: int) -> np.ndarray:
    """Euclidean distance from each L2-normalized feature to its k-th nearest neighbour in `bank`
    (already normalized ID features); higher = more OOD.

    Example:
        knn_score(h, l2_normalize(h_id), k=50)
    """
    if not 1 <= k <= len(bank):
        raise ConfigError(f"knn: `k` must be in [1, {len(bank)}] (the number of fit samples). Received: k={k}")
    z = l2_normalize(features)
    out = np.empty(len(z))
    for start in range(0, len(z), CHUNK):
        sim = z[start:start + CHUNK] @ bank.T
        kth = -np.partition(-sim, k - 1, axis=1)[:, k - 1]  # k-th largest cosine similarity
        out[start:start + CHUNK] = np.sqrt(np.maximum(2.0 - 2.0 * kth, 0.0))
    return out


class Knn(Detector):
    """k-th nearest-neighbour distance among normalized ID fit features (paper: k = 50 for CIFAR-10,
    1000 for ImageNet with 1% of the training set).

    Example:
        det = Knn(model, k=50).fit(id_train)
    """

    name = "knn"
    needs_fit = True

    def __init__(self, model, k: int = 50):
        check_positive(self.name, "k", k)
        super().__init__(model)
        self.k, self.bank = int(k), None

    def hyperparams(self):
        return {"k": self.k}

    def _fit(self, outputs):
        if self.k > len(outputs["features"]):
            raise ConfigError(f"knn: `k` must not exceed the {len(outputs['features'])} fit samples. "
                              f"Received: k={self.k}")
        self.bank = l2_normalize(outputs["features"])

    def score_outputs(self, outputs):
        self._check_fitted()
        return knn_score(outputs["features"], self.bank, self.k)
