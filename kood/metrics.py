"""OOD detection metrics: FPR at 95% TPR, AUROC, AUPR-In, AUPR-Out, ID accuracy, and tables of them.

Scores follow the detector convention: higher = more OOD. Two FPR95 conventions exist
(docs/methods.md "Scores and conventions"):
- `"id"` (default; GReg / Energy / ODIN papers): ID is the positive class. The threshold keeps
  95% of ID samples (score <= threshold = accepted as ID); FPR95 is the fraction of OOD samples
  accepted as ID.
- `"ood"` (OpenOOD, pytorch-ood, oodeel): OOD is the positive class. The threshold detects 95% of
  OOD samples (score >= threshold); FPR95 is the fraction of ID samples flagged as OOD.
AUROC is the same under both. AUPR-In treats ID as positive (confidence = -score), AUPR-Out
treats OOD as positive. Ties are handled as scikit-learn does (a tie is one threshold).

Example:
    m = ood_metrics(id_scores, ood_scores)              # {"fpr95", "auroc", "aupr_in", "aupr_out"}
    table = metrics_table(id_scores, {"svhn": s1, "textures": s2}, groups={"far": ["svhn", "textures"]})
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from scipy.stats import rankdata

from kood.errors import ConfigError

CONVENTIONS = ("id", "ood")
METRICS = ("fpr95", "auroc", "aupr_in", "aupr_out")
CONVENTION_NOTE = {
    "id": "FPR95: ID is positive (fraction of OOD accepted as ID at the threshold keeping 95% of ID)",
    "ood": "FPR95: OOD is positive (fraction of ID flagged as OOD at the threshold detecting 95% of OOD)",
}


def _scores(name: str, x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim > 1 and int(np.prod(x.shape[1:])) != 1:  # e.g. logits passed for scores: flattening would mix them
        raise ConfigError(f"`{name}` must hold one score per sample ([N] or [N, 1]); a [N, K] array such as logits "
                          f"needs a detector's score first (kood.detectors). Received: {name}.shape={x.shape}")
    x = x.reshape(-1)
    if x.size == 0:
        raise ConfigError(f"`{name}` is empty; metrics need at least one score. Received: {name}.shape={x.shape}")
    if not np.all(np.isfinite(x)):
        bad = int(np.sum(~np.isfinite(x)))
        raise ConfigError(f"`{name}` holds {bad} non-finite scores (NaN/inf); check the model and detector. "
                          f"Received: {name}[:5]={x[:5].tolist()}")
    return x


def _check_rate(tpr: float) -> None:
    if not 0.0 < tpr <= 1.0:
        raise ConfigError(f"`tpr` must be in (0, 1]. Received: tpr={tpr}")


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ConfigError(f"`convention` must be one of {CONVENTIONS}. Received: convention={convention!r}")


def _positive_threshold(pos: np.ndarray, tpr: float) -> float:
    """Largest t with mean(pos >= t) >= tpr: the k-th largest positive score, k/n >= tpr first."""
    ranked = np.sort(pos)[::-1]
    # the same float comparison as indexing scikit-learn's roc_curve tpr array (k/n >= tpr)
    k = int(np.searchsorted(np.arange(1, ranked.size + 1) / ranked.size, tpr, side="left"))
    return float(ranked[k])


def threshold_at_tpr(id_scores, tpr: float = 0.95) -> float:
    """The ID-acceptance threshold: scores <= it are ID, and at least `tpr` of ID scores are <= it.

    Args:
        id_scores: detector scores of ID samples (higher = more OOD).
        tpr: fraction of ID samples to accept.

    Example:
        gamma = threshold_at_tpr(energy_id, 0.95)    # accept x as ID when S(x) <= gamma
    """
    _check_rate(tpr)
    return -_positive_threshold(-_scores("id_scores", id_scores), tpr)


def fpr_at_tpr(id_scores, ood_scores, tpr: float = 0.95, convention: str = "id") -> float:
    """False-positive rate at `tpr` true-positive rate (FPR95 for tpr=0.95); see module docstring.

    Args:
        id_scores: scores of ID samples (higher = more OOD).
        ood_scores: scores of OOD samples.
        tpr: true-positive rate of the threshold.
        convention: `"id"` (ID positive, default) or `"ood"` (OOD positive).

    Example:
        fpr95 = fpr_at_tpr(s_id, s_ood)                   # fraction of OOD accepted as ID
    """
    _check_rate(tpr)
    _check_convention(convention)
    s_id, s_ood = _scores("id_scores", id_scores), _scores("ood_scores", ood_scores)
    if convention == "id":
        pos, neg = -s_id, -s_ood
    else:
        pos, neg = s_ood, s_id
    return float(np.mean(neg >= _positive_threshold(pos, tpr)))


def auroc(id_scores, ood_scores) -> float:
    """Area under the ROC curve of separating OOD (positive) from ID; ties count one half.

    Example:
        auroc([0.1, 0.2], [0.9, 0.2])    # 0.875
    """
    s_id, s_ood = _scores("id_scores", id_scores), _scores("ood_scores", ood_scores)
    ranks = rankdata(np.concatenate([s_ood, s_id]))  # average ranks handle ties (Mann-Whitney U)
    n_pos, n_neg = s_ood.size, s_id.size
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def average_precision(pos_scores, neg_scores) -> float:
    """Average precision (area under the step precision-recall curve) with higher score = positive.

    Equal to scikit-learn's `average_precision_score`: sum over distinct thresholds of
    (recall increase) * precision.

    Example:
        average_precision([0.9, 0.8], [0.1])   # 1.0
    """
    pos, neg = _scores("pos_scores", pos_scores), _scores("neg_scores", neg_scores)
    scores = np.concatenate([pos, neg])
    labels = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last_of_tie = np.r_[np.nonzero(np.diff(scores))[0], scores.size - 1]  # one threshold per distinct score
    tp = np.cumsum(labels)[last_of_tie]
    predicted = last_of_tie + 1.0
    precision, recall = tp / predicted, tp / pos.size
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def aupr_in(id_scores, ood_scores) -> float:
    """AUPR with ID as positive (confidence = -score)."""
    return average_precision(-np.asarray(id_scores, np.float64), -np.asarray(ood_scores, np.float64))


def aupr_out(id_scores, ood_scores) -> float:
    """AUPR with OOD as positive."""
    return average_precision(ood_scores, id_scores)


def accuracy(logits, labels) -> float:
    """Top-1 accuracy of `logits [N, K]` against int `labels [N]`.

    Example:
        accuracy([[2.0, 1.0]], [0])   # 1.0
    """
    logits, labels = np.asarray(logits), np.asarray(labels).reshape(-1)
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0] or labels.size == 0:
        raise ConfigError(f"accuracy needs logits [N, K] and labels [N], N > 0. "
                          f"Received: logits.shape={logits.shape}, labels.shape={labels.shape}")
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def ood_metrics(id_scores, ood_scores, convention: str = "id", tpr: float = 0.95) -> dict[str, float]:
    """All four metrics for one OOD set: {"fpr95", "auroc", "aupr_in", "aupr_out"}.

    Example:
        ood_metrics(s_id, s_svhn)["auroc"]
    """
    return {"fpr95": fpr_at_tpr(id_scores, ood_scores, tpr, convention), "auroc": auroc(id_scores, ood_scores),
            "aupr_in": aupr_in(id_scores, ood_scores), "aupr_out": aupr_out(id_scores, ood_scores)}


def _mean(rows: Sequence[dict]) -> dict[str, float]:
    return {m: float(np.mean([r[m] for r in rows])) for m in METRICS}


def metrics_table(id_scores, ood_scores: Mapping[str, np.ndarray], groups: Mapping[str, Sequence[str]] | None = None,
                  convention: str = "id", tpr: float = 0.95) -> dict:
    """Metrics per OOD set, the mean per group (e.g. near/far), and the mean over all sets.

    Args:
        id_scores: ID scores.
        ood_scores: `{set name: scores}`.
        groups: `{group name: [set names]}`; every name must be a key of `ood_scores`.
        convention: FPR95 convention (`"id"` or `"ood"`).
        tpr: true-positive rate of the FPR threshold.

    Returns:
        `{"sets": {name: metrics}, "groups": {group: mean metrics}, "average": mean metrics}`.

    Example:
        metrics_table(s_id, {"svhn": a, "cifar100": b}, groups={"near": ["cifar100"], "far": ["svhn"]})
    """
    if not ood_scores:
        raise ConfigError("metrics_table needs at least one OOD set. Received: ood_scores={}")
    groups = dict(groups or {})
    for group, names in groups.items():
        unknown = [n for n in names if n not in ood_scores]
        if unknown or not names:
            raise ConfigError(f"group {group!r} names OOD sets that are not evaluated: {unknown}. "
                              f"Known sets: {sorted(ood_scores)}. Received: groups={groups}")
    sets = {name: ood_metrics(id_scores, s, convention, tpr) for name, s in ood_scores.items()}
    return {"sets": sets, "groups": {g: _mean([sets[n] for n in names]) for g, names in groups.items()},
            "average": _mean(list(sets.values()))}
