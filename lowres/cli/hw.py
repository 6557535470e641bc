"""`lowres hw`: show this machine's hardware profile (or a saved one), print it as JSON, or save it as YAML."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

GIB = 1024**3


def hw(
    json_output: Annotated[bool, typer.Option("--json", help="Print the profile as JSON instead of a table.")] = False,
    save: Annotated[
        Path | None, typer.Option("--save", metavar="PATH", help="Write the profile as YAML to PATH.")
    ] = None,
    profile: Annotated[
        str | None,
        typer.Option("--profile", metavar="NAME", help="Show a saved profile (name under configs/hardware or path)."),
    ] = None,
    probe_bnb: Annotated[
        bool,
        typer.Option("--probe-bnb/--no-probe-bnb", help="Find which bitsandbytes backends work (imports torch and "
                     "bitsandbytes: 3 s on an idle machine, 15 s on a busy one)."),
    ] = True,
) -> None:
    """Show the machine lowres runs on: CPU and its ISA features, memory, cgroup limits, GPUs, versions."""
    from lowres.hardware import detect, load_profile, save_profile

    if save is not None:  # a bad --save path is refused before the machine is probed
        from lowres.errors import UsageError
        from lowres.locks import check_output_dir

        if save.is_dir():
            raise UsageError(f"--save {str(save)!r} is a folder", hint="give a file name, e.g. my-laptop.yaml")
        check_output_dir(save.parent, "folder of --save")
    if profile:
        prof = load_profile(profile)
    elif probe_bnb:
        from lowres.cli.working import working

        with working("probing bitsandbytes backends (imports torch; --no-probe-bnb skips it) …"):
            prof = detect(probe_bnb=True)
    else:
        prof = detect(probe_bnb=False)
    if save is not None:
        written = save_profile(prof, save)
        # Keep stdout pure JSON when both are asked for.
        Console(stderr=json_output).print(f"saved {prof.tier} ({prof.fingerprint}) to {written}", highlight=False)
    if json_output:
        sys.stdout.write(prof.model_dump_json(indent=2) + "\n")
    elif save is None:
        Console().print(render_table(prof))


def _gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / GIB:.1f} GiB"


def _isa(prof) -> str:
    flags = prof.cpu.flags
    names = ", ".join(f.upper() for f in flags) or "none of note"
    if prof.cpu.bf16_fast:
        native = next(f.upper() for f in ("amx_bf16", "avx512_bf16", "bf16") if f in flags)
        bf16 = f"bf16: native ({native})"
    else:
        bf16 = "bf16: emulated, slow — use fp32 on this CPU"
    if prof.cpu.isa_capped_by:
        bf16 += f"\ncapped by {prof.cpu.isa_capped_by}: torch's kernels may not use the CPU's flags above these"
    return f"{names}\n{bf16}"


def _cgroup(prof) -> str:
    cg = prof.cgroup
    if cg.version is None:
        return "none found"
    memory = "no memory limit" if cg.memory_limit_bytes is None else f"memory limit {_gib(cg.memory_limit_bytes)}"
    if cg.memory_limit_bytes is not None and cg.memory_usage_bytes is not None:
        memory += f" ({_gib(cg.memory_usage_bytes)} used)"
    cpu = "no CPU quota" if cg.cpu_quota_cores is None else f"CPU quota {cg.cpu_quota_cores:g} cores"
    return f"v{cg.version}: {memory}, {cpu}"


def _gpus(prof) -> str:
    if not prof.gpus:
        return "none" + (f" ({prof.gpu_note})" if prof.gpu_note else "")
    lines = []
    for g in prof.gpus:
        free = f", {_gib(g.memory_free_bytes)} free" if g.memory_free_bytes is not None else ""
        lines.append(
            f"{g.index}: {g.name}, {_gib(g.memory_total_bytes)}{free}, compute {g.compute_capability or '?'}, "
            f"driver {g.driver_version or '?'}, CUDA {g.cuda_version or '?'}"
        )
    return "\n".join(lines)


def _roofline(prof) -> str | None:
    r = prof.roofline
    if r is None:
        return None

    def tf(x: float | None) -> str:
        return "unknown" if x is None else f"{x / 1e12:g} TFLOP/s"

    bandwidth = "unknown" if r.mem_bandwidth_bytes_s is None else f"{r.mem_bandwidth_bytes_s / 1e9:g} GB/s"
    return (f"fp32 {tf(r.fp32_flops)}, bf16 {tf(r.bf16_flops)}, fp16 {tf(r.fp16_flops)}, "
            f"memory {bandwidth} ({r.source})")


def render_table(prof) -> Table:
    """The profile as a two-column rich table, one line per thing a person checks."""
    from lowres.hardware import usable_cpus

    detected = prof.source == "detected"
    title = "this machine" if detected else f"saved profile {prof.source}"
    table = Table(title=f"lowres hw — {title}", show_header=False, title_justify="left")
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column(overflow="fold")
    table.add_row("tier", prof.tier)
    table.add_row("fingerprint", prof.fingerprint)
    if prof.is_estimate_only:
        table.add_row("note", "another machine's profile: advice from it is an estimate only")
    table.add_row("CPU", f"{prof.cpu.model} ({prof.cpu.arch})")
    cores = f"{prof.cpu.physical_cores} physical, {prof.cpu.logical_cores} logical"
    if detected:
        cores += f"; this process may use {usable_cpus()}"
    table.add_row("cores", cores)
    table.add_row("ISA features", _isa(prof))
    m = prof.memory
    table.add_row("RAM", f"{_gib(m.total_bytes)} total, {_gib(m.available_bytes)} available")
    swap = "none" if not m.swap_total_bytes else f"{_gib(m.swap_total_bytes)} ({_gib(m.swap_free_bytes)} free)"
    table.add_row("swap", swap)
    table.add_row("cgroup", _cgroup(prof))
    table.add_row("GPUs", _gpus(prof))
    roofline = _roofline(prof)
    if roofline:
        table.add_row("roofline", roofline)
    disk_where = f" in {Path.cwd()}" if detected else ""
    table.add_row("disk free", _gib(prof.disk_free_bytes) + disk_where)
    table.add_row("OS", prof.os)
    table.add_row("Python", prof.python)
    versions = ", ".join(f"{k} {v or 'not installed'}" for k, v in prof.versions.items()) or "unknown"
    table.add_row("packages", versions)
    if "bitsandbytes" in prof.versions and not prof.versions["bitsandbytes"]:
        bnb = "not installed (pip install 'lowres\\[train]')"  # \\[: not rich markup
    elif prof.bnb_backends is None:
        bnb = "not probed" + (" (run without --no-probe-bnb)" if detected else "")
    else:
        bnb = ", ".join(f"{k} {'works' if ok else 'no'}" for k, ok in prof.bnb_backends.items())
    table.add_row("bitsandbytes", bnb)
    return table
