"""What a new user meets first: one flag vocabulary, -h and --version everywhere, a base install whose command
works, distinct run names, progress in a log file while a run goes on, and `lowres compare` right after train.

The declared-imports check (every third-party import is a declared dependency) is tests/test_declared_imports.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import venv
from importlib import metadata
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from lowres.cli.app import app, main

REPO = Path(__file__).resolve().parents[1]
LOWRES = [sys.executable, "-m", "lowres.cli.app"]

# One meaning per short flag, across every command that has it.
SHORT = {"-c": "--config", "-m": "--model", "-o": "--output", "-b": "--batch-size", "-e": "--experiment",
         "-d": "--data", "-r": "--rank", "-q": "--quiet", "-p": "--prompt", "-n": "--max-new-tokens",
         "-t": "--temperature", "-w": "--workload",
         "-H": "--hardware", "-h": "--help", "-V": "--version"}
# Old spellings: they still work, but no help screen shows them.
RETIRED = ("--mlflow-uri", "--output-dir", "--out")
# One name per concept: a command that has the concept shows it under this name.
CONCEPTS = {"MLflow tracking URI": "--tracking-uri"}


def _commands(cmd: click.Command, path: tuple[str, ...] = ()):
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            yield from _commands(sub, path + (name,))


ALL = list(_commands(typer.main.get_command(app)))


def test_every_command_and_group_answers_h_and_help():
    assert len(ALL) > 20  # the root, every command and both groups with theirs
    runner = CliRunner()
    for path, _ in ALL:
        for flag in ("-h", "--help"):
            res = runner.invoke(app, [*path, flag])
            assert res.exit_code == 0 and "Usage:" in res.output, (path, flag, res.output[-500:])


def test_train_help_lists_every_config_field():
    """`lowres train --help` names every field --set takes, section by section: a field added to the config
    without its name in the help fails here."""
    from lowres.cli.train import train
    from lowres.config import RunConfig

    words = set(train.__doc__.replace("·", " ").split())
    for name, field in RunConfig.model_fields.items():
        sub = getattr(field.annotation, "model_fields", None)
        names = list(sub) if sub else [name]
        assert not [k for k in names if k not in words], (name, [k for k in names if k not in words])


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"lowres {metadata.version('lowres')}"
    assert CliRunner().invoke(app, ["-V"]).output.strip() == f"lowres {metadata.version('lowres')}"


def test_shared_flags_have_one_name_across_commands():
    seen: dict[str, set] = {}
    for path, cmd in ALL:
        for p in cmd.params:
            if not isinstance(p, click.Option) or p.hidden:
                continue
            names = p.opts + p.secondary_opts
            for old in RETIRED:
                assert old not in names, f"lowres {' '.join(path)} shows the retired {old}"
            for short in (n for n in names if len(n) == 2):
                long = next((n for n in names if n.startswith("--")), None)
                assert SHORT.get(short) == long, f"lowres {' '.join(path)}: {short} is {long}, elsewhere {SHORT.get(short)}"
                seen.setdefault(short, set()).add(" ".join(path))
            if "tracking uri" in (p.help or "").lower():
                assert p.opts[0] == CONCEPTS["MLflow tracking URI"], (path, p.opts)
    # the concepts are present where a user looks for them
    for path in (("train",), ("tune",), ("compare",), ("regress",), ("bench",), ("dash",), ("sync",), ("fed", "run")):
        cmd = dict(ALL)[path]
        assert any("--tracking-uri" in p.opts for p in cmd.params), path
    for path in (("train",), ("tune",), ("export",), ("fed", "run"), ("fed", "supernode"), ("anomaly", "run")):
        assert any("--output" in p.opts and "-o" in p.opts for p in dict(ALL)[path].params), path
    for path in (("train",), ("tune",), ("advise",), ("fed", "run"), ("anomaly", "run")):
        assert any("--config" in p.opts and "-c" in p.opts for p in dict(ALL)[path].params), path
    assert {"-m", "-o", "-c", "-e", "-b"} <= set(seen)  # -h is click's own, tested above


def test_retired_spellings_still_parse(tmp_path, monkeypatch):
    import lowres.config as config
    from lowres.cli.train import train

    # hidden aliases reach the same field: --output-dir as --output, --mlflow-uri as --tracking-uri
    cli = typer.Typer()
    cli.command()(train)
    seen = {}

    def spy(path, overrides, **kw):
        seen["overrides"] = overrides
        raise SystemExit(0)

    monkeypatch.setattr(config, "load_config", spy)
    CliRunner().invoke(cli, ["--output-dir", str(tmp_path / "x"), "--tracking-uri", "sqlite:///y.db"])
    assert f'output_dir="{tmp_path / "x"}"' in seen["overrides"]
    assert 'tracking.mlflow_uri="sqlite:///y.db"' in seen["overrides"]
    from lowres.cli.dash import dash

    dcli = typer.Typer()
    dcli.command()(dash)
    res = CliRunner().invoke(dcli, ["--mlflow-uri", "sqlite:///z.db", "--port", "0"])
    assert "--port must be in 1..65535, got 0" in str(res.exception)  # parsed, then the port was refused


# ---------------------------------------------------------------------------------------------- real runs
def _train(tmp: Path, name: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "LOWRES_PROGRESS_EVERY_S": "0",
           "COLUMNS": "80"}
    env.pop("LOWRES_DEBUG", None)
    cmd = [*LOWRES, "train", "--model", "tiny", "--steps", "8", "--seq-len", "32", "--batch-size", "2",
           "-o", str(tmp / name)]
    # as `nohup lowres train … > log` does it: stdout and stderr both into the file, no terminal
    return subprocess.Popen(cmd, cwd=tmp, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two_runs")
    seen_while_running = []
    for name in ("a", "b"):
        log = tmp / f"{name}.log"
        proc = _train(tmp, name, log)
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            if "train step 1/8" in text:
                # read while the run is still going: steps 2..8, eval and the adapter are still to come
                seen_while_running.append((name, proc.poll() is None, text))
                break
            time.sleep(0.05)
        assert proc.wait(600) == 0, log.read_text(errors="replace")[-3000:]
    return tmp, seen_while_running


@pytest.mark.slow
def test_piped_train_writes_progress_lines_while_it_runs(two_runs):
    tmp, seen = two_runs
    assert [n for n, _, _ in seen] == ["a", "b"], "no progress line appeared in the log before the run ended"
    assert all(running for _, running, _ in seen)
    assert "setup: loading tiny" in seen[0][2]
    text = (tmp / "a.log").read_text()
    steps = [line for line in text.splitlines() if line.startswith("train step ")]
    assert len(steps) == 8 and steps[-1].startswith("train step 8/8 (100%)") and "tok/s" in steps[-1]
    assert "\x1b[" not in text  # plain lines: no terminal escapes in a log file


@pytest.mark.slow
def test_two_runs_have_different_names_and_compare_lists_both(two_runs):
    import mlflow

    tmp, _ = two_runs
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    c = mlflow.tracking.MlflowClient(uri)
    exp = c.get_experiment_by_name("lowres")
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"  # not MLflow's GenAI view
    runs = c.search_runs([exp.experiment_id])
    names = [r.info.run_name for r in runs]
    assert len(names) == 2 and len(set(names)) == 2, names
    assert all(n.startswith("tiny-") and "-r8-" in n for n in names), names
    for r in runs:
        assert r.data.metrics["summary/tokens_per_second"] > 0 and r.data.metrics["summary/peak_memory_megabytes"] > 1
        assert "profile_summary.json" in {a.path for a in c.list_artifacts(r.info.run_id)}

    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "COLUMNS": "80"}
    out = subprocess.run([*LOWRES, "compare"], cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, out.stdout
    for r in runs:  # name and id of each run, uncut
        assert r.info.run_name in out.stdout and r.info.run_id[:12] in out.stdout, out.stdout
    assert out.stdout.count("train ") >= 2
    js = subprocess.run([*LOWRES, "compare", "--json"], cwd=tmp, env=env, capture_output=True, text=True,
                        timeout=300)
    rows = json.loads(js.stdout)
    assert {r["run"] for r in rows} == set(names) and all(r["kind"] == "train" for r in rows)
    assert all(r["tokens_per_s"] > 0 and r["steps"] == 8 and r["model"] == "tiny" for r in rows)
    csv = subprocess.run([*LOWRES, "compare", "--csv"], cwd=tmp, env=env, capture_output=True, text=True,
                         timeout=300)
    assert csv.stdout.splitlines()[0].startswith("run,run_id,experiment,kind") and len(csv.stdout.splitlines()) == 3


# ---------------------------------------------------------------------------------------------- base install
@pytest.mark.slow
def test_base_install_runs_help_and_hw_without_torch(tmp_path):
    """`pip install .` with no extras: the command works, and nothing heavy (torch, mlflow) came with it."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    res = subprocess.run([str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q", str(REPO)],
                         capture_output=True, text=True, timeout=900, cwd=tmp_path)
    if res.returncode != 0 and any(s in res.stderr for s in ("No matching distribution", "Could not find a version",
                                                             "NewConnectionError", "Network is unreachable")):
        pytest.skip(f"pip cannot reach a package index here: {res.stderr.strip().splitlines()[-1]}")
    assert res.returncode == 0, res.stderr[-3000:]
    probe = "import importlib.util as u; print([m for m in ('torch', 'mlflow', 'transformers') if u.find_spec(m)])"
    # (run outside the checkout: its top-level mlflow/ folder would pass for a namespace package)
    assert subprocess.run([str(py), "-c", probe], capture_output=True, text=True, cwd=tmp_path).stdout.strip() == "[]"
    exe = env_dir / "bin" / "lowres"
    help_ = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert help_.returncode == 0 and "Usage: lowres" in help_.stdout, help_.stderr
    hw = subprocess.run([str(exe), "hw", "--json"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert hw.returncode == 0, hw.stderr
    prof = json.loads(hw.stdout)
    assert prof["cpu"]["logical_cores"] >= 1 and not prof["versions"].get("torch")
    table = subprocess.run([str(exe), "hw"], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                           env={**os.environ, "COLUMNS": "100"})
    assert table.returncode == 0 and "fingerprint" in table.stdout and "torch not installed" in table.stdout
    # a command that needs an extra says which, in one line, instead of a traceback
    cmp = subprocess.run([str(exe), "compare"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert cmp.returncode == 1 and "pip install 'lowres[mlflow]'" in cmp.stderr and "Traceback" not in cmp.stderr


def test_compare_lists_every_kind_of_run(tmp_path, monkeypatch):
    """bench, tune and fed runs side by side, each read from where its kind keeps its figures; child runs (a
    tune's probes) only with --nested; --kind narrows; the table fits 80 columns."""
    from lowres.bench.suite import TAG_PRECISION, TAG_PRESET, TAG_WORKLOAD
    from lowres.tracking import runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("COLUMNS", "80")

    def run(experiment, tags, metrics, name):
        h = runs.start_run(experiment, run_name=name, tracking_uri=uri, fingerprint="fp0", tier="cpu-test",
                           tags=tags)
        runs.log_metrics(h.run_id, metrics, 0, tracking_uri=uri)
        runs.end_run(h.run_id, "FINISHED", uri)
        return h.run_id

    run("lowres-bench", {TAG_WORKLOAD: "tiny-fp32-r4", TAG_PRESET: "tiny", TAG_PRECISION: "fp32",
                         "lowres.command": "train"},
        {"bench/summary/tokens_per_second_median": 1234.0, "bench/summary/peak_memory_bytes_max": 2.0 * 1024**3,
         "train/loss": 3.5}, "quick/tiny-fp32-r4")
    tune = run("lowres", {"lowres.command": "tune"}, {"advisor/chosen_tokens_per_s": 456.0}, "tune-tiny")
    run("lowres", {"lowres.command": "tune-probe", "mlflow.parentRunId": tune}, {"advisor/fits": 1.0}, "probe-1")
    run("lowres-fed", {"lowres.command": "fed"}, {"fed/central_eval_loss": 2.25, "fed/train_loss": 2.5}, "alpha")

    def compare(*args):
        res = CliRunner().invoke(app, ["compare", "--tracking-uri", uri, *args])
        assert res.exit_code == 0, res.output
        return res.output

    rows = {r["kind"]: r for r in json.loads(compare("--json"))}
    assert set(rows) == {"bench", "tune", "fed"}  # the probe is a child run
    assert rows["bench"]["tokens_per_s"] == 1234.0 and rows["bench"]["peak_memory_gib"] == 2.0
    assert rows["bench"]["model"] == "tiny" and rows["bench"]["precision"] == "fp32" and rows["bench"]["loss"] == 3.5
    assert rows["tune"]["tokens_per_s"] == 456.0 and rows["tune"]["tier"] == "cpu-test"
    assert rows["fed"]["eval_loss"] == 2.25 and rows["fed"]["loss"] == 2.5 and rows["fed"]["experiment"] == "lowres-fed"
    assert len(json.loads(compare("--json", "--nested"))) == 4
    assert [r["run"] for r in json.loads(compare("--json", "--kind", "fed"))] == ["alpha"]
    assert [r["run"] for r in json.loads(compare("--json", "-e", "lowres-bench"))] == ["quick/tiny-fp32-r4"]
    table = compare()
    assert all(name in table for name in ("quick/tiny-fp32-r4", "tune-tiny", "alpha")) and "probe-1" not in table
    assert max(len(line) for line in table.splitlines()) <= 80, table
    from profiler.sinks.mlflow import redact_uri

    assert redact_uri(uri) == uri  # the title names the store as given (sqlite://// kept, nothing to hide)
    res = CliRunner().invoke(app, ["compare", "--tracking-uri", uri, "--kind", "nonsense"])
    assert res.exit_code != 0 and "not a kind of run" in str(res.exception or res.output)


def test_offline_hub_kernel_messages_are_quiet_in_lowres_and_its_benches(caplog):
    """bitsandbytes' CPU backend asks the `kernels` package for an optional 4-bit hub kernel at import; offline
    both log a warning that asks nothing of a lowres user. `lowres` (and bench/harness_vs_hf.py's workers, which
    call the same function) raise those two loggers to ERROR; errors still show."""
    import logging

    from lowres.cli.app import _quiet_third_party_noise

    _quiet_third_party_noise()
    with caplog.at_level(logging.DEBUG):
        for name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
            logging.getLogger(name).warning("offline hub kernel message")
            logging.getLogger(name).error("a real failure")
    assert [r.getMessage() for r in caplog.records] == ["a real failure", "a real failure"]
