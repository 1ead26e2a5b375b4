"""One system under test against one ``Reference``, row by row: what every mode reads and writes.

Names (the system's module of an aligned row, the module its replay runs, the inputs that replay gets) and
the records the modes measure; then the rows no mode measured: a twin never called (a failing record) and a
row the system has no module for (reported with where its effect is compared).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from parity.engine.alignment import TABLE_KINDS, Aligned, Kind
from parity.engine.compare import Call, Capture, compare, first, metrics
from parity.engine import modes as M
from parity.engine.record import Record
from parity.engine.system import Elsewhere


@dataclass
class Comparison:
    """The system ``sut`` against reference ``ref``; ``records`` (and, for a model kind with position groups,
    ``layer_groups``) grow as the modes measure rows; ``sections`` holds what a mode adds beside its rows."""

    sut: Any
    ref: Any  # parity.engine.reference.Reference
    records: list[Record] = field(default_factory=list)
    layer_groups: list = field(default_factory=list)
    reported: list[Record] = field(default_factory=list)  # rows shown with the reason they have no metric
    sections: dict = field(default_factory=dict)  # e.g. "roundtrip"
    logits: Any = None  # the system's end-to-end logits
    failures: list = field(default_factory=list)  # what the system raised in a phase (the pipeline's)

    @property
    def rows(self) -> list[Aligned]:
        return self.ref.rows

    @property
    def cap(self) -> Capture:
        return self.ref.cap

    @property
    def where(self):
        return self.ref.where

    def name(self, a: Aligned):
        """The system's name of a row: a module path (slots filled in), ``Elsewhere`` or None."""
        name = self.sut.names.get(a.row.name_key)
        return name.format(**a.slots) if isinstance(name, str) else name

    @staticmethod
    def sibling(a: Aligned, key: str) -> str:
        """The full HF path of name key ``key`` (slots of ``a`` filled in) in ``a``'s stack."""
        return a.hf[: len(a.hf) - len(a.row.hf.format(**a.slots))] + key.format(**a.slots)

    def replay_name(self, a: Aligned):
        """The system's name of the module a replay runs for ``a`` (its ``Replay``'s, else ``name``)."""
        plan = self.sut.replays.get(a.row.name_key)
        return self.name(a) if plan is None else plan.module.format(**a.slots)

    def replay_input(self, a: Aligned, cap: Capture | None = None, module_of=None) -> tuple[str, Any, Call] | None:
        """(module name, module, the call it replays: HF's captured inputs, the HF row's output) for ``a``; None
        where nothing can be replayed. Inputs: the outputs of the row's ``feeds`` (inline steps), else the
        captured inputs of the HF row its ``Replay`` names, else the row's own; from ``cap`` (default: the
        reference's capture) and modules by ``module_of`` (default: the system's ``module``)."""
        cap, module_of = cap or self.cap, module_of or self.sut.module
        name, call = self.replay_name(a), cap.first(a.hf)
        if a.row.kind in TABLE_KINDS or not isinstance(name, str) or call is None:
            return None
        module, feeds = module_of(name), [cap.first(n) for n in a.feeds]
        plan = self.sut.replays.get(a.row.name_key)
        source = cap.first(self.sibling(a, plan.on)) if plan is not None and plan.on else call
        if None in feeds or source is None or (module is None and not a.feeds):
            return None
        if feeds:
            return name, module, Call(tuple(first(f.output) for f in feeds), {}, call.output, call.order)
        return name, module, Call(source.args, source.kwargs, call.output, call.order)

    def order(self, a: Aligned) -> int:
        """HF's return order of ``a`` (the logits after ``lm_head``)."""
        if a.row.kind is Kind.LOGITS:
            return self.cap.order.get("lm_head", max(self.cap.order.values(), default=0)) + 1
        return self.cap.order.get(a.hf, 0)

    def record(self, a: Aligned, mode: str, ref, test, m_: dict | None = None, name: str | None = None,
               where=None) -> Record:
        """Measure ``test`` against ``ref`` (both in ``a``'s layout) and keep the row. ``where``: the real
        positions of inputs other than the run's (a probe's); such rows have no position-group metrics."""
        m_ = compare(a.row.kind, ref, test, where or self.where) if m_ is None else m_
        rec = Record.measured(a, self.name(a) if name is None else name, mode, m_, self.order(a))
        rec.shared = a.row.name_key in self.sut.shared
        if self.ref.groups is not None and a.row.kind is Kind.LAYER and where is None:
            self.layer_groups.append({"name": a.hf, "mode": mode, "layer": a.layer,
                                      **_group_metrics(ref, test, self.ref.groups)})
        self.records.append(rec)
        return rec

    def raised(self, a: Aligned, mode: str, name: str | None, error) -> Record:
        """A row the system raised on (``parity.engine.system.SystemRaised``): a failing record with the error."""
        rec = Record.measured(a, name, mode, {}, self.order(a))
        rec.raised = f"the system raised: {error.text}"
        self.records.append(rec)
        return rec

    def not_run(self, a: Aligned, mode: str, name: str, why: str) -> None:
        """A row the system's module cannot be run for in ``mode``: reported with ``why``."""
        self.reported.append(Record.reported(a, mode, name, why))

    def silent(self) -> None:
        """No silent rows: every row the system has a module for yields a record in every mode that measures
        every row; a twin never called (either side) is a failing record with that reason."""
        seen = {(r.name, r.mode) for r in self.records + self.reported}
        for a in self.rows:
            if a.row.kind in TABLE_KINDS:
                continue
            for mode in (m for m in M.MODES if m.every_row):
                name = self.replay_name(a) if mode.replay else self.name(a)
                if (a.hf, mode.name) in seen or not isinstance(name, str):
                    continue
                hf_missing = self.cap.first(a.hf) is None or any(self.cap.first(n) is None for n in a.feeds)
                stopped = next((f for f in self.failures if f["phase"] == mode.name), None)
                why = (f"HF module {a.hf} was never called" if hf_missing else
                       f"not reached: the system raised first ({stopped['method']}: {stopped['error']})"
                       if stopped else
                       f"{self.sut.name} module {name} could not be replayed" if mode.replay else
                       f"{self.sut.name} module {name} was never called")
                rec = Record.measured(a, name, mode.name, {}, self.cap.order.get(a.hf, 0))
                rec.missing = why
                self.records.append(rec)

    def unobserved(self) -> list[Record]:
        """Rows the system has no module for (``Elsewhere``), reported with where their effect is compared (a
        row it still replays, by a ``Replay`` plan, only in the modes that do not replay); and the rows it could
        not run alone."""
        out = list(self.reported)
        for a in self.rows:
            where = self.name(a)
            if not isinstance(where, Elsewhere):
                continue
            at = self.sibling(a, where.at)
            for mode in M.MODES:
                if mode.every_row and not (mode.replay and a.row.name_key in self.sut.replays):
                    out.append(Record.reported(a, mode.name, None, f"{where.why}: compared at {at}", compared_at=at))
        return out


def _group_metrics(ref, test, groups: dict) -> dict:
    out = {}
    for g, mask in groups.items():
        m_ = metrics(ref, test, mask) if bool(mask.any()) else None
        out[g] = None if m_ is None else {k: m_[k] for k in ("cosine", "rel_l2", "max_abs", "numel")}
    return out
