"""Does a training-step option pay? Interleaved A/B of lowres' step with and without it, same model and tokens.

    .venv/bin/python bench/step_options.py --variant eager:train.attention=eager \\
        --variant foreach:train.optimizer_impl=foreach --variant nochunk:train.loss_chunk_tokens=0
    .venv/bin/python bench/step_options.py --quick --variant compile:train.compile=true

Each variant (and the baseline, lowres' defaults) runs in its own worker process (bench/harness_vs_hf.py's),
set up once; then round after round each runs ``--steps`` optimizer steps in turn (the order rotates), so a
noisy neighbour slows all alike. Per round: tokens/s of the kept steps (the first ``--warmup`` dropped; the
first round of a compiled variant also pays its compilation, reported apart, unless ``--warm-steps`` ran it
first — the default), the variant over the baseline. The baseline is lowres' defaults, ``train.compile=auto``
included (a long run: it compiles during the warm-up where that measures faster); A/B an eager option with
``--set train.compile=false``.
Printed: the median ratio and its spread, the peak RSS of each process, and the largest relative difference of
each variant's per-step losses from the baseline's (the same tokens in the same order: it must be noise).
Last line: ``RESULT <variant>=<median ratio> … loss_max_rel_diff=… load=…``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("harness_vs_hf", HERE / "harness_vs_hf.py")
harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(harness)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", action="append", default=[], metavar="NAME:A.B=C[,D.E=F]",
                   help="a variant: a name and lowres config overrides (repeatable)")
    p.add_argument("--quick", action="store_true", help="tiny preset, short sequences")
    p.add_argument("--model", default=None)
    p.add_argument("--precision", default="fp32", help="compute dtype of every contender (default fp32)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--warm-steps", type=int, default=10, help="steps every variant runs once before round 1, "
                   "not timed (their losses are compared): warm caches, and train.compile (auto: its measured "
                   "decision takes 8 steps; true: the compiling first step)")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--data", default=None, metavar="PATH|SAMPLE",
                   help="train on this dataset (a data.path, or a shipped sample: instructions, hdfs_logs) instead "
                   "of the bench's packed corpus of equal blocks")
    p.add_argument("--set", action="append", default=[], metavar="A.B=C",
                   help="lowres config for the baseline and every variant alike (e.g. train.threads=1)")
    args = p.parse_args()
    if not args.variant:
        p.error("give at least one --variant NAME:A.B=C")
    model = args.model or ("tiny" if args.quick else "SmolLM2-135M-Instruct")
    seq_len = args.seq_len or (64 if args.quick else 256)
    variants = {"baseline": list(args.set)}
    for v in args.variant:
        name, _, sets = v.partition(":")
        variants[name] = list(args.set) + [s for s in sets.split(",") if s]

    from lowres.hardware import usable_cpus

    print(f"{model}, data {args.data or 'the packed bench corpus'}, seq {seq_len} × batch {args.batch_size}, "
          f"r={args.rank}, {args.precision} "
          f"{' '.join(args.set)}; load at start "
          f"{harness.load_now()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="lowres-ab-") as tmp:
        if args.data:
            from lowres.data.reading import list_samples, sample_path

            data = sample_path(args.data) if args.data in list_samples() else Path(args.data)
        else:
            data = Path(tmp) / "corpus.txt"
            data.write_text("\n".join(f"{i}: {harness.CORPUS * 3}" for i in range(400)))
        workers = {}
        try:
            for name, sets in variants.items():
                wargs = dict(model=model, data=str(data), seq_len=seq_len, batch_size=args.batch_size,
                             rank=args.rank, tmp=str(Path(tmp) / name), threads=usable_cpus(), set=sets)
                Path(wargs["tmp"]).mkdir()
                workers[name] = harness.Worker(name, args.precision, wargs)
            names = list(workers)
            rates = {n: [] for n in names}
            losses = {n: [] for n in names}
            first_round = {}
            if args.warm_steps:
                said = []
                for n in names:
                    rep = workers[n].ask(cmd="run", steps=args.warm_steps)
                    losses[n].extend(rep["losses"])
                    first_round[n] = rep["times"][0][0]
                    said.append(f"{n}: {rep['info'].get('compile')}")
                print(f"warm-up: {args.warm_steps} steps each, not timed; compile — " + " · ".join(said), flush=True)
            for r in range(args.rounds):
                order = names[r % len(names):] + names[: r % len(names)]
                for n in order:
                    rep = workers[n].ask(cmd="run", steps=args.steps)
                    if r == 0 and n not in first_round:
                        first_round[n] = rep["times"][0][0]
                    rates[n].append(harness.tps(rep["times"], args.warmup))
                    losses[n].extend(rep["losses"])
                    workers[n].peak = rep["peak_rss"]
                print(f"round {r + 1} (load {harness.load_now()}): "
                      + " · ".join(f"{n} {rates[n][-1]:,.0f} tok/s" for n in names), flush=True)
            closing = {n: w.close() for n, w in workers.items()}
        finally:
            for w in workers.values():
                if w.proc.poll() is None:
                    w.proc.kill()
    results = []
    base = losses["baseline"]
    worst_loss = 0.0
    for n in names[1:]:
        # round 1 of a compiled variant includes its compilation: compared from round 2 on, said below
        skip = (1 if any("compile=true" in s for s in variants[n]) and args.rounds > 1 and not args.warm_steps
                else 0)
        ratio = [a / b for a, b in zip(rates[n][skip:], rates["baseline"][skip:])]
        diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses[n], base))
        worst_loss = max(worst_loss, diff)
        extra = ""
        if closing[n].get("compile_seconds") is not None:
            extra = f"; compile {closing[n]['compile_seconds']:.1f} s (first step {first_round[n]:.1f} s)"
        print(f"{n} ({', '.join(variants[n])}) / baseline: {harness.spread(ratio)}"
              f"{' from round 2' if skip else ''}; peak RSS {workers[n].peak / 2**20:,.0f} vs "
              f"{workers['baseline'].peak / 2**20:,.0f} MiB; per-step loss max rel. diff {diff:.2e}{extra}")
        results.append(f"{n}={statistics.median(ratio):.3f}")
    print(f"load at end {harness.load_now()}")
    print(f"RESULT {' '.join(results)} loss_max_rel_diff={worst_loss:.2e} load={os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
