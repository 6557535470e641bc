"""bench/fed_compression.py end to end on a toy size: per-round figures, the summary, the RESULT keys the
study reports, and resume (a rerun with the same --out runs nothing it already has)."""

import csv
import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "fed_compression.py"


def _bench():
    spec = importlib.util.spec_from_file_location("fed_compression_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.timeout(600)
def test_study_writes_rounds_summary_result_and_resumes(tmp_path, capsys):
    bench = _bench()
    args = ["--rounds", "2", "--seeds", "1", "--clients", "2", "--local-steps", "1", "--eval-batches", "1",
            "--codecs", "none,int8,int4,int4+qat", "--partitions", "iid,dirichlet0.5", "--out", str(tmp_path)]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    result = dict(kv.split("=", 1) for kv in out.strip().splitlines()[-1].split()[1:])
    for key in ("best_codec", "bytes_reduction", "loss_delta", "qat_int4_loss_delta", "int4_loss_delta",
                "best_codec_noniid", "bytes_reduction_noniid", "loss_delta_noniid"):
        assert key in result, (key, result)
    with open(tmp_path / "rounds.csv") as f:
        rows = list(csv.DictReader(f))
    # 4 codecs × 2 partitionings × (round 0 + 2 rounds)
    assert len(rows) == 4 * 2 * 3
    by = {(r["partition"], r["codec"], r["round"]): r for r in rows}
    none, int8 = by[("iid", "none", "1")], by[("iid", "int8", "1")]
    assert float(int8["bytes_up"]) < float(none["bytes_up"]) / 3  # int8 is about a quarter of fp32
    assert float(by[("iid", "int4", "1")]["bytes_up"]) < float(int8["bytes_up"])
    assert "| iid | int8 |" in (tmp_path / "summary.md").read_text()
    assert bench.main(args) == 0  # resume: everything is in runs.jsonl already
    assert "0 federations to run" in capsys.readouterr().out
