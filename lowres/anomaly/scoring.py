"""Teacher scores, what travels to the server, pseudo-labels, thresholds and detection metrics.

    acc, loss = score_sessions(teacher, texts)          # per session: next-token accuracy and mean loss
    nbytes = scores_bytes({"accuracy": acc, "loss": loss})   # exact serialised bytes of the client's reply
    agg = aggregate_scores([acc_client0, acc_client1], "mean")
    normal_idx, anomal_idx = select_pseudo_labels(agg, k_normal=100, k_anomalous=100)
    thr = threshold_from_normal(train_acc, quantile=0.01)
    f1, precision, recall = prf(y_true, y_pred)

A teacher trained on normal logs predicts the next token of a normal session well; an anomalous session has
events it rarely saw, so its accuracy drops and its loss rises. High accuracy = confidently normal.
"""

from __future__ import annotations

import numpy as np

from lowres.errors import LowresError


class SelectionError(LowresError):
    """A public set too small for the requested pseudo-labels."""

    exit_code = 2


def score_sessions(teacher, texts: list[str], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(next-token accuracy, mean next-token loss) of ``teacher`` on each text, truncated to its max_length.

    Per session rather than per packed block: the unit that is judged normal or anomalous is the session."""
    import torch

    model, tok, length = teacher.model, teacher.tokenizer, teacher.max_length
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    accs, losses = [], []
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            enc = [tok(t, add_special_tokens=False)["input_ids"][:length] for t in texts[start:start + batch_size]]
            width = max(2, max(len(e) for e in enc))
            ids = torch.full((len(enc), width), pad, dtype=torch.long)
            mask = torch.zeros((len(enc), width), dtype=torch.long)
            for i, e in enumerate(enc):
                ids[i, :len(e)] = torch.tensor(e, dtype=torch.long)
                mask[i, :len(e)] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target, valid = ids[:, 1:], mask[:, 1:].bool()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
            hit = (logits.argmax(-1) == target) & valid
            n = valid.sum(1).clamp(min=1)
            accs.append((hit.sum(1) / n).numpy())
            losses.append(((nll * valid).sum(1) / n).numpy())
    if was_training:
        model.train()
    return np.concatenate(accs).astype(np.float32), np.concatenate(losses).astype(np.float32)


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


def prf(y_true, y_pred) -> tuple[float, float, float]:
    """(F1, precision, recall) with anomaly = 1 the positive class; 0 where undefined."""
    y, p = np.asarray(y_true).astype(bool), np.asarray(y_pred).astype(bool)
    tp = float((y & p).sum())
    precision = tp / p.sum() if p.sum() else 0.0
    recall = tp / y.sum() if y.sum() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return f1, precision, recall
