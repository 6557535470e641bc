"""Optimizer and learning-rate schedule of the recipe."""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch

from lowres.errors import UnsupportedError


def build_optimizer(params: list, train_cfg: Any, device: str) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters.

    CPU: torch's fused AdamW (one kernel over all tensors instead of a loop of small ops). CUDA: bitsandbytes'
    paged AdamW, whose states move to host memory instead of failing when the GPU runs short; the 8-bit
    variant on request. Paged optimizers need CUDA, so asking for one elsewhere is refused here.
    """
    check_optimizer(train_cfg, device)
    kw = dict(lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    name = train_cfg.optimizer
    if device.startswith("cuda"):
        import bitsandbytes as bnb

        return (bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.PagedAdamW)(params, **kw)
    impl = getattr(train_cfg, "optimizer_impl", "fused")  # train.optimizer_impl; see lowres.train.speed
    if impl == "fused":
        return torch.optim.AdamW(params, fused=True, **kw)
    return torch.optim.AdamW(params, foreach=impl == "foreach", **kw)


def check_optimizer(train_cfg: Any, device: str) -> None:
    """Refuse, before any loading, an optimizer this device cannot run."""
    name = train_cfg.optimizer
    if name != "adamw" and not device.startswith("cuda"):
        raise UnsupportedError(f"optimizer {name} pages its state through CUDA unified memory and needs a GPU",
                               hint="use --set train.optimizer=adamw on the CPU")


def cosine_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up from lr/warmup to lr over ``warmup`` steps, then cosine decay to ``min_ratio``·lr at
    ``total`` (Loshchilov & Hutter 2017, SGDR, without restarts). ``step`` counts completed steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg: Any) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over ``cosine_factor``; its state_dict holds only numbers (the partial is not pickled)."""
    fn = partial(cosine_factor, warmup=train_cfg.warmup_steps, total=train_cfg.max_steps,
                 min_ratio=train_cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
