"""Sink specs, the JSONL sink, and the exporter's port handling (no external servers)."""

import json
import socket
import urllib.request

import pytest

from profiler.reading import Sample
from profiler.sinks import PortInUse, Sink, build
from profiler.sinks.jsonl import read
from servers import LOOPBACK, wait_until


@pytest.mark.parametrize("spec, named", [
    ({"kind": "nope"}, "'nope'"),
    ({"path": "x.jsonl"}, "None"),
    ({"kind": "jsonl"}, "'path'"),
    ({"kind": "jsonl", "path": "x.jsonl", "colour": "red"}, "'colour'"),
    ({"kind": "jsonl", "path": "x.jsonl", "flush_interval_s": 0}, "'flush_interval_s'"),
    ({"kind": "prometheus", "port": "9100"}, "'port'"),
    ({"kind": "prometheus", "port": 70000}, "'port'"),
    ({"kind": "prometheus", "port": True}, "'port'"),
    ({"kind": "prometheus", "port": 0, "labels": {"step": "3"}}, "'step'"),
    ({"kind": "pushgateway", "job": "lowres"}, "'url'"),
    ({"kind": "pushgateway", "url": "127.0.0.1:1", "push_interval_s": -1}, "'push_interval_s'"),
    ({"kind": "mlflow", "tracking_uri": None}, "'run_id'"),
    ({"kind": "mlflow", "run_id": "r", "interval_s": "10"}, "'interval_s'"),
])
def test_bad_spec_is_a_value_error_naming_the_problem(spec, named):
    with pytest.raises(ValueError) as err:
        build(spec)
    assert named in str(err.value)


def test_a_spec_is_plain_json(tmp_path):
    # The sampler process receives specs as text: a spec that survives a JSON round trip must build.
    spec = json.loads(json.dumps({"kind": "jsonl", "path": str(tmp_path / "s.jsonl")}))
    sink = build(spec)
    try:
        assert isinstance(sink, Sink)
        assert sink.describe()["path"] == spec["path"]
    finally:
        sink.close()


def test_jsonl_writes_one_line_per_sample_and_flushes_without_close(tmp_path):
    path = tmp_path / "deep" / "samples.jsonl"
    sink = build({"kind": "jsonl", "path": str(path), "flush_interval_s": 0.2})
    batch = [Sample(1.0 + i, "lowres_system_cpu_core_utilization_ratio", i / 10, (("cpu", str(i)),))
             for i in range(5)]
    try:
        sink.write(batch)
        # A live reader (the dashboard) must see the lines while the run goes on, before close.
        wait_until(lambda: len(read(path)) == 5, 10, "the JSONL flusher to write 5 lines")
        sink.write(batch[:2])
    finally:
        sink.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 7
    assert json.loads(lines[0]) == batch[0].to_dict()
    assert read(path) == batch + batch[:2]


def test_exporter_port_zero_gets_a_free_port_and_serves_metrics():
    sink = build({"kind": "prometheus", "port": 0})
    try:
        d = sink.describe()
        assert d["kind"] == "prometheus" and d["port"] > 0
        assert d["url"] == f"http://127.0.0.1:{d['port']}/metrics"
        sink.write([Sample(1.0, "lowres_process_count", 3.0)])
        body = urllib.request.urlopen(d["url"], timeout=5).read().decode()
        assert "lowres_process_count 3.0" in body
        assert "python_gc" not in body  # its own registry, not the process-global one
    finally:
        sink.close()


def test_exporter_on_a_taken_port_names_the_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(PortInUse) as err:
            build({"kind": "prometheus", "port": port})
    assert str(port) in str(err.value)
    assert err.value.port == port


def test_exporter_rejects_a_metric_outside_the_catalog():
    sink = build({"kind": "prometheus", "port": 0})
    try:
        with pytest.raises(KeyError, match="lowres_made_up_bytes"):
            sink.write([Sample(1.0, "lowres_made_up_bytes", 1.0)])
    finally:
        sink.close()
