"""Residual: the norm of the feature's residual off the ID principal subspace, the feature-only
baseline of the ViM paper (Wang, Li, Feng & Zhang, "ViM: Out-Of-Distribution with Virtual-logit
Matching", CVPR 2022, Sec. 3.2 and the "Residual" rows of its tables).

It is ViM's virtual logit without the logits: the same origin `u = -b pinv(W)` and the same residual
space (the eigenvectors of the ID features' second-moment matrix around `u` past the first `dim`),
score = ||(h - u) R||, with no alpha scaling and no energy term (OpenOOD's `residual` postprocessor
returns its negative; kood scores higher = more OOD).
"""

from __future__ import annotations

import numpy as np

from kood.detectors.base import Detector, check_positive
from kood.detectors.vim import default_dim, fit_vim
from kood.errors import ConfigError


def residual_score(features: np.ndarray, origin: np.ndarray, residual: np.ndarray) -> np.ndarray:
    """||(h - u) R|| per row: the length of the feature's part outside the principal subspace
    (higher = more OOD).

    Example:
        origin, basis, _ = fit_vim(h_id, z_id, W, b, dim=8)
        residual_score(h, origin, basis)
    """
    return np.linalg.norm((np.asarray(features, np.float64) - origin) @ residual, axis=1)


class Residual(Detector):
    """Residual norm off the ID principal subspace; `fit` on ID data (labels not needed).

    Example:
        det = Residual(model).fit(id_train)   # dim defaults to ViM's rule (kood.detectors.vim.default_dim)
    """

    name = "residual"
    needs_fit = True

    def __init__(self, model, dim: int | None = None):
        if dim is not None:
            check_positive(self.name, "dim", dim)
        super().__init__(model)
        self.dim = int(dim) if dim is not None else default_dim(self.weight.shape[0])
        self.origin = self.residual = None

    def hyperparams(self):
        return {"dim": self.dim}

    def _fit(self, outputs):
        feature_dim = outputs["features"].shape[1]
        if not self.dim < feature_dim:  # checked here so that the message names residual, not vim
            raise ConfigError(f"residual: `dim` must be in [1, {feature_dim}) (the feature size). "
                              f"Received: dim={self.dim}")
        # fit_vim's alpha (ViM's logit scale) is not part of this score
        self.origin, self.residual, _ = fit_vim(outputs["features"], outputs["logits"], self.weight, self.bias,
                                                self.dim)

    def score_outputs(self, outputs):
        self._check_fitted()
        return residual_score(outputs["features"], self.origin, self.residual)
