"""load_model(): a causal LM with its precision and quantization applied, wrapped with LoRA (peft)."""

from __future__ import annotations

import contextlib
import tempfile
from typing import Any

from lowres.errors import ConfigError, ModelError, UnsupportedError
from lowres.models.precision import ResolvedPrecision, torch_dtype

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
TARGET_PRESETS: dict[str, list[str] | str] = {
    "attention": ATTENTION,
    "attention_mlp": ATTENTION + MLP,
    # peft's shorthand: every nn.Linear (and quantized Linear) except the output head
    "all_linear": "all-linear",
}


def lora_target_modules(targets: str | list[str]) -> list[str] | str:
    """A target preset name → module names for peft; an explicit list passes through."""
    if isinstance(targets, str):
        if targets not in TARGET_PRESETS:
            raise ConfigError("unknown LoRA target preset", [f"lora.targets: {targets!r} is not one of "
                                                              f"{sorted(TARGET_PRESETS)} (or a list of names)"])
        return TARGET_PRESETS[targets]
    return list(targets)


def check_max_length(spec: Any, max_length: int) -> None:
    """ConfigError (a UsageError, exit 2) when sequences would be longer than the model's positions."""
    if max_length > spec.max_position_embeddings:
        raise ConfigError(f"sequence length {max_length} is over model {spec.name!r}'s maximum",
                          [f"data.max_length: {max_length} > max_position_embeddings "
                           f"{spec.max_position_embeddings}"],
                          hint=f"use --set data.max_length={spec.max_position_embeddings} or less")


def bnb_config(rp: ResolvedPrecision):
    """transformers BitsAndBytesConfig for the resolved quantization (None for none)."""
    from transformers import BitsAndBytesConfig

    if rp.quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if rp.quant in ("nf4", "fp4"):
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=rp.quant,
                                  bnb_4bit_use_double_quant=rp.double_quant,
                                  bnb_4bit_compute_dtype=torch_dtype(rp.compute_dtype))
    return None


@contextlib.contextmanager
def quiet_hf_progress():
    """No transformers progress bars ("Loading weights", "Writing model shards") inside: noise in a run's
    console next to lowres's own progress bar or report."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def random_model(hf_config: Any, dtype: Any, seed: int):
    """A causal LM of ``hf_config`` with random weights (seeded), each parameter allocated and initialized once.

    ``AutoModelForCausalLM.from_config`` initializes every tensor twice (torch's ``reset_parameters`` in each
    module's constructor, then the family's ``_init_weights``) and, for tied embeddings, first builds and
    initializes an lm_head weight of its own that tying then drops: a transient vocab × hidden tensor at the
    build's peak (+320 MiB for a 262k × 640 bf16 head, which put the build above the training peak). Built
    here on the meta device instead, then given memory (``to_empty``) and initialized once by the family's own
    ``initialize_weights`` — the same distributions, buffers recomputed by it. Every parameter and floating
    buffer is set to NaN before that; a family whose init leaves any of them NaN (remote code, say), or one
    with an integer buffer that check cannot see, is built by ``from_config`` instead. The caller's RNG is
    not moved (data order and dropout stay reproducible)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        if all(b.is_floating_point() for b in model.buffers()):
            model.to_empty(device="cpu")
            model.tie_weights()  # to_empty gave tied weights a tensor each: tie again before either is touched
            with torch.no_grad():
                for t in (*model.parameters(), *model.buffers()):
                    t.fill_(float("nan"))
            model.initialize_weights()
            model.tie_weights()
            if not any(_has_nan(t) for t in (*model.parameters(), *model.buffers())):
                return model
        del model
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(hf_config, dtype=dtype)


def _has_nan(t: Any, chunk: int = 1 << 22) -> bool:
    """Whether ``t`` holds a NaN, checked 4M elements at a time: ``isnan`` of a whole 262k-vocabulary
    embedding would allocate its own tensor-sized temporaries, at the build's peak."""
    flat = t.detach().reshape(-1)
    return any(bool(flat[i:i + chunk].isnan().any()) for i in range(0, flat.numel(), chunk))


def _random_model(loc: Any, dtype: Any, seed: int):
    return random_model(loc.spec.to_hf_config(), dtype, seed)


def _base_model(loc: Any, rp: ResolvedPrecision, device: str, seed: int):
    from transformers import AutoModelForCausalLM

    quant = bnb_config(rp)
    dtype = torch_dtype(rp.weights_dtype)
    with quiet_hf_progress():
        if loc.kind == "random-init" and quant is None:
            return _random_model(loc, dtype, seed).to(device)
        if loc.kind == "random-init":
            # bitsandbytes quantizes while loading a checkpoint, so a random model is saved once (safetensors,
            # a temp dir) and loaded back through the same path as pretrained weights.
            with tempfile.TemporaryDirectory(prefix="lowres-init-") as tmp:
                _random_model(loc, dtype, seed).save_pretrained(tmp)
                return AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, quantization_config=quant,
                                                            device_map=device)
        try:
            if quant is None:
                return AutoModelForCausalLM.from_pretrained(
                    loc.path, dtype=dtype, trust_remote_code=loc.trust_remote_code).to(device)
            return AutoModelForCausalLM.from_pretrained(loc.path, dtype=dtype, quantization_config=quant,
                                                        device_map=device, trust_remote_code=loc.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ModelError(f"could not load a causal LM from {loc.path!r}: {exc}",
                             hint="check that the folder holds a causal language model (config.json + weights)"
                             ) from None


def load_base_model(loc: Any, rp: ResolvedPrecision, device: str = "cpu", seed: int = 0):
    """The base model at ``loc`` in precision ``rp``, without LoRA, in eval mode with its KV cache on — what
    `lowres generate` and `lowres chat` run."""
    model = _base_model(loc, rp, device, seed)
    model.eval()
    model.config.use_cache = True
    return model


def count_parameters(model: Any) -> tuple[int, int]:
    """(total, trainable) parameters; a packed 4-bit weight counts its unpacked size."""
    total = trainable = 0
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        n = qs.shape.numel() if qs is not None and hasattr(qs, "shape") else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable


def load_model(loc: Any, rp: ResolvedPrecision, lora: Any, gradient_checkpointing: bool = False,
               device: str = "cpu", seed: int = 0) -> tuple[Any, dict]:
    """Build or load the base model at ``loc`` in precision ``rp``, freeze it and wrap it with LoRA.

    Random init is seeded (``seed``). Quantized bases go through peft.prepare_model_for_kbit_training
    (which freezes them and keeps norms/embeddings in fp32 for stable training). Returns the PeftModel and
    an info dict: weights_source, params_total, params_trainable, quant, dtype, weights_dtype, autocast,
    gradient_checkpointing, lora_targets, name, hub_id, path, max_position_embeddings.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    if rp.quant != "none" and not (device == "cpu" or device.startswith("cuda")):
        raise UnsupportedError(f"{rp.quant} quantization on device {device!r} is not supported",
                               hint="use --device cpu or cuda, or precision.quant=none")
    model = _base_model(loc, rp, device, seed)
    model.config.use_cache = False  # a KV cache is useless in training and costs memory
    if rp.quant != "none":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        if gradient_checkpointing:
            # transformers 5 renamed it (the old name warns); 4.x has only the old one
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    targets = lora_target_modules(lora.targets)
    peft_cfg = PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                              target_modules=targets, use_rslora=lora.rslora, task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, peft_cfg)
    except ValueError as exc:
        raise ConfigError("LoRA targets do not match the model's modules",
                          [f"lora.targets: {lora.targets!r}: {exc}"],
                          hint="use lora.targets=all_linear or list module names of this model") from None
    total, trainable = count_parameters(model)
    info = {
        "weights_source": "random-init" if loc.kind == "random-init" else "pretrained",
        "weights_location": loc.kind,
        "params_total": total,
        "params_trainable": trainable,
        "quant": rp.quant,
        "dtype": rp.compute_dtype,
        "weights_dtype": rp.weights_dtype,
        "autocast": rp.autocast,
        "gradient_checkpointing": gradient_checkpointing,
        "lora_targets": targets,
        "name": loc.spec.name,
        "hub_id": loc.hub_id,
        "path": loc.path,
        "max_position_embeddings": loc.spec.max_position_embeddings,
    }
    return model, info
