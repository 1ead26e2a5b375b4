"""``Progress``: phases and their named parts, as a run's results and the bench records carry them."""
from __future__ import annotations

import time

from parity.engine.progress import Progress


def test_parts_sum_within_their_phase():
    prog = Progress(False)
    with prog.phase("fp32_replay"):
        for _ in range(3):
            with prog.part("hf_layer"):
                time.sleep(0.01)
        with prog.part("truth"):
            pass
    with prog.phase("probing"), prog.part("hf_layer"):  # the same part name in another phase: its own entry
        time.sleep(0.005)
    assert set(prog.parts) == {"fp32_replay.hf_layer", "fp32_replay.truth", "probing.hf_layer"}
    assert 0.03 <= prog.parts["fp32_replay.hf_layer"] <= prog.phases["fp32_replay"]
    assert prog.parts["fp32_replay.truth"] < 0.01
    assert 0.005 <= prog.parts["probing.hf_layer"] <= prog.phases["probing"]


def test_a_part_is_charged_when_it_raises():
    prog = Progress(False)
    try:
        with prog.phase("p"), prog.part("x"):
            raise ValueError
    except ValueError:
        pass
    assert "p.x" in prog.parts and "p" in prog.phases and prog._phase is None
