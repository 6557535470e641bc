"""Crafted client replies against the real server loop (run_federation over a LocalGrid, the ClientApp handlers
the Flower engines run): none crashes the round or captures the global adapter, and the server's memory
stays bounded whatever sizes a reply claims. Also the pieces: robust aggregators, weight caps, the norm
screen below 3 clients, and clients that never take trust_remote_code from the server."""

import numpy as np
import pytest
from safetensors.numpy import load_file

from lowres.federated.client import clear_cache
from lowres.federated.client_app import app as client_app
from lowres.federated.config import load_fed_config
from lowres.federated.hostile import CRAFTED, CRAFTED_EVAL, CRAFTED_IDENTITY, HostileGrid, cosine
from lowres.federated.preparation import prepare
from lowres.federated.server import run_federation
from lowres.federated.strategy import Update, aggregate, screen, update_weights

BASE = "configs/fed/tiny-sim.yaml"
MB = 1024 * 1024


@pytest.fixture(autouse=True)
def _fresh_clients():
    clear_cache()
    yield
    clear_cache()


def fed_config(tmp_path, *extra):
    return load_fed_config(BASE, [f"output_dir={tmp_path / 'fed'}", "tracking.mlflow=false", "local_steps=2",
                                  "robustness.round_timeout_s=30", *extra])


def run_hostile(tmp_path, honest, crafted, *extra):
    """(result, grid, [cosine of each round's global update to that round's honest mean])."""
    fed = fed_config(tmp_path, *extra)
    prep = prepare(fed)
    globals_ = [{k: v.copy() for k, v in prep.global_tensors.items()}]
    grid = HostileGrid(client_app, honest, crafted)
    res = run_federation(grid, fed, prep=prep)
    grid.finish()
    globals_ += [load_file(str(p)) for p in sorted((tmp_path / "fed" / "global").glob("round-*.safetensors"))]
    cos = [cosine({k: b[k].astype(np.float64) - a[k] for k in a}, grid.honest_mean(i))
           for i, (a, b) in enumerate(zip(globals_, globals_[1:]))]
    return res, grid, cos


def test_crafted_replies_neither_crash_nor_capture_the_round(tmp_path):
    crafted = list(CRAFTED) + list(CRAFTED_IDENTITY) + list(CRAFTED_EVAL)
    assert len(crafted) >= 12
    res, grid, cos = run_hostile(tmp_path, 3, crafted, "rounds=2")
    name_of = {f"node-{n}": craft for n, craft in grid.crafted.items()}
    assert len(res.rounds) == 2 and len(cos) == 2
    for rnd, c in zip(res.rounds, cos):
        assert rnd["status"] == "aggregated"
        failed = {name_of.get(f["client"], f["client"]): f["reason"] for f in rnd["failures"]}
        # the honest clients are all in; every crafted reply is a recorded failure of its own client …
        assert not {"client-00", "client-01", "client-02"} & set(failed)
        assert set(failed) == set(crafted) - {"num_examples_1e9_flipped"}, sorted(set(crafted) - set(failed))
        # … except the inflated claim, which is well formed and taken in at a capped weight
        assert rnd["clients_accepted"] == 4
        assert c >= 0.99, f"round {rnd['round']}: global update at cosine {c:.4f} to the honest mean"
    for reason in ("shape (1000000, 1000000), expected", "shape (1, 200000000), expected", "is not one of",
                   "num_examples -50 is not a positive count", "no metrics record", "the reply has no arrays record",
                   "update norm", "NaN or Inf", "wire shapes end before", "bad .npy header"):
        assert any(reason in f["reason"] for f in res.failures), reason
    # the server never allocated what a header claimed (2e8 float16 = 381 MiB; 1e12 elements far more)
    windows = grid.server_windows
    assert windows and max(w["traced_peak_bytes"] for w in windows) < 64 * MB, windows
    assert max(w["rss_rise_bytes"] for w in windows) < 128 * MB, windows
    assert np.isfinite(res.rounds[-1]["central_eval_loss"]) and np.isfinite(res.final_eval["federated_eval_loss"])
    # the final federated eval: its crafted answers are recorded and left out of the mean
    eval_failed = {name_of[f["client"]] for f in res.final_eval["failures"]}
    assert eval_failed == set(CRAFTED_EVAL)


def test_inflated_num_examples_captures_fedavg_without_the_cap(tmp_path):
    # the control: with both caps off, one client claiming 1e9 examples turns the global update around
    _, _, cos = run_hostile(tmp_path / "off", 3, ["num_examples_1e9_flipped"], "rounds=1",
                            "strategy.max_weight_ratio=null")
    assert cos[0] < -0.9
    clear_cache()
    _, _, cos = run_hostile(tmp_path / "equal", 3, ["num_examples_1e9_flipped"], "rounds=1",
                            "strategy.max_weight_ratio=null", "strategy.weighting=equal")
    assert cos[0] >= 0.99


def test_norm_screen_works_with_two_clients(tmp_path):
    res, _, cos = run_hostile(tmp_path, 1, ["huge_norm_flipped"], "rounds=2", "robustness.min_clients=1",
                              "robustness.min_available=2")
    r1, r2 = res.rounds
    assert r1["clients_accepted"] == r2["clients_accepted"] == 1
    assert any("the other update's norm" in f["reason"] for f in r1["failures"])
    assert any("previous global update norm" in f["reason"] for f in r2["failures"])
    assert min(cos) >= 0.99


# ---------------------------------------------------------------------------------------------- the pieces
A, B = "m.layers.0.q_proj.lora_A.weight", "m.layers.0.q_proj.lora_B.weight"
RNG = np.random.default_rng(3)


def upd(client, rank=4, n=10, scale=0.01, shift=0.0):
    return Update(client, {A: RNG.normal(shift, scale, (rank, 6)).astype(np.float32),
                           B: RNG.normal(shift, scale, (5, rank)).astype(np.float32)}, n, rank)


def glob(rank=4):
    return {A: np.zeros((rank, 6), np.float32), B: np.zeros((5, rank), np.float32)}


@pytest.mark.parametrize("method", ["median", "trimmed_mean"])
def test_robust_aggregators_ignore_a_minority(method):
    honest = [upd(c, shift=0.1) for c in "abcd"]
    byzantine = upd("evil", shift=-50.0)
    new = aggregate(glob(), honest + [byzantine], method=method)
    assert all(np.all((x > 0.05) & (x < 0.15)) for x in new.values())
    fedavg = aggregate(glob(), honest + [byzantine])
    assert np.all(fedavg[A] < -5)


def test_robust_aggregators_keep_rank_slots_apart():
    small, big = upd("s", rank=2, shift=1.0, scale=0.0), upd("b", rank=4, shift=3.0, scale=0.0)
    new = aggregate(glob(4), [small, big, upd("b2", rank=4, shift=3.0, scale=0.0)], method="median")
    assert np.allclose(new[A][:2], 3.0) and np.allclose(new[A][2:], 3.0)  # median of 1, 3, 3 and of 3, 3
    new = aggregate(glob(4), [small, big], method="trimmed_mean")
    assert np.allclose(new[A][:2], 2.0) and np.allclose(new[A][2:], 3.0)  # slots 2-3: the rank-4 client alone


def test_weights_are_capped_or_equal():
    us = [upd("a", n=40), upd("b", n=50), upd("c", n=45), upd("liar", n=1e9)]
    assert update_weights(us) == [40, 50, 45, 1e9]
    assert update_weights(us, max_ratio=2.0) == [40, 50, 45, 90]  # 2 × the lower median (45)
    assert update_weights(us, max_examples=48) == [40, 48, 45, 48]
    assert update_weights(us, "equal") == [1.0] * 4


def test_norm_screen_below_three_updates():
    g = glob()
    honest, huge = upd("a"), upd("b", scale=10.0)
    ok, rejected = screen([honest, huge], g, norm_factor=10)
    assert [u.client for u in ok] == ["a"] and "the other update's" in rejected[0].reason
    ok, rejected = screen([huge], g, norm_factor=10, reference_norm=0.05)
    assert not ok and "previous global update" in rejected[0].reason
    ok, rejected = screen([honest], g, norm_factor=10, reference_norm=0.05)
    assert [u.client for u in ok] == ["a"] and not rejected


def test_clients_never_take_trust_remote_code_from_the_server(tmp_path):
    import json

    from flwr.app import ConfigRecord, Context, RecordDict

    from lowres.federated.client_app import _client_config

    fed = fed_config(tmp_path, "run.model.trust_remote_code=true",
                     "client_overrides={0: [model.trust_remote_code=true]}")
    cfg = fed.run_config()
    assert cfg.model.trust_remote_code  # what the server would ask for
    config = ConfigRecord({"run_config": cfg.model_dump_json(), "fed_dir": str(tmp_path / "fed"),
                           "client_overrides": json.dumps({"0": ["model.trust_remote_code=true"]})})

    def client(node_config):
        ctx = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})
        return _client_config(ctx, config)[0]

    assert client({"partition-id": 0}).model.trust_remote_code is False
    # the node's own overrides may allow it: its owner decides what runs on it
    own = client({"partition-id": 0, "lowres-overrides": "model.trust_remote_code=true"})
    assert own.model.trust_remote_code is True
