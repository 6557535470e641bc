"""Aggregation rules: FedAvg by samples, rejection of bad updates, mixed ranks, metric sums, resume."""

import numpy as np
import pytest

from lowres.federated.global_state import latest_global, save_global
from lowres.federated.strategy import (Update, aggregate, screen, sum_metrics, truncate_to_rank)

RNG = np.random.default_rng(1)
A, B = "m.layers.0.q_proj.lora_A.weight", "m.layers.0.q_proj.lora_B.weight"


def glob(rank=8):
    return {A: RNG.normal(size=(rank, 16)).astype(np.float32), B: np.zeros((12, rank), np.float32)}


def upd(client, rank, n=10, value=None, scale=0.01):
    d = {A: RNG.normal(0, scale, (rank, 16)).astype(np.float32), B: RNG.normal(0, scale, (12, rank)).astype(np.float32)}
    if value is not None:
        d = {k: np.full_like(v, value) for k, v in d.items()}
    return Update(client, d, n, rank)


def test_fedavg_weighted_by_samples():
    g = glob()
    u1, u2 = upd("a", 8, n=10, value=1.0), upd("b", 8, n=30, value=-1.0)
    new = aggregate(g, [u1, u2])
    assert np.allclose(new[A], g[A] + (10 * 1 - 30 * 1) / 40)
    assert np.allclose(new[B], -0.5)


def test_nan_update_is_rejected_and_never_averaged_in():
    g = glob()
    good = [upd(c, 8) for c in "abc"]
    bad = upd("poison", 8)
    bad.delta[A][0, 0] = np.nan
    ok, rejected = screen(good + [bad], g)
    assert [u.client for u in ok] == ["a", "b", "c"]
    assert rejected[0].client == "poison" and "NaN" in rejected[0].reason
    new = aggregate(g, ok)
    assert np.all(np.isfinite(new[A])) and np.allclose(new[A], aggregate(g, good)[A])


def test_wrong_shape_and_outlying_norm_are_rejected():
    g = glob()
    wrong = upd("wrong", 8)
    wrong.delta[B] = np.zeros((13, 8), np.float32)
    huge = upd("huge", 8, scale=10.0)
    ok, rejected = screen([upd(c, 8) for c in "abcd"] + [wrong, huge], g, norm_factor=10)
    reasons = {r.client: r.reason for r in rejected}
    assert "shape (13, 8)" in reasons["wrong"] and "median" in reasons["huge"]
    assert len(ok) == 4


def test_mixed_ranks_aggregate_per_slot_and_go_back_truncated():
    g = glob(8)
    small, big = upd("small", 4, n=10, value=1.0), upd("big", 8, n=10, value=3.0)
    ok, rejected = screen([small, big], g)
    assert not rejected
    new = aggregate(g, ok)
    assert new[A].shape == (8, 16) and new[B].shape == (12, 8)
    # slots 0..3 are owned by both (mean 2), slots 4..7 by the rank-8 client alone (3): not diluted by zeros
    assert np.allclose(new[A][:4] - g[A][:4], 2.0) and np.allclose(new[A][4:] - g[A][4:], 3.0)
    assert np.allclose(new[B][:, :4], 2.0) and np.allclose(new[B][:, 4:], 3.0)
    back = truncate_to_rank(new, 4)
    assert back[A].shape == (4, 16) and back[B].shape == (12, 4)
    assert np.array_equal(back[A], new[A][:4])
    # a rank-4 update claiming rank 8 is caught by its shapes
    liar = upd("liar", 4)
    liar.rank = 8
    assert "expected (8, 16)" in screen([liar], g)[1][0].reason


def test_metrics_sum_bytes_and_average_the_rest():
    m = sum_metrics([{"bytes_up_bytes": 100, "loss": 1.0, "peak_rss_bytes": 5, "num_examples": 10},
                     {"bytes_up_bytes": 50, "loss": 3.0, "peak_rss_bytes": 7, "num_examples": 30}],
                    [10, 30])
    assert m["bytes_up_bytes"] == 150 and m["num_examples"] == 40
    assert m["loss"] == pytest.approx(2.5) and m["peak_rss_bytes"] == 7


def test_global_checkpoint_resumes_from_the_newest_round(tmp_path):
    assert latest_global(tmp_path) is None
    for r in range(1, 6):
        save_global(tmp_path, r, {A: np.full((2, 2), r, np.float32)}, {"federation": "t"})
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    rnd, tensors, meta = latest_global(tmp_path)
    assert rnd == 5 and np.all(tensors[A] == 5) and meta["federation"] == "t"
