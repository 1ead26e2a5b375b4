"""The comparison modes: what a run measures of a system against the HF reference, as a list of data.

Each ``Mode`` says its name (as results.json writes it), its label and colour in reports, whether it feeds
both sides the same captured inputs (a *replay*: a module failing there is at fault itself), its rank when
one module fails in several modes (the first divergence names the lowest), which gate section of the case
file judges its rows, whether HF's bf16 noise floors are measured for it, when it runs, and the module that
implements it. An implementation module has ``run(comparison, progress)`` and, with ``floors``,
``floors(reference, progress) -> {HF name: floor}`` (parity.engine.pipeline calls both). Adding a mode is
one module under ``parity.engine.modes`` plus its line here; gates, the report and the pytest plugin read
this list. Pure data: the report imports it without torch.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Mode:
    name: str  # results.json ``mode`` of its rows (a mode without rows of its own: its section's key)
    label: str  # in reports
    module: str  # parity.engine.modes.<module>: its ``run`` (and ``floors``)
    color: str = "#57606a"
    replay: bool = False  # both sides fed HF's captured inputs: a row failing here is at fault itself
    rank: int = 9  # at one module failing in several modes, the first divergence names the lowest rank
    gates: str = "run"  # "run": the case's gates of the run's dtype; "float32": its fp32 gates in any run
    floors: bool = False  # bf16 runs measure HF-bf16 against HF-fp32 in this mode (each row's noise floor)
    every_row: bool = False  # every row the system has a module for yields a record (else a failing one)
    when: str = "always"  # "always" | "bf16_single": bf16 runs of one process (the fp32 replay)
    records_as: str | None = None  # its rows are written with this mode's name (tables: end_to_end rows)

    def runs(self, dtype: str, world_size: int) -> bool:
        return self.when == "always" or (dtype != "float32" and world_size == 1)

    def implementation(self):
        return importlib.import_module(f"parity.engine.modes.{self.module}")


MODES = (  # in the order a run measures them
    Mode("roundtrip", "round trip", "roundtrip"),
    Mode("end_to_end", "end-to-end", "end_to_end", color="#bc4c00", rank=2, floors=True, every_row=True),
    Mode("isolated", "isolated", "isolated", color="#0969da", replay=True, rank=0, floors=True, every_row=True),
    Mode("fp32_replay", "fp32 replay", "fp32_replay", color="#8250df", replay=True, rank=1, gates="float32",
         when="bf16_single"),
    Mode("tables", "masks and RoPE", "tables", records_as="end_to_end"),
)
BY_NAME = {m.name: m for m in MODES}
REPLAYS = tuple(m.name for m in MODES if m.replay)  # modes feeding both sides the same captured inputs
PLOTTED = tuple(m.name for m in sorted(MODES, key=lambda m: m.rank) if m.every_row)  # drawn layer by layer


def label(name: str | None) -> str:
    mode = BY_NAME.get(name or "")
    return mode.label if mode else (name or "")


def rank(name: str) -> int:
    mode = BY_NAME.get(name)
    return mode.rank if mode else 3
