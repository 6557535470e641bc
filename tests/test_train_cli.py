"""`lowres train|eval|export` end to end: bad input exits 2 before any work; SIGKILL + --resume equals an
uninterrupted run, and MLflow holds every step exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lowres.cli.app import main
from train_helpers import subprocess_env, tiny_overrides, write_corpus


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LOWRES_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "lowres-cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _cli(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def test_bad_inputs_exit_2_before_any_work(tmp_path, capsys):
    good = write_corpus(tmp_path, lines=20)
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": oops}\n')
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = [
        (["--data", str(tmp_path / "missing.txt")], "does not exist"),
        (["--data", str(bad_jsonl)], "bad.jsonl:3: not valid JSON"),
        (["--data", str(empty)], "empty"),
        (["--seq-len", "4096"], "max_position_embeddings 2048"),
        (["--model", "nobody-here/no-such-model-xyz"], "no-such-model-xyz"),
        (["--set", "train.optimizer=paged_adamw"], "needs a GPU"),
        (["--set", "train.lr=-1"], "train.lr"),
    ]
    for extra, expected in cases:
        out_dir = tmp_path / "never"
        overrides = tiny_overrides(tmp_path, good, steps=2, output_dir=out_dir, **{
            "data.path": None if "--data" in extra else good, "data.max_length": None if "--seq-len" in extra else 32,
            "model.name": None if "--model" in extra else "tiny"})
        args = ["train", "-q", *_sets(overrides), *extra]
        code, _, err = _cli(args, capsys)
        assert code == 2, (extra, err)
        assert expected in " ".join(err.split()), (extra, err)
        assert not (out_dir / "checkpoints").exists() and not (out_dir / "adapter").exists()


def _train_args(tmp: Path, data: Path, out: Path, steps: int, every: int) -> list[str]:
    overrides = tiny_overrides(tmp, data, steps=steps, output_dir=out, **{
        "checkpoint.every": every, "tracking.profiler_mode": "process", "tracking.jsonl": True,
        "tracking.experiment": "kill-test"})
    return [sys.executable, "-m", "lowres.cli.app", "train", "-q", *_sets(overrides)]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    data = write_corpus(tmp_path, lines=150)
    env = subprocess_env(tmp_path_cache := tmp_path / "cache")
    steps, every = 16, 4
    killed_dir, whole_dir = tmp_path / "killed", tmp_path / "whole"

    proc = subprocess.Popen(_train_args(tmp_path, data, killed_dir, steps, every), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first_ckpt = killed_dir / "checkpoints" / f"step-{2 * every:08d}"
    deadline = time.monotonic() + 180
    while not first_ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed_dir / "adapter").exists()  # it really was cut short

    resumed = subprocess.run(_train_args(tmp_path, data, killed_dir, steps, every) + ["--resume"], env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    whole = subprocess.run(_train_args(tmp_path, data, whole_dir, steps, every), env=env,
                           capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]

    a, b = _adapter(killed_dir), _adapter(whole_dir)
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("kill-test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2  # the resumed run continued its own MLflow run
    killed_run = next(r for r in runs if r.info.run_id == json.loads(
        (killed_dir / "checkpoints" / f"step-{steps:08d}" / "state.json").read_text())["run_id"])
    assert killed_run.info.status == "FINISHED"
    for key in ("train/loss", "train/learning_rate", "train/tokens_per_second"):
        history = client.get_metric_history(killed_run.info.run_id, key)
        assert sorted(m.step for m in history) == list(range(1, steps + 1)), key
    losses = {m.step: m.value for m in client.get_metric_history(killed_run.info.run_id, "train/loss")}
    whole_run = next(r for r in runs if r.info.run_id != killed_run.info.run_id)
    for m in client.get_metric_history(whole_run.info.run_id, "train/loss"):
        assert losses[m.step] == pytest.approx(m.value, rel=1e-4)


def test_eval_and_export_merge(tmp_path, capsys):
    data = write_corpus(tmp_path, lines=60)
    out = tmp_path / "run"
    code, _, err = _cli(["train", "-q", *_sets(tiny_overrides(tmp_path, data, steps=4, output_dir=out))], capsys)
    assert code == 0, err

    code, stdout, err = _cli(["eval", str(out), "--json"], capsys)
    assert code == 0, err
    result = json.loads(stdout)
    assert result["tokens"] > 0 and result["perplexity"] == pytest.approx(2.718281828 ** result["loss"], rel=1e-6)
    code, stdout, err = _cli(["eval", str(out), "--data", str(data), "--batches", "2", "--json"], capsys)
    assert code == 0 and json.loads(stdout)["batches"] == 2

    merged = tmp_path / "merged"
    code, stdout, err = _cli(["export", str(out), "--merge", "--out", str(merged)], capsys)
    assert code == 0, err
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(merged))
    assert (merged / "model.safetensors").is_file() and not any("lora" in n for n, _ in model.named_parameters())
    ids = AutoTokenizer.from_pretrained(str(merged))("the quick brown fox", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(input_ids=ids).logits).all()

    code, _, err = _cli(["eval", str(tmp_path / "nothing-here")], capsys)
    assert code == 2 and "not a finished lowres run" in err
