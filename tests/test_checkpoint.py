"""Checkpoints: atomic, pruned, and a load restores adapter, optimizer, scheduler and RNG exactly."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from lowres.errors import CheckpointError
from lowres.train.checkpoint import (
    check_compatible,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)


def _tiny_peft(seed: int):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                             init_lora_weights=False))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def _step(model, opt, sched):
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def _adapter(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def test_save_load_round_trip(tmp_path):
    model, opt, sched = _tiny_peft(0)
    _step(model, opt, sched)
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    path = save_checkpoint(tmp_path, 1, model, opt, sched, {"epoch": 0, "pos": 3},
                           {"run_id": "abc", "config_hash": "h1"})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    weights, lr = _adapter(model), sched.get_last_lr()

    other, opt2, sched2 = _tiny_peft(1)  # different weights, fresh optimizer
    assert any(not torch.equal(weights[k], v) for k, v in _adapter(other).items())
    state = load_checkpoint(path, other, opt2, sched2)
    assert state["step"] == 1 and state["run_id"] == "abc" and state["data"] == {"epoch": 0, "pos": 3}
    for k, v in _adapter(other).items():
        torch.testing.assert_close(v, weights[k], rtol=0, atol=0)
    assert sched2.get_last_lr() == lr and sched2.last_epoch == sched.last_epoch
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_atomic_keep_and_latest(tmp_path):
    model, opt, sched = _tiny_peft(0)
    (tmp_path / ".step-00000009.tmp123").mkdir(parents=True)  # what a kill mid-save leaves
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, model, opt, sched, {}, {"run_id": "r", "config_hash": "h"}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004", "step-00000006"]
    assert latest_checkpoint(tmp_path).name == "step-00000006"
    assert not list(tmp_path.glob(".*tmp*"))
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_config_mismatch_and_damage_are_checkpoint_errors(tmp_path):
    model, opt, sched = _tiny_peft(0)
    path = save_checkpoint(tmp_path, 1, model, opt, sched, {}, {"run_id": "r", "config_hash": "aaa"})
    check_compatible(read_meta(path), "aaa", path)
    with pytest.raises(CheckpointError, match="config hash aaa.*bbb"):
        check_compatible(read_meta(path), "bbb", path)
    (path / "optimizer.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(path, model, opt, sched)
    (path / "state.json").write_text("{")
    with pytest.raises(CheckpointError, match="cannot be read"):
        read_meta(path)
