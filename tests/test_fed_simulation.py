"""The simulation engine for real (Flower + Ray): 3 clients of `tiny`, 2 rounds, MLflow parent and child runs."""

import pytest

from lowres.federated.config import load_fed_config


@pytest.mark.timeout(300)
def test_three_clients_two_rounds_on_ray(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")
    from lowres.federated.simulation import simulate
    from lowres.tracking.runs import client

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    fed = load_fed_config("configs/fed/tiny-sim.yaml", [f"output_dir={tmp_path / 'fed'}", f"tracking.mlflow_uri={uri}",
                                                          "local_steps=2"])
    res = simulate(fed)
    assert [r["round"] for r in res.rounds] == [1, 2]
    assert all(r["clients_accepted"] == 3 and r["clients_failed"] == 0 for r in res.rounds)
    # fp32 LoRA weights of rank 8 down and up, per client: the byte counts are the adapter's size plus headers
    for r in res.rounds:
        assert 3 * 4 * 147968 < r["bytes_down"] < 3 * 4 * 147968 * 1.05
        assert 3 * 4 * 147968 < r["bytes_up"] < 3 * 4 * 147968 * 1.05
    assert res.rounds[-1]["central_eval_loss"] < res.rounds[0]["central_eval_loss"] + 0.5
    assert res.final_eval["clients"] == 3 and res.final_eval["federated_eval_loss"] > 0

    c = client(uri)
    parent = c.get_run(res.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["lowres.federation"] == "tiny-sim"
    # a clean end: the end marker, and the health every reader (page, `lowres fed status`) derives from it
    from lowres.federated.health import classify_run

    assert parent.data.tags["lowres.fed.status"] == "finished" and float(parent.data.tags["lowres.fed.ended"]) > 0
    assert classify_run(parent).state == "finished"
    assert [m.step for m in c.get_metric_history(res.run_id, "fed/bytes_up")] == [1, 2]
    assert sorted(res.children) == ["client-00", "client-01", "client-02"]
    for child_id in res.children.values():
        child = c.get_run(child_id)
        assert child.data.tags["mlflow.parentRunId"] == res.run_id
        assert child.data.metrics["fed/client/peak_rss_bytes"] > 50e6
        assert child.data.metrics["fed/client/train_seconds"] > 0
