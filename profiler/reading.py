"""The one record every sampler produces and every sink consumes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading: when, which metric (a name from ``metric_catalog``), its value in base units, labels.

    Labels are few and bounded (e.g. ``gpu``, ``cpu``, ``device``, ``phase``); never a step or a timestamp.
    """

    ts: float
    name: str
    value: float
    labels: tuple[tuple[str, str], ...] = field(default=())

    def label(self, key: str, default: str | None = None) -> str | None:
        for k, v in self.labels:
            if k == key:
                return v
        return default

    def to_dict(self) -> dict:
        return {"ts": self.ts, "name": self.name, "value": self.value, "labels": dict(self.labels)}

    @classmethod
    def from_dict(cls, d: dict) -> "Sample":
        return cls(float(d["ts"]), str(d["name"]), float(d["value"]), tuple(sorted((d.get("labels") or {}).items())))
