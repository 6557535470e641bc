"""Where the step's time goes (train.profile_steps) and the step's speed options: each option keeps the loss
curve of the default within numerical noise. Tiny models only; no timing is asserted."""

from __future__ import annotations

import gzip
import json

import pytest
from typer.testing import CliRunner

from lowres.config import load_config
from lowres.train import run
from lowres.train.opprofile import FAMILIES, family_of
from train_helpers import tiny_overrides, write_corpus


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LOWRES_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "lowres-cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_op_families_by_name_and_phase():
    assert family_of("aten::mm", False) == "matmul" and family_of("aten::addmm", False) == "matmul"
    assert family_of("aten::_scaled_dot_product_flash_attention_for_cpu", False) == "attention"
    assert family_of("aten::_softmax", False) == "attention"
    assert family_of("aten::mul", False) == "norm/element-wise" and family_of("aten::copy_", False) == "norm/element-wise"
    assert family_of("aten::_fused_adamw_", True) == "optimizer" and family_of("aten::mm", True) == "optimizer"
    assert family_of("autograd::engine::evaluate_function: MmBackward0", False) is None  # stays in "other"


def test_profile_steps_writes_trace_and_family_table(tmp_path):
    from lowres.cli.train import train

    import typer

    app = typer.Typer()
    app.command()(train)
    data = write_corpus(tmp_path)
    sets = [a for kv in tiny_overrides(tmp_path, data, steps=5, **{"tracking.mlflow": "false"}) for a in ("--set", kv)]
    res = CliRunner().invoke(app, [*sets, "--profile-steps", "2", "--json", "-q"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout[res.stdout.index("{"):])
    prof = out["op_profile"]
    assert prof["steps"] == 2 and list(prof["families"]) == list(FAMILIES)
    shares = [v["share"] for v in prof["families"].values()]
    assert all(s >= 0 for s in shares) and sum(shares) == pytest.approx(1.0, abs=1e-6)
    assert prof["families"]["matmul"]["seconds_per_step"] > 0 and prof["families"]["optimizer"]["seconds_per_step"] > 0
    assert any(o["op"] == "aten::mm" for o in prof["top_ops"])
    run_dir = tmp_path / "out"
    assert json.loads((run_dir / "op_profile.json").read_text())["families"] == prof["families"]
    trace = json.loads(gzip.decompress((run_dir / "torch_trace.json.gz").read_bytes()))
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"lowres.forward", "lowres.backward", "lowres.optimizer"} <= names


def test_profile_cut_short_by_the_run_end_is_still_summarised(tmp_path):
    data = write_corpus(tmp_path)
    cfg = load_config(None, tiny_overrides(tmp_path, data, steps=3, **{
        "tracking.mlflow": "false", "train.profile_steps": 5, "train.warmup_ignore_steps": 1}))
    result = run(cfg, progress=False)
    assert result.op_profile["steps"] == 2  # steps 2 and 3 of 3 were traced
    assert cfg.config_hash() == load_config(None, tiny_overrides(tmp_path, data, steps=3, **{
        "tracking.mlflow": "false", "train.warmup_ignore_steps": 1})).config_hash()  # a trace changes no result


def _losses(tmp_path, name: str, steps: int = 3, **extra) -> tuple[list[float], dict]:
    from lowres.train.recipe import Recipe

    data = write_corpus(tmp_path)
    cfg = load_config(None, tiny_overrides(tmp_path / name, data, steps=100, **{"tracking.mlflow": "false", **extra}))
    recipe = Recipe(cfg, progress=False).setup()
    try:
        recipe.train(steps=steps)  # fewer than max_steps: no final eval or save, just the steps
    finally:
        recipe.cleanup()
    return [r["loss"] for r in recipe.history], recipe.info


OPTIONS = [{"train.attention": "eager"}, {"train.optimizer_impl": "foreach"}, {"train.optimizer_impl": "loop"},
           {"train.loss_chunk_tokens": 0}, {"train.threads": 1}, {"train.fused_lora": "true"},
           {"train.gemm": "onednn"}]


def test_speed_options_keep_the_loss_curve(tmp_path):
    base, info = _losses(tmp_path, "base")
    assert info["fused_lora_layers"] == 0 and info["attention"] == "sdpa" and not info["compiled"]
    assert base[-1] < base[0]  # the steps did train (a loss curve, not a constant)
    for i, option in enumerate(OPTIONS):
        other, info = _losses(tmp_path, f"o{i}", **option)
        if "train.fused_lora" in option or "train.gemm" in option:
            assert info["fused_lora_layers"] > 0  # the option did change the layers it claims to
        # the same tokens and seed: only float summation order may differ
        assert other == pytest.approx(base, rel=1e-4), option


def test_onednn_frozen_linear_and_head_match_torch_values_and_gradients():
    """train.gemm=onednn: the frozen projection and the chunked LM head give torch's outputs and input
    gradients (another summation order only), and fall back to torch's own where they do not apply."""
    import torch

    from lowres.train.loss import chunked_lm_loss
    from lowres.train.speed import frozen_linear, onednn_available

    if not onednn_available():
        pytest.skip("this torch build has no oneDNN")
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 32, generator=g), torch.randn(48, generator=g)
    x = torch.randn(10, 32, generator=g, requires_grad=True)
    for bias in (None, b):
        ours = frozen_linear(x, w, bias, "onednn")
        ref = torch.nn.functional.linear(x, w, bias)
        assert ours.grad_fn is not None and type(ours.grad_fn).__name__ != type(ref.grad_fn).__name__
        assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-5)
        up = torch.randn(ref.shape, generator=g)
        (gx,) = torch.autograd.grad(ours, x, up)
        (rx,) = torch.autograd.grad(ref, x, up)
        assert torch.allclose(gx, rx, rtol=1e-5, atol=1e-5)
    trainable = w.clone().requires_grad_(True)  # a weight that trains is not "frozen": torch's own GEMM
    assert type(frozen_linear(x, trainable, None, "onednn").grad_fn).__name__ == "MmBackward0"
    hidden = torch.randn(2, 12, 32, generator=g, requires_grad=True)
    labels = torch.randint(0, 48, (2, 12), generator=g)
    labels[0, :5] = -100
    losses, grads = [], []
    for gemm in ("torch", "onednn"):
        loss = chunked_lm_loss(hidden, w, labels, None, chunk_tokens=7, gemm=gemm)
        losses.append(loss.detach())
        grads.append(torch.autograd.grad(loss, hidden)[0])
    assert torch.allclose(losses[0], losses[1], rtol=1e-5) and torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)
