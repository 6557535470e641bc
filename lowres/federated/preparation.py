"""What the server sets up before round 1, and its centralised evaluation.

    prep = prepare(fed)        # partitions, shared tokenizer, held-out eval set, initial or resumed global adapter
    loss = central_eval(prep, tensors)
    figures = central_figures(prep, tensors)     # central_eval_loss, central_eval_accuracy
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lowres.federated.config import FedConfig
from lowres.federated.global_state import latest_global


@dataclass
class Prepared:
    """What the server sets up before round 1."""

    fed_dir: Path
    tokenizer_dir: str | None
    partitions: list[str]
    global_tensors: dict[str, np.ndarray]
    start_round: int  # 1, or the round after the last saved one
    central: Any = None  # the recipe whose model evaluates the global adapter (None: no holdout)
    central_blocks: Any = None


def prepare(fed: FedConfig, central_eval: bool = True) -> Prepared:
    """Partitions (one JSONL per simulated client), the shared tokenizer, the held-out central eval set, and
    the initial global adapter — or the last saved one, so a restarted server resumes."""
    from lowres.data import read_records
    from lowres.federated.client import FedRecipe, lora_tensors, shared_tokenizer
    from lowres.federated.partition import dirichlet, holdout, iid, labels_of, write_partitions

    fed_dir = Path(fed.output_dir)
    fed_dir.mkdir(parents=True, exist_ok=True)
    base = fed.run_config()
    records = read_records(base.data)
    p = fed.partition
    central, rest = holdout(records, p.holdout, p.seed)
    if p.scheme == "iid":
        parts = iid(len(rest), fed.clients, p.seed)
    else:
        parts = dirichlet(labels_of(rest, p.label), fed.clients, p.alpha, p.seed)
    partitions = [str(x) for x in write_partitions(rest, parts, fed_dir / "partitions")]
    tokenizer_dir = shared_tokenizer(records, base, fed_dir / "tokenizer")

    # The server's model: the largest rank of the federation, seeded like the clients' (same base).
    rank = fed.max_rank()
    central_path = fed_dir / "central.jsonl"
    central_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in (central or rest[:1])))
    server_cfg = fed.run_config(extra=[f"lora.rank={rank}", f"lora.alpha={base.lora.alpha * rank / base.lora.rank}",
                                       f"data.path={central_path}", "data.eval_fraction=0",
                                       f"output_dir={fed_dir / 'server'}", "data.max_examples=null"])
    recipe = FedRecipe(server_cfg, tokenizer_dir, progress=False).setup()
    resumed = latest_global(fed_dir / "global")
    if resumed is not None and resumed[2].get("federation") == fed.federation:
        start, tensors = resumed[0] + 1, resumed[1]
    else:
        start, tensors = 1, lora_tensors(recipe.model)
    use_central = central_eval and bool(central)
    return Prepared(fed_dir, tokenizer_dir, partitions, tensors, start,
                    recipe if use_central else None, recipe.data.train if use_central else None)


def central_eval(prep: Prepared, tensors: dict[str, np.ndarray]) -> float | None:
    """Eval loss of ``tensors`` on the server's held-out records."""
    return central_figures(prep, tensors).get("central_eval_loss")


def central_figures(prep: Prepared, tensors: dict[str, np.ndarray]) -> dict[str, float]:
    """``central_eval_loss`` and ``central_eval_accuracy`` (top-1 next-token accuracy) of ``tensors`` on the
    server's held-out records; {} without a holdout."""
    if prep.central is None:
        return {}
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from lowres.train.evaluation import evaluate
    from lowres.federated.wire import numpy_to_state

    r = prep.central
    set_peft_model_state_dict(r.model, numpy_to_state(tensors, get_peft_model_state_dict(r.model)))
    res = evaluate(r.model, prep.central_blocks, r.cfg.train.batch_size, r.cfg.train.loss_chunk_tokens, None,
                   r.precision, r.device, accuracy=True)
    return {} if res is None else {"central_eval_loss": float(res["loss"]), "central_eval_accuracy": res["accuracy"]}
