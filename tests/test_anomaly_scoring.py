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


class _CountingTeacher:
    """A stand-in teacher whose model predicts token t + 1 after token t (one-hot logits, no context), with a
    whitespace tokenizer of integer ids and EOS = 0: the expected scores can be worked out by hand."""

    vocab = 64

    class _Tok:
        eos_token_id = 0
        pad_token_id = 0

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [int(x) for x in text.split()]}

    class _Model:
        training = False

        def eval(self):
            return self

        def train(self):
            return self

        def __call__(self, input_ids, attention_mask):
            import torch
            from types import SimpleNamespace

            logits = torch.nn.functional.one_hot((input_ids + 1) % _CountingTeacher.vocab, _CountingTeacher.vocab)
            return SimpleNamespace(logits=logits.float() * 10)

    def __init__(self, max_length):
        self.model, self.tokenizer, self.max_length = self._Model(), self._Tok(), max_length


def test_sessions_are_framed_by_eos_so_their_end_is_judged():
    from lowres.anomaly.scoring import score_sessions

    # framed: EOS 1 2 3 EOS → targets 1 2 3 (predicted) and EOS (the model says 4): 3 of 4 right;
    # EOS 5 9 EOS → 5 (says 1), 9 (says 6), EOS (says 10): none
    s = score_sessions(_CountingTeacher(64), ["1 2 3", "5 9"])
    assert s["accuracy"] == pytest.approx([0.75, 0.0])
    assert s["max_loss"][0] > 5 and s["loss"][0] == pytest.approx(s["max_loss"][0] / 4, rel=1e-3)


def test_long_sessions_are_scored_in_windows_every_token_once():
    from lowres.anomaly.scoring import _session_windows, score_sessions

    ids = list(range(1, 40))
    for length in (4, 7, 16, 64):
        windows = _session_windows(ids, length)
        scored = [pos for w, first in windows for pos in range(first, len(w))]
        assert len(scored) == len(ids) - 1 and all(len(w) <= length for w, _ in windows)
        assert all(first >= length // 2 for _, first in windows[1:])  # later windows keep half a window of context
    text = " ".join(str(i) for i in range(1, 40)) + " 7 3"
    whole, windowed = score_sessions(_CountingTeacher(128), [text]), score_sessions(_CountingTeacher(8), [text])
    for key in whole:
        assert windowed[key] == pytest.approx(whole[key], rel=1e-5)
    assert whole["accuracy"][0] == pytest.approx(39 / 42)  # EOS→1→…→39 right; 39→7, 7→3, 3→EOS wrong


def test_scores_do_not_depend_on_batching_order_or_window_override():
    from lowres.anomaly.scoring import score_sessions

    rng = np.random.default_rng(3)
    # sessions of very different lengths, in shuffled order: sorting by length inside must map scores back
    texts = [" ".join(str(int(x)) for x in rng.integers(1, 60, size=n)) for n in rng.permutation([3, 40, 9, 17, 1, 25, 6])]
    one = score_sessions(_CountingTeacher(16), texts, batch_size=1)
    for kw in ({}, {"batch_size": 3}, {"max_batch_tokens": 20}):
        other = score_sessions(_CountingTeacher(16), texts, **kw)
        for key in one:
            assert other[key] == pytest.approx(one[key], rel=1e-6), (kw, key)
    # ``window`` overrides the teacher's max_length: one window per session, as a teacher of 128 would score
    wide = score_sessions(_CountingTeacher(16), texts, window=128)
    whole = score_sessions(_CountingTeacher(128), texts)
    for key in whole:
        assert wide[key] == pytest.approx(whole[key], rel=1e-6)
    # a session's own scores, alone, are what it gets among others
    alone = score_sessions(_CountingTeacher(16), [texts[2]])
    assert alone["loss"][0] == pytest.approx(one["loss"][2], rel=1e-6)


def test_normality_is_higher_for_more_normal_whatever_the_score():
    from lowres.anomaly.scoring import normality

    s = {"accuracy": np.array([0.9, 0.2]), "loss": np.array([0.1, 2.0]), "max_loss": np.array([1.0, 9.0])}
    for how in ("accuracy", "loss", "max_loss"):
        n = normality(s, how)
        assert n[0] > n[1]
    with pytest.raises(ValueError, match="accuracy, loss, max_loss"):
        normality(s, "perplexity")


def test_auroc_counts_pairs_ordered_and_ties_half():
    from lowres.anomaly.scoring import auroc

    y = np.array([1, 1, 0, 0])
    assert auroc(y, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0   # every anomaly scores less normal
    assert auroc(y, np.array([0.9, 0.8, 0.1, 0.2])) == 0.0
    assert auroc(y, np.array([0.5, 0.5, 0.5, 0.5])) == 0.5   # all ties
    # pairs (anomaly, normal): (0.1,0.3) (0.1,0.4) (0.35,0.3)x (0.35,0.4) → 3 of 4
    assert auroc(y, np.array([0.1, 0.35, 0.3, 0.4])) == 0.75
    assert np.isnan(auroc(np.array([0, 0]), np.array([0.1, 0.2])))
