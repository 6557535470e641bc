"""Models: presets (ModelSpec), precision decisions, locating weights, tokenizers, loading with LoRA.

    spec = load_spec("tiny")
    rp = resolve_precision(cfg.precision)            # refuses what this machine cannot run, before loading
    loc = locate_weights(cfg.model)                  # local > HF cache > package > hub > random-init (warned)
    tok, source = load_tokenizer(loc, texts)         # pretrained, or BPE trained on the run's texts
    model, info = load_model(loc, rp, cfg.lora)      # a peft.PeftModel; info["weights_source"]
"""

from lowres.config import DEFAULT_MODEL
from lowres.models.loading import (
    TARGET_PRESETS,
    bnb_config,
    check_max_length,
    count_parameters,
    load_base_model,
    load_model,
    lora_target_modules,
)
from lowres.models.precision import ResolvedPrecision, resolve_precision, torch_dtype
from lowres.models.spec import ModelSpec, list_presets, load_spec, presets_dir
from lowres.models.tokenizer import CHAT_TEMPLATE, load_tokenizer, render_chat, train_tokenizer
from lowres.models.weights import WeightsLocation, hub_offline, locate_weights, warn_random_init

__all__ = [
    "CHAT_TEMPLATE",
    "DEFAULT_MODEL",
    "ModelSpec",
    "ResolvedPrecision",
    "TARGET_PRESETS",
    "WeightsLocation",
    "bnb_config",
    "check_max_length",
    "count_parameters",
    "hub_offline",
    "list_presets",
    "load_base_model",
    "load_model",
    "load_spec",
    "load_tokenizer",
    "locate_weights",
    "lora_target_modules",
    "presets_dir",
    "render_chat",
    "resolve_precision",
    "torch_dtype",
    "train_tokenizer",
    "warn_random_init",
]
