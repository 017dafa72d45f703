"""kood.metrics against scikit-learn (including ties) and the two FPR95 conventions."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from kood import metrics
from kood.errors import ConfigError


def _cases():
    rng = np.random.default_rng(0)
    yield rng.normal(0, 1, 300), rng.normal(1, 1, 200)                  # continuous
    yield rng.integers(0, 5, 101).astype(float), rng.integers(2, 8, 57).astype(float)  # heavy ties
    yield np.zeros(20), np.zeros(30)                                     # all tied
    yield np.arange(10.0), np.arange(10.0) + 100                         # perfectly separated


def _sk_fpr_at_tpr(pos_scores, neg_scores, tpr=0.95):
    y = np.r_[np.ones(len(pos_scores)), np.zeros(len(neg_scores))]
    fpr, tprs, _ = roc_curve(y, np.r_[pos_scores, neg_scores], drop_intermediate=False)
    return fpr[np.searchsorted(tprs, tpr, side="left")]


@pytest.mark.parametrize("case", list(range(4)))
def test_metrics_match_sklearn(case):
    s_id, s_ood = list(_cases())[case]
    y_ood = np.r_[np.zeros(len(s_id)), np.ones(len(s_ood))]
    scores = np.r_[s_id, s_ood]
    assert metrics.auroc(s_id, s_ood) == pytest.approx(roc_auc_score(y_ood, scores), abs=1e-12)
    assert metrics.aupr_out(s_id, s_ood) == pytest.approx(average_precision_score(y_ood, scores), abs=1e-12)
    assert metrics.aupr_in(s_id, s_ood) == pytest.approx(average_precision_score(1 - y_ood, -scores), abs=1e-12)
    # ID positive: confidence = -score; OOD positive: the score itself
    assert metrics.fpr_at_tpr(s_id, s_ood) == pytest.approx(_sk_fpr_at_tpr(-s_id, -s_ood))
    assert metrics.fpr_at_tpr(s_id, s_ood, convention="ood") == pytest.approx(_sk_fpr_at_tpr(s_ood, s_id))


def test_fpr_conventions_differ_and_follow_definition():
    s_id = np.arange(100.0)          # ID scores 0..99
    s_ood = np.arange(100.0) + 50    # OOD scores 50..149
    # ID positive: threshold keeps 95 ID (scores <= 94); OOD accepted: 50..94 = 45 of 100
    assert metrics.threshold_at_tpr(s_id) == 94.0
    assert metrics.fpr_at_tpr(s_id, s_ood) == pytest.approx(0.45)
    # OOD positive: threshold detects 95 OOD (scores >= 55); ID flagged: 55..99 = 45 of 100
    assert metrics.fpr_at_tpr(s_id, s_ood, convention="ood") == pytest.approx(0.45)
    s_ood2 = np.r_[np.full(10, -1.0), np.full(90, 1000.0)]
    assert metrics.fpr_at_tpr(s_id, s_ood2) == pytest.approx(0.10)
    assert metrics.fpr_at_tpr(s_id, s_ood2, convention="ood") == pytest.approx(1.0)


def test_threshold_at_tpr_is_float_exact():
    # 0.95 * 100 = 95.00000000000001 in floats: the threshold must still keep exactly 95 of 100
    s = np.arange(100.0)
    assert np.mean(s <= metrics.threshold_at_tpr(s, 0.95)) == 0.95
    assert metrics.threshold_at_tpr(s, 1.0) == 99.0


def test_accuracy():
    assert metrics.accuracy([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0]], [0, 1, 1]) == pytest.approx(2 / 3)
    with pytest.raises(ConfigError, match="logits"):
        metrics.accuracy([1.0, 2.0], [0, 1])


def test_metrics_table_groups_and_average():
    rng = np.random.default_rng(1)
    s_id = rng.normal(0, 1, 200)
    sets = {"a": rng.normal(3, 1, 100), "b": rng.normal(0.5, 1, 100), "c": rng.normal(1, 1, 50)}
    table = metrics.metrics_table(s_id, sets, groups={"far": ["a"], "near": ["b", "c"]})
    assert table["sets"]["a"]["auroc"] > table["sets"]["b"]["auroc"]
    assert table["groups"]["near"]["auroc"] == pytest.approx(
        (table["sets"]["b"]["auroc"] + table["sets"]["c"]["auroc"]) / 2)
    assert table["average"]["fpr95"] == pytest.approx(np.mean([table["sets"][k]["fpr95"] for k in sets]))
    with pytest.raises(ConfigError, match="'x'"):
        metrics.metrics_table(s_id, sets, groups={"near": ["x"]})


def test_bad_inputs():
    with pytest.raises(ConfigError, match="non-finite"):
        metrics.auroc([0.0, np.nan], [1.0])
    with pytest.raises(ConfigError, match="empty"):
        metrics.fpr_at_tpr([], [1.0])
    with pytest.raises(ConfigError, match="convention"):
        metrics.fpr_at_tpr([0.0], [1.0], convention="out")
    with pytest.raises(ConfigError, match="tpr"):
        metrics.fpr_at_tpr([0.0], [1.0], tpr=0.0)
    with pytest.raises(ConfigError, match=r"one score per sample .*Received: id_scores.shape=\(4, 3\)"):
        metrics.auroc(np.zeros((4, 3)), [1.0])  # logits instead of scores: flattening would silently mix them
    assert metrics.auroc(np.zeros((4, 1)), np.ones((2, 1))) == 1.0  # a column of scores is fine
