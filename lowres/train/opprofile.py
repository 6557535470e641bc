"""Where a training step's time goes: a short torch.profiler trace, summed by op family.

``train.profile_steps: N`` (``lowres train --profile-steps N``) traces N optimizer steps right after the
``train.warmup_ignore_steps`` warm-up steps, writes the trace to ``<output_dir>/torch_trace.json.gz`` (open it
in https://ui.perfetto.dev or chrome://tracing) and sums each op's *self* time (its own, not its children's:
nothing is counted twice) into families:

* ``matmul``: GEMMs and their backward (mm, addmm, bmm, linear, …) outside the optimizer;
* ``attention``: scaled-dot-product attention kernels and softmax, and every op run inside lowres' bmm
  attention (``train.attention=bmm``: its batched GEMMs count here, not as matmul);
* ``norm/element-wise``: every other aten op — norms, activations, adds, copies and casts, the loss;
* ``optimizer``: everything under the recipe's optimizer phase (gradient clipping, AdamW, zero_grad);
* ``other``: the steps' wall time that no op accounts for — Python, the autograd engine, dispatch, the
  profiler's own cost.

The profiled steps run somewhat slower than unprofiled ones (the profiler records every op); read the shares,
and compare seconds only between traces. CPU only: on CUDA, ops are asynchronous and self CPU time is launch
time, so the table is not made there.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

FAMILIES = ("matmul", "attention", "norm/element-wise", "optimizer", "other")
OPTIMIZER_MARK = "lowres.optimizer"  # the record_function label of the recipe's optimizer phase (PhaseTimer)
# profiler ranges whose ops all belong to one family: the optimizer phase, lowres' bmm attention (its autograd
# Function forward and backward, lowres.train.attention)
MARKS = {OPTIMIZER_MARK: "optimizer", "BmmAttention": "attention", "BmmAttentionBackward": "attention",
         "BlockedCausalAttention": "attention", "BlockedCausalAttentionBackward": "attention"}
TRACE_NAME = "torch_trace.json.gz"
TABLE_NAME = "op_profile.json"

_MATMUL = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "matmul", "linear", "addmv", "mv", "dot", "addbmm", "einsum",
           "_addmm_activation", "mkldnn_linear", "_mkldnn_linear", "mkldnn_matmul", "_weight_int4pack_mm",
           "_weight_int8pack_mm"}
_ONEDNN_MATMUL = {"_linear_pointwise", "_linear_pointwise_binary"}
_ATTENTION = {"scaled_dot_product_attention", "softmax", "_softmax", "_softmax_backward_data", "_safe_softmax"}


def family_of(name: str, under: str | bool | None = None) -> str | None:
    """The family of one profiler event by its name and the marked range it runs under (``MARKS``: optimizer,
    attention; True means the optimizer); None for what is not an aten op (Python-level ranges, autograd
    engine wrappers): their self time stays in ``other``."""
    under = "optimizer" if under is True else (under or None)
    if name.startswith("mkldnn::") and name[len("mkldnn::"):] in _ONEDNN_MATMUL:
        return under or "matmul"  # oneDNN's GEMMs (train.gemm=onednn)
    if not name.startswith("aten::"):
        return None
    if under:
        return under
    op = name[len("aten::"):]
    if op in _MATMUL:
        return "matmul"
    if op in _ATTENTION or "attention" in op:
        return "attention"
    return "norm/element-wise"


def summarise(events: Any, wall_s: float, steps: int) -> dict:
    """Seconds per step and shares of the step by family, from profiler ``events()`` of ``steps`` steps that
    took ``wall_s`` seconds in all."""
    seconds = dict.fromkeys(FAMILIES, 0.0)
    top: dict[str, float] = {}
    memo: dict[int, str | None] = {}

    def marked(ev) -> str | None:
        """The family of the nearest marked range above ``ev`` (MARKS), memoised along the chain."""
        chain, node = [], ev
        while node is not None and id(node) not in memo:
            if node.name in MARKS:
                memo[id(node)] = MARKS[node.name]
                break
            chain.append(node)
            node = node.cpu_parent
        found = memo.get(id(node)) if node is not None else None
        for n in chain:
            memo[id(n)] = found
        return found

    for ev in events:
        fam = family_of(ev.name, marked(ev))
        if fam is None:
            continue
        s = ev.self_cpu_time_total / 1e6
        seconds[fam] += s
        top[ev.name] = top.get(ev.name, 0.0) + s
    counted = sum(seconds.values())
    seconds["other"] = max(0.0, wall_s - counted)
    steps = max(1, steps)
    return {
        "steps": steps,
        "step_seconds": wall_s / steps,
        "families": {f: {"seconds_per_step": seconds[f] / steps, "share": seconds[f] / wall_s if wall_s else 0.0}
                     for f in FAMILIES},
        "top_ops": [{"op": k, "seconds_per_step": v / steps}
                    for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:12]],
    }


class StepProfiler:
    """Traces steps ``skip`` … ``skip + steps - 1`` of this process (0-based), then summarises them.

    Use ``with sp.step(): one_step()`` around every step; after the window, ``sp.result`` holds the summary
    (also written to ``out/op_profile.json``) and ``sp.trace`` the trace file's path.
    """

    def __init__(self, steps: int, skip: int, out: Path, device: str = "cpu"):
        self.steps, self.skip, self.out = steps, skip, Path(out)
        self.enabled = steps > 0 and not device.startswith("cuda")
        self.seen = 0
        self.prof = None
        self.wall = 0.0
        self.result: dict | None = None
        self.trace: Path | None = None

    @property
    def active(self) -> bool:
        return self.enabled and self.skip <= self.seen < self.skip + self.steps

    @contextlib.contextmanager
    def step(self):
        if not self.active:
            self.seen += 1
            yield
            return
        if self.prof is None:
            from torch.profiler import ProfilerActivity, profile

            self.prof = profile(activities=[ProfilerActivity.CPU], record_shapes=False, with_stack=False)
            self.prof.__enter__()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.wall += time.perf_counter() - t0
            self.seen += 1
            self.prof.step()
        if self.seen == self.skip + self.steps:
            self.finish()

    def finish(self) -> dict | None:
        """Stop a running trace early (the run ended inside the window) and summarise what it holds."""
        if self.prof is None or self.result is not None:
            return self.result
        self.prof.__exit__(None, None, None)
        done = self.seen - self.skip
        self.result = summarise(self.prof.events(), self.wall, done)
        self.out.mkdir(parents=True, exist_ok=True)
        self.trace = self.out / TRACE_NAME
        self.prof.export_chrome_trace(str(self.trace))
        self.result["trace"] = str(self.trace)
        (self.out / TABLE_NAME).write_text(json.dumps(self.result, indent=2) + "\n")
        self.prof = None
        return self.result


def table(result: dict):
    """A rich Table of ``result`` (seconds per step and share of the step by family, then the top ops)."""
    from rich.table import Table

    t = Table(title=f"where a step's time goes ({result['steps']} profiled step(s), "
                    f"{result['step_seconds']:.3f} s each with the profiler on)", title_justify="left")
    t.add_column("op family")
    t.add_column("s / step", justify="right")
    t.add_column("share", justify="right")
    for fam, v in result["families"].items():
        t.add_row(fam, f"{v['seconds_per_step']:.4f}", f"{v['share']:.1%}")
    ops = ", ".join(f"{o['op'].removeprefix('aten::')} {o['seconds_per_step']:.3f}s" for o in result["top_ops"][:6])
    t.caption = f"top ops (self time per step): {ops}. Trace: {result.get('trace')}"
    return t
