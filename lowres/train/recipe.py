"""The LoRA/QLoRA fine-tuning recipe: setup → train → cleanup, to be read top to bottom.

One recipe serves `lowres train`, the advisor's probes and each federated client:

    result = run(cfg)                                   # the whole run, as `lowres train` does it
    recipe = Recipe(cfg, progress=False)                # or a few steps in-process:
    recipe.setup(); result = recipe.train(steps=5); recipe.cleanup()

Everything a user can get wrong (config, checkpoint, model id, sequence length, precision, data) is checked
in ``setup`` before the model loads. The loop only marks phase boundaries and hands figures off: MLflow
writes happen on a thread (metrics_log), sampling in the profiler's own process.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowres.config import RunConfig
from lowres.locks import check_output_dir
from lowres.tracking.uri import check_tracking_uri
from lowres.train import checkpoint as ckpt
from lowres.train.evaluation import autocast_context, evaluate
from lowres.train.loss import IGNORE_INDEX, causal_lm_loss, shift_labels
from lowres.train.mfu import mfu, raise_to_achieved, roofline, train_flops_per_token
from lowres.train.optim import build_optimizer, build_scheduler, check_optimizer
from lowres.train.progress import TrainProgress, stop_on_signals
from lowres.train.timing import PHASES, PhaseTimer

_WEIGHTS_SAID: set[str | None] = set()  # weights whose provenance this process has printed
SYSTEM_WINDOW_S = 10.0  # one MLflow system/ point (mean and peak) per window of profiler samples


@dataclass
class TrainResult:
    """What a run (or a slice of one) did. Means leave out the first ``warmup_ignore_steps`` steps."""

    run_id: str | None
    step: int
    stopped_by: str  # "max_steps", "steps" (asked for fewer), "SIGTERM", "SIGINT"
    loss: float | None
    eval: dict | None  # the adapter's loss on the held-out split
    tokens_per_s: float | None
    step_seconds: float | None
    mfu: float | None
    flops_per_token: float
    peak_flops_per_s: float | None
    peak_rss_bytes: int
    output_dir: str
    checkpoint: str | None
    history: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    profile: dict | None = None
    eval_base: dict | None = None  # the base model's loss on the same held-out split (adapter switched off)
    op_profile: dict | None = None  # time by op family of the traced steps (train.profile_steps; opprofile)


class Recipe:
    """A LoRA fine-tune of one RunConfig; see the module docstring for the two ways to drive it."""

    owns_output_dir = True  # lock the output folder for the run (federated clients share theirs: see FedRecipe)

    def __init__(self, cfg: RunConfig, *, resume: bool = False, console: Any = None, progress: bool = True,
                 device: str | None = None):
        from rich.console import Console

        self.cfg, self.resume = cfg, resume
        self.console = console or Console(stderr=True)
        self.show_progress = progress
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.out = Path(cfg.output_dir)
        self.step, self.history, self.run_id = 0, [], None
        self.prof = self.logger = self.tracker = None
        self._last_checkpoint: Path | None = None
        self._eval: dict | None = None
        self._eval_base: dict | None = None
        self._lock = None

    # ------------------------------------------------------------------ setup: checks first, then loading
    def setup(self) -> "Recipe":
        """Check every input, then load data, model, optimizer, state, tracking and profiler."""
        from lowres.data import BatchIterator, build_data, read_records
        from lowres.hardware import detect, usable_cpus
        from lowres.models import check_max_length, load_model, locate_weights, resolve_precision

        cfg = self.cfg
        _seed_everything(cfg.train.seed)  # LoRA's own init draws from the global RNG
        # Threads: the CPUs this process may actually use (cgroup quota, affinity), not os.cpu_count().
        torch.set_num_threads(cfg.train.threads or usable_cpus())
        self.config_hash = cfg.config_hash()
        check_output_dir(self.out)  # UsageError: a file, under a file, read-only — nothing created yet
        if cfg.tracking.mlflow:
            check_tracking_uri(cfg.tracking.mlflow_uri, "tracking.mlflow_uri")  # UsageError: unknown scheme
        resume_from = self._find_checkpoint()  # CheckpointError (another config, damaged) before any work
        records = read_records(cfg.data)  # DataError: missing, malformed (with line), empty
        self.loc = locate_weights(cfg.model)  # ModelError: unknown model offline
        if self.loc.pretrained and self.loc.path not in _WEIGHTS_SAID:
            _WEIGHTS_SAID.add(self.loc.path)  # once per process: federated clients and teachers set up many
            self.console.print(f"weights: {self.loc.describe()}", highlight=False)
        check_max_length(self.loc.spec, cfg.data.max_length)  # ConfigError: longer than the model's positions
        self.hw = detect(probe_bnb=cfg.precision.quant != "none")
        self.precision = resolve_precision(cfg.precision, self.hw, self.device)  # UnsupportedError
        from lowres.train.mfu import measured_auto_precision

        # auto's bf16 (native by the flags) kept only where its GEMMs measure faster than fp32's here
        self.precision = measured_auto_precision(cfg.precision, self.precision, self.hw, self.loc.spec,
                                                 cfg.train.batch_size * cfg.data.max_length, self.device)
        check_optimizer(cfg.train, self.device)  # UnsupportedError: a paged optimizer without CUDA
        self._own_output_dir(resume_from)  # every input is good: lock the folder, then clear an older run's
        self.tokenizer, tokenizer_source = self._tokenizer(records, resume_from)
        self.data = build_data(cfg.data, self.tokenizer, cfg.train.seed, records=records)

        self._say(f"setup: loading {cfg.model.name} ({self.precision.compute_dtype}, quant {self.precision.quant}) …")
        self.model, info = load_model(self.loc, self.precision, cfg.lora, cfg.precision.gradient_checkpointing,
                                      device=self.device, seed=cfg.train.seed)
        self.model.train()
        from lowres.train import speed
        from lowres.train.allocator import tune_malloc, untouched

        malloc = tune_malloc() if cfg.train.malloc_tuning and self.device == "cpu" else untouched()

        from lowres.train.roofline_cache import gemm_shapes

        # train.gemm resolved: auto → onednn or torch, as measured on this machine for these shapes
        self.gemm = speed.resolve_gemm(cfg.train.gemm, "cuda" if self.device.startswith("cuda") else "cpu",
                                       self.precision.compute_dtype,
                                       gemm_shapes(self.loc.spec, cfg.train.batch_size * cfg.data.max_length),
                                       self.hw.fingerprint, say=self._say)
        from lowres.train.attention import resolve_attention

        attention = resolve_attention(cfg.train.attention, "cuda" if self.device.startswith("cuda") else "cpu",
                                      self.precision.compute_dtype, cfg.data.max_length)
        speed_info = speed.apply(self.model, cfg.train, self.gemm, attention)
        if self.device == "cpu":
            from lowres.train.allocator import release_free_memory

            release_free_memory()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, cfg.train, self.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        self.batches = BatchIterator(self.data.train, cfg.train.batch_size, cfg.train.seed)
        self.info = {**info, "tokenizer": tokenizer_source, "data": self.data.stats, "device": self.device,
                     "threads": torch.get_num_threads(), "precision_reasons": self.precision.reasons,
                     "weights_provenance": self.loc.provenance, "malloc": malloc, **speed_info}
        self.info["compile_setting"] = str(cfg.train.compile).lower()
        self._auto_compile = self._auto_compile_for(attention)
        run_id = None
        self._run_started_at = time.time()  # the origin of the system-metric steps, kept across resumes
        if resume_from is not None:
            state = ckpt.load_checkpoint(resume_from, self.model, self.optimizer, self.scheduler)
            self.batches.load_state_dict(state["data"])
            self.step, run_id = state["step"], state.get("run_id")
            self._run_started_at = state.get("run_started_at") or self._run_started_at
            self._last_checkpoint = resume_from
            self.console.print(f"resuming from {resume_from} (step {self.step})", highlight=False)

        # MFU: model FLOPs per token (one cited formula) over this machine's roofline for these shapes.
        self.flops_per_token = train_flops_per_token(self.loc.spec, cfg.data.max_length, info["params_trainable"])
        tokens = cfg.train.batch_size * cfg.data.max_length
        self._say("setup: this machine's roofline for the model's shapes (measured once, then cached) …")
        self.roofline = roofline(self.loc.spec, self.precision.compute_dtype, tokens,
                                 fingerprint=self.hw.fingerprint, device=self.device)
        from lowres.train.opprofile import StepProfiler

        self.op_profiler = StepProfiler(cfg.train.profile_steps, cfg.train.warmup_ignore_steps, self.out, self.device)
        self._write_run_files()  # first: the MLflow run logs config.yaml from the output dir
        self._start_tracking(run_id)
        self._start_profiler()
        return self

    def _auto_compile_for(self, attention: str):
        """train.compile=auto: the measured decision (lowres.train.speed.AutoCompile), or None where it is
        decided already (its reason in ``info["compile"]``)."""
        from lowres.train import speed

        cfg = self.cfg.train
        if cfg.compile == "auto":
            why = None
            if self.device != "cpu":
                why = "on a GPU auto is not measured by lowres (train.compile=true compiles from the first step)"
            elif speed.cpp_compiler() is None:
                why = "no C++ compiler found (inductor's CPU kernels need one: g++, or $CXX)"
            elif not speed.python_headers():
                why = "this Python's C headers (Python.h) are not installed; inductor's CPU kernels need them"
            elif cfg.profile_steps:
                why = "--profile-steps traces the eager step"
            if why is None:
                key = (f"{self.cfg.model.name}|{self.precision.compute_dtype}|{cfg.batch_size}x{self.cfg.data.max_length}"
                       f"|{self.gemm}|{attention}|torch {torch.__version__}|{self.hw.fingerprint}")
                auto = speed.AutoCompile(self.model, key, cfg.warmup_ignore_steps, say=self._say)
                self.info["compile"] = auto.decision
                return auto
            self.info["compile"] = f"eager: {why}"
        else:
            self.info["compile"] = "compiled from the first step" if cfg.compile else "eager"
        return None

    def _say(self, text: str) -> None:
        """A setup line while nothing else shows progress (loading can take most of a short run)."""
        if self.show_progress:
            self.console.print(f"[dim]{text}[/]", highlight=False, soft_wrap=True)

    def _find_checkpoint(self) -> Path | None:
        """The checkpoint --resume continues from (checked whole and of this config), or None. Deletes nothing."""
        root = ckpt.checkpoints_dir(self.out)
        if not self.resume:
            return None
        found = ckpt.latest_checkpoint(root)
        if found is None:
            self.console.print(f"note: --resume found no checkpoint in {root}; starting afresh", highlight=False)
            return None
        ckpt.check_compatible(ckpt.read_meta(found), self.config_hash, found)
        ckpt.check_loadable(found)  # a truncated adapter or optimizer file: refused before the model loads
        return found

    def _own_output_dir(self, resume_from: Path | None) -> None:
        """Lock the output folder for this run (LockedError naming the holder when another process writes
        there); a fresh run then removes an older run's checkpoints, which --resume would later mix up."""
        from lowres.locks import FolderLock

        if self.owns_output_dir:
            self._lock = FolderLock(self.out, "output folder",
                                    hint="wait for that run to finish, or give this one another --output folder")
            self._lock.acquire()
        root = ckpt.checkpoints_dir(self.out)
        if resume_from is None and ckpt.latest_checkpoint(root) is not None:
            shutil.rmtree(root)
            self.console.print(f"note: starting afresh; removed earlier checkpoints in {root} "
                               "(use --resume to continue them)", highlight=False)

    def _tokenizer(self, records: list[dict], resume_from: Path | None):
        from lowres.data import render_texts
        from lowres.models import load_tokenizer

        saved = self.out / "tokenizer"
        if resume_from is not None and saved.is_dir():
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(saved)), "saved-with-run"
        texts = render_texts(records, self.cfg.data, None) if not self.loc.pretrained else None
        tokenizer, source = load_tokenizer(self.loc, texts, self.cfg.data.tokenizer_vocab)
        return tokenizer, source

    def _start_tracking(self, run_id: str | None) -> None:
        """The MLflow run (new, or the checkpoint's on resume) and the per-step metrics thread.

        Nothing here stops a run when the server is away: a new run becomes a pending local run, and every
        figure the server cannot take (params, config, metrics, artifacts, the end) is spooled for
        ``lowres sync`` by the SpoolingLogger ``self.tracker``.
        """
        if not self.cfg.tracking.mlflow:
            return
        from lowres.tracking.logger import SpoolingLogger
        from lowres.tracking.runs import TAG_CONFIG_HASH
        from lowres.train.metrics_log import StepMetricsLogger

        t = self.cfg.tracking
        # The run's config hash is the checkpoint's: what determines results, not where a run writes or logs,
        # so benchmark runs with different output dirs or run names stay comparable (lowres regress).
        tags = {**self.loc.tags(), "lowres.command": "train", TAG_CONFIG_HASH: self.config_hash}
        kw = dict(fingerprint=self.hw.fingerprint, tier=self.hw.tier, config=self.cfg.model_dump(mode="json"),
                  tags=tags)
        if run_id is None:
            from lowres.tracking.runs import descriptive_run_name

            p, quant = self.precision, self.precision.quant
            name = t.run_name or descriptive_run_name(
                self.cfg.model.name, p.compute_dtype + ("" if quant == "none" else f"-{quant}"),
                f"r{self.cfg.lora.rank}", platform.node().split(".")[0][:24])
            self.tracker = SpoolingLogger.start(t.experiment, run_name=name, tracking_uri=t.mlflow_uri, **kw)
            resumed = False
        else:
            self.tracker, resumed = self._resume_tracking(run_id, kw)
        self.run_id, self.tracking_uri = self.tracker.run_id, self.tracker.tracking_uri
        skip = self._logged_steps() if resumed else {}
        if not resumed:
            self.tracker.log_params({"config": self.cfg.model_dump(mode="json"), "model": {
                k: self.info[k] for k in ("params_total", "params_trainable", "weights_source", "dtype", "quant")},
                "mfu": {"flops_per_token": self.flops_per_token,
                        "roofline_flops_per_s": self.roofline.flops_per_s}})
            self.tracker.log_artifact(self.out / "config.yaml")
        # system/ steps count sink windows from the run's start; a resumed process starts after the window it
        # resumes in — and after what the server holds — even when the server cannot be asked (a restart at 0
        # would have sync take the new points for duplicates of the old ones)
        self._system_first_step = 1 + max((v for k, v in skip.items() if k.startswith("system/")), default=-1)
        if run_id is not None:
            since = math.floor((time.time() - self._run_started_at) / SYSTEM_WINDOW_S) + 1
            self._system_first_step = max(self._system_first_step, since)
        self.logger = StepMetricsLogger(self.tracker, skip)

    def _resume_tracking(self, run_id: str, kw: dict):
        """(SpoolingLogger, resumed on the server?) for the checkpoint's run ``run_id``.

        A run that began while the server was down has a local id; once ``lowres sync`` has created it, its
        pending record names the server's id and the run continues there. If the server cannot be reached now,
        the figures are spooled under the id the run has; sync drops any step the server already holds.
        """
        from lowres.tracking import runs, spool
        from lowres.tracking.logger import SpoolingLogger

        t = self.cfg.tracking
        if spool.is_local_run_id(run_id):
            pending = spool.read_pending_runs(spool.default_spool_dir()).get(run_id)
            run_id = (pending[1].get("server_run_id") if pending else None) or run_id
        tracker = SpoolingLogger(run_id, t.mlflow_uri)
        if tracker.pending:
            return tracker, False
        try:
            from lowres.tracking.logger import server_alive

            http = tracker.tracking_uri.startswith(("http://", "https://"))
            if http and not server_alive(tracker.tracking_uri, tracker.timeout_s):
                raise ConnectionError(f"{tracker.shown_uri}/health did not answer")
            runs.start_run(t.experiment, run_id=run_id, tracking_uri=tracker.tracking_uri, **kw)
            return tracker, True
        except Exception as exc:  # the server is away: tags wait in the spool like every other figure
            tracker.set_tags({**runs.standard_tags(fingerprint=kw["fingerprint"], tier=kw["tier"],
                                                   config=kw["config"]), **kw["tags"]})
            self.console.print(f"note: MLflow is unreachable ({type(exc).__name__}); run {run_id} continues "
                               "with its figures spooled", highlight=False)
            return tracker, False

    def _logged_steps(self) -> dict[str, int]:
        """Per key, the last step the resumed run holds on the server: those are not sent again."""
        from lowres.tracking.runs import client, max_logged_step

        skip: dict[str, int] = {}
        try:
            for key in client(self.tracking_uri).get_run(self.run_id).data.metrics:
                last = max_logged_step(self.run_id, key, self.tracking_uri)
                if last is not None:
                    skip[key] = last
        except Exception:  # unreachable now: send everything; sync skips the steps the server already has
            return {}
        return skip

    def _start_profiler(self) -> None:
        t = self.cfg.tracking
        if t.profiler_mode == "off":
            return
        from profiler import Profiler

        sinks: list[dict] = []
        if t.jsonl:
            sinks.append({"kind": "jsonl", "path": str(self.out / "profile.jsonl")})
        if t.prometheus_port is not None:
            sinks.append({"kind": "prometheus", "port": t.prometheus_port})
        run_label = self.run_id or self.out.resolve().name
        if t.pushgateway:
            # one group per run, or two runs pushing at once would overwrite each other's series
            sinks.append({"kind": "pushgateway", "url": t.pushgateway, "job": "lowres",
                          "grouping": {"run": run_label}})
        if self.run_id:
            sinks.append({"kind": "mlflow", "run_id": self.run_id, "tracking_uri": self.tracking_uri,
                          "interval_s": SYSTEM_WINDOW_S, "first_step": self._system_first_step,
                          "origin_ts": self._run_started_at})
        labels = {"fingerprint": self.hw.fingerprint, "run": run_label, "host": platform.node()}
        self.out.mkdir(parents=True, exist_ok=True)
        self.prof = Profiler(interval=t.profiler_interval, sinks=sinks, mode=t.profiler_mode, labels=labels).start()

    def _write_run_files(self) -> None:
        """config.yaml and tokenizer/ beside the checkpoints: eval, export and --resume read them back."""
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(self.cfg.to_yaml())
        self.tokenizer.save_pretrained(str(self.out / "tokenizer"))

    # ------------------------------------------------------------------ train: the loop
    def train(self, steps: int | None = None) -> TrainResult:
        """Run optimizer steps up to ``train.max_steps`` (or ``steps`` more); stop cleanly on SIGTERM/SIGINT."""
        cfg = self.cfg
        target = cfg.train.max_steps if steps is None else min(cfg.train.max_steps, self.step + steps)
        stopped_by = "max_steps" if target == cfg.train.max_steps else "steps"
        with stop_on_signals() as stop, TrainProgress(self.console, cfg.train.max_steps, self.step,
                                                      self.show_progress) as bar:
            while self.step < target and not stop:
                with self.op_profiler.step():
                    record = self._compiling_step() if (self._auto_compile is not None and
                                                        self._auto_compile.compiling_now(self.step + 1)) \
                        else self._train_step()
                self.step += 1
                self._report(record, bar)
                if self._auto_compile is not None:
                    self._auto_compile.after_step(self.history, self.step, cfg.train.max_steps)
                    self.info["compile"] = self._auto_compile.decision
                    self.info["compiled"] = self._auto_compile.state in ("trial", "on")
                if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and self.step < cfg.train.max_steps:
                    self._evaluate()
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                    self._save_checkpoint()
            if stop:
                stopped_by = stop.signame
                self._save_checkpoint()
                self.console.print(f"{stop.signame}: checkpoint at step {self.step} saved; continue with --resume",
                                   highlight=False)
        if self.step >= cfg.train.max_steps and stopped_by == "max_steps":
            self._evaluate()
            self._evaluate_base()
            self._save_checkpoint()
            self._save_final()
        return self._result(stopped_by)

    def _compiling_step(self) -> dict:
        """train.compile=auto's compiling step: should compiling fail, the layers go back to eager and the step
        runs again on the same micro-batches (nothing reached the weights: a failure comes in forward or
        backward, before the optimizer step)."""
        data_state, bad_steps = self.batches.state_dict(), getattr(self, "bad_steps", 0)
        try:
            return self._train_step()
        except Exception as e:  # noqa: BLE001 — any compile failure; a real training error raises again below
            self._auto_compile.failed(e)
            self.optimizer.zero_grad(set_to_none=True)
            self.batches.load_state_dict(data_state)
            self.bad_steps = bad_steps  # a non-finite compiled step is the compiler's, not the run's
            return self._train_step()

    def _train_step(self) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches; returns its figures."""
        cfg, timer = self.cfg.train, PhaseTimer(self.prof, self.device)
        t0 = time.perf_counter()
        with timer("data"):
            micro = [{k: v.to(self.device) for k, v in self.batches.next().items()} for _ in range(cfg.grad_accum)]
            # Every label token of the step weighs the same, as in one big batch (HF: num_items_in_batch).
            n_label = sum(int((shift_labels(b["labels"]) != IGNORE_INDEX).sum()) for b in micro)
            tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                         for b in micro)
        loss_sum = 0.0
        for batch in micro:
            with timer("forward"), autocast_context(self.precision, self.device):
                loss, _ = causal_lm_loss(self.model, batch, cfg.loss_chunk_tokens, self.gemm)
                loss = loss / max(1, n_label)
            with timer("backward"):
                loss.backward()
            loss_sum += float(loss.detach())
        with timer("optimizer"):
            lr = self.scheduler.get_last_lr()[0]
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
            finite = math.isfinite(loss_sum) and math.isfinite(grad_norm)
            if finite:  # a non-finite step never reaches the weights (see _bad_step)
                self.optimizer.step()
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        if not finite:
            self._bad_step(loss_sum, grad_norm)
        seconds = time.perf_counter() - t0
        return {"loss": loss_sum, "skipped": not finite, "learning_rate": lr, "grad_norm": grad_norm, "tokens": tokens,
                "step_seconds": seconds, "tokens_per_second": tokens / seconds,
                "peak_memory_bytes": timer.peak_bytes, **{f"{k}_seconds": v for k, v in timer.seconds.items()}}

    def _bad_step(self, loss: float, grad_norm: float) -> None:
        """A step whose loss or gradient is NaN/Inf was skipped (no optimizer or scheduler step); after
        ``train.max_bad_steps`` of them the run stops with NonFiniteError — nothing non-finite is saved."""
        from lowres.errors import NonFiniteError

        self.bad_steps = getattr(self, "bad_steps", 0) + 1
        t = self.cfg.train
        what = f"step {self.step + 1}: loss {loss:.4g}, gradient norm {grad_norm:.4g}"
        if self.bad_steps > t.max_bad_steps:
            raise NonFiniteError(
                f"training diverged at {what} ({self.bad_steps} non-finite step(s), train.max_bad_steps="
                f"{t.max_bad_steps}); stopped, and no adapter or checkpoint of it was saved",
                hint=f"lower the learning rate (train.lr={t.lr:g}), keep clipping on (train.max_grad_norm="
                     f"{t.max_grad_norm}), or compute in fp32 (--precision fp32)"
                     + ("; the layers are compiled (train.compile=true): if eager steps were finite, try "
                        "train.compile=false — a miscompile gives NaN too" if self.info.get("compiled") else ""))
        self.console.print(f"warning: skipped {what} ({self.bad_steps} of train.max_bad_steps={t.max_bad_steps})",
                           highlight=False)

    def _check_finite_adapter(self) -> None:
        """NonFiniteError before a NaN/Inf adapter could be written to a checkpoint, the run folder or MLflow."""
        from lowres.errors import NonFiniteError

        bad = [n for n, p in self.model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
        if bad:
            raise NonFiniteError(f"the adapter holds non-finite weights ({len(bad)} tensors, e.g. {bad[0]}) at "
                                 f"step {self.step}; nothing was saved",
                                 hint=f"lower the learning rate (train.lr={self.cfg.train.lr:g}) or keep clipping on")

    def _report(self, record: dict, bar: TrainProgress) -> None:
        """Figures of the step just done → history, MLflow (queued), profiler sinks, progress bar."""
        record["mfu_ratio"] = mfu(record["tokens_per_second"], self.flops_per_token, self.roofline.flops_per_s)
        record["step"] = self.step
        self.history.append(record)
        if self.logger:
            keys = ("loss", "learning_rate", "grad_norm", "tokens_per_second", "step_seconds", "mfu_ratio",
                    *(f"{p}_seconds" for p in PHASES))
            # memory in megabytes (10^6), MLflow's unit for its own system metrics: its charts show raw bytes
            # as unreadable 1.2e9s
            # a skipped (non-finite) step logs no loss or gradient norm: NaN would spoil every chart of the run
            self.logger.log({f"train/{k}": record[k] for k in keys if k in record and math.isfinite(record[k])}
                            | {"train/peak_memory_megabytes": record["peak_memory_bytes"] / 1e6}, self.step)
        if self.prof:
            for name, key in (("lowres_train_loss", "loss"), ("lowres_train_tokens_per_second", "tokens_per_second"),
                              ("lowres_train_step_seconds", "step_seconds"), ("lowres_train_mfu_ratio", "mfu_ratio"),
                              ("lowres_train_learning_rate", "learning_rate")):
                if math.isfinite(record[key]):
                    self.prof.record(name, record[key])
            self.prof.record("lowres_train_steps_total", self.step)
        bar.update(self.step, record["loss"], record["tokens_per_second"], record["peak_memory_bytes"])

    def log_summary(self, result: TrainResult) -> None:
        """The run's figures as `lowres train` prints them (means without warm-up), one value each under
        ``summary/``: MLflow's runs table and `lowres compare` show these rather than the last step's."""
        if self.logger and result.tokens_per_s is not None:
            figures = {"summary/tokens_per_second": result.tokens_per_s, "summary/step_seconds": result.step_seconds,
                       "summary/mfu_ratio": result.mfu, "summary/peak_memory_megabytes": result.peak_rss_bytes / 1e6}
            self.logger.log({k: v for k, v in figures.items() if v is not None}, self.step)

    def _evaluate(self) -> None:
        with (self.prof.phase("eval") if self.prof else contextlib.nullcontext()):
            result = evaluate(self.model, self.data.eval, self.cfg.train.batch_size, self.cfg.train.loss_chunk_tokens,
                              self.cfg.train.eval_batches, self.precision, self.device)
        if result is None:
            return
        self._eval = dict(result, step=self.step)
        if self.logger:
            self.logger.log({"eval/loss": result["loss"], "eval/perplexity": result["perplexity"]}, self.step)

    def _evaluate_base(self) -> None:
        """The base model's loss on the same held-out batches, the adapter switched off (peft's
        disable_adapter): what the fine-tune bought, side by side with the adapter's ``eval/loss``."""
        if self._eval is None:
            return
        with (self.prof.phase("eval") if self.prof else contextlib.nullcontext()), self.model.disable_adapter():
            result = evaluate(self.model, self.data.eval, self.cfg.train.batch_size, self.cfg.train.loss_chunk_tokens,
                              self.cfg.train.eval_batches, self.precision, self.device)
        if result is None:
            return
        self._eval_base = dict(result, step=0)
        if self.logger:
            self.logger.log({"eval/base_loss": result["loss"], "eval/base_perplexity": result["perplexity"]},
                            self.step)

    def _save_checkpoint(self) -> None:
        self._check_finite_adapter()
        if self.logger:
            # Every step up to the checkpoint must be in the store before the checkpoint exists: a resume
            # starts after it and never logs those steps again.
            self.logger.flush()
        meta = {"run_id": self.run_id, "config_hash": self.config_hash, "run_started_at": self._run_started_at}
        self._last_checkpoint = ckpt.save_checkpoint(
            ckpt.checkpoints_dir(self.out), self.step, self.model, self.optimizer, self.scheduler,
            self.batches.state_dict(), meta, keep=self.cfg.checkpoint.keep)

    def _save_final(self) -> None:
        """The adapter beside config.yaml and tokenizer/; all three logged to the MLflow run."""
        adapter = self.out / "adapter"
        self._check_finite_adapter()
        self.model.save_pretrained(str(adapter), safe_serialization=True)
        if self.tracker is not None:  # folders become artifacts adapter/… and tokenizer/…
            self.tracker.log_artifact(adapter)
            self.tracker.log_artifact(self.out / "tokenizer")

    # ------------------------------------------------------------------ cleanup
    def _result(self, stopped_by: str) -> TrainResult:
        # the warm-up, and a step that compiled mid-run (train.compile=auto), are left out of the means
        timed = [r for r in self.history[self.cfg.train.warmup_ignore_steps:] if not r.get("compiled_here")]
        timed = timed or self.history
        mean = (lambda k: statistics.fmean(r[k] for r in timed)) if timed else (lambda k: None)
        tps = (sum(r["tokens"] for r in timed) / sum(r["step_seconds"] for r in timed)) if timed else None
        if tps is not None and tps * self.flops_per_token > self.roofline.flops_per_s:
            self.roofline = raise_to_achieved(self.roofline, tps * self.flops_per_token,
                                              fingerprint=self.hw.fingerprint, device=self.device)
        return TrainResult(
            run_id=self.run_id, step=self.step, stopped_by=stopped_by,
            loss=self.history[-1]["loss"] if self.history else None, eval=self._eval, eval_base=self._eval_base,
            tokens_per_s=tps, step_seconds=mean("step_seconds"),
            mfu=None if tps is None else mfu(tps, self.flops_per_token, self.roofline.flops_per_s),
            flops_per_token=self.flops_per_token, peak_flops_per_s=self.roofline.flops_per_s,
            peak_rss_bytes=max((r["peak_memory_bytes"] for r in self.history), default=0),
            output_dir=str(self.out), checkpoint=str(self._last_checkpoint) if self._last_checkpoint else None,
            history=self.history, info=dict(self.info, roofline_source=self.roofline.source,
                                            **self._compile_info()),
            op_profile=self._op_profile())

    def _compile_info(self) -> dict:
        """train.compile: what the compilation cost — auto: the step that compiled minus the eager steps' median;
        true: the first step minus the median later one."""
        auto = getattr(self, "_auto_compile", None)
        if auto is not None:
            return {} if auto.compile_seconds is None else {"compile_seconds": auto.compile_seconds}
        if not self.info.get("compiled"):
            return {}
        from lowres.train.speed import compile_seconds

        return {"compile_seconds": compile_seconds([r["step_seconds"] for r in self.history])}

    def _op_profile(self) -> dict | None:
        """The traced steps' time by op family (a trace cut short by the run's end is summarised as it is)."""
        sp = getattr(self, "op_profiler", None)
        if sp is None or sp.finish() is None:
            return None
        rows = self.history[sp.skip: sp.skip + sp.result["steps"]] or self.history
        tokens = sorted(r["tokens"] for r in rows)[len(rows) // 2] if rows else 0
        sp.add_floor(self.flops_per_token * tokens, self.roofline.flops_per_s or 0.0)  # replayed once, after the run
        if self.tracker is not None and not getattr(sp, "logged", False):
            sp.logged = True
            self.tracker.log_artifact(self.out / "op_profile.json")
        return sp.result

    def cleanup(self, status: str = "FINISHED") -> dict | None:
        """Stop the profiler, flush metrics, close the MLflow run with ``status``; the profile summary. The
        output folder's lock is released last, whatever happens here."""
        try:
            return self._cleanup(status)
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def _cleanup(self, status: str) -> dict | None:
        summary = None
        if self.prof is not None:
            summary = self.prof.stop().to_dict()
            self.prof = None
            # what the profiler measured, kept with the run: printed by `lowres train`, in its --json, and an
            # MLflow artifact (profile_summary.json) beside config.yaml
            path = self.out / "profile_summary.json"
            path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
            if self.tracker is not None:
                self.tracker.log_artifact(path)
        if self.logger is not None:
            self.logger.close()
        if self.tracker is not None:
            self.tracker.end(status)
            self._report_spooled()
        self.logger = self.tracker = None
        return summary

    def _report_spooled(self) -> None:
        """Say, once at the end, what waits in the spool and how to upload it."""
        t, points = self.tracker, self.logger.spooled_points if self.logger else 0
        if not t.spooled:
            return
        why = "the run was started while it was unreachable" if t.pending else f"last error: {t.last_error}"
        self.console.print(f"warning: MLflow at {t.shown_uri} did not take everything ({why}); {points} metric "
                           f"points and {t.spooled - points} other records of run {t.run_id} are spooled in "
                           f"{t.spool_dir} — run `lowres sync` when the server is back", highlight=False)


def run(cfg: RunConfig, *, resume: bool = False, console: Any = None, progress: bool = True,
        steps: int | None = None) -> TrainResult:
    """setup → train → cleanup for one RunConfig; ``steps`` runs only that many (probes, federated rounds)."""
    recipe = Recipe(cfg, resume=resume, console=console, progress=progress)
    status = "FAILED"
    try:
        recipe.setup()
        result = recipe.train(steps)
        recipe.log_summary(result)
        status = "FINISHED" if result.stopped_by in ("max_steps", "steps") else "KILLED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        profile = recipe.cleanup(status)
    result.profile = profile
    return result


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
