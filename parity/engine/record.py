"""One compared row of a run, typed: what a mode measured, then what the gates decided.

A mode makes a ``Record`` with ``Record.measured`` (a metric dict of ``parity.engine.compare``) or
``Record.reported`` (a row shown with the reason it has no metric); ``parity.engine.gates`` fills the verdict
fields; ``to_dict`` writes the row as results.json holds it (optional fields only when set).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

_OPTIONAL = ("router", "detail", "shared", "truth_rel_l2", "missing", "agree_weight_rel_l2", "why", "unstable",
             "truth_gate", "truth_ratio", "compared_at", "layout", "calls", "raised", "probe", "example")
_MEASURED_ONLY = ("p99_abs", "nonfinite", "gate_class")  # not on reported rows


@dataclass
class Record:
    name: str  # the HF module path (HF is the reference)
    megatron_name: str | None
    mode: str
    kind: str  # ``Row.label``: ``qkv:q``, ``norm``, ``mask``, ...
    layer: int | None
    order: int  # HF's return order (first divergence: the lowest failing)
    group: str = "text"  # "text" | "vision"
    cosine: float | None = None
    rel_l2: float | None = None
    max_abs: float | None = None
    p99_abs: float | None = None
    nonfinite: tuple | None = None  # (reference, test) counts
    gate_class: str | None = None  # "module" | "exact"; None on a reported row (never gated)
    router: dict | None = None
    detail: str | None = None
    shared: bool = False  # the system runs HF's own code here: evidence only of its inputs
    missing: str | None = None  # a twin never called: fails with this reason
    truth_rel_l2: float | None = None  # its module (run dtype) against HF's in fp32 on the same inputs
    compared_at: str | None = None  # a reported row: where its effect is compared
    layout: dict | None = None  # shapes that differ: {reference, test, compared (the shape both were reshaped to, or
    # None when the element counts differ)}
    calls: list | None = None  # [HF, system]: how often each side called the module, when they differ (end to end)
    raised: str | None = None  # the system raised while running this row: the error and where (fails)
    probe: str | None = None  # a probing row: the transformed input it ran on (mode ``probing``)
    example: dict | None = None  # a probing row found by a search: the drawn (shrunk) parameters, to reproduce it
    # the verdict (parity.engine.gates)
    floor: float | None = None
    gate: dict | None = None
    ratio: float | None = None
    passed: bool = True
    why: str | None = None
    unstable: bool = False
    truth_gate: dict | None = None
    truth_ratio: float | None = None
    agree_weight_rel_l2: float | None = None

    @classmethod
    def measured(cls, a, megatron_name: str | None, mode: str, m: dict, order: int) -> "Record":
        """A row of aligned row ``a`` (``parity.engine.alignment.Aligned``) with metrics ``m``."""
        return cls(name=a.hf, megatron_name=megatron_name, mode=mode, kind=a.row.label, layer=a.layer, order=order,
                   group=a.group(), cosine=m.get("cosine"), rel_l2=m.get("rel_l2"), max_abs=m.get("max_abs"),
                   p99_abs=m.get("p99_abs"), nonfinite=(m.get("nonfinite_ref", 0), m.get("nonfinite_test", 0)),
                   gate_class=a.row.gate, router=m.get("router"), detail=m.get("detail") or None,
                   layout=m.get("layout"))

    @classmethod
    def reported(cls, a, mode: str, megatron_name: str | None, why: str, compared_at: str | None = None) -> "Record":
        """A row shown with the reason it has no metric in ``mode`` (never gated, never silent)."""
        return cls(name=a.hf, megatron_name=megatron_name, mode=mode, kind=a.row.label, layer=a.layer, order=0,
                   group=a.group(), detail=why, compared_at=compared_at)

    @classmethod
    def from_dict(cls, d: dict) -> "Record":
        """A row of a stored results.json (keys it lacks take their defaults)."""
        known = {f.name for f in fields(cls)}
        out = cls(**{k: v for k, v in d.items() if k in known})
        if isinstance(out.nonfinite, list):
            out.nonfinite = tuple(out.nonfinite)
        return out

    @property
    def reported_only(self) -> bool:
        return self.gate_class is None

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in _OPTIONAL and (v is None or v is False):
                continue
            if f.name in _MEASURED_ONLY and self.reported_only:
                continue
            out[f.name] = v
        return out
