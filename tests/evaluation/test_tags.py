"""Multi-label quality of the pooled scores (issue 20): precision / recall / F1, AP, best threshold."""

from __future__ import annotations

import numpy as np
import pytest

from vitpcm.evaluation.tags import average_precision, best_threshold, mean_f1, tag_quality


def _ap_by_definition(scores: np.ndarray, truth: np.ndarray) -> float:
    """sum over distinct thresholds t (descending) of (R(t) - R(prev)) * P(t)."""
    ap, prev_recall = 0.0, 0.0
    for t in sorted(set(scores.tolist()), reverse=True):
        pred = scores >= t
        tp = float((pred & truth).sum())
        recall = tp / truth.sum()
        ap += (recall - prev_recall) * tp / pred.sum()
        prev_recall = recall
    return ap


def test_average_precision_matches_its_definition_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.integers(0, 6, 30) / 5.0  # many ties
        truth = rng.random(30) < 0.4
        if truth.any():
            assert average_precision(scores, truth) == pytest.approx(_ap_by_definition(scores, truth))
    assert average_precision(np.array([0.9, 0.1]), np.array([True, False])) == 1.0
    assert average_precision(np.array([0.1, 0.9]), np.array([True, False])) == 0.5
    assert average_precision(np.array([0.3, 0.2]), np.array([False, False])) is None


def test_tag_quality_counts_a_small_case_by_hand():
    classes = ["background", "cat", "dog"]
    truth = np.array([[1, 1, 0], [1, 1, 1], [1, 0, 1], [1, 0, 0]])
    scores = np.array([[0.9, 0.8, 0.1], [0.9, 0.3, 0.7], [0.9, 0.6, 0.4], [0.9, 0.2, 0.2]])
    q = tag_quality(scores, truth, classes, threshold=0.5)
    cat, dog = q["per_class"]["cat"], q["per_class"]["dog"]
    # cat at 0.5: predicted on images 0, 2; true on 0, 1 -> tp 1, fp 1, fn 1
    assert (cat["precision"], cat["recall"], cat["f1"], cat["support"]) == (0.5, 0.5, 0.5, 2)
    # dog at 0.5: predicted on image 1; true on 1, 2 -> tp 1, fp 0, fn 1
    assert (dog["precision"], dog["recall"], dog["f1"]) == (1.0, 0.5, pytest.approx(2 / 3))
    assert q["mean_f1"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert "background" not in q["per_class"]  # always on: never scored
    assert q["map"] == pytest.approx((average_precision(scores[:, 1], truth[:, 1] > 0)
                                      + average_precision(scores[:, 2], truth[:, 2] > 0)) / 2)  # fmt: skip
    # the best threshold is the candidate with the highest mean F1
    best = q["best_threshold"]
    assert q["best_mean_f1"] == mean_f1(scores, truth, best)
    assert all(mean_f1(scores, truth, t) <= q["best_mean_f1"] for t in np.arange(0.05, 1.0, 0.05))
    assert best_threshold(scores, truth) == best


def test_a_class_never_predicted_has_no_precision():
    q = tag_quality(np.array([[1.0, 0.1], [1.0, 0.2]]), np.array([[1, 1], [1, 0]]), ["background", "x"], 0.5)
    assert q["per_class"]["x"]["precision"] is None and q["per_class"]["x"]["f1"] == 0.0
    with pytest.raises(ValueError):
        tag_quality(np.zeros((2, 3)), np.zeros((3, 3)), ["b", "x", "y"], 0.5)
