"""Strategies by name or class (lowres/federated/strategies.py): Flower's server optimisers over the averaged
update, client selection by what clients report, a user class from configs/ taking effect in the real round
loop, exit-2 errors for a class that is missing or wrong, and token accuracy beside loss."""

import numpy as np
import pytest

from lowres.errors import ConfigError
from lowres.federated.config import load_fed_config
from lowres.federated.strategies import (ClientInfo, EvalReply, ServerOptimizer, make_strategy, select_clients,
                                         weighted_eval)
from lowres.federated.strategy import Update, aggregate

TINY = "configs/fed/tiny-sim.yaml"
CUSTOM = "configs/fed/tiny-custom-strategy.yaml"
A, B = "m.layers.0.q_proj.lora_A.weight", "m.layers.0.q_proj.lora_B.weight"


def _clients():
    return [ClientInfo("client-00", 1000, 0, 8, {"free_memory_bytes": 8e9, "num_records": 40, "tokens_per_second": 900}),
            ClientInfo("client-01", 1001, 1, 8, {"free_memory_bytes": 2e9, "num_records": 90}),  # not measured yet
            ClientInfo("client-02", 1002, 2, 8, {"free_memory_bytes": 4e9, "num_records": 10, "tokens_per_second": 300})]


def test_selection_by_memory_speed_and_examples_with_floors():
    names = lambda cs: [c.name for c in cs]  # noqa: E731
    assert names(select_clients(_clients(), 2, "memory")) == ["client-00", "client-02"]
    assert names(select_clients(_clients(), 1, "examples")) == ["client-01"]
    # speed: the unmeasured client goes first (so it gets measured), then the fastest
    assert names(select_clients(_clients(), 2, "speed")) == ["client-00", "client-01"]
    assert names(select_clients(_clients(), 3, "examples", minimum={"free_memory_bytes": 3e9})) == \
        ["client-00", "client-02"]
    # a floor on a figure a client has not reported does not filter it; one on a reported figure does
    assert names(select_clients(_clients(), 3, "random", minimum={"tokens_per_second": 500})) == \
        ["client-00", "client-01"]
    picks = {tuple(names(select_clients(_clients(), 2, "random", seed=0, server_round=r))) for r in range(1, 9)}
    assert len(picks) > 1  # random: a seeded sample that changes with the round
    with pytest.raises(ValueError, match="selection.by"):
        select_clients(_clients(), 1, "colour")


def _adam(rounds_of_deltas, eta, b1=0.9, b2=0.99, tau=1e-3):
    """Adam on the server (Reddi et al. 2021, Algorithm 2) with Flower's bias-corrected step, written out."""
    x = np.ones(4)
    m = v = np.zeros(4)
    for t, d in enumerate(rounds_of_deltas, start=1):
        m = b1 * m + (1 - b1) * d
        v = b2 * v + (1 - b2) * d ** 2
        x = x + eta * np.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1)) * m / (np.sqrt(v) + tau)
    return x


def test_fedadam_is_flowers_update_rule_over_the_averaged_delta():
    fed = load_fed_config(TINY, ["strategy.name=fedadam", "strategy.eta=0.05"])
    strategy = make_strategy(fed.strategy)
    g = {"w": np.ones(4, np.float32)}
    deltas = [np.array([0.01, -0.02, 0.0, 0.03]), np.array([0.02, -0.01, 0.01, 0.0])]
    for rnd, d in enumerate(deltas, start=1):
        # two clients whose sample-weighted mean (10 and 30 examples) is d
        ups = [Update("a", {"w": (d + 0.3).astype(np.float32)}, 10, 1), Update("b", {"w": (d - 0.1).astype(np.float32)}, 30, 1)]
        g = strategy.aggregate_train(rnd, g, ups, [10.0, 30.0])
    assert np.allclose(g["w"], _adam(deltas, 0.05), atol=1e-6)
    # fedavg takes the average step itself; yogi and adagrad take other steps from the same average
    avg = aggregate({"w": np.ones(4, np.float32)}, [Update("a", {"w": deltas[0].astype(np.float32)}, 1, 1)])["w"]
    steps = {name: ServerOptimizer(name, eta=0.05).step(1, {"w": np.ones(4, np.float32)}, {"w": avg})["w"]
             for name in ("fedadam", "fedyogi", "fedadagrad")}
    assert not np.allclose(steps["fedyogi"], steps["fedadagrad"]) and not np.allclose(steps["fedadam"], avg)


def test_weighted_eval_by_examples():
    out = weighted_eval([EvalReply("a", 10, 2.0, 0.5), EvalReply("b", 30, 4.0, 0.1)])
    assert out == pytest.approx({"loss": 3.5, "accuracy": 0.2})
    assert weighted_eval([]) == {}


@pytest.mark.parametrize("body, name, problem", [
    (None, "nowhere_strategy.py:X", "no file"),
    ("class Other:\n    pass\n", "s.py:Mine", "has no class 'Mine'"),
    ("class Mine:\n    def select(self, server_round, clients, count): ...\n"
     "    def aggregate_train(self, server_round, global_tensors, updates, weights): ...\n", "s.py:Mine",
     "aggregate_evaluate(server_round, evals) is missing"),
    ("class Mine:\n    def select(self, clients): ...\n"
     "    def aggregate_train(self, server_round, global_tensors, updates, weights): ...\n"
     "    def aggregate_evaluate(self, server_round, evals): ...\n", "s.py:Mine", "select(self, clients) cannot take"),
    ("import not_a_module_anywhere\n", "s.py:Mine", "failed to import"),
    (None, "no_such_package.mod:Cls", "cannot be imported"),
    (None, "fedsgd", "is not one of fedavg"),
])
def test_a_missing_or_wrong_strategy_is_one_line_exit_2(tmp_path, capsys, body, name, problem):
    if body is not None:
        (tmp_path / "s.py").write_text(body)
    spec = str(tmp_path / name) if name.endswith(".py:Mine") or name.startswith("nowhere") else name
    with pytest.raises(ConfigError) as err:
        load_fed_config(TINY, [f"strategy.name={spec}"])
    assert err.value.exit_code == 2 and problem in str(err.value)
    from lowres.cli.app import main

    try:
        code = main(["fed", "run", "--config", TINY, "--set", f"strategy.name={spec}", "-o", str(tmp_path / "f")])
    except SystemExit as exc:
        code = exc.code
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and problem in lines[0]


def test_a_user_strategy_answer_that_cannot_be_used_is_one_line_naming_the_method():
    from lowres.federated.strategies import CheckedStrategy, StrategyError

    class Sloppy:
        def select(self, server_round, clients, count):
            return ["client-09"]

        def aggregate_train(self, server_round, global_tensors, updates, weights):
            return {k: v[:1] for k, v in global_tensors.items()}

        def aggregate_evaluate(self, server_round, evals):
            raise KeyError("accuracy")

    s = CheckedStrategy(Sloppy(), "mine.py:Sloppy")
    for call, says in ((lambda: s.select(1, _clients(), 2), "select returned 'client-09', not one of the clients"),
                       (lambda: s.aggregate_train(1, {"w": np.ones((2, 2), np.float32)}, [], []), r"w has shape \(1, 2\), expected \(2, 2\)"),
                       (lambda: s.aggregate_evaluate(1, []), "aggregate_evaluate raised KeyError")):
        with pytest.raises(StrategyError, match=says) as err:
            call()
        assert err.value.exit_code == 2 and "\n" not in str(err.value)


def test_strategy_parameters_are_validated():
    for bad, says in ((["strategy.eta=0.1"], "only to fedadam"), (["strategy.name=fedprox"], "fedprox_mu > 0"),
                      (["strategy.name=fedadam", "strategy.beta_1=1.5"], "beta_1"),
                      (["strategy.name=fedadagrad", "strategy.beta_2=0.9"], "fedadagrad"),
                      (["strategy.options={k: 1}"], "user strategy class"),
                      (["strategy.selection.by=colour"], "selection.by")):
        with pytest.raises(ConfigError, match=says):
            load_fed_config(TINY, bad)
    fed = load_fed_config(TINY, ["strategy.name=fedyogi", "strategy.eta_l=0.004"])
    assert fed.run_config().train.lr == 0.004  # η_l is the clients' learning rate
    from flwr.serverapp.strategy import FedYogi

    assert make_strategy(fed.strategy).optimizer.flower.eta == FedYogi().eta  # null: Flower's own default


def test_custom_selector_and_aggregator_from_configs_take_effect(tmp_path):
    """configs/fed/tiny-custom-strategy.yaml: its class picks the 2 clients with the most records and averages
    their updates with equal weights × server_lr — observed on the wire of the real round loop."""
    from lowres.federated.client import clear_cache
    from lowres.federated.client_app import app as client_app
    from lowres.federated.compression import decode
    from lowres.federated.local_grid import LocalGrid
    from lowres.federated.server import run_federation
    from lowres.federated.wire import ARRAYS_KEY, from_arrayrecord

    fed = load_fed_config(CUSTOM, [f"output_dir={tmp_path / 'fed'}", "tracking.mlflow=false", "local_steps=2",
                                   "strategy.options.server_lr=0.5"])
    assert fed.strategy.name.endswith("example_strategy.py:LargestClientsEqualMean")
    grid = LocalGrid(client_app, 3)
    sent, replies = [], []  # per train exchange: (node, global it got), (node, delta, num_examples)
    orig = grid.send_and_receive

    def spy(messages, *, timeout=None):
        messages = list(messages)
        out = orig(messages, timeout=timeout)
        for msg in messages:
            if msg.metadata.message_type == "train":
                sent.append((msg.metadata.dst_node_id, decode(from_arrayrecord(msg.content[ARRAYS_KEY]))))
        for r in out:
            if r.metadata.message_type == "train":
                m = r.content.metric_records["metrics"]
                replies.append((r.metadata.src_node_id, decode(from_arrayrecord(r.content[ARRAYS_KEY])),
                                float(m["num_examples"])))
        return out

    grid.send_and_receive = spy
    clear_cache()
    try:
        res = run_federation(grid, fed)
    finally:
        clear_cache()
    # the selector: the 2 partitions holding the most records trained, in both rounds; the third never
    records = [sum(1 for _ in open(p)) for p in sorted((tmp_path / "fed" / "partitions").glob("client-*.jsonl"))]
    largest = {1000 + i for i in np.argsort(records)[-2:]}
    assert len(set(records)) == 3 and set(grid.train_rounds) == largest and set(grid.train_rounds.values()) == {2}
    assert [r["sampled"] for r in res.rounds] == [[f"client-{n - 1000:02d}" for n in sorted(largest)]] * 2
    # the aggregator: round 2's global = round 1's + 0.5 × the equal-weight mean of round 1's two updates
    g1, g2 = sent[0][1], sent[2][1]
    d = [delta for _, delta, _ in replies[:2]]
    n = [ex for _, _, ex in replies[:2]]
    expected = {k: g1[k] + 0.5 * (d[0][k] + d[1][k]) / 2 for k in g1}
    fedavg = {k: g1[k] + (n[0] * d[0][k] + n[1] * d[1][k]) / (n[0] + n[1]) for k in g1}
    assert n[0] != n[1] and all(np.allclose(g2[k], expected[k], atol=1e-6) for k in g1)
    assert not all(np.allclose(g2[k], fedavg[k], atol=1e-6) for k in g1)  # it is not FedAvg's result
    # its eval aggregation: the worst client's loss beside the weighted loss, per round and at the end
    assert res.rounds[0]["federated_eval_worst_loss"] >= res.rounds[0]["federated_eval_loss"]
    assert res.final_eval["federated_eval_worst_loss"] >= res.final_eval["federated_eval_loss"]
    # centralised and federated eval: loss and token accuracy each round, from the starting adapter on
    for figures in (res.initial_eval, *res.rounds):
        assert np.isfinite(figures["central_eval_loss"]) and 0 <= figures["central_eval_accuracy"] <= 1
        assert 0 <= figures["federated_eval_accuracy"] <= 1
    assert 0 <= res.final_eval["federated_eval_accuracy"] <= 1 and res.final_eval["clients"] == 3


def test_token_accuracy_counts_top1_hits_on_label_tokens_only():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowres.train.loss import IGNORE_INDEX, causal_lm_loss, causal_lm_loss_and_correct

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = torch.randint(0, 40, (3, 12))
    labels = ids.clone()
    labels[0, :5] = IGNORE_INDEX  # a masked prompt
    labels[2, 8:] = IGNORE_INDEX  # padding
    batch = {"input_ids": ids, "labels": labels}
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    target = torch.cat([labels[:, 1:], torch.full((3, 1), IGNORE_INDEX)], dim=1)
    keep = target != IGNORE_INDEX
    hits = int(((logits.argmax(-1) == target) & keep).sum())
    for chunk in (5, 0):  # chunked head and whole-batch head agree
        loss, tokens, correct = causal_lm_loss_and_correct(model, batch, chunk)
        assert (tokens, correct) == (int(keep.sum()), hits)
        with torch.no_grad():
            ref, _ = causal_lm_loss(model, batch, 16)
        assert loss == pytest.approx(float(ref), rel=1e-5)
    # a model that always predicts the target scores 1.0
    with torch.no_grad():
        model.lm_head.weight.zero_()
    assert causal_lm_loss_and_correct(model, {"input_ids": ids, "labels": torch.full_like(ids, 0)}, 4)[2] == 3 * 11


def test_builtin_selection_by_examples_uses_what_clients_report(tmp_path):
    """strategy.selection.by=examples in the real round loop: the records each client reports with its identity
    decide which 2 of 3 train."""
    from lowres.federated.client import clear_cache
    from lowres.federated.client_app import app as client_app
    from lowres.federated.local_grid import LocalGrid
    from lowres.federated.server import run_federation

    fed = load_fed_config(TINY, [f"output_dir={tmp_path / 'fed'}", "tracking.mlflow=false", "rounds=1",
                                 "local_steps=1", "partition.scheme=dirichlet", "robustness.min_available=2",
                                 "robustness.fraction=0.67", "strategy.selection.by=examples"])
    grid = LocalGrid(client_app, 3)
    clear_cache()
    try:
        res = run_federation(grid, fed)
    finally:
        clear_cache()
    records = [sum(1 for _ in open(p)) for p in sorted((tmp_path / "fed" / "partitions").glob("client-*.jsonl"))]
    assert len(set(records)) == 3 and set(grid.train_rounds) == {1000 + i for i in np.argsort(records)[-2:]}
    assert {c["client"]: c["figures"]["num_records"] for c in res.clients.values()} == \
        {f"client-{i:02d}": float(n) for i, n in enumerate(records)}
