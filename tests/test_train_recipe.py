"""The recipe in-process: loss falls on a repetitive corpus, the 4-bit path runs, resume logs each step once."""

from __future__ import annotations

import math

import pytest
import torch

from lowres.config import load_config
from lowres.train import run
from train_helpers import tiny_overrides, write_corpus


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    # one roofline measurement for the whole session, never the user's ~/.cache
    monkeypatch.setenv("LOWRES_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "lowres-cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _history(uri: str, run_id: str, key: str) -> list:
    from mlflow.tracking import MlflowClient

    return sorted(MlflowClient(uri).get_metric_history(run_id, key), key=lambda m: m.step)


def test_tiny_loss_falls_and_everything_is_tracked(tmp_path):
    data = write_corpus(tmp_path)
    cfg = load_config(None, tiny_overrides(tmp_path, data, steps=14, **{"tracking.profiler_mode": "thread"}))
    result = run(cfg, progress=False)

    losses = [r["loss"] for r in result.history]
    assert result.step == 14 and result.stopped_by == "max_steps"
    assert min(losses[-3:]) < losses[0] - 1.0, losses  # a repetitive corpus is learned quickly
    assert result.eval is not None and result.eval["loss"] < losses[0]
    assert all(math.isfinite(r["grad_norm"]) and r["tokens"] == 128 for r in result.history)
    assert 0 < result.mfu < 1 and result.flops_per_token > 0 and result.peak_rss_bytes > 0
    assert result.info["weights_source"] == "random-init"

    uri = cfg.tracking.mlflow_uri
    steps = [m.step for m in _history(uri, result.run_id, "train/loss")]
    assert steps == list(range(1, 15))
    for key in ("train/learning_rate", "train/grad_norm", "train/tokens_per_second", "train/mfu_ratio",
                "train/peak_memory_megabytes", "train/forward_seconds", "train/backward_seconds", "eval/loss"):
        assert _history(uri, result.run_id, key), key
    # warm-up then cosine decay to min_lr_ratio · lr
    lrs = [m.value for m in _history(uri, result.run_id, "train/learning_rate")]
    assert lrs[0] < lrs[1] == pytest.approx(3e-3) and lrs[-1] < lrs[2]

    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    run_info = c.get_run(result.run_id)
    assert run_info.info.status == "FINISHED" and run_info.data.tags["weights"] == "random-init"
    artifacts = {a.path for a in c.list_artifacts(result.run_id)}
    assert {"adapter", "tokenizer", "config.yaml"} <= artifacts
    # the profiler saw the phases
    assert {"forward", "backward", "optimizer", "data", "eval"} <= set(result.profile["phases"])


def test_nf4_path_runs_on_cpu(tmp_path):
    data = write_corpus(tmp_path, lines=40)
    cfg = load_config(None, tiny_overrides(tmp_path, data, steps=3, **{
        "precision.quant": "nf4", "tracking.mlflow": False, "train.eval_batches": 1}))
    result = run(cfg, progress=False)
    assert result.info["quant"] == "nf4" and result.step == 3
    assert all(math.isfinite(r["loss"]) for r in result.history)


def test_resume_recomputes_without_logging_twice(tmp_path):
    data = write_corpus(tmp_path, lines=60)
    overrides = tiny_overrides(tmp_path, data, steps=8, **{"checkpoint.every": 3})
    cfg = load_config(None, overrides)
    first = run(cfg, progress=False, steps=5)  # logs steps 1-5, checkpoint at 3 only
    assert first.stopped_by == "steps" and first.checkpoint.endswith("step-00000003")
    second = run(cfg, resume=True, progress=False)
    assert second.run_id == first.run_id and [r["step"] for r in second.history] == [4, 5, 6, 7, 8]
    # steps 4 and 5 were recomputed from the checkpoint and came out the same
    for a, b in zip(first.history[3:5], second.history[:2]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    steps = [m.step for m in _history(cfg.tracking.mlflow_uri, first.run_id, "train/loss")]
    assert steps == list(range(1, 9))

    # a different config refuses the checkpoint before any work
    from lowres.errors import CheckpointError

    other = load_config(None, overrides + ["train.lr=1e-4"])
    with pytest.raises(CheckpointError, match="config hash"):
        run(other, resume=True, progress=False)


def test_chunked_loss_matches_plain_inside_the_model(tmp_path):
    """The recipe's loss through the chunked head equals HF's own loss for the same batch."""
    from lowres.train.loss import causal_lm_loss
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    ids = torch.randint(0, 300, (2, 16))
    labels = ids.clone()
    labels[:, :3] = -100
    ref = model(input_ids=ids, labels=labels).loss
    total, n = causal_lm_loss(model, {"input_ids": ids, "labels": labels}, chunk_tokens=5)
    assert (total / n).item() == pytest.approx(ref.item(), rel=1e-5)
