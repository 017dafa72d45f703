"""ViM: virtual-logit matching (Wang, Li, Feng & Zhang, "ViM: Out-Of-Distribution with Virtual-logit
Matching", CVPR 2022)."""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp

from kood.detectors.base import Detector, check_positive
from kood.errors import ConfigError


def default_dim(feature_dim: int) -> int:
    """The paper's principal-subspace size: 1000 for D >= 2048, 512 for D >= 768, else D // 2."""
    return 1000 if feature_dim >= 2048 else 512 if feature_dim >= 768 else max(feature_dim // 2, 1)


def fit_vim(features: np.ndarray, logits: np.ndarray, weight: np.ndarray, bias: np.ndarray,
            dim: int, name: str = "vim") -> tuple[np.ndarray, np.ndarray, float]:
    """Origin `u = -b pinv(W)`, the basis `[D, D-dim]` of the residual (non-principal) space of the
    ID features around `u`, and the scale `alpha` = mean max-logit / mean residual norm. `name`: the
    detector the errors name.

    Example:
        origin, residual, alpha = fit_vim(h_id, z_id, W, b, dim=8)
    """
    h = np.asarray(features, np.float64)
    if not 1 <= dim < h.shape[1]:
        raise ConfigError(f"{name}: `dim` must be in [1, {h.shape[1]}) (the feature size). Received: dim={dim}")
    origin = -bias @ np.linalg.pinv(weight)
    centred = h - origin
    eigvals, eigvecs = np.linalg.eigh(centred.T @ centred / len(h))
    residual = eigvecs[:, np.argsort(-eigvals)[dim:]]
    alpha = float(np.asarray(logits, np.float64).max(axis=1).mean() / residual_norm(h, origin, residual).mean())
    return origin, residual, alpha


def residual_norm(features: np.ndarray, origin: np.ndarray, residual: np.ndarray) -> np.ndarray:
    """||(h - u) R|| per row: the length of the feature's part outside the principal subspace."""
    return np.linalg.norm((np.asarray(features, np.float64) - origin) @ residual, axis=1)


def vim_score(features: np.ndarray, logits: np.ndarray, origin: np.ndarray, residual: np.ndarray,
              alpha: float) -> np.ndarray:
    """alpha * ||residual part of (h - u)|| - logsumexp(logits) (higher = more OOD)."""
    virtual = alpha * residual_norm(features, origin, residual)
    return virtual - logsumexp(np.asarray(logits, np.float64), axis=1)


class Vim(Detector):
    """Virtual logit from the feature residual outside the ID principal subspace; `fit` on ID data.

    Example:
        det = Vim(model).fit(id_train)       # dim defaults to the paper's rule (default_dim)
    """

    name = "vim"
    needs_fit = True

    def __init__(self, model, dim: int | None = None):
        if dim is not None:
            check_positive(self.name, "dim", dim)
        super().__init__(model)
        self.dim = int(dim) if dim is not None else default_dim(self.weight.shape[0])
        self.origin = self.residual = self.alpha = None

    def hyperparams(self):
        return {"dim": self.dim}

    def _fit(self, outputs):
        self.origin, self.residual, self.alpha = fit_vim(outputs["features"], outputs["logits"], self.weight,
                                                         self.bias, self.dim, self.name)

    def score_outputs(self, outputs):
        self._check_fitted()
        return vim_score(outputs["features"], outputs["logits"], self.origin, self.residual, self.alpha)
