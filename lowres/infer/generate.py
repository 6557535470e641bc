"""Generation with its costs measured: load time, time to first token, decode tokens/s, peak memory.

A model is a base (preset, hub id, local folder or .gguf file, found as training finds it) or a finished
`lowres train` run, whose adapter is merged into the base for generation (one matmul per projection instead
of three) unless the base is quantized. Prompts go through the tokenizer's chat template.

Timing: transformers' ``generate`` hands each new token to a streamer as soon as it is chosen; the streamer
stamps it. Time to first token (TTFT) is from the call to the first stamp (tokenizing, the prompt's prefill
and the first sampling step); decode tokens/s counts the tokens after the first over the time after it.
Memory: the process's high-water mark (VmHWM) is reset when generation starts and read when it ends
(profiler.phases), so the peak is that of generating, not of loading.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from lowres.errors import UsageError


@dataclass
class Generation:
    """One answer and what it cost."""

    text: str
    prompt_tokens: int
    new_tokens: int
    ttft_s: float | None
    tokens_per_s: float | None  # decode rate after the first token
    total_s: float
    peak_rss_bytes: int  # this process's high-water mark while generating
    predicted_peak_bytes: float  # lowres.advisor.inference for this model, format and context
    stop: str  # "eos" or "max_new_tokens"
    prediction: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class _StampingStreamer:
    """A transformers streamer that stamps every new token and passes decoded text to ``on_text``."""

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None] | None):
        from transformers import TextStreamer

        outer = self

        class _Streamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                if outer.on_text is not None and text:
                    outer.on_text(text)

        self.on_text = on_text
        self.stamps: list[float] = []
        self._prompt_seen = False
        self._inner = _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)

    def put(self, value: Any) -> None:
        if self._prompt_seen:  # the first call carries the prompt, every later one a new token
            self.stamps.append(time.perf_counter())
        self._prompt_seen = True
        self._inner.put(value)

    def end(self) -> None:
        self._inner.end()


def _decode_precision(precision: str, device: str) -> str:
    """``auto`` for generation on a CPU is fp32: decoding one token at a time is matrix-vector work, where
    torch's CPU bf16 kernels ran 3-5× slower than fp32 here (SmolLM2-135M, 2-core EPYC with AVX512_BF16),
    while bf16 pays off in training's matrix-matrix work. Elsewhere ``auto`` resolves as in training."""
    return "fp32" if precision == "auto" and device == "cpu" else precision


class Generator:
    """A loaded model ready to answer; build it with :meth:`load`."""

    def __init__(self, model: Any, tokenizer: Any, spec: Any, precision: Any, device: str, load_s: float,
                 describe: str, tags: dict[str, str], source: dict):
        self.model, self.tokenizer, self.spec, self.precision = model, tokenizer, spec, precision
        self.device, self.load_s, self.describe, self.tags, self.source = device, load_s, describe, tags, source

    @classmethod
    def load(cls, model: str | None = None, run_dir: str | Path | None = None, *, precision: str = "auto",
             quant: str = "none", device: str | None = None, console: Any = None) -> "Generator":
        """Load a base model (``model``) or a finished run's adapter on its base (``run_dir``); ``load_s``
        times it (from the converted cache for packaged GGUF weights: seconds)."""
        import torch

        if (model is None) == (run_dir is None):
            raise UsageError("give either a RUN_DIR (a trained adapter) or --model M (a base model)",
                             hint="e.g. lowres generate --model SmolLM2-135M-Instruct --prompt 'Hello'")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        t0 = time.perf_counter()
        if run_dir is not None:
            gen = cls._load_run(Path(run_dir), device, console)
        else:
            gen = cls._load_base(model, precision, quant, device, console)
        gen.load_s = time.perf_counter() - t0
        return gen

    @classmethod
    def _load_base(cls, name: str, precision: str, quant: str, device: str, console: Any) -> "Generator":
        from lowres.config import DataConfig, ModelConfig, PrecisionConfig
        from lowres.data import read_records, render_texts
        from lowres.hardware import detect
        from lowres.models import load_base_model, load_tokenizer, locate_weights, resolve_precision

        loc = locate_weights(ModelConfig(name=name))
        hw = detect(probe_bnb=quant != "none")
        precision = _decode_precision(precision, device)
        rp = resolve_precision(PrecisionConfig(compute=precision, quant=quant), hw, device)
        texts = None
        if not loc.pretrained:  # random weights speak no language: a tokenizer from the shipped sample serves
            data = DataConfig()
            texts = render_texts(read_records(data), data, None)
        tokenizer, _ = load_tokenizer(loc, texts)
        model = load_base_model(loc, rp, device)
        return cls(model, tokenizer, loc.spec, rp, device, 0.0, loc.describe(), loc.tags(),
                   {"model": name, "weights": loc.kind, "path": loc.path, "provenance": loc.provenance})

    @classmethod
    def _load_run(cls, run_dir: Path, device: str, console: Any) -> "Generator":
        from lowres.config import load_config
        from lowres.models import locate_weights
        from lowres.train.evaluation import find_run, load_trained

        run = find_run(run_dir)
        cfg = load_config(run.config_path, use_env=False)
        cfg.precision.compute = _decode_precision(cfg.precision.compute, device)
        loc = locate_weights(cfg.model)
        model, tokenizer, rp = load_trained(run, cfg, device)
        merged = rp.quant == "none"
        if merged:  # one matmul per projection instead of base + two LoRA factors
            model = model.merge_and_unload()
        model.eval()
        model.config.use_cache = True
        how = "merged into" if merged else "on"
        return cls(model, tokenizer, loc.spec, rp, device, 0.0,
                   f"adapter of {run.root} {how} {loc.describe()}", {**loc.tags(), "lowres.adapter": str(run.root)},
                   {"run_dir": str(run.root), "model": cfg.model.name, "weights": loc.kind,
                    "provenance": loc.provenance})

    def prompt_ids(self, messages: list[dict]) -> Any:
        """Token ids of ``messages`` under the chat template, ending with the assistant's turn opened."""
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)["input_ids"]
        return ids.to(self.device)

    def predict(self, prompt_tokens: int, max_new_tokens: int) -> Any:
        """The advisor's inference-memory estimate for this model, format and context."""
        from lowres.advisor.inference import estimate_inference

        return estimate_inference(self.spec, compute=self.precision.weights_dtype, quant=self.precision.quant,
                                  context=prompt_tokens + max_new_tokens, prompt_tokens=prompt_tokens,
                                  device="cuda" if self.device.startswith("cuda") else "cpu")

    def generate(self, prompt: str | list[dict], *, max_new_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, on_text: Callable[[str], None] | None = None) -> Generation:
        """Answer ``prompt`` (a user message, or a whole conversation as chat messages). Greedy when
        ``temperature`` is 0. ``on_text`` receives the answer's text as it is produced."""
        import torch

        from profiler.phases import PhaseTracker

        if max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise UsageError(f"temperature must be ≥ 0 and top-p in (0, 1], got {temperature} and {top_p}")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        tracker = PhaseTracker(lambda _msg: None)
        streamer = _StampingStreamer(self.tokenizer, on_text)
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else \
            dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        try:
            with tracker.phase("generate"):
                t0 = time.perf_counter()
                ids = self.prompt_ids(messages)
                limit = self.spec.max_position_embeddings - ids.shape[1]
                if limit < 1:
                    raise UsageError(f"the prompt is {ids.shape[1]} tokens, the model's whole context "
                                     f"({self.spec.max_position_embeddings})", hint="shorten the prompt")
                torch.manual_seed(seed)
                with torch.inference_mode():
                    out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                              max_new_tokens=min(max_new_tokens, limit), streamer=streamer,
                                              pad_token_id=self.tokenizer.pad_token_id, **sampling)
                total = time.perf_counter() - t0
        finally:
            tracker.close()
        new = out[0, ids.shape[1]:]
        stamps = streamer.stamps
        ttft = stamps[0] - t0 if stamps else None
        rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 and stamps[-1] > stamps[0] else None
        eos = self.tokenizer.eos_token_id
        stop = "eos" if len(new) and eos is not None and int(new[-1]) == eos else "max_new_tokens"
        est = self.predict(int(ids.shape[1]), int(len(new)))
        return Generation(
            text=self.tokenizer.decode(new, skip_special_tokens=True).strip(), prompt_tokens=int(ids.shape[1]),
            new_tokens=int(len(new)), ttft_s=ttft, tokens_per_s=rate, total_s=total,
            peak_rss_bytes=int(tracker.phases["generate"]["peak_rss_bytes"]),
            predicted_peak_bytes=est.peak_bytes, stop=stop, prediction=est.to_dict())
