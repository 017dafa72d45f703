"""Residual: the norm of the feature's residual off the ID principal subspace, the feature-only
baseline of the ViM paper (Wang, Li, Feng & Zhang, "ViM: Out-Of-Distribution with Virtual-logit
Matching", CVPR 2022, Sec. 3.2 and the "Residual" rows of its tables).

It is ViM's virtual logit without the logits: the same origin `u = -b pinv(W)` and the same residual
space (the eigenvectors of the ID features' second-moment matrix around `u` past the first `dim`),
score = ||(h - u) R||, with no alpha scaling and no energy term (OpenOOD's `residual` postprocessor
returns its negative; kood scores higher = more OOD).
"""

from __future__ import annotations

from kood.detectors.vim import Vim, residual_norm

residual_score = residual_norm  # ||(h - u) R|| per row: the score itself (higher = more OOD)


class Residual(Vim):
    """Residual norm off the ID principal subspace; `fit` on ID data (labels not needed). ViM's fit
    (same `dim`, default ViM's rule `kood.detectors.vim.default_dim`); its alpha is not used.

    Example:
        det = Residual(model).fit(id_train)
    """

    name = "residual"

    def score_outputs(self, outputs):
        self._check_fitted()
        return residual_score(outputs["features"], self.origin, self.residual)
