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
    assert family_of("mkldnn::_linear_pointwise", False) == "matmul"  # train.gemm=onednn's GEMMs
    assert family_of("aten::addmm_", False) == "matmul"  # fused LoRA's rank-r term, added in place
    assert family_of("aten::_scaled_dot_product_flash_attention_for_cpu", False) == "attention"
    assert family_of("aten::_softmax", False) == "attention"
    assert family_of("aten::mul", False) == "norm/element-wise" and family_of("aten::copy_", False) == "norm/element-wise"
    assert family_of("aten::_fused_adamw_", True) == "optimizer" and family_of("aten::mm", True) == "optimizer"
    assert family_of("autograd::engine::evaluate_function: MmBackward0", False) is None  # stays in "other"
    # inside lowres' bmm attention (its Function's forward and backward ranges) GEMMs count as attention
    assert family_of("aten::bmm", "attention") == "attention" and family_of("aten::bmm", None) == "matmul"


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
    assert prof["families"]["attention"]["seconds_per_step"] > 0  # sdpa's kernel or bmm attention's range
    assert any(o["op"] == "aten::mm" for o in prof["top_ops"])
    floor = prof["gemm_floor"]  # the traced GEMM calls replayed alone after the run, and the MFU they allow
    assert floor["calls_per_step"] > 0 and floor["replayed_share"] == 1.0 and floor["alone_seconds"] > 0
    assert 0 < floor["mfu_ceiling"] and all(r["alone_seconds"] > 0 for r in floor["by_call"])
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


OPTIONS = [{"train.attention": "eager"}, {"train.attention": "sdpa"}, {"train.attention": "bmm"},
           {"train.fused_norm": "false"}, {"train.optimizer_impl": "foreach"}, {"train.optimizer_impl": "loop"},
           {"train.loss_chunk_tokens": 0}, {"train.threads": 1}, {"train.gemm": "torch"}, {"train.gemm": "onednn"},
           {"train.fused_lora": "false", "train.gemm": "torch"}, {"train.malloc_tuning": "false"},
           {"train.lora_groups": "false"}]


def test_speed_options_keep_the_loss_curve(tmp_path):
    from lowres.train.speed import onednn_available

    from lowres.train.attention import resolve_attention

    base, info = _losses(tmp_path, "base")
    # the defaults: every LoRA layer through lowres' Function, the GEMM library measured faster here, the
    # attention kernel auto picks for this dtype and length (32 tokens: bmm in bf16, sdpa in fp32)
    assert info["fused_lora_layers"] > 0 and info["fused_norm_layers"] > 0 and not info["compiled"]
    assert info["grouped_lora_layers"] > 0  # q/k/v and gate/up of the tiny preset
    assert info["attention"] == resolve_attention("auto", "cpu", info["dtype"], 32)
    assert info["gemm"] in (("torch", "onednn") if onednn_available() else ("torch",))
    from lowres.train.allocator import glibc_version

    assert info["malloc"].startswith(f"glibc {glibc_version()}:" if glibc_version() else "unchanged")
    assert base[-1] < base[0]  # the steps did train (a loss curve, not a constant)
    for i, option in enumerate(OPTIONS):
        if option.get("train.gemm") == "onednn" and not onednn_available():
            continue
        other, info = _losses(tmp_path, f"o{i}", **option)
        peft_path = option.get("train.fused_lora") == "false"
        assert (info["fused_lora_layers"] == 0) == peft_path  # the option did what it claims
        assert (info["fused_norm_layers"] == 0) == (option.get("train.fused_norm") == "false")
        assert (info["grouped_lora_layers"] == 0) == (peft_path or option.get("train.lora_groups") == "false")
        assert info["gemm"] == option.get("train.gemm", info["gemm"])
        if option.get("train.malloc_tuning") == "false":
            # mallopt is process-wide: the default run above tuned it, and the run says false did not undo it
            assert info["malloc"] == "unchanged" or "false does not undo it" in info["malloc"]
        # the same tokens and seed: only float summation order may differ (peft's path differs from the default
        # in two orders at once, GEMM library and LoRA graph; Adam turns ~1e-7 gradient noise into ~1e-4 of
        # loss by step 3 on this random-init model — a wrong gradient would move it by whole percents)
        assert other == pytest.approx(base, rel=3e-4), option


def _peft_linear(dtype, bias: bool, dropout: float = 0.0):
    """A peft LoRA Linear (r=4 over a 32 → 48 projection) with a non-zero B, and a fused copy of it."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    from lowres.train.speed import fuse_lora

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(32, 48, bias=bias)).to(dtype)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0"], lora_dropout=dropout))
    torch.nn.init.normal_(model.base_model.model[0].lora_B["default"].weight, std=0.5)
    fused = copy.deepcopy(model)
    return model.base_model.model[0], fused, fuse_lora(fused)


def _nodes(fn, depth: int = 2) -> set[str]:
    """The autograd node names within ``depth`` steps of ``fn`` (the output's own view node, then its op)."""
    if fn is None or depth == 0:
        return set()
    return {type(fn).__name__}.union(*(_nodes(n, depth - 1) for n, _ in fn.next_functions))


def _forward_backward(layer, x, up):
    """The layer's output and the gradients of <output, up> with respect to x (if it wants one), A and B."""
    import torch

    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    y = layer(x)
    wrt = ([x] if x.requires_grad else []) + [a, b]
    return [y.detach(), *torch.autograd.grad(y, wrt, up)], y.grad_fn


@pytest.mark.parametrize("gemm", ["torch", "onednn"])
def test_fused_lora_matches_peft_values_and_gradients(gemm):
    """train.fused_lora's LoRA linear (one autograd Function) gives peft's output and its gradients for the
    input, A and B: equal to float noise in fp32 — with torch's or oneDNN's GEMM — and to bf16 rounding in
    bf16 (where it computes the adapter in bf16 and peft in fp32); no input gradient where none is wanted."""
    import torch

    from lowres.train.speed import onednn_available

    if gemm == "onednn" and not onednn_available():
        pytest.skip("this torch build has no oneDNN")
    g = torch.Generator().manual_seed(1)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        for bias in (False, True):
            ref_layer, fused, n = _peft_linear(dtype, bias)
            assert n == 1
            layer = fused.base_model.model[0]
            layer._lowres_gemm = gemm
            x = torch.randn(2, 5, 32, generator=g).to(dtype).requires_grad_(True)
            up = torch.randn(2, 5, 48, generator=g).to(dtype)
            ref, ref_fn = _forward_backward(ref_layer, x, up)
            ours, our_fn = _forward_backward(layer, x, up)
            assert "_LoraLinearBackward" in _nodes(our_fn) and "_LoraLinearBackward" not in _nodes(ref_fn)
            for r, o, what in zip(ref, ours, ("output", "d input", "d A", "d B")):
                assert o.dtype == r.dtype and o.shape == r.shape, what
                err = ((o.float() - r.float()).norm() / r.float().norm()).item()
                assert err < tol, (dtype, bias, what, err)
            # the first layer's input wants no gradient: only A's and B's are computed
            ours2, _ = _forward_backward(layer, x.detach(), up)
            for r, o in zip(ref[2:], ours2[1:]):
                assert ((o.float() - r.float()).norm() / r.float().norm()).item() < tol


def test_fused_lora_falls_back_to_peft_where_it_does_not_apply():
    """Dropout, autocast, fp16 and a disabled adapter keep peft's own forward (and its results)."""
    import torch

    ref_layer, fused, _ = _peft_linear(torch.float32, False, dropout=0.1)
    x = torch.randn(3, 32)
    layer = fused.base_model.model[0]
    assert layer(x).grad_fn is not None and "_LoraLinearBackward" not in _nodes(layer(x).grad_fn)
    ref_layer, fused, _ = _peft_linear(torch.float32, False)
    layer = fused.base_model.model[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "_LoraLinearBackward" not in _nodes(layer(x).grad_fn)
    assert "_LoraLinearBackward" in _nodes(layer(x).grad_fn)  # outside autocast, the same layer is fused
    with fused.disable_adapter():
        assert torch.equal(layer(x), layer.base_layer(x))
    _, fp16, _ = _peft_linear(torch.float16, False)  # fp16: peft keeps the adapter's gradients in fp32
    assert "_LoraLinearBackward" not in _nodes(fp16.base_model.model[0](x.half().requires_grad_(True)).grad_fn)


def test_onednn_head_matches_torch_values_and_gradients():
    """train.gemm=onednn in the chunked LM head: torch's loss and input gradient (another summation order)."""
    import torch

    from lowres.train.loss import chunked_lm_loss
    from lowres.train.speed import onednn_available

    if not onednn_available():
        pytest.skip("this torch build has no oneDNN")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 32, generator=g)
    hidden = torch.randn(2, 12, 32, generator=g, requires_grad=True)
    labels = torch.randint(0, 48, (2, 12), generator=g)
    labels[0, :5] = -100
    losses, grads = [], []
    for gemm in ("torch", "onednn"):
        loss = chunked_lm_loss(hidden, w, labels, None, chunk_tokens=7, gemm=gemm)
        losses.append(loss.detach())
        grads.append(torch.autograd.grad(loss, hidden)[0])
    assert torch.allclose(losses[0], losses[1], rtol=1e-5) and torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_gemm_auto_is_measured_here_cached_and_only_for_fp32_on_the_cpu(tmp_path, monkeypatch):
    """train.gemm=auto: torch off the CPU and outside fp32; on the CPU in fp32, whichever library timed faster
    on the model's shapes here (a real measurement, cached per machine/threads/shapes); onednn where it
    cannot run is refused with what to do."""
    from lowres.train import speed

    shapes = [(64, 32, 48), (64, 48, 32)]
    assert speed.resolve_gemm("auto", "cuda", "fp32", shapes) == "torch"
    assert speed.resolve_gemm("auto", "cpu", "bf16", shapes) == "torch"
    assert speed.resolve_gemm("torch", "cpu", "fp32", shapes) == "torch"
    with pytest.raises(ValueError, match="off the CPU.*train.gemm=auto or torch"):
        speed.resolve_gemm("onednn", "cuda")
    if not speed.onednn_available():
        assert speed.resolve_gemm("auto", "cpu", "fp32", shapes) == "torch"
        return
    path = tmp_path / "roofline.json"
    first = speed.measure_gemm_choice(shapes, fingerprint="test", path=path)
    assert first["choice"] in ("torch", "onednn") and first["torch_s"] > 0 and first["onednn_s"] > 0
    assert (first["choice"] == "onednn") == (first["onednn_s"] <= speed.GEMM_MARGIN * first["torch_s"])
    if path.exists():  # kept unless the machine was busy while it measured
        again = speed.measure_gemm_choice(shapes, fingerprint="test", path=path)
        assert again["source"] == "cache" and again["choice"] == first["choice"]
    monkeypatch.setattr(speed, "measure_gemm_choice", lambda shapes, fingerprint=None: {"choice": "onednn"})
    assert speed.resolve_gemm("auto", "cpu", "fp32", shapes, "x") == "onednn"


@pytest.mark.parametrize("gemm", ["onednn", "torch"])
def test_compile_runs_the_fused_lora_layers_and_keeps_the_loss_curve(tmp_path, monkeypatch, gemm):
    """train.compile=true over the fused LoRA layers, with either GEMM library (oneDNN's reaches inductor inside
    the opaque lowres::lora_linear ops): the same losses as eager to float noise."""
    from lowres.train.speed import onednn_available

    if gemm == "onednn" and not onednn_available():
        pytest.skip("this torch build has no oneDNN")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    base, _ = _losses(tmp_path, "eager", **{"train.gemm": gemm})
    compiled, info = _losses(tmp_path, "compiled", **{"train.compile": "true", "train.gemm": gemm})
    assert info["compiled"] and info["gemm"] == gemm and info["fused_lora_layers"] > 0
    assert compiled == pytest.approx(base, rel=3e-4)


def test_compile_is_regional_and_traces_each_layer_without_a_graph_break(tmp_path, monkeypatch):
    """train.compile compiles each decoder layer, not the stack: the stack's eager forward leaves the causal mask
    out (None), so the block-causal attention Function (128 tokens: two query blocks in fp32), the fused norms
    and the fused LoRA ops are traced into one graph per layer with no graph break — a break (a Function class
    built inside the traced forward, a mask cached from inside it) made dynamo skip the layer loop and run
    dozens of small graphs a step. Losses equal eager's to float noise."""
    import torch
    from torch._dynamo.utils import counters

    from lowres.train.attention import causal_blocks

    assert causal_blocks(128, 4) == 2
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    extra = {"data.max_length": 128, "train.batch_size": 2, "train.attention": "bmm"}
    base, _ = _losses(tmp_path, "eager", **extra)
    torch._dynamo.reset()
    counters.clear()
    from lowres.train.loss import _head_and_decoder
    from lowres.train.recipe import Recipe

    cfg = load_config(None, tiny_overrides(tmp_path / "compiled", write_corpus(tmp_path), steps=100,
                                           **{"tracking.mlflow": "false", "train.compile": "true", **extra}))
    recipe = Recipe(cfg, progress=False).setup()
    try:
        decoder, _ = _head_and_decoder(recipe.model)
        assert decoder._compiled_call_impl is None  # the stack itself runs eagerly
        assert all(layer._compiled_call_impl is not None for layer in decoder.layers)
        recipe.train(steps=3)
    finally:
        recipe.cleanup()
    compiled, info = [r["loss"] for r in recipe.history], recipe.info
    assert info["compiled"] and info["attention"] == "bmm" and info["fused_norm_layers"] > 0
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] >= 1
    assert compiled == pytest.approx(base, rel=3e-4)


def _auto_run(tmp_path, name: str, steps: int, **extra):
    from lowres.train.loss import _head_and_decoder
    from lowres.train.recipe import Recipe

    cfg = load_config(None, tiny_overrides(tmp_path / name, write_corpus(tmp_path), steps=100,
                                           **{"tracking.mlflow": "false", **extra}))
    recipe = Recipe(cfg, progress=False).setup()
    try:
        recipe.train(steps=steps)
        result = recipe._result("steps")
        decoder, _ = _head_and_decoder(recipe.model)
        compiled_layers = sum(layer._compiled_call_impl is not None for layer in decoder.layers)
    finally:
        recipe.cleanup()
    return recipe, result, compiled_layers


def test_compile_auto_keeps_a_short_run_eager_and_says_why(tmp_path):
    """The default (auto): 100 steps of a tiny model would never recoup a first compile — eager, with the
    arithmetic in the run's info; nothing compiled."""
    recipe, result, compiled_layers = _auto_run(tmp_path, "short", steps=8)
    assert recipe.cfg.train.compile == "auto"
    assert result.info["compile"].startswith("eager: the ") and "would save" in result.info["compile"]
    assert not result.info["compiled"] and compiled_layers == 0 and "compile_seconds" not in result.info


@pytest.mark.parametrize("keep", [True, False])
def test_compile_auto_compiles_mid_run_then_keeps_or_reverts_by_measurement(tmp_path, monkeypatch, keep):
    """Where the rest of the run would recoup it (here: the expected compile cost set to 0), auto compiles after
    timing its eager steps, times the compiled ones, and keeps them only if faster (``keep``: the bar set so
    that it always is / never is). The compiling step is left out of the means and its cost is recorded for
    the next run's estimate; the loss curve is eager's within float noise either way."""
    import json

    from lowres.train import speed

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv("LOWRES_CACHE_DIR", str(tmp_path / "cache"))  # no compile time recorded by another test
    monkeypatch.setattr(speed, "AUTO_FIRST_COMPILE_S", 0.0)
    monkeypatch.setattr(speed, "AUTO_KEEP_BELOW", 1e9 if keep else 0.0)
    base, _ = _losses(tmp_path, "eager", steps=10, **{"train.compile": "false"})
    recipe, result, compiled_layers = _auto_run(tmp_path, "auto", steps=10)
    warm = recipe.cfg.train.warmup_ignore_steps
    at = warm + speed.AUTO_EAGER_STEPS + 1  # the step that compiled
    marked = [r["step"] for r in recipe.history if r.get("compiled_here")]
    assert marked == [at]
    timed = [r for r in recipe.history[warm:] if r["step"] != at]
    assert result.step_seconds == pytest.approx(sum(r["step_seconds"] for r in timed) / len(timed))
    assert result.info["compile_seconds"] >= 0
    table = json.loads((speed._compile_cache()).read_text())
    assert list(table.values()) == [pytest.approx(result.info["compile_seconds"], abs=0.01)]
    if keep:
        assert result.info["compile"].startswith(f"compiled at step {at}") and result.info["compiled"]
        assert compiled_layers > 0
    else:
        assert "back to eager" in result.info["compile"] and not result.info["compiled"] and compiled_layers == 0
    assert [r["loss"] for r in recipe.history] == pytest.approx(base, rel=3e-4)


def test_compile_auto_survives_a_compile_that_fails(tmp_path, monkeypatch):
    """A compile that fails at its first call (no working C++ toolchain, an inductor error) does not end the
    run: the layers go back to eager, the step runs again on the same micro-batches, and the loss curve is the
    eager run's exactly; the decision names the error."""
    from lowres.train import speed
    from lowres.train.loss import _head_and_decoder

    def broken_compile(model):
        decoder, _ = _head_and_decoder(model)
        for layer in decoder.layers:
            layer._compiled_call_impl = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no working g++"))
        return True

    monkeypatch.setenv("LOWRES_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(speed, "AUTO_FIRST_COMPILE_S", 0.0)
    monkeypatch.setattr(speed, "compile_decoder", broken_compile)
    base, _ = _losses(tmp_path, "eager", steps=9, **{"train.compile": "false"})
    recipe, result, compiled_layers = _auto_run(tmp_path, "auto", steps=9)
    at = recipe.cfg.train.warmup_ignore_steps + speed.AUTO_EAGER_STEPS + 1
    assert result.info["compile"].startswith(f"eager: compiling failed at step {at} (RuntimeError: no working g++)")
    assert not result.info["compiled"] and compiled_layers == 0
    assert [r["loss"] for r in recipe.history] == base


def test_built_once_builds_on_first_call_only():
    from lowres.train.lazy import built_once

    calls = []

    @built_once
    def thing():
        """doc kept"""
        calls.append(1)
        return object()

    assert calls == [] and thing.__doc__ == "doc kept"
    first = thing()
    assert thing() is first and calls == [1]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_lora_library_ops_agree_with_their_fake_kernels_and_the_eager_function(dtype):
    """What torch.compile sees of a fused LoRA layer: lowres::lora_linear and its backward, checked by torch's
    own opcheck (schema, fake kernel shapes and strides, no aliasing) and equal to the eager Function."""
    import torch

    from lowres.train import speed

    ops = speed._lora_ops()
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 16, generator=g).to(dt)
    w, bias = torch.randn(24, 16, generator=g).to(dt), torch.randn(24, generator=g).to(dt)
    a, b = torch.randn(4, 16, generator=g), torch.randn(24, 4, generator=g)  # fp32 masters, as trained
    gemms = ["torch"] + (["onednn"] if speed.onednn_available() else [])
    for gemm in gemms:
        fwd = (x, w, bias, a, b, 0.5, gemm)
        torch.library.opcheck(ops.lora_linear.default, fwd)
        y, h = ops.lora_linear(*fwd)
        gy = torch.randn(12, 24, generator=g).to(dt)
        for want in [(True, True, True), (False, True, True), (True, False, False)]:
            bwd = (gy, x, w, a, b, h, 0.5, gemm, *want)
            torch.library.opcheck(ops.lora_linear_backward.default, bwd)
            dx, da, db = ops.lora_linear_backward(*bwd)
            assert [t.numel() > 0 for t in (dx, da, db)] == list(want)
        # the eager Function's gradients are the op's
        xr, ar, br = x.clone().requires_grad_(), a.clone().requires_grad_(), b.clone().requires_grad_()
        out = speed.LoraLinearFunction.apply(xr, w, bias, ar, br, 0.5, gemm)
        out.backward(gy)
        dx, da, db = ops.lora_linear_backward(gy, x, w, a, b, h, 0.5, gemm, True, True, True)
        assert torch.equal(out, y) and torch.equal(xr.grad, dx) and torch.equal(ar.grad, da)
        assert torch.equal(br.grad, db)


@pytest.mark.parametrize("family", ["neox", "gemma3"])
def test_compile_runs_other_families_to_the_end_without_a_graph_break(tmp_path, monkeypatch, family):
    """train.compile=true on other families' structural miniatures (tests/test_advisor_families.py's: GPT-NeoX's
    fused qkv, partial rotary and parallel residual, LoRA on all its linears; Gemma 3's q/k norms and sliding
    window, in bf16) — about 50 s each, so two of the five families: the whole run — steps, the final eval and the base model's eval, which recompile under
    no_grad and with the adapter off — with no graph break, and losses equal eager's to float noise."""
    import torch
    from torch._dynamo.utils import counters

    from lowres.train.recipe import Recipe
    from test_advisor_families import TINY

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    folder = tmp_path / family
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY[family]))
    data = write_corpus(tmp_path)
    dtype = "bf16" if family == "gemma3" else "fp32"
    out = {}
    for compile_ in ("false", "true"):
        torch._dynamo.reset()
        counters.clear()
        cfg = load_config(None, tiny_overrides(tmp_path / compile_, data, steps=4, **{
            "model.name": str(folder), "model.weights": "random-init", "precision.compute": dtype,
            "data.max_length": 64, "data.tokenizer_vocab": 300, "train.batch_size": 2,
            "lora.targets": "all_linear" if family == "neox" else "attention_mlp",
            "tracking.mlflow": "false", "train.compile": compile_}))
        recipe = Recipe(cfg, progress=False).setup()
        try:
            result = recipe.train()
        finally:
            recipe.cleanup()
        out[compile_] = ([r["loss"] for r in recipe.history] + [result.eval["loss"], result.eval_base["loss"]],
                         dict(counters["graph_break"]))
    assert out["true"][1] == {}
    assert out["true"][0] == pytest.approx(out["false"][0], rel=3e-4 if dtype == "fp32" else 2e-3)


def test_inductor_cache_is_lowres_own_per_machine_unless_the_user_chose_one(tmp_path, monkeypatch):
    """torch's import sets TORCHINDUCTOR_CACHE_DIR to its /tmp default: that value counts as "not chosen", and
    compiling moves it into lowres' cache, one folder per machine fingerprint; a folder the user set stays."""
    import os

    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from lowres.hardware.detection import this_machine_fingerprint
    from lowres.train import speed

    monkeypatch.setenv("LOWRES_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", os.path.abspath(default_cache_dir()))
    assert speed.use_inductor_cache_dir() == str(tmp_path / "cache" / "inductor" / this_machine_fingerprint())
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    assert speed.use_inductor_cache_dir().endswith(this_machine_fingerprint())
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert speed.use_inductor_cache_dir() == str(tmp_path / "mine")


def test_gemm_floor_replays_each_traced_gemm_call_with_its_shapes_strides_and_scalars():
    import torch
    from torch.profiler import ProfilerActivity, profile

    from lowres.train.opprofile import gemm_floor, gemm_key, replay_seconds, summarise

    a, w = torch.randn(64, 32), torch.randn(48, 32)
    c, q, k = torch.zeros(64, 48), torch.randn(3, 16, 8), torch.randn(3, 8, 16)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
        for _ in range(2):  # two "steps"
            torch.mm(a, w.t())  # a transposed operand, as F.linear's weight
            c.addmm_(a, w.t(), beta=0.5, alpha=2.0)
            torch.bmm(q, k)
            torch.baddbmm(torch.zeros(16, 16), q, k)  # a broadcast input
    res = summarise(p.events(), wall_s=1.0, steps=2)
    calls = res.pop("_gemm_calls")
    by_op = {key[0]: (key, n) for key, (n, _) in calls.items()}
    assert set(by_op) == {"aten::mm", "aten::addmm_", "aten::bmm", "aten::baddbmm"}
    assert all(n == 2 for _, n in by_op.values())
    mm_key = by_op["aten::mm"][0]
    assert mm_key[1] == ((64, 32), (32, 48)) and mm_key[2][1] == (1, 32) and mm_key[3][:2] == ("float32", "float32")
    assert by_op["aten::addmm_"][0][4][3:] == (0.5, 2.0)  # beta and alpha as traced
    for key, _ in by_op.values():
        assert 0 < replay_seconds(key, max_s=0.05) < 1.0
    floor = gemm_floor(calls, steps=2)
    assert floor["calls_per_step"] == 4 and floor["replayed_share"] == 1.0
    want = 2 * 64 * 32 * 48 * 2 + 2 * 3 * 16 * 8 * 16 * 2  # mm + addmm_, bmm + baddbmm
    assert floor["gflop_per_step"] * 1e9 == pytest.approx(want)
    assert floor["alone_seconds"] > 0 and len(floor["by_call"]) == 4
    assert all(r["alone_seconds"] > 0 and r["calls_per_step"] == 1 for r in floor["by_call"])
    # an event without shapes (record_shapes off) or of another op is not a replayable GEMM call
    assert gemm_key(type("E", (), {"name": "aten::mm", "input_shapes": []})()) is None
    assert gemm_key(type("E", (), {"name": "aten::mul", "input_shapes": [[2], [2]]})()) is None
