"""The comparison modes are a list of data: each names a module that runs it, the gates and reports read the
list, a new mode is one module plus one line, and a mode a system cannot serve is skipped with its reason."""
from __future__ import annotations

import dataclasses

from parity.cases import load_case
from parity.engine import modes as M
from parity.engine.launch import cpu_threads
from parity.engine.modes import MODES, Mode

ECHO = "echo"


def test_every_mode_names_a_module_that_runs_it():
    assert len({m.name for m in MODES}) == len(MODES)
    for mode in MODES:
        impl = mode.implementation()
        assert callable(impl.run), mode.name
        assert callable(getattr(impl, "floors", None)) == mode.floors, mode.name
        assert mode.gates in ("run", "float32") and mode.when in ("always", "bf16_single", "single", "train", "lora")
        assert mode.gate_key in ("rel_l2", "grad_rel_l2")
    assert M.PLOTTED == ("isolated", "end_to_end")
    assert [m.name for m in MODES if m.replay] == ["isolated", "fp32_replay", "probing", "isolated_backward"]
    assert M.rank("isolated") < M.rank("fp32_replay") < M.rank("end_to_end") < M.rank("no such mode")


def test_why_a_mode_does_not_run():
    fp32 = M.get("fp32_replay")

    class Bare:
        name = "bare"

    one, two = load_case("gemma4-text-tiny"), load_case("gemma4-text-tiny-tp2")
    assert fp32.why_not(one, "float32", Bare()) == "a float32 run: nothing to replay in fp32"
    assert fp32.why_not(two, "bfloat16", Bare()) == "runs of one process only (this run has 2)"
    assert fp32.why_not(one, "bfloat16", Bare()) == "bare has no module, replay, fp32"
    Bare.module = Bare.replay = Bare.fp32 = lambda self, *a: None
    assert fp32.why_not(one, "bfloat16", Bare()) is None
    assert M.get("backward").why_not(one, "float32") == "not a train case (no [train] table)"
    assert M.get("grad_input") is M.get("backward")  # its rows' mode values lead to it


# --- a new mode: this module is its implementation (``run``), one ``Mode`` line adds it -------------------------

def run(c, prog) -> None:
    """Each decoder layer's isolated replay again, written as mode ``echo`` (what a new mode's rows look like)."""
    import torch

    from parity.engine.compare import value

    for a in c.rows:
        planned = c.replay_input(a)
        if a.row.kind.value != "layer" or planned is None:
            continue
        name, module, call = planned
        with torch.no_grad():
            c.record(a, ECHO, value(a.row.kind, call.output), c.sut.replay(a, module, call), name=name)


def _run(monkeypatch, case: str, mode: Mode | None = None, system: str = "parity") -> dict:
    from parity.engine.pipeline import run as run_case

    if mode is not None:
        monkeypatch.setattr(M, "MODES", MODES + (mode,))
    with cpu_threads("cpu"):
        return run_case(load_case(case), device="cpu", system=system)


def test_a_new_mode_is_one_module_and_one_line(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "parity.engine.modes.echo", sys.modules[__name__])  # as if it lived there
    r = _run(monkeypatch, "gemma4-text-tiny", Mode(ECHO, "echo replay", "echo", rank=1, replay=True))
    echo = [m for m in r["modules"] if m["mode"] == ECHO]
    assert [m["name"] for m in echo] == [f"model.layers.{i}" for i in range(len(r["layer_types"]))]
    for m in echo:  # judged by the case's fp32 gates like every row, and identical to its isolated twin
        twin = next(x for x in r["modules"] if x["name"] == m["name"] and x["mode"] == "isolated")
        assert m["gate"] == {"metric": "rel_l2", "max": 1e-5} and m["passed"] is True
        assert m["rel_l2"] == twin["rel_l2"] and m["megatron_name"] == twin["megatron_name"]
    assert {"name": ECHO, "label": "echo replay", "ran": True} in r["modes"] and r["passed"] is True


class _NoFp32:
    """System ``parity`` without an fp32 copy of its layers: the fp32 replay is skipped, and says why."""

    def __new__(cls):
        from parity.systems.ours import ParitySystem

        class NoFp32(ParitySystem):
            name = "no-fp32"
            fp32 = None
        return NoFp32()


def test_a_mode_the_system_cannot_serve_is_skipped_with_its_reason(monkeypatch):
    from parity import registry

    monkeypatch.setitem(registry.SYSTEMS, "no-fp32", f"{__name__}:_NoFp32")
    r = _run(monkeypatch, "gemma4-text-tiny-bf16", system="no-fp32")
    assert {"name": "fp32_replay", "label": "fp32 replay", "ran": False, "why": "no-fp32 has no fp32"} in r["modes"]
    assert not [m for m in r["modules"] if m["mode"] == "fp32_replay"]
    # the truth gate of the replays comes with the fp32 replay (probing rows measure their own)
    assert not [m for m in r["modules"] if "truth_rel_l2" in m and m["mode"] != "probing"]
    assert [m["name"] for m in r["modes"] if m["ran"]] == ["roundtrip", "end_to_end", "isolated", "tables", "probing"]


def test_modes_are_recorded_in_the_report(monkeypatch, tmp_path):
    from parity.report.html import render_run

    r = _run(monkeypatch, "gemma4-text-dense-tiny")
    html = render_run(r, None)
    assert 'id="modes">modes: round trip, end-to-end, isolated, masks and RoPE, probing · not run — fp32 replay: ' \
           'a float32 run: nothing to replay in fp32' in html
    assert dataclasses.is_dataclass(M.get("isolated"))


class _NoTraining:
    """System ``parity`` whose adapter does not model training yet (it says so with ``NotImplementedError``)."""

    def __new__(cls):
        from parity.systems.ours import ParitySystem

        class NoTraining(ParitySystem):
            name = "no-training"

            def train_loss(self, inputs, labels):
                raise NotImplementedError("its training path is not wired here")
        return NoTraining()


def test_a_mode_the_adapter_does_not_model_yet_is_not_run_not_a_verdict(monkeypatch):
    from parity import registry

    monkeypatch.setitem(registry.SYSTEMS, "no-training", f"{__name__}:_NoTraining")
    r = _run(monkeypatch, "gemma4-text-tiny-train", system="no-training")
    backward = next(m for m in r["modes"] if m["name"] == "backward")
    assert backward == {"name": "backward", "label": "backward", "ran": False,
                        "why": "no-training does not model it yet: its training path is not wired here"}
    assert r["passed"] is True and not r.get("failures")
    # the isolated backward does not need its training path (each module alone, its loss alone): it still runs
    assert r["checks"]["gradients"] is True and {m["mode"] for m in r["modules"] if "grad" in m["mode"]} == {
        "isolated_grad_input", "isolated_param_grad"}
    assert not [m for m in r["modules"] if m["mode"] in ("loss", "grad_output", "grad_input", "param_grad")]
