"""Owned run folders, one sync at a time, training that stops on NaN/Inf, secrets never shown or stored.

Where the process boundary matters (a lock held by another process, a profiled command that must run while
the tracking server is down) the test starts a real process; the rest runs in this one.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lowres.errors import NonFiniteError
from lowres.locks import FolderLock, LockedError
from train_helpers import tiny_overrides, write_corpus

HOLD = ("import sys, time; from lowres.locks import FolderLock; FolderLock(sys.argv[1]).acquire(); "
        "print('held', flush=True); time.sleep(120)")


def test_a_second_run_into_a_folder_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError) as err:
            FolderLock(folder).acquire()
        assert f"process {holder.pid}" in str(err.value) and err.value.exit_code == 2
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing (SIGKILL): its lock file is still there, the lock is not
    assert (folder / ".lowres.lock").exists()
    with FolderLock(folder) as lock:
        assert json.loads((folder / ".lowres.lock").read_text())["pid"] == os.getpid() and lock.held
    # in one process, two holders are refused too (locks are per open file)
    with FolderLock(folder):
        with pytest.raises(LockedError):
            FolderLock(folder).acquire()


def test_train_into_a_locked_folder_exits_2_before_touching_it(tmp_path, capsys):
    from lowres.cli.app import main

    data = write_corpus(tmp_path, lines=20)
    out = tmp_path / "out"
    ck = out / "checkpoints" / "step-00000001"
    ck.mkdir(parents=True)
    (ck / "state.json").write_text("{}")
    with FolderLock(out):
        with pytest.raises(SystemExit) as exc:
            main(["train", "-q", *[a for o in tiny_overrides(tmp_path, data, steps=2, output_dir=out)
                                   for a in ("--set", o)]])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "in use by process" in err and str(os.getpid()) in err, err
    assert (ck / "state.json").exists()  # the older run's checkpoint was not removed


def test_training_that_diverges_stops_with_a_clear_error_and_saves_nothing(tmp_path):
    from lowres.config import load_config
    from lowres.train import run

    data = write_corpus(tmp_path, lines=40)
    out = tmp_path / "nan"
    cfg = load_config(None, tiny_overrides(tmp_path, data, steps=6, output_dir=out, **{
        "train.lr": "1e30", "train.max_grad_norm": "null", "train.warmup_steps": 0, "checkpoint.every": 1,
        "train.max_bad_steps": 1}), use_env=False)
    with pytest.raises(NonFiniteError) as err:
        run(cfg, progress=False)
    assert "train.max_bad_steps=1" in str(err.value) and "train.lr=1e+30" in str(err.value)
    assert err.value.exit_code == 2
    assert not (out / "adapter").exists()
    from safetensors.torch import load_file

    for ck in (out / "checkpoints").glob("step-*"):  # any checkpoint written before it diverged is finite
        assert all(bool(t.isfinite().all()) for t in load_file(str(ck / "adapter_model.safetensors")).values())
    # the lock is released on the way out: the folder can be used again at once
    FolderLock(out).acquire().release()


def test_two_syncs_at_once_create_each_pending_run_once(tmp_path, monkeypatch):
    from lowres.tracking import runs, spool
    from lowres.tracking.logger import SpoolingLogger
    from lowres.tracking.sync import sync

    sdir = tmp_path / "spool"
    dead = "http://127.0.0.1:9"  # nothing listens: the runs are started pending, with local ids
    for i in range(3):
        lg = SpoolingLogger.start("race", tracking_uri=dead, spool_dir=sdir, timeout_s=0.5)
        lg.log_metrics({"m": float(i)}, step=0)
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    reports, errors = [], []

    def one():
        try:
            reports.append(sync(sdir, uri))
        except Exception as exc:  # noqa: BLE001 — reported below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert sorted(r.runs_created for r in reports) == [0, 3]
    found = runs.client(uri).search_runs([runs.client(uri).get_experiment_by_name("race").experiment_id])
    assert len(found) == 3
    assert {r.data.tags[spool.TAG_LOCAL_RUN_ID] for r in found} == set(spool.read_pending_runs(sdir))


def test_credentials_in_a_tracking_uri_are_never_printed_or_spooled(tmp_path, capsys):
    from profiler.sinks.mlflow import redact_uri, strip_credentials
    from lowres.tracking.logger import SpoolingLogger

    uri = "http://alice:s3cr3t-pw@127.0.0.1:9/?token=t0k3n"
    assert redact_uri(uri) == "http://alice:***@127.0.0.1:9/?token=***"
    assert strip_credentials(uri) == "http://127.0.0.1:9/"
    sdir = tmp_path / "spool"
    with pytest.warns(RuntimeWarning) as warned:
        lg = SpoolingLogger.start("secret", tracking_uri=uri, spool_dir=sdir, timeout_s=0.5)
        lg.log_metrics({"m": 1.0}, step=0)
        lg.log_params({"a": 1})
        lg.end()
    shown = " ".join(str(w.message) for w in warned) + capsys.readouterr().err + json.dumps(lg.describe())
    stored = "".join(p.read_text() for p in sdir.rglob("*") if p.is_file())
    for secret in ("s3cr3t-pw", "t0k3n"):
        assert secret not in shown and secret not in stored


def test_fed_certs_writes_the_key_readable_by_its_owner_only(tmp_path):
    from lowres.cli.app import main

    assert main(["fed", "certs", str(tmp_path / "certs")]) == 0
    assert stat.S_IMODE((tmp_path / "certs" / "server.key").stat().st_mode) == 0o600


def test_profile_mlflow_with_the_server_down_runs_the_command_and_spools(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"http://user:pw-secret@127.0.0.1:{port}")
    marker = tmp_path / "ran"
    res = subprocess.run([sys.executable, "-m", "lowres.cli.app", "profile", "--mlflow", "--", sys.executable, "-c",
                          f"open({str(marker)!r}, 'w').write('yes')"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=240)  # a hang guard, not a timing check (MLflow's retries took 255 s)
    assert res.returncode == 0, res.stderr[-2000:]
    assert marker.read_text() == "yes"
    assert "lowres sync" in res.stderr and "pw-secret" not in res.stderr + res.stdout
    spooled = "".join(p.read_text() for p in (tmp_path / ".lowres" / "spool").glob("*.jsonl"))
    assert spooled and "pw-secret" not in spooled
