"""Sensitivity of the comparison (issue 11, item 8): a relative error planted in one module of layer 0 (a norm
weight, a projection, the routing weights, an expert output; ``tests/plants.py`` ``sensitivity_plant``) is
caught and localised at that module down to the sizes ``bench/detection-sensitivity-*.json`` record, and
below the fp32 gate (1e-5) no module row fails: detection is the gate, not noise.

The HF side is built, captured and floored once per dtype (``parity.engine.pipeline.reference``); only the
Megatron side re-runs per plant, against that one reference (``pipeline.against``).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from parity.cases import load_case
from tests.plants import CASES, SENSITIVITY, Unrepresentable, exceeds, perturbed, sensitivity_plant

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = list(SENSITIVITY)
WEIGHTS = [c for c in CLASSES if SENSITIVITY[c][1] is not None]


class Runs:
    """``runs(dtype, plant)``: the padded tiny case of ``dtype`` on CPU (one thread, as ``execute``) with ``plant``
    planted; one HF reference per dtype, kept while that dtype's runs last."""

    def __init__(self):
        self.dtype, self.ref = None, None

    def __call__(self, dtype: str, plant=None) -> dict:
        from parity.engine import pipeline
        from parity.engine.launch import cpu_threads

        with cpu_threads("cpu"):
            if dtype != self.dtype:
                self.close()
                self.ref, self.dtype = pipeline.reference(load_case(CASES[dtype]), device="cpu"), dtype
            with pytest.MonkeyPatch.context() as mp:
                if plant is not None:
                    plant.plant(mp, None)
                return pipeline.against(self.ref, "parity")

    def close(self):
        if self.ref is not None:
            self.ref.close()
        self.dtype = self.ref = None


@pytest.fixture(scope="module")
def runs():
    r = Runs()
    yield r
    r.close()


def _explain(r: dict) -> str:
    bad = sorted((m for m in r["modules"] if not m["passed"]), key=lambda m: (m["order"], m["mode"]))
    return f"passed={r['passed']} first_divergence={r['summary']['first_divergence']!r} " + "; ".join(
        f"{m['name']} [{m['mode']}] {m['gate']['metric']}={m.get(m['gate']['metric'])} gate={m['gate']['max']}"
        for m in bad[:4])


def _caught(r: dict, where: str) -> dict:
    assert r["passed"] is False, _explain(r)
    assert r["summary"]["first_divergence"] == where, _explain(r)
    rows = [m for m in r["modules"] if m["name"] == where and not m["passed"]]
    assert rows and all(exceeds(m) for m in rows), _explain(r)
    detail = r["summary"]["first_divergence_detail"]
    assert detail["value"] > detail["gate"], detail
    return detail


@pytest.mark.parametrize("cls", CLASSES)
def test_fp32_below_the_gate_no_module_fails(runs, cls):
    """1e-7 is a hundred times under the fp32 gate: no module row fails and nothing diverges. The runtime errors
    pass outright; a weight error still fails the bit-exact weight round trip, the one check that sees it."""
    plant = sensitivity_plant(cls, 1e-7)
    r = runs("float32", plant)
    assert r["summary"]["first_divergence"] is None and r["summary"]["n_failed"] == 0, _explain(r)
    assert r["summary"]["logits"]["rel_l2"] <= 1e-6
    weight = cls in WEIGHTS
    assert r["checks"] == {"logits": True, "modules": True, "router": True, "roundtrip": not weight}, r["checks"]
    assert r["passed"] is (not weight)
    if weight:
        assert r["roundtrip"]["bit_exact"] == r["roundtrip"]["tensors"] - 1


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # dtype outermost: one HF reference each
def test_a_1e3_error_is_caught_at_its_module(runs, dtype, cls):
    plant = sensitivity_plant(cls, 1e-3)
    detail = _caught(runs(dtype, plant), plant.where)
    assert 0.8e-3 <= plant.info["rel_l2"] <= 1.25e-3, plant.info  # the error planted is the error asked for
    if dtype == "float32":  # fp32 gates: 1e-5 on every module, and the planted module's error is ~eps
        assert detail["gate"] == 1e-5 and 0.5e-3 <= detail["value"] <= 2e-3, detail


@pytest.mark.parametrize("cls", ["routing weights", "expert output"])
def test_bf16_catches_1e5_in_the_fp32_replay(runs, cls):
    """Far below bf16's own noise (floors ~1e-3 to 1e-2 here): the fp32 replay rows, gated at fp32's 1e-5, see a
    1e-5 relative error of the routing weights / expert output, and only there."""
    plant = sensitivity_plant(cls, 1e-5)
    detail = _caught(runs("bfloat16", plant), plant.where)
    assert detail["mode"] == "fp32_replay" and detail["gate"] == 1e-5, detail
    assert 1e-5 < detail["value"] < 1.01e-5, detail


def test_bf16_projection_catches_1e4_of_one_ulp_moves(runs):
    """A 1e-4 relative error of a bf16 weight is a handful of one-ulp moves (a dense x (1 + 1e-4 N) would round
    back to the same tensor): caught in the fp32 replay of o_proj."""
    plant = sensitivity_plant("projection", 1e-4)
    detail = _caught(runs("bfloat16", plant), plant.where)
    assert plant.info["method"] == "ulp" and 1 <= plant.info["changed"] <= 10, plant.info
    assert detail["mode"] == "fp32_replay" and detail["gate"] == 1e-5, detail


def test_perturbed_is_deterministic_and_realises_eps():
    torch.manual_seed(0)
    norm = (1 + 0.1 * torch.randn(96)).to(torch.bfloat16)
    proj = (0.05 * torch.randn(96, 128)).to(torch.bfloat16)
    for w, eps, method in ((proj.float(), 1e-6, "dense"), (proj, 1e-2, "dense"), (proj, 1e-3, "ulp"),
                           (proj, 1e-4, "ulp"), (norm, 1e-3, "ulp")):
        info, before = {}, w.clone()
        out = perturbed(w, eps, info=info)
        assert torch.equal(w, before)  # a new tensor: HF's own weights are never touched
        assert torch.equal(out, perturbed(w, eps)) and out.dtype == w.dtype  # seeded: the same tensor again
        assert info["method"] == method and 0.8 * eps <= info["rel_l2"] <= 1.25 * eps, (eps, info)
        if method == "ulp":  # only one-ulp moves: each changed element is its bf16 neighbour
            changed = out != w
            assert info["changed"] == int(changed.sum()) < w.numel()
            bits = (out.view(torch.int16).int() - w.view(torch.int16).int())[changed]
            assert set(bits.abs().tolist()) == {1}
    # x (1 + 1e-4 N) in bf16 rounds back to the very same tensor: the dense form would plant nothing
    assert torch.equal((proj.float() * (1 + 1e-4 * torch.randn(proj.shape))).to(torch.bfloat16), proj)
    with pytest.raises(Unrepresentable, match="nearest it carries is 0.000"):  # one ulp of one of 96 is ~8e-4
        perturbed(norm, 1e-4)


def test_unknown_class_is_refused():
    with pytest.raises(KeyError, match="unknown sensitivity class 'bias'"):
        sensitivity_plant("bias", 1e-3)


def test_the_sensitivity_sweep_runs_end_to_end(tmp_path):
    """``scripts/gpu_plants.py --sensitivity`` on the tiny fp32 case, two classes, eps 1e-3 then 1e-7: each class is
    caught at 1e-3 and stops at 1e-7 (no module fails), and the record says so."""
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "gpu_plants.py"), "--sensitivity", "--case-inputs",
           "--case", CASES["float32"], "--device", "cpu", "--eps", "1e-3,1e-7",
           "--classes", "projection,expert output", "--out", str(tmp_path)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    table = json.loads((tmp_path / f"detection-sensitivity-{CASES['float32']}-cpu.json").read_text())
    assert table["eps_tried"] == [1e-3, 1e-7] and table["classes"] == ["projection", "expert output"]
    assert table["clean"]["passed"] is True and table["runs"] == 4
    assert table["smallest_caught"] == {"projection": 1e-3, "expert output": 1e-3}
    for cls, res in table["results"].items():
        assert res["expected"] == SENSITIVITY[cls][0]
        caught, stop = res["points"]
        assert caught["outcome"] == "caught" and caught["first_divergence"] == res["expected"], caught
        assert caught["gate"] == 1e-5 and not math.isnan(caught["value"]) and caught["value"] > 1e-5
        assert stop["outcome"] == "missed" and stop["n_failed"] == 0 and stop["first_divergence"] is None, stop
        assert res["stopped_at"] == {"eps": 1e-7, "outcome": "missed"}
    assert table["results"]["projection"]["points"][1]["roundtrip_bit_exact"] is False  # what still sees it
    assert table["env"]["torch"] == torch.__version__
