"""The benchmark suites: a fixed list of workloads per suite, so every machine of a lab measures the same.

A workload is one model preset × precision × LoRA rank at a fixed batch and sequence length. ``quick`` runs
in a couple of minutes on two CPU cores; ``full`` adds a 135M-class preset in fp32, bf16 and 4-bit NF4.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from lowres.errors import UsageError

BENCH_EXPERIMENT = "lowres-bench"
MAX_STEPS = 100_000


@dataclass(frozen=True)
class Workload:
    """One benchmark configuration; ``name`` is its tag ``lowres.bench.workload``. Data, seed and every shape
    are fixed, so a workload names one exact config (one config hash)."""

    preset: str
    precision: str  # fp32, bf16 or nf4 (4-bit base, bf16/fp32 compute chosen by the machine)
    rank: int
    seq_len: int
    batch_size: int
    warmup_steps: int  # run first and dropped: allocator, caches and thread pools settle
    steps: int  # timed steps per repeat
    threads: int | None = None  # torch threads; None: every CPU this process may use (the machine's figure)

    @property
    def name(self) -> str:
        threads = f"-t{self.threads}" if self.threads else ""
        return f"{self.preset}-{self.precision}-r{self.rank}-s{self.seq_len}{threads}"

    def to_dict(self) -> dict:
        return asdict(self)


def _grid(preset: str, precisions: tuple[str, ...], ranks: tuple[int, ...], **shape) -> list[Workload]:
    return [Workload(preset, p, r, **shape) for p in precisions for r in ranks]


SUITES: dict[str, list[Workload]] = {
    "quick": _grid("tiny", ("fp32", "bf16"), (4, 16), seq_len=64, batch_size=4, warmup_steps=3, steps=8),
}
SUITES["full"] = SUITES["quick"] + _grid("SmolLM2-135M", ("fp32", "bf16", "nf4"), (8, 32), seq_len=128,
                                         batch_size=2, warmup_steps=2, steps=4)


def suite_workloads(suite: str, only: list[str] | None = None) -> list[Workload]:
    """The workloads of ``suite``, optionally only those whose name contains one of ``only``."""
    if suite not in SUITES:
        raise UsageError(f"unknown benchmark suite {suite!r}", hint=f"choose one of: {', '.join(SUITES)}")
    chosen = [w for w in SUITES[suite] if not only or any(o in w.name for o in only)]
    if not chosen:
        names = ", ".join(w.name for w in SUITES[suite])
        raise UsageError(f"no workload of suite {suite!r} matches {only}", hint=f"workloads: {names}")
    return chosen


def workload_overrides(w: Workload, *, out_dir: Path, experiment: str,
                       tracking_uri: str | None, run_name: str) -> list[str]:
    """``--set`` style overrides that turn a workload into a RunConfig.

    ``max_steps`` is fixed far beyond the steps run (``repeats`` changes nothing in the config, so its hash —
    what ``lowres regress`` matches on — is the same for any ``--repeats``); the bench stops early, so no final
    eval, checkpoint or adapter upload runs: only the steps are measured.
    """
    compute = "auto" if w.precision == "nf4" else w.precision
    sets = {
        "output_dir": str(out_dir), "model.name": w.preset, "model.weights": "random-init",
        "precision.compute": compute, "precision.quant": "nf4" if w.precision == "nf4" else "none",
        "lora.rank": w.rank, "lora.alpha": 2 * w.rank,
        "data.sample": "hdfs_logs", "data.max_length": w.seq_len, "data.tokenizer_vocab": 1024,
        "data.eval_fraction": 0.0,
        "train.max_steps": MAX_STEPS, "train.batch_size": w.batch_size,
        "train.warmup_ignore_steps": w.warmup_steps, "train.seed": 0, "train.threads": w.threads,
        "checkpoint.every": 0,
        "tracking.experiment": experiment, "tracking.run_name": run_name, "tracking.jsonl": False,
    }
    if tracking_uri:
        sets["tracking.mlflow_uri"] = tracking_uri
    return [f"{k}={v}" for k, v in sets.items() if v is not None]
