"""An example strategy for `lowres fed` (strategy.name: configs/fed/strategies/example_strategy.py:LargestClientsEqualMean).

A strategy is any class with the three methods below (lowres/federated/strategies.py; README, "Strategies").
lowres screens every update (NaN/Inf, shapes, norm) and caps self-reported counts before a strategy sees
them; the built-in steps are plain functions (``select_clients``, ``aggregate``, ``weighted_eval``) to reuse.

This one:
- selects the ``clients_per_round`` clients holding the most training records (what each client reported
  before its first round), leaving out any that report less than ``min_free_memory_gb`` free;
- aggregates with every client counting once, whatever its size (an equal-weight mean of the updates, per
  LoRA rank slot), scaled by a server learning rate ``server_lr``;
- evaluates as FedAvg does (weighted by examples) and adds the worst client's loss, the figure a federation
  that must serve every client watches (logged as fed/federated_eval_worst_loss).
"""

from lowres.federated.strategies import weighted_eval
from lowres.federated.strategy import aggregate


class LargestClientsEqualMean:
    def __init__(self, clients_per_round: int = 2, min_free_memory_gb: float = 0.0, server_lr: float = 1.0):
        if clients_per_round < 1 or server_lr <= 0:
            raise ValueError(f"clients_per_round ({clients_per_round}) must be ≥ 1 and server_lr ({server_lr}) > 0")
        self.k, self.min_free, self.server_lr = clients_per_round, min_free_memory_gb * 2**30, server_lr

    def select(self, server_round, clients, count):
        """The k clients with the most records among those with enough free memory (ties: lower node id)."""
        roomy = [c for c in clients if c.figures.get("free_memory_bytes", float("inf")) >= self.min_free]
        roomy.sort(key=lambda c: (-c.figures.get("num_records", 0), c.node))
        return roomy[:self.k]

    def aggregate_train(self, server_round, global_tensors, updates, weights):
        """global + server_lr × (equal-weight mean of the updates)."""
        mean = aggregate(global_tensors, updates, [1.0] * len(updates))
        return {k: g + self.server_lr * (mean[k] - g) for k, g in global_tensors.items()}

    def aggregate_evaluate(self, server_round, evals):
        out = weighted_eval(evals)
        if evals:
            out["worst_loss"] = max(e.loss for e in evals)
        return out
