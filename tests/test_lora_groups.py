"""Sibling LoRA layers as one GEMM (train.lora_groups, lowres.train.lora_groups): the same outputs and gradients
as peft and as the single fused layers, the same weight memory, and the single layer wherever the group cannot
apply. Tiny random models; no timing is asserted."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_model(family: str, dtype, rank: int = 4):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(family, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=101)
    model = get_peft_model(AutoModelForCausalLM.from_config(cfg).to(dtype),
                           LoraConfig(r=rank, target_modules=TARGETS, lora_dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: the adapter's path would carry no signal
            torch.nn.init.normal_(p, std=0.1)
    return model


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / (b.float().norm() + 1e-12)).item()


def _graph_names(t) -> set[str]:
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(n for n, _ in fn.next_functions)
    return names


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q/k/v with biases
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("gemm", ["torch", "onednn"])
def test_groups_match_peft_and_the_single_fused_layers(family, dtype, gemm):
    from lowres.train.speed import fuse_lora, onednn_available

    if gemm == "onednn" and not onednn_available():
        pytest.skip("this torch build has no oneDNN")
    dtype = getattr(torch, dtype)
    ref = _peft_model(family, dtype)
    single, grouped = copy.deepcopy(ref), copy.deepcopy(ref)
    fuse_lora(single, gemm, groups=False)
    fuse_lora(grouped, gemm, groups=True)
    groups = {id(m._lowres_group) for m in grouped.modules() if getattr(m, "_lowres_group", None) is not None}
    assert len(groups) == 4  # per decoder layer: q/k/v and gate/up
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(3))
    loss_ref, g_ref = _loss_and_grads(ref, ids)
    loss_single, g_single = _loss_and_grads(single, ids)
    loss_grouped, g_grouped = _loss_and_grads(grouped, ids)
    assert "_LoraGroupFnBackward" in _graph_names(grouped(input_ids=ids, labels=ids).loss)
    # fp32: summation order only; bf16: the adapters' GEMMs in bf16 (as the single fused layer), against peft's fp32
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert loss_grouped == pytest.approx(loss_ref, rel=tol)
    for name in g_ref:
        assert _rel(g_grouped[name], g_ref[name]) < tol, name
        if dtype == torch.float32:
            assert _rel(g_grouped[name], g_single[name]) < 1e-5, name


def test_groups_under_gradient_checkpointing_match_the_single_layers():
    from lowres.train.speed import fuse_lora

    ref = _peft_model("llama", torch.float32)
    grouped = copy.deepcopy(ref)
    fuse_lora(grouped)
    for m in (ref, grouped):
        m.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
    ids = torch.randint(0, 101, (2, 10), generator=torch.Generator().manual_seed(5))
    loss_ref, g_ref = _loss_and_grads(ref, ids)
    loss, g = _loss_and_grads(grouped, ids)
    assert loss == pytest.approx(loss_ref, rel=1e-5)
    for name in g_ref:
        assert _rel(g[name], g_ref[name]) < 1e-5, name
    assert all(getattr(m, "_lowres_group", None) is None or m._lowres_group.kept is None for m in grouped.modules())


def test_grouped_weights_share_one_buffer_without_a_second_copy():
    from lowres.train.speed import fuse_lora

    model = _peft_model("llama", torch.float32)
    attn = model.base_model.model.model.layers[0].self_attn
    before = {k: getattr(attn, k).base_layer.weight.detach().clone() for k in ("q_proj", "k_proj", "v_proj")}
    fuse_lora(model)
    group = attn.q_proj._lowres_group
    ptr = group.c.untyped_storage().data_ptr()
    for k, w in before.items():
        now = getattr(attn, k).base_layer.weight
        assert now.is_contiguous() and torch.equal(now, w)
        assert now.untyped_storage().data_ptr() == ptr  # a block of C, not a copy beside it
    weights = sum(w.numel() for w in before.values())
    assert group.c.numel() == weights + 3 * 4 * 64  # the frozen rows and one r-row block per adapter


def test_kept_outputs_are_never_stale_and_other_inputs_compute_afresh():
    from lowres.train.speed import fuse_lora

    ref = _peft_model("llama", torch.float32)
    model = copy.deepcopy(ref)
    fuse_lora(model)
    attn, attn_ref = (m.base_model.model.model.layers[0].self_attn for m in (model, ref))
    x, other = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    with torch.no_grad():
        q = attn.q_proj(x)  # the group runs: k and v are kept for x
        assert torch.allclose(q, attn_ref.q_proj(x), atol=1e-5)
        # another input: computed for it, not the kept output for x
        assert torch.allclose(attn.k_proj(other), attn_ref.k_proj(other), atol=1e-5)
        # an optimizer-like in-place change of v's adapter after the group ran: v is computed afresh
        for m in (attn.v_proj, attn_ref.v_proj):
            m.lora_A["default"].weight.add_(0.5)
        assert torch.allclose(attn.v_proj(x), attn_ref.v_proj(x), atol=1e-5)
        # a disabled adapter and a merged one fall back to the single layer (peft's forward), with peft's results
        with model.disable_adapter(), ref.disable_adapter():
            assert torch.allclose(attn.q_proj(x), attn_ref.q_proj(x), atol=1e-5)
        attn.q_proj.merge()
        attn_ref.q_proj.merge()
        assert torch.allclose(attn.q_proj(x), attn_ref.q_proj(x), atol=1e-5)
        assert torch.allclose(attn.k_proj(x), attn_ref.k_proj(x), atol=1e-5)


def test_a_model_moved_to_another_dtype_falls_back_and_ungroup_restores_own_tensors():
    from lowres.train.lora_groups import ungroup
    from lowres.train.speed import fuse_lora

    ref = _peft_model("llama", torch.float32)
    model = copy.deepcopy(ref)
    fuse_lora(model)
    ids = torch.randint(0, 101, (1, 9))
    model.to(torch.float64)
    ref.to(torch.float64)
    group = model.base_model.model.model.layers[0].mlp.up_proj._lowres_group
    assert not group.intact()  # new tensors: the buffer no longer backs the weights
    out = model(input_ids=ids).logits
    assert "_LoraGroupFnBackward" not in _graph_names(out)
    assert torch.allclose(out, ref(input_ids=ids).logits, atol=1e-8)

    model = _peft_model("llama", torch.float32)
    expect = model(input_ids=ids).logits.detach()
    fuse_lora(model)
    assert ungroup(model) == 10
    w = [m.base_layer.weight for m in model.modules() if hasattr(m, "base_layer")]
    assert len({t.untyped_storage().data_ptr() for t in w}) == len(w)
    assert torch.allclose(model(input_ids=ids).logits, expect, atol=1e-5)


def test_a_grouped_model_merges_and_saves(tmp_path):
    from transformers import AutoModelForCausalLM

    from lowres.train.speed import fuse_lora

    model = _peft_model("qwen2", torch.float32)
    ids = torch.randint(0, 101, (1, 7))
    fuse_lora(model)
    expect = model(input_ids=ids).logits.detach()
    copy.deepcopy(model).merge_and_unload().save_pretrained(str(tmp_path), safe_serialization=True)
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert torch.allclose(again(input_ids=ids).logits, expect, atol=1e-4)


def test_groups_need_two_plain_siblings_with_one_adapter():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowres.train.speed import fuse_lora

    cfg = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=101)
    # only q and o adapted: q has no adapted sibling; gate/up not adapted at all
    model = get_peft_model(AutoModelForCausalLM.from_config(cfg),
                           LoraConfig(r=4, target_modules=["q_proj", "o_proj"], lora_dropout=0.0))
    fuse_lora(model)
    assert not any(getattr(m, "_lowres_group", None) for m in model.modules())
    model = get_peft_model(AutoModelForCausalLM.from_config(cfg),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    fuse_lora(model)
    assert sum(getattr(m, "_lowres_group", None) is not None for m in model.modules()) == 2  # q and v


def _file_rss_kib(path) -> int:
    total, here = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if parts and "-" in parts[0] and not parts[0].endswith(":"):
                here = len(parts) > 5 and parts[5] == str(path)
            elif here and parts[0] == "Rss:":
                total += int(parts[1])
    return total


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="madvise and smaps are Linux's")
def test_release_pages_drops_a_mapped_tensor_from_rss_and_keeps_its_data(tmp_path):
    """A weight read from a mapped checkpoint and copied into a group's buffer leaves this process' RSS; heap
    memory and pages another tensor lies on are never dropped."""
    import numpy as np

    from lowres.train.lora_groups import Droppable, _byte_range, release_pages

    path = tmp_path / "w.bin"
    data = np.arange(4 << 20, dtype=np.float32)  # 16 MiB
    data.tofile(path)
    t = torch.from_numpy(np.memmap(path, dtype=np.float32, mode="r").view(np.float32))
    assert float(t.double().sum()) == float(data.astype(np.float64).sum())  # every page touched
    assert _file_rss_kib(path) > 12 << 10
    # another tensor of the model on the same pages (a view of its first half): nothing dropped
    assert not release_pages(t, Droppable([_byte_range(t), _byte_range(t[: 2 << 20])]))
    assert _file_rss_kib(path) > 12 << 10
    assert release_pages(t, Droppable([_byte_range(t)]))
    assert _file_rss_kib(path) < 1 << 10
    assert torch.equal(t[:5], torch.arange(5, dtype=torch.float32))  # read again from the file
    heap = torch.arange(4 << 20, dtype=torch.float32)
    assert not release_pages(heap, Droppable([_byte_range(heap)]))
    assert float(heap.double().sum()) == float(data.astype(np.float64).sum())


def test_weights_tied_across_layers_are_not_grouped():
    """A base weight that another module also holds (tied) stays where it is: a group would untie it."""
    from lowres.train.speed import fuse_lora

    model = _peft_model("llama", torch.float32)
    layers = model.base_model.model.model.layers
    layers[1].self_attn.k_proj.base_layer.weight = layers[0].self_attn.k_proj.base_layer.weight
    fuse_lora(model)
    assert getattr(layers[0].self_attn.q_proj, "_lowres_group", None) is None
    assert getattr(layers[1].self_attn.q_proj, "_lowres_group", None) is None
    assert layers[0].mlp.up_proj._lowres_group is not None  # the untied siblings still are
    assert layers[1].self_attn.k_proj.base_layer.weight is layers[0].self_attn.k_proj.base_layer.weight
