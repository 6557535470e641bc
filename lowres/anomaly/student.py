"""The student: a small Llama with a classification head, LoRA-trained on the teachers' pseudo-labels.

    student = build_student(tokenizer, size="small", seed=0)       # random-init base + LoRA + trainable head
    train_student(student, texts, labels, steps=150)
    save_student(student, "runs/anomaly/student")                   # safetensors + tokenizer + config
    student = load_student("runs/anomaly/student")
    p = predict_proba(student, texts)                               # P(anomaly) per session

Smaller than the teacher on purpose: it is what every client downloads and runs on each new session. The
base is random-init (as the `tiny` teacher is; no pretrained weights are reachable offline) and frozen; LoRA
adapts its attention and MLP and the score head is trained in full (peft's SEQ_CLS task keeps it in
``modules_to_save``). What travels to clients is the adapter and head: a client rebuilds the frozen base from
its config and seed, as federated clients rebuild the teacher's base.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# hidden, layers, heads, kv heads, intermediate — the teacher (`tiny`) is 256/4/4/2/688
SIZES = {"small": (64, 2, 2, 1, 172), "tiny": (128, 2, 2, 1, 344)}


@dataclass
class Student:
    model: Any  # peft PeftModel around LlamaForSequenceClassification
    tokenizer: Any
    max_length: int
    meta: dict


def build_student(tokenizer: Any, size: str = "small", max_length: int = 256, seed: int = 0, rank: int = 8) -> Student:
    """A random-init Llama classifier of ``SIZES[size]`` over ``tokenizer``'s vocabulary, wrapped with LoRA."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForSequenceClassification

    hidden, layers, heads, kv, inter = SIZES[size]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=inter,
                         max_position_embeddings=max(512, max_length), num_labels=2, pad_token_id=pad,
                         tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(seed)
    base = LlamaForSequenceClassification(config)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, task_type="SEQ_CLS",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(base, lora)
    meta = {"size": size, "seed": seed, "rank": rank, "max_length": max_length}
    return Student(model, tokenizer, max_length, meta)


def _batch(tokenizer: Any, texts: list[str], max_length: int):
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    enc = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_length] or [pad] for t in texts]
    width = max(len(e) for e in enc)
    # right padding: LlamaForSequenceClassification pools the last non-pad token, found from pad_token_id
    ids = torch.full((len(enc), width), pad, dtype=torch.long)
    mask = torch.zeros((len(enc), width), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, :len(e)] = torch.tensor(e)
        mask[i, :len(e)] = 1
    return ids, mask


def train_student(student: Student, texts: list[str], labels: list[int], steps: int = 150, batch_size: int = 16,
                  lr: float = 3e-3, seed: int = 0) -> dict:
    """AdamW on cross-entropy over (text, pseudo-label) pairs, class-balanced batches; returns figures."""
    import torch

    y = np.asarray(labels, dtype=np.int64)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(f"the student needs both classes: {len(neg)} normal and {len(pos)} anomalous pseudo-labels")
    rng = np.random.default_rng(seed)
    model = student.model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    t0, losses = time.perf_counter(), []
    half = max(1, batch_size // 2)
    for _ in range(steps):
        # balanced batches: the pseudo-label sets may differ in size, the decision should not lean on that
        idx = np.concatenate([rng.choice(pos, half), rng.choice(neg, half)])
        ids, mask = _batch(student.tokenizer, [texts[i] for i in idx], student.max_length)
        out = model(input_ids=ids, attention_mask=mask, labels=torch.from_numpy(y[idx]))
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(out.loss.item())
    model.eval()
    return {"steps": steps, "seconds": time.perf_counter() - t0, "final_loss": float(np.mean(losses[-10:]))}


def predict_proba(student: Student, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """P(anomaly) of each text."""
    import torch

    model = student.model
    model.eval()
    out = []
    with torch.inference_mode():
        for s in range(0, len(texts), batch_size):
            ids, mask = _batch(student.tokenizer, texts[s:s + batch_size], student.max_length)
            out.append(torch.softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)[:, 1].numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def student_tensors(student: Student) -> dict[str, np.ndarray]:
    """What a client downloads: the LoRA weights and the score head, float32."""
    from peft import get_peft_model_state_dict

    from lowres.federated.wire import state_to_numpy

    return state_to_numpy(get_peft_model_state_dict(student.model))


def save_student(student: Student, folder: str | Path) -> Path:
    """The adapter + head (safetensors), the base model's config and weights, the tokenizer, meta.json."""
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    student.model.save_pretrained(str(d / "adapter"))
    # the base too (a few hundred kB): `detect` then needs nothing but this folder, whatever the seed rules
    from lowres.models.loading import quiet_hf_progress

    with quiet_hf_progress():
        # the frozen base as a plain model: peft wraps its linears in place (q_proj.base_layer.weight, …), and a
        # plain from_pretrained would not find q_proj.weight there and silently re-initialise them. A copy
        # is unloaded (LoRA layers removed, not merged; the score head back to its original) — a few hundred kB.
        copy.deepcopy(student.model).unload().save_pretrained(str(d / "base"))
    student.tokenizer.save_pretrained(str(d / "tokenizer"))
    (d / "meta.json").write_text(json.dumps(student.meta, indent=2))
    return d


def load_student(folder: str | Path) -> Student:
    """A student saved by ``save_student``."""
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    d = Path(folder)
    if not (d / "meta.json").is_file():
        raise FileNotFoundError(f"{d} holds no student (meta.json missing): train one with `lowres anomaly run`")
    meta = json.loads((d / "meta.json").read_text())
    from lowres.models.loading import quiet_hf_progress

    with quiet_hf_progress():
        base = LlamaForSequenceClassification.from_pretrained(str(d / "base"))
    model = PeftModel.from_pretrained(base, str(d / "adapter"))
    model.eval()
    return Student(model, AutoTokenizer.from_pretrained(str(d / "tokenizer")), int(meta["max_length"]), meta)
