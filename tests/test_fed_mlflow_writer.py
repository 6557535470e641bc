"""FedMonitor's MLflow writes go through a queue and a writer thread (lowres.federated.mlflow_writer): batched
per run, every value at its step and in order, all of it in the store after close(), failures counted."""

import threading

import pytest

from lowres.federated import health
from lowres.federated.mlflow_writer import BatchWriter
from lowres.federated.monitor import FedMonitor


@pytest.fixture()
def uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _history(c, run_id, key):
    return [(m.step, m.value) for m in sorted(c.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))]


def test_queued_writes_are_batched_per_run_and_all_there_after_close(uri):
    from lowres.tracking.runs import client

    mon = FedMonitor("batched", tracking_uri=uri, experiment="writer", mlflow_flush_s=60.0)  # round ends flush
    writes = 0
    for rnd in (1, 2, 3):
        mon.round_started(rnd)
        for name in ("c1", "c2"):
            mon.sent(name, 100 * rnd)
            for step_part in range(3):  # several replies a round (train, evaluate …): one batch for them all
                mon.reply(rnd, name, 10 * rnd + step_part, {"train_loss": rnd + step_part / 10})
                writes += 1
        mon.failure(rnd, "c3", "no reply")
        mon.round_done(rnd, {"round_seconds": float(rnd), "clients_replied": 2.0})
        writes += 2
    mon.close("FINISHED", step=3)
    c = client(uri)
    assert mon.failures == 0, mon.last_error
    assert 0 < mon._writer.batches < writes / 2  # one log_batch per run per flush, not one per event
    parent = c.get_run(mon.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags[health.TAG_STATUS] == "finished"
    assert _history(c, mon.run_id, "fed/round_seconds") == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert _history(c, mon.run_id, "fed/bytes_sent_total") == [(3, 2 * 100 * (1 + 2 + 3))]
    assert set(mon.children) == {"c1", "c2", "c3"}
    for name in ("c1", "c2"):
        run = c.get_run(mon.children[name])
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == mon.run_id
        ups = _history(c, mon.children[name], "fed/client/bytes_up")
        assert [s for s, _ in ups] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
        assert ups[-1] == (3, 32.0)  # the last write of a step is the run's latest value
        assert run.data.metrics["fed/client/bytes_up"] == 32.0
    assert _history(c, mon.children["c3"], "fed/client/failed") == [(1, 1.0), (2, 1.0), (3, 1.0)]


def test_a_failing_store_is_counted_per_write_and_never_raises(uri, monkeypatch):
    from lowres.tracking import runs

    mon = FedMonitor("broken", tracking_uri=uri, experiment="writer", mlflow_flush_s=60.0)
    mon.flush()

    class Down:
        def log_batch(self, *a, **k):
            raise ConnectionError("tracking server down")

    real = runs.client
    monkeypatch.setattr(runs, "client", lambda uri=None: Down())
    mon.reply(1, "c1", 10, {"train_loss": 1.0})  # the child run is created by the writer: that fails too
    mon.round_done(1, {"round_seconds": 1.0})
    mon.round_done(2, {"round_seconds": 1.0})
    mon.flush()
    assert mon.failures == 3 and "tracking server down" in mon.last_error
    monkeypatch.setattr(runs, "client", real)
    mon.round_done(3, {"round_seconds": 3.0})
    mon.close("FINISHED", step=3)
    assert mon.failures == 3
    assert _history(real(uri), mon.run_id, "fed/round_seconds") == [(3, 3.0)]


def test_the_writer_is_off_the_callers_thread_and_a_bounded_queue_drops_with_a_count():
    gate, errors, sent = threading.Event(), [], []

    def resolve(key):
        gate.wait(10)  # a store that hangs: the caller must not wait for it
        sent.append(key)
        return None  # nothing to write to: the writes are skipped

    w = BatchWriter("sqlite:///unused.db", resolve, lambda n, exc: errors.append((n, str(exc))), flush_s=0.05,
                    max_pending=3)
    w.metrics("a", {"x": 1.0}, 1)
    w.kick()
    for _ in range(5):  # while the writer hangs in resolve, the queue fills
        w.metrics("b", {"x": 2.0}, 1)
    assert sum(n for n, _ in errors) >= 2 and "dropped" in errors[0][1]
    gate.set()
    w.close()
    assert "a" in sent and "b" in sent
    with pytest.raises(RuntimeError):
        w.metrics("a", {"x": 1.0}, 2)
