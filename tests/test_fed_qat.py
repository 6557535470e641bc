"""The compression study's client and server pieces: int4, QAT (the uploaded update is a fixed point of the
codec; without QAT training is the recipe's own), per-client uplink codecs with per-client bytes."""

import numpy as np
import pytest

from lowres.federated.client import clear_cache, client_state, load_global, lora_tensors, train_round
from lowres.federated.client_app import app as client_app
from lowres.federated.compression import decode, encode, payload_bytes, quantize
from lowres.federated.config import load_fed_config
from lowres.federated.local_grid import NODE_BASE, LocalGrid
from lowres.federated.server import run_federation
from lowres.errors import ConfigError

BASE = "configs/fed/tiny-sim.yaml"


@pytest.fixture(autouse=True)
def _fresh_clients():
    clear_cache()
    yield
    clear_cache()


def test_int4_packs_two_values_a_byte_and_is_its_own_fixed_point():
    rng = np.random.default_rng(0)
    t = {"a.lora_A": rng.normal(size=(4, 33)).astype(np.float32), "b.lora_B": rng.normal(size=(17, 4)).astype(np.float32),
         "odd": rng.normal(size=(5,)).astype(np.float32)}
    parts, parts8 = encode(t, "int4"), encode(t, "int8")
    assert parts["i4"].size == (4 * 33 + 17 * 4 + 5 + 1) // 2
    assert payload_bytes(parts) < 0.75 * payload_bytes(parts8)
    back = decode(parts)
    for n, x in t.items():
        step = np.abs(x).max() / 7
        assert np.abs(back[n] - x).max() <= step / 2 + 1e-6  # per channel: never worse than the tensor's step
        np.testing.assert_array_equal(quantize(x, "int4"), back[n])
        np.testing.assert_array_equal(quantize(back[n], "int4"), back[n])


def _state(tmp_path, name):
    fed = load_fed_config(BASE, [f"output_dir={tmp_path / 'fed'}", "tracking.mlflow=false", "rounds=2",
                                 "local_steps=3"])
    cfg = fed.run_config(extra=[f"output_dir={tmp_path / name}", "train.lr=0.01"])
    return client_state(cfg, name, None)


@pytest.mark.parametrize("codec", ["int4", "int8"])
def test_qat_update_is_a_fixed_point_of_the_uplink_codec(tmp_path, codec):
    state = _state(tmp_path, "qat")
    start = encode(lora_tensors(state.recipe.model), "none")
    received = decode(start)
    parts, metrics = train_round(state, start, 3, codec, qat=True)
    assert metrics["qat"] == 1.0
    delta = {n: x - received[n] for n, x in lora_tensors(state.recipe.model).items()}
    assert max(np.abs(d).max() for d in delta.values()) > 0  # it trained
    sent = decode(parts)
    for n, d in delta.items():
        np.testing.assert_allclose(quantize(d, codec), d, rtol=0, atol=1e-6)
        np.testing.assert_allclose(sent[n], d, rtol=0, atol=1e-6)  # the upload loses (near) nothing
    # the same round without QAT: its update is off the codec's grid by a visible amount
    clear_cache()
    plain = _state(tmp_path, "plain")
    train_round(plain, start, 3, codec, qat=False)
    plain_delta = {n: x - received[n] for n, x in lora_tensors(plain.recipe.model).items()}
    levels = 7 if codec == "int4" else 127
    off_grid = max(np.abs(quantize(d, codec) - d).max() / (np.abs(d).max() / levels) for d in plain_delta.values())
    assert off_grid > 0.1  # in units of the codec's step (rounding: up to 0.5); under QAT: ~1e-6 / step


def test_without_qat_training_is_the_recipes_own(tmp_path):
    a = _state(tmp_path, "a")
    start = encode(lora_tensors(a.recipe.model), "none")
    _, metrics = train_round(a, start, 3, "int4", qat=False)
    assert metrics["qat"] == 0.0
    clear_cache()
    b = _state(tmp_path, "b")
    load_global(b, start)
    losses = [b.recipe.train(steps=1).loss for _ in range(3)]
    assert a.recipe.history[-1]["loss"] == pytest.approx(b.recipe.history[-1]["loss"], rel=1e-6)
    assert [h["loss"] for h in a.recipe.history] == pytest.approx(losses, rel=1e-6)
    # and no parametrization is left on the model after a QAT round either
    train_round(a, start, 1, "int4", qat=True)
    assert not any("parametrizations" in n for n, _ in a.recipe.model.named_parameters())


def test_qat_needs_an_integer_uplink():
    with pytest.raises(ConfigError, match="qat"):
        load_fed_config(BASE, ["compression.qat=true", "compression.up=topk10+int8"])
    with pytest.raises(ConfigError, match="slow_below_tokens_per_second"):
        load_fed_config(BASE, ["compression.slow_up=topk10+int8"])
    with pytest.raises(ConfigError, match="per_client"):
        load_fed_config(BASE, ["compression.per_client={client-01: int3}"])


def test_per_client_codecs_and_the_slow_client_rule(tmp_path):
    fed = load_fed_config(BASE, [f"output_dir={tmp_path / 'fed'}", "tracking.mlflow=false", "local_steps=1",
                                 "rounds=2", "compression.up=int8", "compression.per_client={client-01: topk10+int8}",
                                 "compression.slow_up=int4", "compression.slow_below_tokens_per_second=1e12"])
    assert fed.compression.uplink("client-00", {}) == "int8"  # not yet measured: the default
    assert fed.compression.uplink("client-00", {"tokens_per_second": 5.0}) == "int4"
    assert fed.compression.uplink("client-01", {"tokens_per_second": 5.0}) == "topk10+int8"
    grid = LocalGrid(client_app, 3)
    res = run_federation(grid, fed)
    assert all(r["clients_accepted"] == 3 for r in res.rounds)
    up = {}
    for kind, node, nbytes in grid.up:
        if kind == "train":
            up.setdefault(node - NODE_BASE, []).append(nbytes)
    # round 1: client-00 and -02 send int8 (same size), client-01 top-k; round 2: every client has reported a
    # speed below the (huge) threshold, so client-00/-02 send int4 and client-01 keeps its own codec
    assert up[0][0] == up[2][0] and up[1][0] < 0.5 * up[0][0]
    assert up[0][1] < 0.75 * up[0][0] and up[1][1] == up[1][0]
    # the server counted each client's own bytes
    assert sum(r["bytes_up"] for r in res.rounds) == sum(sum(v) for v in up.values())
    # what `tune --fed-round-budget` predicts for such a reply is what crossed the wire (within the metrics' few bytes)
    from lowres.advisor.fedbudget import message_bytes
    from lowres.models import locate_weights

    cfg = fed.run_config()
    predicted = message_bytes(locate_weights(cfg.model).spec, 8, cfg.lora.targets, "int8", "int8")[1]
    assert abs(up[0][0] - predicted) < 0.01 * predicted


def test_round_budget_chooses_rank_and_codec_together_from_measured_bytes():
    from lowres.advisor import fedbudget
    from lowres.config import load_config
    from lowres.models import locate_weights

    cfg = load_config("configs/runs/tiny-cpu.yaml", [], use_env=False)
    spec = locate_weights(cfg.model).spec
    big, why = fedbudget.advise(spec, cfg, 50e6)
    want = big.rank
    assert (big.up, big.down, big.qat) == ("none", "none", False) and big.bytes_round <= 50e6 and "MB" in why[-2]
    names = list(fedbudget.UPLINKS)
    for share in (0.6, 0.3, 0.19):  # tiny at rank 8: fp16, int8, top-k 25 % + int8 (int4's round is 20.2 %)
        budget = share * big.bytes_round
        c, why = fedbudget.advise(spec, cfg, budget)
        assert c.bytes_round <= budget and c.rank == want and c.up != "none"
        # the least compressed codec that fits: the one before it in UPLINKS does not
        before = names[names.index(c.up) - 1]
        assert sum(fedbudget.message_bytes(spec, want, cfg.lora.targets, before, fedbudget.UPLINKS[before],
                                           cfg.model_dump_json())) > budget
        assert c.qat == (c.up == "int4") and f"compression.up={c.up}" in why[-1]
    # below what the smallest codec needs at that rank: a lower rank
    d, u = fedbudget.message_bytes(spec, want, cfg.lora.targets, "topk10+int8", "int8", cfg.model_dump_json())
    low, _ = fedbudget.advise(spec, cfg, 0.9 * (d + u))
    assert low.rank < want and low.bytes_round <= 0.9 * (d + u)
    none, why = fedbudget.advise(spec, cfg, 1000)
    assert none is None and "even rank 1" in why[-1]
