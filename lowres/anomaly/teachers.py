"""Teachers: per-client LoRA next-token models of normal logs, trained through lowres' federated code.

    fed = teacher_fed_config(normal_txt, folder, clients=3, rounds=3, local_steps=20)
    prep = prepare_teachers(fed)                              # partitions + the shared tokenizer (server side)
    teachers = train_local_teachers(fed, prep, steps=60)      # one-shot: each client alone, nothing sent
    teachers, res = train_fedavg_teachers(fed)                # N FedAvg rounds (LocalGrid), bytes per round

A Teacher is (name, model, tokenizer). The shared tokenizer matters: random-init presets train their BPE on
the data, and scores of different clients are only comparable when their token ids mean the same thing.
One-shot teachers use the same client code (``client_state``: the FedRecipe with the shared tokenizer) as a
federated client, only without the rounds. FedAvg teachers run the same server round loop and client
handlers as ``lowres fed`` through the in-process ``LocalGrid``; after the run each client holds the final
global adapter (loaded by the federated eval), so every FedAvg teacher is the global model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowres.paths import configs_dir, find_config_file

FED_CONFIG = "anomaly/teachers-fed.yaml"


@dataclass
class Teacher:
    name: str
    model: Any  # peft PeftModel (causal LM)
    tokenizer: Any
    max_length: int
    precision: Any = None  # the recipe's ResolvedPrecision: scoring runs under its autocast, as training did


def teacher_fed_config(normal_txt: str | Path, folder: str | Path, clients: int, rounds: int, local_steps: int,
                       config: str | Path | None = None, extra: list[str] | None = None):
    """The teachers' FedConfig: ``config`` (default configs/anomaly/teachers-fed.yaml) with the data, folder
    and sizes of this run."""
    from lowres.federated.config import load_fed_config

    path = find_config_file(config) if config else configs_dir() / FED_CONFIG
    return load_fed_config(path, [
        f"output_dir={folder}", f"clients={clients}", f"rounds={max(rounds, 1)}", f"local_steps={local_steps}",
        f"run.data.path={normal_txt}", f"robustness.min_available={clients}", "tracking.mlflow=false",
        *(extra or [])])


def prepare_teachers(fed):
    """Partitions (client-XX.jsonl) and the shared tokenizer, as the server prepares a federation."""
    from lowres.federated.preparation import prepare

    return prepare(fed, central_eval=False)


def _client_cfg(fed, prep, i: int, steps: int):
    """Client ``i``'s recipe for one-shot training. ``run_config`` pins max_steps to rounds × local_steps (the
    federation's LR schedule), so the one-shot length is set after it."""
    from lowres.config import RunConfig

    cfg = fed.run_config(i, extra=[f"data.path={prep.partitions[i]}", "data.max_examples=null",
                                   f"output_dir={Path(fed.output_dir) / 'clients' / f'oneshot-{i:02d}'}"])
    d = cfg.model_dump(mode="json")
    d["train"]["max_steps"] = steps
    return RunConfig.model_validate(d)


def train_local_teachers(fed, prep, steps: int) -> list[Teacher]:
    """One-shot: each client trains its own teacher on its own partition for ``steps``; no adapter travels."""
    from lowres.federated.client import client_state

    teachers = []
    for i in range(fed.clients):
        state = client_state(_client_cfg(fed, prep, i, steps), f"oneshot-{i:02d}", prep.tokenizer_dir)
        result = state.recipe.train(steps=steps)
        if result.stopped_by in ("SIGTERM", "SIGINT"):  # the recipe saved a checkpoint; the pipeline stops too
            from lowres.errors import Interrupted

            raise Interrupted(result.stopped_by, f"{result.stopped_by}: stopped while training teacher {i + 1} of "
                              f"{fed.clients} (step {result.step})", hint="run it again to start afresh")
        r = state.recipe
        teachers.append(Teacher(f"client-{i:02d}", r.model, r.tokenizer, r.cfg.data.max_length, r.precision))
    return teachers


def train_fedavg_teachers(fed) -> tuple[list[Teacher], Any]:
    """``fed.rounds`` rounds of FedAvg over the teachers' LoRA adapters; (the clients' teachers, FedResult).

    FedResult.rounds carry ``bytes_down``/``bytes_up`` per round, summed over clients (exact wire bytes)."""
    from lowres.federated.client import _CACHE
    from lowres.federated.client_app import app as client_app
    from lowres.federated.local_grid import LocalGrid
    from lowres.federated.server import run_federation

    before = set(_CACHE)
    result = run_federation(LocalGrid(client_app, fed.clients), fed)
    teachers = []
    fed_dir = str(Path(fed.output_dir))
    for key in [k for k in _CACHE if k not in before]:
        state = _CACHE[key]
        r = state.recipe
        if fed_dir in str(r.cfg.data.path):
            teachers.append(Teacher(state.key, r.model, r.tokenizer, r.cfg.data.max_length, r.precision))
    teachers.sort(key=lambda t: t.name)
    return teachers, result
