"""A small grid of candidates (precision/quantization × LoRA rank × batch): the starting set of the search."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lowres.advisor.estimate import Candidate, Estimate, estimate, largest_fitting_batch

# fp32 and bf16 unquantized, then the bitsandbytes bases; bf16 rows stay in on machines where bf16 is slow,
# flagged, so the table shows why they are not chosen.
PRECISIONS = (("fp32", "none"), ("bf16", "none"), ("fp32", "int8"), ("fp32", "nf4"), ("bf16", "nf4"))
RANKS = (8, 64)
BATCHES = (1, 4, 16)


@dataclass
class GridRow:
    """One precision/quantization × rank: estimates at each grid batch and at the largest batch that fits."""

    compute: str
    quant: str
    rank: int
    by_batch: dict[int, Estimate]
    max_batch: int
    at_max: Estimate | None

    def to_dict(self) -> dict[str, Any]:
        return {"compute": self.compute, "quant": self.quant, "rank": self.rank, "max_batch": self.max_batch,
                "by_batch": {str(b): est.to_dict() for b, est in self.by_batch.items()},
                "at_max": None if self.at_max is None else self.at_max.to_dict()}


def candidate_grid(spec: Any, hw: Any, base: Candidate, *, precisions=PRECISIONS, ranks=RANKS,
                   batches=BATCHES, max_batch: int = 4096, **kwargs: Any) -> list[GridRow]:
    """Estimate every precision/quant × rank of the grid at each batch in ``batches`` and at its largest
    fitting batch; the other knobs (length, targets, checkpointing, loss chunks) come from ``base``."""
    rows = []
    for compute, quant in precisions:
        for rank in ranks:
            cand = base.model_copy(update={"compute": compute, "quant": quant, "lora_rank": rank})
            by_batch = {b: estimate(spec, hw, cand.model_copy(update={"batch_size": b}), **kwargs)
                        for b in batches}
            best = largest_fitting_batch(spec, hw, cand, max_batch=max_batch, **kwargs)
            at_max = (estimate(spec, hw, cand.model_copy(update={"batch_size": best}), **kwargs)
                      if best else None)
            rows.append(GridRow(compute, quant, rank, by_batch, best, at_max))
    return rows
