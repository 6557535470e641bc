"""Teacher scores, what travels to the server, pseudo-labels, thresholds and detection metrics.

    s = score_sessions(teacher, texts)     # per session: {"accuracy", "loss", "max_loss"} arrays
    nbytes = scores_bytes(s)               # exact serialised bytes of the client's reply
    agg = aggregate_scores([normality(s0, "loss"), normality(s1, "loss")], "mean")
    normal_idx, anomal_idx = select_pseudo_labels(agg, k_normal=100, k_anomalous=100)
    thr = threshold_from_normal(train_acc, quantile=0.01)
    f1, precision, recall = prf(y_true, y_pred)

A teacher trained on normal logs predicts the next token of a normal session well; an anomalous session has
events it rarely saw or ends where normal sessions go on, so its accuracy drops and its loss rises
(``normality``: higher = more confidently normal, whichever score ranks).
"""

from __future__ import annotations

import numpy as np

from lowres.errors import LowresError


class SelectionError(LowresError):
    """A public set too small for the requested pseudo-labels."""

    exit_code = 2


SCORES = ("accuracy", "loss", "max_loss")


def _session_windows(ids: list[int], length: int) -> list[tuple[list[int], int]]:
    """Windows of at most ``length`` tokens covering a session's targets once each: (window ids, index of
    the first target the window scores). Sliding with half-window overlap, so every target after the first
    window is predicted from at least ``length // 2`` tokens of context (the sliding-window perplexity of
    Hugging Face's "Perplexity of fixed-length models")."""
    if len(ids) <= length:
        return [(ids, 1)]
    stride = max(1, length // 2)
    out, done = [], 1  # targets are positions 1..n-1 of ids; ``done`` = the next one to score
    start = 0
    while done < len(ids):
        window = ids[start:start + length]
        out.append((window, done - start))
        done = start + len(window)
        start += stride
    return out


def score_sessions(teacher, texts: list[str], batch_size: int = 32, window: int | None = None,
                   max_batch_tokens: int = 4096) -> dict[str, np.ndarray]:
    """Per session: ``accuracy`` (top-1 next-token accuracy), ``loss`` (mean next-token loss) and
    ``max_loss`` (the loss of the most surprising token) of ``teacher``, each a float32 array.

    A session is framed as the teacher saw it in training (lowres.data.blocks packs sessions with EOS after
    each): EOS, its tokens, EOS. So the first event is predicted from a session boundary and the end is
    predicted too: a session cut short (HDFS' commonest anomaly: a block opened and never finished) ends
    where a teacher of normal logs expects more. Sessions longer than ``window`` tokens (default: the
    teacher's ``max_length``) are scored in sliding windows (every token once, with at least half a window of
    context), not truncated.

    Windows are sorted by length and batched up to ``batch_size`` rows and ``max_batch_tokens`` padded tokens,
    so little compute goes to padding and the logits (rows × width × vocabulary) stay bounded. The loss is
    ``logsumexp − target logit`` on fp32 logits; a hit is a target that is the logits' argmax. Under
    the teacher's ``precision`` (a ResolvedPrecision, if it has one) the forward runs under autocast as in
    training and evaluation."""
    import torch

    from lowres.train.evaluation import autocast_context

    model, tok = teacher.model, teacher.tokenizer
    length = window or teacher.max_length
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos = tok.eos_token_id
    rows: list[tuple[int, list[int], int]] = []  # (session, window ids, first scored position)
    for i, t in enumerate(texts):
        ids = [eos] + tok(t, add_special_tokens=True)["input_ids"] + [eos]
        rows += [(i, w, first) for w, first in _session_windows(ids, length)]
    rows.sort(key=lambda r: -len(r[1]))  # longest first: a batch's width is its first row's length
    batches, start = [], 0
    while start < len(rows):
        width = len(rows[start][1])
        n = max(1, min(batch_size, max_batch_tokens // max(width, 1)))
        batches.append(rows[start:start + n])
        start += n
    hits = np.zeros(len(texts))
    nll_sum = np.zeros(len(texts))
    nll_max = np.zeros(len(texts))
    count = np.zeros(len(texts))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
    except (AttributeError, StopIteration):
        device = torch.device("cpu")
    precision = getattr(teacher, "precision", None)
    with torch.inference_mode():
        for chunk in batches:
            width = len(chunk[0][1])
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            scored = torch.zeros((len(chunk), width), dtype=torch.bool)
            for j, (_, w, first) in enumerate(chunk):
                ids[j, :len(w)] = torch.tensor(w, dtype=torch.long)
                mask[j, :len(w)] = 1
                scored[j, first:len(w)] = True
            with autocast_context(precision, str(device)):
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1]
            logits = logits.float().cpu()
            target, valid = ids[:, 1:], scored[:, 1:]
            nll = torch.logsumexp(logits, dim=-1) - logits.gather(-1, target[..., None]).squeeze(-1)
            hit = ((logits.argmax(-1) == target) & valid).sum(1).numpy()
            del logits
            nll = torch.where(valid, nll, torch.zeros_like(nll))
            n, total, peak = valid.sum(1).numpy(), nll.sum(1).numpy(), nll.max(1).values.numpy()
            for j, (i, _, _) in enumerate(chunk):
                hits[i] += hit[j]
                nll_sum[i] += total[j]
                count[i] += n[j]
                nll_max[i] = max(nll_max[i], peak[j])
    if was_training:
        model.train()
    count = np.maximum(count, 1)
    return {"accuracy": (hits / count).astype(np.float32), "loss": (nll_sum / count).astype(np.float32),
            "max_loss": nll_max.astype(np.float32)}


def normality(scores: dict[str, np.ndarray], how: str) -> np.ndarray:
    """One number per session, higher = more normal: accuracy as is; loss and max_loss negated."""
    if how not in SCORES:
        raise ValueError(f"score must be one of {', '.join(SCORES)}, got {how!r}")
    return scores[how] if how == "accuracy" else -scores[how]


def scores_bytes(scores: dict[str, np.ndarray]) -> int:
    """Exact bytes of a client's reply carrying these score arrays, serialised as a Flower RecordDict (the same
    counting as the federation's adapters, so the two methods' bytes compare like for like)."""
    from flwr.app import RecordDict

    from lowres.federated.wire import ARRAYS_KEY, content_bytes, to_arrayrecord

    return content_bytes(RecordDict({ARRAYS_KEY: to_arrayrecord({k: np.asarray(v) for k, v in scores.items()})}))


def tensors_bytes(tensors: dict[str, np.ndarray]) -> int:
    """Exact bytes of a message carrying these tensors through lowres' uncompressed codec (what a FedAvg round
    or the student's download puts on the wire)."""
    from flwr.app import RecordDict

    from lowres.federated.compression import encode
    from lowres.federated.wire import ARRAYS_KEY, content_bytes, to_arrayrecord

    return content_bytes(RecordDict({ARRAYS_KEY: to_arrayrecord(encode(tensors, "none"))}))


def aggregate_scores(per_client: list[np.ndarray], how: str = "mean") -> np.ndarray:
    """Clients' scores of the same sessions → one score each: ``mean`` (consensus) or ``max`` (a session is as
    normal as the teacher that knows it best — kinder to behaviour only one client has seen)."""
    if not per_client:
        raise ValueError("no client scores to aggregate")
    stack = np.stack([np.asarray(x, dtype=np.float64) for x in per_client])
    if how == "mean":
        return stack.mean(0)
    if how == "max":
        return stack.max(0)
    raise ValueError(f"aggregation must be 'mean' or 'max', got {how!r}")


def select_pseudo_labels(score: np.ndarray, k_normal: int, k_anomalous: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices of the k_normal highest scores, indices of the k_anomalous lowest). Ties break by index, so the
    selection is deterministic. SelectionError when the public set holds fewer than k_normal + k_anomalous."""
    score = np.asarray(score)
    need = k_normal + k_anomalous
    if k_normal < 1 or k_anomalous < 1:
        raise SelectionError(f"k_normal and k_anomalous must be >= 1, got {k_normal} and {k_anomalous}")
    if len(score) < need:
        raise SelectionError(f"the public set has {len(score)} sessions; top-{k_normal} + bottom-{k_anomalous} "
                             f"needs at least {need}", hint="lower k or use a larger public set")
    order = np.lexsort((np.arange(len(score)), score))  # ascending score, then index
    return np.sort(order[len(score) - k_normal:]), np.sort(order[:k_anomalous])


def threshold_from_normal(normal_scores: np.ndarray, quantile: float = 0.01) -> float:
    """A threshold chosen without any anomaly label: the ``quantile`` of the scores of sessions known normal
    (the teachers' own training sessions). Sessions scoring below it are flagged."""
    return float(np.quantile(np.asarray(normal_scores, dtype=np.float64), quantile))


def auroc(y_true, normal_score) -> float:
    """Area under the ROC curve of flagging by low ``normal_score`` (anomaly = 1): the chance that a random
    anomalous session scores below a random normal one, ties counting half (the Mann–Whitney U statistic
    over n_pos·n_neg). Threshold-free, so it shows how well a score separates the classes apart from where a
    threshold is put. NaN when one class is absent."""
    y = np.asarray(y_true).astype(bool)
    x = -np.asarray(normal_score, dtype=np.float64)  # higher = more anomalous
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if not n_pos or not n_neg:
        return float("nan")
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    sorted_x = x[order]
    # average ranks over ties
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + b + 1) / 2
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def prf(y_true, y_pred) -> tuple[float, float, float]:
    """(F1, precision, recall) with anomaly = 1 the positive class; 0 where undefined."""
    y, p = np.asarray(y_true).astype(bool), np.asarray(y_pred).astype(bool)
    tp = float((y & p).sum())
    precision = tp / p.sum() if p.sum() else 0.0
    recall = tp / y.sum() if y.sum() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return f1, precision, recall
