"""Bad inputs to every command: exit 2, one line on stderr (no traceback), nothing lost.

Each case runs ``lowres.cli.app.main([...])`` in this process inside a fresh workspace (a tmp folder holding
good and bad files, a finished-looking run, an output folder with a checkpoint, a spool) and checks:

- the exit code is 2 (bad input), and stderr is exactly one line starting with ``error:``;
- every file that existed before still exists with the same bytes (nothing deleted or overwritten).

Every case must fail before a model loads (``--model tiny`` where a model is needed), which keeps the file
fast. Cases where the process boundary matters (a lock held by another process) live in test_run_locks.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pytest

TINY = ["--model", "tiny"]
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class Case:
    id: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    contains: str | None = None  # a word the one line must hold (the bad value, usually)


def _write_workspace(w: Path) -> None:
    """Good and bad files every case may point at; see the module docstring."""
    rng = __import__("random").Random(14)
    records = [{"text": f"line {i} of some training text, with words to learn from"} for i in range(40)]
    (w / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (w / "empty.jsonl").write_text("")
    (w / "bad.jsonl").write_text('{"text": "fine"}\nthis is not json\n')
    (w / "list.jsonl").write_text("[1, 2, 3]\n")
    (w / "random.bin").write_bytes(bytes(rng.randrange(256) for _ in range(4096)))
    (w / "binary.yaml").write_bytes(b"\x00\x01\xff\xfe" + bytes(rng.randrange(256) for _ in range(512)))
    (w / "latin1.yaml").write_bytes("model:\n  name: caf\xe9\n".encode("latin-1"))
    (w / "list.yaml").write_text("- a\n- b\n")
    (w / "syntax.yaml").write_text("train: [1, 2\n")
    (w / "unknown.yaml").write_text("train:\n  lrr: 1\n")
    (w / "notadir.txt").write_text("a plain file, not a folder\n")
    (w / "emptydir").mkdir()
    # labelled session CSVs for `anomaly detect`
    (w / "labels_nonint.csv").write_text("Sequence,label\nE5 E22 E11,maybe\n")
    (w / "labels_none.csv").write_text("Sequence,label\n")
    (w / "labels_badid.csv").write_text("Sequence,label\nE999999 E5,1\n")

    # a finished-looking run: config, tokenizer, a truncated adapter
    run = w / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "tokenizer").mkdir()
    cfg = {"output_dir": str(run), "model": {"name": "tiny"}, "data": {"path": str(w / "data.jsonl")}}
    (run / "config.yaml").write_text(json.dumps(cfg))
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "adapter" / "adapter_model.safetensors").write_bytes(_safetensors_one_float())
    shutil.copytree(run, w / "run_trunc")
    (w / "run_trunc" / "adapter" / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    shutil.copytree(run, w / "run_binary_config")
    (w / "run_binary_config" / "config.yaml").write_bytes(b"\xff\xfe\x00garbage")

    # an output folder holding an earlier run's checkpoint (a fresh run with bad inputs must not delete it)
    ck = w / "out" / "checkpoints" / "step-00000001"
    ck.mkdir(parents=True)
    (ck / "state.json").write_text(json.dumps({"step": 1, "config_hash": "x", "run_id": None}))
    (ck / "adapter_model.safetensors").write_bytes(b"not really")

    # a spool with a corrupted pending-run file
    for name, text in (("bad_spool", "{ not json"), ("list_spool", "[1, 2]"), ("noid_spool", '{"experiment": "e"}')):
        sp = w / name
        sp.mkdir()
        (sp / "local-0123.run.json").write_text(text)
    (w / "bin_spool").mkdir()
    (w / "bin_spool" / "local-0456.run.json").write_bytes(b"\xff\xfe\x00\x01")

    # certificates folder missing its key; a student folder with nothing in it
    (w / "certs").mkdir()
    (w / "certs" / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    (w / "student_empty").mkdir()
    for part in ("base", "adapter", "tokenizer"):  # looks like a saved student (loading it is forbidden here)
        (w / "student" / part).mkdir(parents=True)
    (w / "student" / "meta.json").write_text('{"max_length": 64}')
    # a federation config whose clients' recipe is found from any working directory
    fed = (CONFIGS / "fed" / "tiny-sim.yaml").read_text()
    (w / "fed.yaml").write_text(fed.replace("base: configs/runs/", f"base: {CONFIGS}/runs/"))


def _safetensors_one_float() -> bytes:
    """A whole safetensors file holding one float32 (the format: 8-byte header length, JSON header, data)."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + struct.pack("<f", 1.0)


def _resume_case_files(w: Path) -> None:
    """A checkpoint of the exact config of the --resume cases, with a truncated adapter file."""
    from lowres.config import load_config

    cfg = load_config(None, ["model.name=tiny", f"data.path={w / 'data.jsonl'}", f"output_dir={w / 'resume'}"],
                      use_env=False)
    ck = w / "resume" / "checkpoints" / "step-00000002"
    ck.mkdir(parents=True)
    (ck / "state.json").write_text(json.dumps({"step": 2, "config_hash": cfg.config_hash(), "run_id": None}))
    (ck / "adapter_config.json").write_text("{}")
    (ck / "adapter_model.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"w\": {\"dtype\":")
    (ck / "optimizer.pt").write_bytes(b"")
    (ck / "trainer_state.pt").write_bytes(b"")
    ck2 = w / "resume_badstate" / "checkpoints" / "step-00000002"
    ck2.mkdir(parents=True)
    (ck2 / "state.json").write_text("{ torn")


def _snapshot(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


RUN = "run"
C = Case
CASES: list[Case] = [
    # ---- hw
    C("hw-profile-missing", ["hw", "--profile", "no-such-profile"], contains="no-such-profile"),
    C("hw-profile-binary", ["hw", "--profile", "{w}/binary.yaml"], contains="binary.yaml"),
    C("hw-profile-latin1", ["hw", "--profile", "{w}/latin1.yaml"], contains="latin1.yaml"),
    C("hw-profile-list", ["hw", "--profile", "{w}/list.yaml"], contains="list.yaml"),
    C("hw-save-into-file", ["hw", "--save", "{w}/notadir.txt/hw.yaml"], contains="notadir.txt"),
    C("hw-save-is-dir", ["hw", "--save", "{w}/emptydir"], contains="emptydir"),
    C("hw-unknown-flag", ["hw", "--bogus"], contains="--bogus"),
    # ---- advise
    C("advise-model-unknown", ["advise", "--model", "no-such-model-xyz"], contains="no-such-model-xyz"),
    C("advise-hardware-missing", ["advise", "--hardware", "no-such-hw"], contains="no-such-hw"),
    C("advise-hardware-binary", ["advise", "--hardware", "{w}/binary.yaml"], contains="binary.yaml"),
    C("advise-config-binary", ["advise", "--config", "{w}/binary.yaml"], contains="binary.yaml"),
    C("advise-config-latin1", ["advise", "--config", "{w}/latin1.yaml"], contains="latin1.yaml"),
    C("advise-headroom", ["advise", "--headroom", "1.5"], contains="1.5"),
    C("advise-rank-0", ["advise", "--rank", "0"], contains="rank"),
    C("advise-quant", ["advise", "--quant", "int3"], contains="int3"),
    C("advise-precision", ["advise", "--precision", "fp8"], contains="fp8"),
    C("advise-seq-len-negative", ["advise", "--seq-len", "-5"], contains="-5"),
    C("advise-targets", ["advise", "--targets", "everything"], contains="everything"),
    C("advise-batch-not-int", ["advise", "--batch-size", "abc"], contains="abc"),
    # ---- tune
    C("tune-objective", ["tune", "--auto", "--objective", "cheapest", "--dry-run", *TINY], contains="cheapest"),
    C("tune-objective-time", ["tune", "--auto", "--objective", "time:-5", "--dry-run", *TINY], contains="time:-5"),
    C("tune-memory-budget", ["tune", "--auto", "--memory-budget", "lots", "--dry-run", *TINY], contains="lots"),
    C("tune-data-missing", ["tune", "--auto", "--data", "{w}/typo.jsonl", "--dry-run", "--no-mlflow", *TINY],
      contains="typo.jsonl"),
    C("tune-data-empty", ["tune", "--auto", "--data", "{w}/empty.jsonl", "--dry-run", "--no-mlflow", *TINY],
      contains="empty.jsonl"),
    C("tune-config-binary", ["tune", "--auto", "--config", "{w}/binary.yaml", "--dry-run"], contains="binary.yaml"),
    C("tune-out-into-file", ["tune", "--auto", "--out", "{w}/notadir.txt/chosen.yaml", "--dry-run", "--no-mlflow",
                             *TINY], contains="notadir.txt"),
    C("tune-out-is-dir", ["tune", "--auto", "--out", "{w}/emptydir", "--dry-run", "--no-mlflow", *TINY],
      contains="emptydir"),
    C("tune-model-unknown", ["tune", "--auto", "--model", "no-such-model-xyz", "--dry-run", "--no-mlflow"],
      contains="no-such-model-xyz"),
    C("tune-headroom", ["tune", "--auto", "--headroom", "-1", "--dry-run", *TINY], contains="-1"),
    C("tune-probe-steps", ["tune", "--auto", "--probe-steps", "0", "--dry-run", *TINY], contains="0"),
    C("tune-set-bad", ["tune", "--auto", "--set", "train.lr=-1", "--dry-run", "--no-mlflow", *TINY],
      contains="train.lr"),
    C("tune-tracking-scheme", ["tune", "--auto", "--dry-run", *TINY], env={"MLFLOW_TRACKING_URI": "ftp://x/y"},
      contains="ftp"),
    # ---- profile
    C("profile-no-command", ["profile"], contains="command"),
    C("profile-interval-0", ["profile", "--interval", "0", "--", "true"], contains="interval"),
    C("profile-interval-negative", ["profile", "--interval", "-1", "--", "true"], contains="-1"),
    C("profile-port-range", ["profile", "--prometheus-port", "70000", "--", "true"], contains="70000"),
    C("profile-jsonl-into-file", ["profile", "--jsonl", "{w}/notadir.txt/p.jsonl", "--", "true"],
      contains="notadir.txt"),
    C("profile-jsonl-is-dir", ["profile", "--jsonl", "{w}/emptydir", "--", "true"], contains="emptydir"),
    C("profile-pushgateway-scheme", ["profile", "--pushgateway", "file:///etc/passwd", "--", "true"],
      contains="file://"),
    C("profile-mlflow-scheme", ["profile", "--mlflow", "--", "true"], env={"MLFLOW_TRACKING_URI": "ftp://x/y"},
      contains="ftp"),
    # ---- train
    C("train-data-typo-keeps-checkpoints", ["train", *TINY, "-o", "{w}/out", "--data", "{w}/typo.jsonl"],
      contains="typo.jsonl"),
    C("train-config-missing", ["train", "{w}/nosuch.yaml"], contains="nosuch.yaml"),
    C("train-config-binary", ["train", "{w}/binary.yaml"], contains="binary.yaml"),
    C("train-config-latin1", ["train", "{w}/latin1.yaml"], contains="latin1.yaml"),
    C("train-config-list", ["train", "{w}/list.yaml"], contains="list.yaml"),
    C("train-config-syntax", ["train", "{w}/syntax.yaml"], contains="syntax.yaml"),
    C("train-config-unknown-field", ["train", "{w}/unknown.yaml"], contains="lrr"),
    C("train-config-is-dir", ["train", "{w}/emptydir"], contains="emptydir"),
    C("train-lr-negative", ["train", *TINY, "--lr", "-1"], contains="train.lr"),
    C("train-lr-not-number", ["train", *TINY, "--lr", "abc"], contains="abc"),
    C("train-steps-0", ["train", *TINY, "--steps", "0"], contains="max_steps"),
    C("train-rank-0", ["train", *TINY, "--rank", "0"], contains="lora.rank"),
    C("train-precision", ["train", *TINY, "--precision", "fp8"], contains="fp8"),
    C("train-quant", ["train", *TINY, "--quant", "int3"], contains="int3"),
    C("train-set-no-equals", ["train", *TINY, "--set", "nonsense"], contains="nonsense"),
    C("train-set-unknown-field", ["train", *TINY, "--set", "train.nonsense=1"], contains="nonsense"),
    C("train-env-override", ["train", *TINY], env={"LOWRES_TRAIN__LR": "abc"}, contains="train.lr"),
    C("train-output-is-file", ["train", *TINY, "-o", "{w}/notadir.txt", "--data", "{w}/data.jsonl"],
      contains="notadir.txt"),
    C("train-output-under-file", ["train", *TINY, "-o", "{w}/notadir.txt/run", "--data", "{w}/data.jsonl"],
      contains="notadir.txt"),
    C("train-output-empty", ["train", *TINY, "-o", " "], contains="output_dir"),
    C("train-model-unknown", ["train", "--model", "no-such-model-xyz", "--set", "model.weights=pretrained"],
      contains="no-such-model-xyz"),
    C("train-data-empty", ["train", *TINY, "--data", "{w}/empty.jsonl", "-o", "{w}/out"], contains="empty.jsonl"),
    C("train-data-malformed", ["train", *TINY, "--data", "{w}/bad.jsonl", "-o", "{w}/out"], contains="bad.jsonl"),
    C("train-data-binary", ["train", *TINY, "--data", "{w}/random.bin", "-o", "{w}/out"], contains="random.bin"),
    C("train-data-not-records", ["train", *TINY, "--data", "{w}/list.jsonl", "-o", "{w}/out"],
      contains="list.jsonl"),
    C("train-data-empty-dir", ["train", *TINY, "--data", "{w}/emptydir", "-o", "{w}/out"], contains="emptydir"),
    C("train-seq-len-over-model", ["train", *TINY, "--seq-len", "100000", "--data", "{w}/data.jsonl",
                                   "--set", "model.weights=random-init"],
      contains="100000"),
    C("train-tracking-scheme", ["train", *TINY, "--data", "{w}/data.jsonl", "-o", "{w}/out",
                                "--set", "tracking.mlflow_uri=ftp://host/x"], contains="ftp"),
    C("train-tracking-scheme-env", ["train", *TINY, "--data", "{w}/data.jsonl", "-o", "{w}/out"],
      env={"MLFLOW_TRACKING_URI": "gopher://host/x"}, contains="gopher"),
    C("train-resume-truncated-adapter", ["train", *TINY, "--data", "{w}/data.jsonl", "-o", "{w}/resume", "--resume"],
      contains="adapter_model.safetensors"),
    C("train-resume-torn-state", ["train", *TINY, "--data", "{w}/data.jsonl", "-o", "{w}/resume_badstate",
                                  "--resume"], contains="state.json"),
    # ---- eval
    C("eval-run-missing", ["eval", "{w}/nosuchrun"], contains="nosuchrun"),
    C("eval-run-is-file", ["eval", "{w}/notadir.txt"], contains="notadir.txt"),
    C("eval-run-empty-dir", ["eval", "{w}/emptydir"], contains="emptydir"),
    C("eval-config-binary", ["eval", "{w}/run_binary_config"], contains="config.yaml"),
    C("eval-data-missing", ["eval", "{w}/run", "--data", "{w}/typo.jsonl"], contains="typo.jsonl"),
    C("eval-truncated-adapter", ["eval", "{w}/run_trunc"], contains="adapter_model.safetensors"),
    C("eval-batches-0", ["eval", "{w}/run", "--batches", "0"], contains="batches"),
    # ---- export
    C("export-out-inside-run", ["export", "{w}/run", "--out", "{w}/run/exported"], contains="inside"),
    C("export-out-is-run", ["export", "{w}/run", "--out", "{w}/run"], contains="run"),
    C("export-out-is-file", ["export", "{w}/run", "--out", "{w}/notadir.txt"], contains="notadir.txt"),
    C("export-run-missing", ["export", "{w}/nosuchrun", "--out", "{w}/x"], contains="nosuchrun"),
    C("export-truncated-adapter", ["export", "{w}/run_trunc", "--merge", "--out", "{w}/merged"],
      contains="adapter_model.safetensors"),
    # ---- sync
    C("sync-spool-is-file", ["sync", "--spool-dir", "{w}/notadir.txt"], contains="notadir.txt"),
    C("sync-spool-missing", ["sync", "--spool-dir", "{w}/nosuchspool"], contains="nosuchspool"),
    C("sync-pending-torn", ["sync", "--spool-dir", "{w}/bad_spool"], contains="local-0123.run.json"),
    C("sync-pending-list", ["sync", "--spool-dir", "{w}/list_spool"], contains="local-0123.run.json"),
    C("sync-pending-no-id", ["sync", "--spool-dir", "{w}/noid_spool"], contains="local-0123.run.json"),
    C("sync-pending-binary", ["sync", "--spool-dir", "{w}/bin_spool"], contains="local-0456.run.json"),
    C("sync-tracking-scheme", ["sync", "--spool-dir", "{w}/emptydir", "--tracking-uri", "ftp://x/y"],
      contains="ftp"),
    # ---- dash
    C("dash-port-0", ["dash", "--port", "0"], contains="0"),
    C("dash-port-range", ["dash", "--port", "70000"], contains="70000"),
    C("dash-threshold", ["dash", "--regression-threshold", "500"], contains="500"),
    C("dash-prometheus-file-url", ["dash", "--prometheus", "file:///etc/passwd"], contains="file://"),
    C("dash-runs-dir-is-file", ["dash", "--runs-dir", "{w}/notadir.txt"], contains="notadir.txt"),
    C("dash-mlflow-scheme", ["dash", "--mlflow-uri", "ftp://x/y"], contains="ftp"),
    C("dash-port-in-use", ["dash", "--port", "{busy_port}"], contains="{busy_port}"),
    # ---- bench, compare, regress
    C("bench-suite", ["bench", "--suite", "huge"], contains="huge"),
    C("bench-repeats-0", ["bench", "--repeats", "0"], contains="0"),
    C("bench-workload-unknown", ["bench", "--workload", "no-such-workload"], contains="no-such-workload"),
    C("bench-tracking-scheme", ["bench", "--tracking-uri", "ftp://x/y", "--workload", "tiny"], contains="ftp"),
    C("compare-plot-into-file", ["compare", "--plot", "{w}/notadir.txt/p.png"], contains="notadir.txt"),
    C("compare-tracking-scheme", ["compare", "--tracking-uri", "ftp://x/y"], contains="ftp"),
    C("regress-threshold", ["regress", "-b", "latest", "-c", "previous", "--threshold", "-1"], contains="-1"),
    C("regress-confidence", ["regress", "-b", "latest", "-c", "previous", "--confidence", "2"], contains="2"),
    C("regress-metric", ["regress", "-b", "latest", "-c", "previous", "--metric", "joy"], contains="joy"),
    C("regress-missing-candidate", ["regress", "-b", "latest"], contains="candidate"),
    C("regress-tracking-scheme", ["regress", "-b", "latest", "-c", "previous", "--tracking-uri", "ftp://x/y"],
      contains="ftp"),
    # ---- fed
    C("fed-run-config-missing", ["fed", "run", "--config", "{w}/nosuch.yaml"], contains="nosuch.yaml"),
    C("fed-run-config-binary", ["fed", "run", "--config", "{w}/binary.yaml"], contains="binary.yaml"),
    C("fed-run-config-latin1", ["fed", "run", "--config", "{w}/latin1.yaml"], contains="latin1.yaml"),
    C("fed-run-rounds-0", ["fed", "run", "--config", "{w}/fed.yaml", "--set", "rounds=0"],
      contains="rounds"),
    C("fed-run-set-no-equals", ["fed", "run", "--config", "{w}/fed.yaml", "--set", "nonsense"],
      contains="nonsense"),
    C("fed-run-superlink-no-tls", ["fed", "run", "--config", "{w}/fed.yaml", "--superlink",
                                   "127.0.0.1:1"], contains="--insecure"),
    C("fed-run-output-is-file", ["fed", "run", "--config", "{w}/fed.yaml", "--set",
                                 "output_dir={w}/notadir.txt"], contains="notadir.txt"),
    C("fed-superlink-no-tls-choice", ["fed", "superlink", "--dry-run"], contains="--insecure"),
    C("fed-superlink-certs-missing", ["fed", "superlink", "--certs", "{w}/nosuchcerts", "--dry-run"],
      contains="nosuchcerts"),
    C("fed-superlink-certs-incomplete", ["fed", "superlink", "--certs", "{w}/certs", "--dry-run"],
      contains="server"),
    C("fed-superlink-port", ["fed", "superlink", "--insecure", "--port", "70000", "--dry-run"], contains="70000"),
    C("fed-supernode-address", ["fed", "supernode", "--superlink", "nohostport", "--insecure", "--dry-run"],
      contains="nohostport"),
    C("fed-supernode-root-cert-missing", ["fed", "supernode", "--superlink", "127.0.0.1:1", "--root-cert",
                                          "{w}/nosuch.crt", "--dry-run"], contains="nosuch.crt"),
    C("fed-supernode-data-missing", ["fed", "supernode", "--superlink", "127.0.0.1:1", "--insecure",
                                     "--data-path", "{w}/typo.jsonl", "--dry-run"], contains="typo.jsonl"),
    C("fed-supernode-auth-key-missing", ["fed", "supernode", "--superlink", "127.0.0.1:1", "--insecure",
                                         "--auth-key", "{w}/nosuch.key", "--dry-run"], contains="nosuch.key"),
    C("fed-supernode-port", ["fed", "supernode", "--superlink", "127.0.0.1:1", "--insecure", "--port", "70000",
                             "--dry-run"], contains="70000"),
    C("fed-supernode-overrides", ["fed", "supernode", "--superlink", "127.0.0.1:1", "--insecure", "--overrides",
                                  "lora.rank", "--dry-run"], contains="lora.rank"),
    C("fed-certs-into-file", ["fed", "certs", "{w}/notadir.txt/certs"], contains="notadir.txt"),
    C("fed-certs-is-file", ["fed", "certs", "{w}/notadir.txt"], contains="notadir.txt"),
    C("fed-certs-would-overwrite", ["fed", "certs", "{w}/certs"], contains="ca.crt"),
    # ---- anomaly
    C("anomaly-run-config-missing", ["anomaly", "run", "--config", "{w}/nosuch.yaml"], contains="nosuch.yaml"),
    C("anomaly-run-config-binary", ["anomaly", "run", "--config", "{w}/binary.yaml"], contains="binary.yaml"),
    C("anomaly-run-config-list", ["anomaly", "run", "--config", "{w}/list.yaml"], contains="list.yaml"),
    C("anomaly-run-set-unknown", ["anomaly", "run", "--set", "no_such_field=1"], contains="no_such_field"),
    C("anomaly-run-set-no-equals", ["anomaly", "run", "--set", "k_normal"], contains="k_normal"),
    C("anomaly-run-set-bad-value", ["anomaly", "run", "--set", "clients=many"], contains="clients"),
    C("anomaly-run-output-is-file", ["anomaly", "run", "--set", "output_dir={w}/notadir.txt"],
      contains="notadir.txt"),
    C("anomaly-detect-file-is-dir", ["anomaly", "detect", "{w}/emptydir", "--model", "{w}/student"],
      contains="emptydir"),
    C("anomaly-detect-file-missing", ["anomaly", "detect", "{w}/nosuch.csv", "--model", "{w}/student"],
      contains="nosuch.csv"),
    C("anomaly-detect-random-bytes", ["anomaly", "detect", "{w}/random.bin", "--model", "{w}/student"],
      contains="random.bin"),
    C("anomaly-detect-label-not-int", ["anomaly", "detect", "{w}/labels_nonint.csv", "--model",
                                       "{w}/student"], contains="maybe"),
    C("anomaly-detect-no-sessions", ["anomaly", "detect", "{w}/labels_none.csv", "--model", "{w}/student"],
      contains="labels_none.csv"),
    C("anomaly-detect-unknown-event", ["anomaly", "detect", "{w}/labels_badid.csv", "--model", "{w}/student"],
      contains="E999999"),
    C("anomaly-detect-model-missing", ["anomaly", "detect", "{w}/labels_badid.csv", "--model", "{w}/nosuchmodel"],
      contains="nosuchmodel"),
    C("anomaly-detect-model-empty", ["anomaly", "detect", "{w}/labels_badid.csv", "--model",
                                     "{w}/student_empty"], contains="student_empty"),
    C("anomaly-detect-threshold", ["anomaly", "detect", "{w}/labels_badid.csv", "--model", "{w}/student",
                                   "--threshold", "2"], contains="threshold"),
]


def test_at_least_80_distinct_bad_inputs():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 80, len(CASES)
    commands = {c.argv[0] if c.argv[0] not in ("fed", "anomaly") else " ".join(c.argv[:2]) for c in CASES}
    every = {"hw", "advise", "tune", "profile", "train", "eval", "export", "sync", "dash", "bench", "compare",
             "regress", "fed run", "fed superlink", "fed supernode", "fed certs", "anomaly run", "anomaly detect"}
    assert every <= commands, every - commands


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    w = tmp_path / "w"
    w.mkdir()
    _write_workspace(w)
    _resume_case_files(w)
    monkeypatch.chdir(w)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{w / 'mlflow.db'}")
    monkeypatch.setenv("LOWRES_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LOWRES_DEBUG", raising=False)
    for k in list(os.environ):
        if k.startswith("LOWRES_") and "__" in k:
            monkeypatch.delenv(k)
    _forbid_heavy_work(monkeypatch)
    return w


class ReachedHeavyWork(Exception):
    """A bad input that was not caught before a model load, a probe, a server or a pipeline."""


def _forbid_heavy_work(monkeypatch) -> None:
    """Every entry to heavy work raises: a bad input must be refused before any of it starts."""
    import subprocess

    import lowres.advisor.probe
    import lowres.anomaly.pipeline
    import lowres.anomaly.student
    import lowres.bench.suite
    import lowres.federated.simulation
    import lowres.models
    import lowres.train.evaluation
    import lowres.train.tools
    import lowres.advisor.search

    def stop(what):
        def raiser(*a, **k):
            raise ReachedHeavyWork(what)
        return raiser

    for mod, name in ((lowres.models, "load_model"), (lowres.advisor.probe, "probe"),
                      (lowres.federated.simulation, "simulate"), (lowres.anomaly.pipeline, "run_pipeline"),
                      (lowres.anomaly.pipeline, "split_data"), (lowres.anomaly.student, "load_student"),
                      (lowres.bench.suite, "run_suite"), (lowres.train.evaluation, "load_trained"),
                      (lowres.train.tools, "load_trained"), (lowres.advisor.search, "probe")):
        monkeypatch.setattr(mod, name, stop(f"{mod.__name__}.{name}"))
    real_popen = subprocess.Popen

    class GuardedPopen(real_popen):
        def __init__(self, args, *a, **k):
            text = " ".join(map(str, args)) if isinstance(args, (list, tuple)) else str(args)
            for heavy in ("lowres.advisor.probe", "streamlit", "flwr", "flower-", "lowres.bench"):
                if heavy in text:
                    raise ReachedHeavyWork(f"subprocess {text[:200]}")
            super().__init__(args, *a, **k)

    monkeypatch.setattr(subprocess, "Popen", GuardedPopen)
    monkeypatch.setattr(subprocess, "call", stop("subprocess.call"))
    monkeypatch.setattr(os, "execve", stop("os.execve (streamlit)"))
    monkeypatch.setattr(os, "execvpe", stop("os.execvpe (flower)"))


def invoke(argv: list[str], capsys) -> tuple[int, str, str]:
    """``lowres ARGV`` in this process: (exit code, stdout, stderr). Any other exception fails the test."""
    from lowres.cli.app import main

    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_loses_nothing(case: Case, workspace: Path, capsys, monkeypatch):
    configs = Path(__file__).resolve().parents[1] / "configs"
    busy = None
    if "{busy_port}" in " ".join(case.argv):
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
    port = str(busy.getsockname()[1]) if busy else ""
    fill = lambda s: s.replace("{w}", str(workspace)).replace("{configs}", str(configs)).replace(  # noqa: E731
        "{busy_port}", port)
    for k, v in case.env.items():
        monkeypatch.setenv(k, v)
    before = _snapshot(workspace)
    capsys.readouterr()
    try:
        code, out, err = invoke([fill(a) for a in case.argv], capsys)
    finally:
        if busy:
            busy.close()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit {code}; stderr:\n{err}\nstdout:\n{out}"
    assert len(lines) == 1, f"stderr is not one line:\n{err}"
    assert lines[0].startswith("error:"), lines[0]
    assert "Traceback" not in err + out
    if case.contains:
        assert fill(case.contains) in lines[0], lines[0]
    after = _snapshot(workspace)
    lost = {f for f in before if f not in after}
    changed = {f for f in before if f in after and before[f] != after[f]}
    assert not lost and not changed, f"lost {sorted(lost)}, changed {sorted(changed)}"
