"""The Prometheus sinks against a real Prometheus (scraping our exporter) and a real Pushgateway."""

import json
import time

import pytest

from profiler.reading import Sample
from profiler.sinks import build
from servers import http_get, prometheus_query, prometheus_server, pushgateway_server, wait_until

pytestmark = pytest.mark.server


def _by_labels(result: list[dict], key: str) -> dict[str, float]:
    return {r["metric"].get(key, ""): float(r["value"][1]) for r in result}


def test_real_prometheus_scrapes_the_exporter():
    exporter = build({"kind": "prometheus", "port": 0, "labels": {"run": "r42", "host": "box"}})
    try:
        now = time.time()
        exporter.write([
            Sample(now, "lowres_process_resident_memory_bytes", 1.0e9),
            Sample(now, "lowres_system_cpu_core_utilization_ratio", 0.25, (("cpu", "0"),)),
            Sample(now, "lowres_system_cpu_core_utilization_ratio", 0.75, (("cpu", "1"),)),
            # a label that would make a series per sample must not reach Prometheus
            Sample(now, "lowres_process_cpu_seconds_total", 5.0, (("step", "17"),)),
        ])
        # only the latest value of a series counts
        exporter.write([Sample(now + 1, "lowres_process_resident_memory_bytes", 2.0e9)])
        target = f"127.0.0.1:{exporter.describe()['port']}"
        with prometheus_server([target], scrape_interval="1s") as prom:
            rss = wait_until(lambda: prometheus_query(prom, "lowres_process_resident_memory_bytes"), 30,
                             "Prometheus to scrape the exporter")
            assert len(rss) == 1
            labels = rss[0]["metric"]
            assert (labels["run"], labels["host"], labels["job"]) == ("r42", "box", "lowres")
            assert float(rss[0]["value"][1]) == 2.0e9

            cores = prometheus_query(prom, "lowres_system_cpu_core_utilization_ratio")
            assert _by_labels(cores, "cpu") == {"0": 0.25, "1": 0.75}

            cpu = prometheus_query(prom, "lowres_process_cpu_seconds_total")
            assert len(cpu) == 1 and "step" not in cpu[0]["metric"]
            assert float(cpu[0]["value"][1]) == 5.0

            # A counter goes on counting between scrapes; rate() over it is Prometheus' job.
            exporter.write([Sample(time.time(), "lowres_process_cpu_seconds_total", 9.0)])
            wait_until(lambda: float(prometheus_query(prom, "lowres_process_cpu_seconds_total")[0]["value"][1])
                       == 9.0, 30, "the counter's new value to be scraped")

            status, body = http_get(f"{prom}/api/v1/metadata")
            meta = json.loads(body)["data"]
            # Scraped as OpenMetrics the family is named without ``_total``; as text 0.0.4, with it.
            types = {m["type"] for name, fam in meta.items() if name.startswith("lowres_process_cpu_seconds")
                     for m in fam}
            assert status == 200 and types == {"counter"}, meta
            assert {m["type"] for m in meta["lowres_process_resident_memory_bytes"]} == {"gauge"}
    finally:
        exporter.close()


def test_pushgateway_receives_the_latest_values():
    with pushgateway_server() as pgw:
        url = pgw.removeprefix("http://")
        sink = build({"kind": "pushgateway", "url": url, "job": "lowres_test",
                      "grouping": {"run": "r7"}, "push_interval_s": 0.5, "labels": {"host": "box"}})
        try:
            sink.write([Sample(1.0, "lowres_process_resident_memory_bytes", 123.0),
                        Sample(1.0, "lowres_gpu_utilization_ratio", 0.5, (("gpu", "0"),))])

            def pushed_rss():
                status, body = http_get(f"{pgw}/metrics")
                return status == 200 and 'lowres_process_resident_memory_bytes{' in body.decode() and body.decode()
            text = wait_until(pushed_rss, 20, "the periodic push to reach the Pushgateway")
            assert 'job="lowres_test"' in text and 'run="r7"' in text
            sink.write([Sample(2.0, "lowres_process_resident_memory_bytes", 456.0)])
        finally:
            sink.close()  # the final push carries the last value

        status, body = http_get(f"{pgw}/api/v1/metrics")
        groups = json.loads(body)["data"]
        group = next(g for g in groups if g["labels"].get("job") == "lowres_test")
        assert group["labels"]["run"] == "r7"
        rss = group["lowres_process_resident_memory_bytes"]
        assert rss["type"] == "GAUGE"
        assert [float(m["value"]) for m in rss["metrics"]] == [456.0]
        assert rss["metrics"][0]["labels"]["host"] == "box"
        gpu = group["lowres_gpu_utilization_ratio"]["metrics"][0]
        assert gpu["labels"]["gpu"] == "0" and float(gpu["value"]) == 0.5
        assert sink.describe()["failures"] == 0 and sink.describe()["pushes"] >= 2


def test_pushgateway_unreachable_never_raises():
    from servers import free_port

    sink = build({"kind": "pushgateway", "url": f"127.0.0.1:{free_port()}", "push_interval_s": 600,
                  "timeout_s": 1.0})
    sink.write([Sample(1.0, "lowres_process_count", 2.0)])  # no exception here…
    with pytest.warns(RuntimeWarning, match="Pushgateway"):
        sink.close()
    assert sink.describe()["failures"] >= 1
