"""ASH: activation shaping (Djurisic, Bozanic, Ashok & Liu, "Extremely Simple Activation Shaping for
Out-of-Distribution Detection", ICLR 2023).

Applied to the penultimate feature vector (after global pooling), as the paper does for
ResNet-50 and as pytorch-ood/oodeel do; activations are assumed non-negative (post-ReLU).
"""

from __future__ import annotations

import numpy as np

from kood.detectors.base import Detector, check_percentile, energy
from kood.errors import ConfigError

VARIANTS = ("s", "p", "b")


def ash_features(features: np.ndarray, percentile: float = 90.0, variant: str = "s") -> np.ndarray:
    """Per sample: keep the k = D - round(D * percentile / 100) largest of its D activations (as the
    paper's code, `torch.topk`) and zero the others, then `"p"`: leave the kept ones; `"s"`: scale
    them by exp(sum before / sum after); `"b"`: set each to sum before / k.

    A count, not a percentile threshold: with many exact zeros (ReLU) a threshold of 0 would keep
    every activation, and ASH-B would spread the sum over all D.

    Example:
        ash_features(h, 90, "s")
    """
    if variant not in VARIANTS:
        raise ConfigError(f"ash: `variant` must be one of {VARIANTS}. Received: variant={variant!r}")
    h = np.asarray(features, np.float64)
    total = h.sum(axis=1, keepdims=True)
    k = max(h.shape[1] - int(np.round(h.shape[1] * percentile / 100.0)), 1)
    keep = np.zeros(h.shape, bool)
    np.put_along_axis(keep, np.argpartition(-h, k - 1, axis=1)[:, :k], True, axis=1)
    pruned = np.where(keep, h, 0.0)
    if variant == "p":
        return pruned
    if variant == "s":
        kept = pruned.sum(axis=1, keepdims=True)
        return pruned * np.exp(total / np.maximum(kept, 1e-12))
    return keep * (total / np.maximum(keep.sum(axis=1, keepdims=True), 1))


def ash_score(features, weight, bias, percentile: float = 90.0, variant: str = "s") -> np.ndarray:
    """Energy of the logits recomputed from shaped features (higher = more OOD)."""
    return energy(ash_features(features, percentile, variant) @ weight + bias)


class Ash(Detector):
    """Activation shaping, default ASH-S at percentile 90 (the paper's ImageNet setting); no fit.

    Example:
        scores = Ash(model, percentile=90, variant="s").score(images)
    """

    name = "ash"

    def __init__(self, model, percentile: float = 90.0, variant: str = "s"):
        check_percentile(self.name, "percentile", percentile)
        if variant not in VARIANTS:
            raise ConfigError(f"ash: `variant` must be one of {VARIANTS}. Received: variant={variant!r}")
        super().__init__(model)
        self.percentile, self.variant = float(percentile), variant

    def hyperparams(self):
        return {"percentile": self.percentile, "variant": self.variant}

    def score_outputs(self, outputs):
        return ash_score(outputs["features"], self.weight, self.bias, self.percentile, self.variant)
