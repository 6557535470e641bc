"""ModelSpec: a model's architecture numbers, enough to estimate memory and FLOPs without loading anything.

Presets live in ``configs/models/<name>.yaml`` (found through ``lowres.paths.configs_dir()``); any Hugging Face
``config.json`` of a Llama-style decoder converts too (``ModelSpec.from_hf_config``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lowres.errors import ModelError
from lowres.paths import configs_dir


class ModelSpec(BaseModel):
    """Architecture of a decoder-only causal LM (Llama, Qwen2, SmolLM2, TinyLlama)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    hub_id: str | None = Field(None, description="Hugging Face repository the pretrained weights come from")
    family: str = Field("llama", description="transformers model_type: llama, qwen2, ...")
    hidden_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    max_position_embeddings: int = Field(gt=0)
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = Field(None, description="extra rope parameters, e.g. Llama 3's")
    attention_bias: bool = Field(False, description="q/k/v projections carry a bias (Qwen2)")
    rms_norm_eps: float = 1e-5
    head_dim_override: int | None = Field(None, alias="head_dim", description="when not hidden/heads")
    published_params: float | None = Field(None, description="parameter count its authors state (for tests)")
    source: str | None = Field(None, description="where the numbers come from")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.head_dim_override or self.hidden_size // self.num_heads

    def param_count(self) -> int:
        """Parameters of the whole model: embeddings (+ an untied lm_head), per layer q/k/v/o and the SwiGLU
        gate/up/down, two RMSNorms per layer and a final one, and q/k/v biases where the family has them."""
        h, d, i = self.hidden_size, self.head_dim, self.intermediate_size
        q, kv = self.num_heads * d, self.num_kv_heads * d
        per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
        if self.attention_bias:
            per_layer += q + 2 * kv
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return emb + self.num_layers * per_layer + h

    def to_hf_config(self, **overrides: Any):
        """The transformers config that builds this architecture (``AutoModelForCausalLM.from_config``)."""
        from transformers import AutoConfig

        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope = {**self.rope_scaling, "rope_theta": self.rope_theta}
        kwargs: dict[str, Any] = dict(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings, rms_norm_eps=self.rms_norm_eps,
            rope_parameters=rope, head_dim=self.head_dim,
        )
        if self.family == "llama":
            kwargs["attention_bias"] = self.attention_bias
        kwargs.update(overrides)
        return AutoConfig.for_model(self.family, **kwargs)

    @classmethod
    def from_hf_config(cls, config: Any, name: str, hub_id: str | None = None) -> "ModelSpec":
        """A spec from a transformers config (or its dict), for hub ids and local paths that are no preset."""
        c = config if isinstance(config, dict) else config.to_dict()
        rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", None) or c.get("rope_theta") or 10000.0
        if rope.get("rope_type", rope.get("type")) in (None, "default"):
            rope = {}
        try:
            return cls(
                name=name, hub_id=hub_id, family=c.get("model_type", "llama"), hidden_size=c["hidden_size"],
                num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
                num_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
                intermediate_size=c["intermediate_size"], vocab_size=c["vocab_size"],
                max_position_embeddings=c.get("max_position_embeddings", 2048),
                tie_word_embeddings=bool(c.get("tie_word_embeddings", False)), rope_theta=float(theta),
                rope_scaling=rope or None,
                attention_bias=bool(c.get("attention_bias", c.get("model_type") == "qwen2")),
                rms_norm_eps=c.get("rms_norm_eps", 1e-5), head_dim=c.get("head_dim"),
                source="config.json",
            )
        except (KeyError, ValidationError) as exc:
            raise ModelError(f"model {name!r}: its config.json is not that of a Llama-style decoder ({exc})",
                             hint="lowres supports llama, qwen2 and similar architectures") from None


def presets_dir() -> Path:
    """Folder of the model presets."""
    return configs_dir() / "models"


def list_presets() -> list[str]:
    """Names of the model presets (configs/models/<name>.yaml), sorted."""
    folder = presets_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def load_spec(name: str) -> ModelSpec:
    """The preset called ``name``; ModelError listing the presets when there is none of that name."""
    path = presets_dir() / f"{name}.yaml"
    if not path.is_file():
        raise ModelError(f"no model preset named {name!r} in {presets_dir()}",
                         hint=f"use one of {', '.join(list_presets()) or '(none found)'}")
    data = yaml.safe_load(path.read_text()) or {}
    data.setdefault("name", name)
    try:
        return ModelSpec.model_validate(data)
    except ValidationError as exc:
        raise ModelError(f"model preset {str(path)!r} is not valid: {exc}") from None
