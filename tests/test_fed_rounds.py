"""The server's round loop with the real ClientApp handlers, in process (LocalGrid): mixed ranks, codecs,
exact bytes, a poisoned client, a dead client, checkpoints and resume. The Flower engines run the same code
(test_fed_simulation.py, test_fed_deployment.py)."""

import numpy as np
import pytest

from lowres.federated.client import clear_cache
from lowres.federated.client_app import app as client_app
from lowres.federated.config import load_fed_config
from lowres.federated.global_state import latest_global
from lowres.federated.local_grid import LocalGrid
from lowres.federated.server import run_federation
from lowres.federated.wire import ARRAYS_KEY, from_arrayrecord, to_arrayrecord

BASE = "configs/fed/tiny-sim.yaml"


@pytest.fixture(autouse=True)
def _fresh_clients():
    clear_cache()
    yield
    clear_cache()


def fed_config(tmp_path, *extra):
    return load_fed_config(BASE, [f"output_dir={tmp_path / 'fed'}", "tracking.mlflow=false", "local_steps=2",
                                  "robustness.round_timeout_s=30", *extra])


def test_mixed_ranks_compressed_and_bytes_exact(tmp_path):
    fed = fed_config(tmp_path, "client_overrides={0: [lora.rank=4, lora.alpha=8]}",
                     "compression.up=topk10+int8", "compression.down=int8", "compression.error_feedback=true")
    grid = LocalGrid(client_app, 3)
    res = run_federation(grid, fed)
    assert [r["status"] for r in res.rounds] == ["aggregated", "aggregated"]
    assert all(r["clients_accepted"] == 3 for r in res.rounds)
    # the global adapter has the largest rank; the rank-4 client got (and sent) rank 4
    rnd, tensors, meta = latest_global(tmp_path / "fed" / "global")
    assert rnd == 2 and meta["federation"] == "tiny-sim"
    a = next(n for n in tensors if "q_proj.lora_A" in n)
    b = a.replace("lora_A", "lora_B")
    assert tensors[a].shape == (8, 256) and tensors[b].shape == (256, 8)
    assert {c["client"]: c["rank"] for c in res.clients.values()} == {"client-00": 4, "client-01": 8, "client-02": 8}
    # the server's byte counts equal what crossed the wire, measured as it was parsed on the other side
    train_down = [b for t, _, b in grid.down if t == "train"]
    train_up = [b for t, _, b in grid.up if t == "train"]
    assert sum(r["bytes_down"] for r in res.rounds) == sum(train_down)
    assert sum(r["bytes_up"] for r in res.rounds) == sum(train_up)
    # compression: about 8x smaller updates than fp32 weights of the same ranks (4 + 1 bytes per kept value)
    n_params = sum(x.size for x in tensors.values())
    per_round_fp32 = 4 * n_params * (2 + 0.5)  # two rank-8 clients and one rank-4
    assert res.rounds[0]["bytes_up"] < per_round_fp32 / 6
    assert res.rounds[0]["bytes_down"] < per_round_fp32 / 3
    assert np.isfinite(res.rounds[-1]["central_eval_loss"]) and res.final_eval["clients"] == 3


def _poison(node_index, reply):
    if node_index != 1 or reply.metadata.message_type != "train":
        return reply
    parts = from_arrayrecord(reply.content[ARRAYS_KEY])
    parts["f32"] = parts["f32"].copy()
    parts["f32"][::7] = np.nan
    reply.content[ARRAYS_KEY] = to_arrayrecord(parts)
    return reply


def test_poisoned_update_rejected_and_dead_client_recorded(tmp_path):
    # node 1 sends NaN every round; node 2 dies from round 2 (no reply: the timeout rule)
    fed = fed_config(tmp_path, "robustness.min_clients=1")
    grid = LocalGrid(client_app, 3, tamper=_poison, drop={2: 2})
    res = run_federation(grid, fed)
    r1, r2 = res.rounds
    assert r1["clients_accepted"] == 2 and r1["clients_rejected"] == 1
    assert any(f["client"] == "client-01" and "NaN" in f["reason"] and f.get("rejected") for f in r1["failures"])
    assert r2["clients_sampled"] == 3 and r2["clients_accepted"] == 1
    assert any(f["client"] == "client-02" and "no reply" in f["reason"] for f in r2["failures"])
    _, tensors, _ = latest_global(tmp_path / "fed" / "global")
    assert all(np.all(np.isfinite(x)) for x in tensors.values())


def test_too_few_updates_keep_the_global_and_restart_resumes(tmp_path):
    fed = fed_config(tmp_path, "robustness.min_clients=3", "rounds=1")
    res = run_federation(LocalGrid(client_app, 3, tamper=_poison), fed)
    assert res.rounds[0]["status"].startswith("kept the global adapter")
    first = latest_global(tmp_path / "fed" / "global")
    # a restarted server with more rounds continues after the saved round, from the saved adapter
    fed2 = fed_config(tmp_path, "rounds=2")
    res2 = run_federation(LocalGrid(client_app, 3), fed2)
    assert [r["round"] for r in res2.rounds] == [2]
    assert first[0] == 1 and latest_global(tmp_path / "fed" / "global")[0] == 2


def test_fedprox_pulls_towards_the_global(tmp_path):
    def drift(mu):
        clear_cache()
        fed = fed_config(tmp_path / f"mu{mu}", f"strategy.fedprox_mu={mu}", "rounds=1", "local_steps=4",
                         "run.train.lr=0.01")
        grid = LocalGrid(client_app, 3)
        sizes = []
        orig = grid.send_and_receive

        def spy(messages, *, timeout=None):
            replies = orig(messages, timeout=timeout)
            from lowres.federated.compression import decode
            for r in replies:
                if r.metadata.message_type == "train":
                    d = decode(from_arrayrecord(r.content[ARRAYS_KEY]))
                    sizes.append(np.sqrt(sum(float((x ** 2).sum()) for x in d.values())))
            return replies

        grid.send_and_receive = spy
        run_federation(grid, fed)
        return np.mean(sizes)

    assert drift(100.0) < 0.8 * drift(0.0)


def test_clients_with_their_own_precision_and_quantization(tmp_path):
    pytest.importorskip("bitsandbytes")
    fed = fed_config(tmp_path, "rounds=1", "client_overrides={0: [precision.quant=nf4], 1: [precision.compute=fp32]}")
    res = run_federation(LocalGrid(client_app, 3), fed)
    assert res.rounds[0]["clients_accepted"] == 3 and not res.rounds[0]["failures"]
    from lowres.federated.client import _CACHE
    quants = sorted(s.recipe.precision.quant for s in _CACHE.values())
    assert quants == ["nf4", "none", "none"]
