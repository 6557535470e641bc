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

The profiled steps run somewhat slower than unprofiled ones (the profiler records every op and its input
shapes); read the shares, and compare seconds only between traces.

**The GEMM floor.** Every GEMM call of the traced steps is recorded with its op, shapes, strides, dtypes and
scalars. After the run, each distinct call is replayed alone, warm, on this machine (the same threads), and
``gemm_floor`` sums count × its fastest replay: the step's time if every other op took none and every GEMM
ran as fast as it does alone. Against the roofline it bounds MFU (``mfu_ceiling``, from the step's FLOPs and
the roofline the recipe passes): no change outside the GEMMs can take a step's MFU above it with these GEMM
calls. The floor covers the GEMM
kernels the trace shows (mm, addmm, bmm, baddbmm and their in-place forms, oneDNN's linear); a fused kernel
such as torch's flash attention does its GEMMs inside and is not in it. The replays take at most
``FLOOR_BUDGET_S`` seconds.

CPU only: on CUDA, ops are asynchronous and self CPU time is launch time, so the table is not made there.
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
# GEMM kernels the floor replays (leaf ops: aten::matmul, aten::linear and einsum call these, and are not counted)
REPLAYED = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::baddbmm_",
            "mkldnn::_linear_pointwise"}
FLOOR_BUDGET_S = 20.0  # replay time at most; calls past it (the cheapest in the step) keep their in-step time
_DTYPE_NAMES = {"float": "float32", "c10::BFloat16": "bfloat16", "c10::Half": "float16", "double": "float64"}

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


def gemm_key(ev: Any) -> tuple | None:
    """What a replay of this GEMM event needs — (op, shapes, strides, dtypes, scalars) — or None where the
    trace holds no shapes or an input's dtype is not a float type torch can build."""
    shapes = getattr(ev, "input_shapes", None)
    if ev.name not in REPLAYED or not shapes:
        return None
    dtypes = list(getattr(ev, "input_dtypes", None) or [])
    strides = list(getattr(ev, "structured_input_strides", None) or [])
    concrete = list(getattr(ev, "concrete_inputs", None) or [])
    n = len(shapes)
    dtypes, strides, concrete = (dtypes + [""] * n)[:n], (strides + [[]] * n)[:n], (concrete + [None] * n)[:n]
    tensors = [i for i, d in enumerate(dtypes) if d.startswith(("float", "c10::", "double"))]
    if ev.name == "mkldnn::_linear_pointwise":
        tensors = [i for i in tensors if i < 3 and shapes[i]]
    if len([i for i in tensors if shapes[i]]) < 2 or any(dtypes[i] not in _DTYPE_NAMES for i in tensors):
        return None
    scalars = tuple(c if isinstance(c, (int, float)) and not isinstance(c, bool) else None for c in concrete)
    return (ev.name, tuple(tuple(x) for x in shapes), tuple(tuple(x) for x in strides),
            tuple(_DTYPE_NAMES.get(d, "") if i in tensors else "" for i, d in enumerate(dtypes)), scalars)


def gemm_flops(key: tuple) -> float:
    """FLOPs of one call (2·M·K·N, times the batch for bmm), from its key's shapes."""
    op, shapes = key[0], key[1]
    if op == "mkldnn::_linear_pointwise":  # x [..., K], weight [N, K]
        x, w = shapes[0], shapes[1]
        rows = 1
        for d in x[:-1]:
            rows *= d
        return 2.0 * rows * x[-1] * w[0]
    a, b = (shapes[0], shapes[1]) if op in ("aten::mm", "aten::bmm") else (shapes[1], shapes[2])
    batch = a[0] if len(a) == 3 else 1
    return 2.0 * batch * a[-2] * a[-1] * b[-1]


def summarise(events: Any, wall_s: float, steps: int) -> dict:
    """Seconds per step and shares of the step by family, from profiler ``events()`` of ``steps`` steps that
    took ``wall_s`` seconds in all. The GEMM calls (``gemm_key``) are kept under the private key
    ``"_gemm_calls"``: {key: [count, in-step seconds]}, for ``gemm_floor``."""
    seconds = dict.fromkeys(FAMILIES, 0.0)
    calls: dict[tuple, list] = {}
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
        if fam in ("matmul", "attention"):
            key = gemm_key(ev)
            if key is not None:
                c = calls.setdefault(key, [0, 0.0])
                c[0] += 1
                c[1] += s
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
        "_gemm_calls": calls,
    }


def replay_seconds(key: tuple, max_s: float = 0.5, repeats: int = 5) -> float:
    """The fastest of up to ``repeats`` timed runs (after one warm-up) of one GEMM call rebuilt from its key:
    operands of its shapes, strides and dtypes, filled with a constant (any normal value runs at the same
    speed), scalars as traced. Stops early once ``max_s`` is spent."""
    import torch

    op, shapes, strides, dtypes, scalars = key
    args: list[Any] = []
    for shape, stride, dt, sc in zip(shapes, strides, dtypes, scalars):
        if not dt:
            args.append(sc)
            continue
        if not shape:
            args.append(None)
            continue
        stride = stride if len(stride) == len(shape) else torch.empty(shape).stride()
        size = 1 + sum((d - 1) * st for d, st in zip(shape, stride)) if all(shape) else 0
        base = torch.full((max(size, 1),), 0.01, dtype=getattr(torch, dt))
        args.append(base.as_strided(shape, stride))
    if op == "mkldnn::_linear_pointwise":
        x, w, b = (args + [None, None, None])[:3]
        call = lambda: torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")  # noqa: E731
    else:
        fn = getattr(torch.ops.aten, op.removeprefix("aten::"))
        tensors = [a for a in args[:3] if isinstance(a, torch.Tensor)]
        kw = {}
        if op not in ("aten::mm", "aten::bmm"):
            beta, alpha = (list(args[3:5]) + [None, None])[:2]
            kw = {k: v for k, v in (("beta", beta), ("alpha", alpha)) if v is not None}
        call = lambda: fn(*tensors, **kw)  # noqa: E731
    call()
    best = float("inf")
    spent = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        dt_s = time.perf_counter() - t0
        best, spent = min(best, dt_s), spent + dt_s
        if spent >= max_s:
            break
    return best


def gemm_floor(calls: dict[tuple, list], steps: int, budget_s: float = FLOOR_BUDGET_S, top: int = 8) -> dict:
    """Each distinct GEMM call of the traced steps replayed alone (``replay_seconds``), the costliest first;
    the sums per step. A call that cannot be rebuilt, or past ``budget_s``, keeps its in-step time."""
    steps = max(1, steps)
    deadline = time.perf_counter() + budget_s
    rows = []
    for key, (count, in_step) in sorted(calls.items(), key=lambda kv: -kv[1][1]):
        alone = None
        if time.perf_counter() < deadline:
            try:
                alone = replay_seconds(key) * count
            except Exception:  # an op or layout this torch cannot rebuild: counted at its in-step time
                alone = None
        rows.append((key, count, in_step, alone))
    flops = sum(gemm_flops(k) * c for k, c, _, _ in rows)
    in_step = sum(s for _, _, s, _ in rows)
    alone = sum(a if a is not None else s for _, _, s, a in rows)
    replayed = sum(s for _, _, s, a in rows if a is not None)
    return {
        "calls_per_step": sum(c for _, c, _, _ in rows) / steps,
        "gflop_per_step": flops / steps / 1e9,
        "in_step_seconds": in_step / steps,
        "alone_seconds": alone / steps,
        "replayed_share": replayed / in_step if in_step else 1.0,
        "by_call": [{"op": k[0], "shapes": [list(x) for x in k[1] if x], "dtype": next((d for d in k[3] if d), ""),
                     "calls_per_step": c / steps, "in_step_seconds": s / steps,
                     "alone_seconds": None if a is None else a / steps,
                     "in_step_gflops": gemm_flops(k) * c / s / 1e9 if s else None,
                     "alone_gflops": gemm_flops(k) * c / a / 1e9 if a else None}
                    for k, c, s, a in rows[:top]],
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
        self._calls: dict | None = None  # the traced GEMM calls, until add_floor replays them

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

            self.prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_stack=False)
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
        self._calls = self.result.pop("_gemm_calls")
        self.out.mkdir(parents=True, exist_ok=True)
        self.trace = self.out / TRACE_NAME
        self.prof.export_chrome_trace(str(self.trace))
        self.result["trace"] = str(self.trace)
        self.write()
        self.prof = None
        return self.result

    def write(self) -> None:
        (self.out / TABLE_NAME).write_text(json.dumps(self.result, indent=2) + "\n")

    def add_floor(self, step_flops: float = 0.0, peak_flops_s: float = 0.0,
                  budget_s: float = FLOOR_BUDGET_S) -> dict | None:
        """Replay the traced GEMM calls (``gemm_floor``) — after the run, so no step's time includes it — and
        add the result to the summary as ``gemm_floor``, once; with a step's model FLOPs and the roofline, also
        ``mfu_ceiling``: the MFU of a step that took only its GEMMs' time alone."""
        if self.result is None or "gemm_floor" in self.result or not self._calls:
            return None if self.result is None else self.result.get("gemm_floor")
        floor = gemm_floor(self._calls, self.result["steps"], budget_s)
        if step_flops > 0 and peak_flops_s > 0 and floor["alone_seconds"] > 0:
            floor["mfu_ceiling"] = step_flops / (floor["alone_seconds"] * peak_flops_s)
        self.result["gemm_floor"] = floor
        self._calls = None
        self.write()
        return floor


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
    floor = result.get("gemm_floor")
    if floor:
        t.caption += (f"\nGEMM floor: {floor['calls_per_step']:,.0f} GEMM calls a step ({floor['gflop_per_step']:,.1f} "
                      f"GFLOP) took {floor['in_step_seconds']:.3f} s in the step; alone and warm "
                      f"{floor['alone_seconds']:.3f} s — the step if nothing else took any time"
                      + (f": MFU ≤ {floor['mfu_ceiling']:.2f} with these GEMMs" if floor.get("mfu_ceiling") else ""))
    return t
