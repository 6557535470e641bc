"""lowres_fed_* on a real /metrics endpoint: summed byte counters per client, and a silent client going offline."""

import time
import urllib.request

from lowres.federated.monitor import FedMonitor


def scrape(monitor):
    return urllib.request.urlopen(monitor.exporter.url, timeout=5).read().decode()


def value(text, name, **labels):
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_counters_gauges_and_offline_after_timeout():
    m = FedMonitor("fedtest", mlflow=False, prometheus_port=0, offline_after_s=1.0)
    try:
        m.round_started(1)
        m.sent("client-00", 1000)
        m.sent("client-00", 500)
        m.reply(1, "client-00", 300, {"train_seconds": 2.5, "peak_rss_bytes": 1e8})
        m.failure(1, "client-01", "no reply within 5 s")
        m.round_done(1, {"round_seconds": 3.0, "central_eval_loss": 4.2, "central_eval_accuracy": 0.25,
                         "federated_eval_accuracy": 0.125})
        text = scrape(m)
        assert value(text, "lowres_fed_bytes_sent_total", federation="fedtest", client="client-00") == 1500
        assert value(text, "lowres_fed_bytes_received_total", client="client-00") == 300
        assert value(text, "lowres_fed_round", federation="fedtest") == 1
        assert value(text, "lowres_fed_client_peak_memory_bytes", client="client-00") == 1e8
        assert value(text, "lowres_fed_client_failures_total", client="client-01") == 1
        assert value(text, "lowres_fed_eval_loss") == 4.2
        assert value(text, "lowres_fed_eval_accuracy_ratio") == 0.25
        assert value(text, "lowres_fed_federated_eval_accuracy_ratio") == 0.125
        assert abs(value(text, "lowres_fed_client_last_report_timestamp_seconds", client="client-00") - time.time()) < 5
        assert value(text, "lowres_fed_client_up", client="client-00") == 1
        deadline = time.time() + 10
        while value(scrape(m), "lowres_fed_client_up", client="client-00") != 0 and time.time() < deadline:
            time.sleep(0.3)
        assert value(scrape(m), "lowres_fed_client_up", client="client-00") == 0
        assert not m.is_up("client-00")
    finally:
        m.close()


def test_the_federations_run_is_tagged_with_the_servers_machine(tmp_path):
    """A federation's parent run carries the server's hardware fingerprint and tier, as training runs do, so
    federations run on two lab machines compare."""
    import mlflow

    from lowres.hardware import detect
    from lowres.tracking.runs import TAG_FINGERPRINT, TAG_TIER

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    m = FedMonitor("fed-hw", mlflow=True, tracking_uri=uri, experiment="fed-hw-test")
    try:
        assert m.run_id is not None, m.last_error
    finally:
        m.close()
    tags = mlflow.MlflowClient(uri).get_run(m.run_id).data.tags
    hw = detect()
    assert tags[TAG_FINGERPRINT] == hw.fingerprint and tags[TAG_TIER] == hw.tier
    assert tags["lowres.command"] == "fed"
