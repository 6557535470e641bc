"""Pseudo-label selection, aggregation, thresholds, F1 and the exact bytes of a scores upload."""

import numpy as np
import pytest

from lowres.anomaly.scoring import (SelectionError, aggregate_scores, prf, scores_bytes, select_pseudo_labels,
                                    threshold_from_normal)


def test_top_and_bottom_k():
    score = np.array([0.9, 0.1, 0.5, 0.95, 0.2, 0.7])
    normal, anomalous = select_pseudo_labels(score, k_normal=2, k_anomalous=3)
    assert normal.tolist() == [0, 3]
    assert anomalous.tolist() == [1, 2, 4]


def test_ties_break_by_index_and_sets_are_disjoint():
    normal, anomalous = select_pseudo_labels(np.zeros(6), 3, 3)
    assert normal.tolist() == [3, 4, 5] and anomalous.tolist() == [0, 1, 2]


def test_too_small_public_set_says_counts():
    with pytest.raises(SelectionError, match="has 4 sessions; top-3 \\+ bottom-2 needs at least 5"):
        select_pseudo_labels(np.arange(4.0), 3, 2)


def test_aggregation_mean_and_max():
    a, b = np.array([0.2, 0.8]), np.array([0.6, 0.4])
    assert aggregate_scores([a, b], "mean") == pytest.approx([0.4, 0.6])
    assert aggregate_scores([a, b], "max") == pytest.approx([0.6, 0.8])
    with pytest.raises(ValueError, match="mean' or 'max"):
        aggregate_scores([a], "median")


def test_threshold_and_prf():
    assert threshold_from_normal(np.linspace(0, 1, 101), 0.1) == pytest.approx(0.1)
    f1, p, r = prf([1, 1, 0, 0], [1, 0, 1, 0])
    assert (f1, p, r) == pytest.approx((0.5, 0.5, 0.5))
    assert prf([0, 0], [0, 0]) == (0.0, 0.0, 0.0)


def test_scores_bytes_grow_with_the_float32_payload():
    rng = np.random.default_rng(0)  # distinct values: Flower stores identical chunks once
    small = scores_bytes({"accuracy": rng.random(10, np.float32), "loss": rng.random(10, np.float32)})
    big = scores_bytes({"accuracy": rng.random(1010, np.float32), "loss": rng.random(1010, np.float32)})
    # the arrays' raw bytes, plus at most a few bytes of length fields per array
    assert 2 * 1000 * 4 <= big - small <= 2 * 1000 * 4 + 16
