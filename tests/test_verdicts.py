"""Any divergence is a verdict (issue 22, item 1): a system returning another layout, a NaN, a module called
once too often, a system raising while it is built or runs -- each is a FAIL with its reason, the report is
written and the command line exits 1 (exit 3 stays for bugs of the harness itself). And the HF side feeding a
norm the flattened tokens (a layout only) is compared after a reshape and says so, instead of ending the run.

Each broken system is system ``parity`` with one fault, registered for the test under its own name and run
through the command line (``parity.cli.main``) as a user would.
"""
from __future__ import annotations

import json
import types

import pytest
import torch

from parity import cli, registry
from parity.cases import load_case
from parity.engine.launch import cpu_threads
from parity.engine.pipeline import run

CASE = "gemma4-text-tiny"


def _system(fault: str):
    """System ``parity`` with one planted fault (a subclass, built fresh per run)."""
    from parity.systems.ours import ParitySystem

    class Broken(ParitySystem):
        name = f"broken-{fault}"

        def build(self, kind, hf_config, **kw):
            if fault == "build":
                raise RuntimeError("planted: no kernel for this shape")  # BUG: the build raises
            super().build(kind, hf_config, **kw)
            layers = self.lm.decoder.layers
            if fault == "nan":  # BUG: one NaN in layer 2's post-feedforward norm output (token 0 of sequence 0)
                norm = layers[2].post_mlp_layernorm
                forward = norm.forward

                def with_nan(x):
                    y = forward(x).clone()
                    y.view(-1)[5] = float("nan")
                    return y
                norm.forward = with_nan
            if fault == "extra-call":  # BUG: layer 3 applies its post-attention norm twice
                layers[3].forward = types.MethodType(_norm_twice, layers[3])
            if fault == "crash":  # BUG: layer 4's dense MLP raises in its forward
                def crash(*a, **kw):
                    raise RuntimeError("planted: illegal memory access in the MLP kernel")
                layers[4].mlp.forward = crash

        def output(self, a, out, module, grad=False):
            y = super().output(a, out, module, grad)
            return _transposed(a, y) if fault == "transposed" else y

        def replay(self, a, module, call):
            y = super().replay(a, module, call)
            return _transposed(a, y) if fault == "transposed" else y

    return Broken()


def _norm_twice(self, hidden_states, attention_mask, rotary_pos_emb, **_):  # _: PLE / KV sharing (none here)
    """``Gemma4TransformerLayer.forward`` with the post-attention norm applied twice."""
    residual = hidden_states
    h = self.input_layernorm(hidden_states)
    h, _ = self.self_attention(h, attention_mask, rotary_pos_emb=rotary_pos_emb)
    h = residual + self.post_attention_layernorm(self.post_attention_layernorm(h))  # BUG: twice
    residual = h
    m, _ = self.mlp(self.pre_mlp_layernorm(h))
    m1 = self.post_mlp_layernorm_1(m)
    m2 = self.moe(residual, self.pre_moe_layernorm(residual))
    m = m1 + self.post_moe_layernorm(m2)
    h = residual + self.post_mlp_layernorm(m)
    return h * self.layer_scalar


def _transposed(a, y):
    """BUG: layer 1's post-attention norm handed back in Megatron's [s, b, H] layout, not HF's [b, s, H]."""
    return y.transpose(0, 1) if a.hf == "model.layers.1.post_attention_layernorm" else y


def _factory(fault: str):
    return lambda: _system(fault)


FAULTS = ("transposed", "nan", "extra-call", "crash", "build")
for _fault in FAULTS:  # registry factories: ``tests.test_verdicts:broken_<fault>``
    globals()[f"broken_{_fault.replace('-', '_')}"] = _factory(_fault)


def _cli(monkeypatch, tmp_path, fault: str) -> tuple[int, dict]:
    """The command line on the broken system: its exit code, and the results.json it wrote beside index.html."""
    name = f"broken-{fault}"
    monkeypatch.setitem(registry.SYSTEMS, name, f"{__name__}:broken_{fault.replace('-', '_')}")
    out = tmp_path / fault
    code = cli.main(["run", "--case", CASE, "--system", name, "--out", str(out)])
    assert (out / "index.html").is_file(), "the report is written"
    return code, json.loads((out / "results.json").read_text())


def _first(r: dict) -> dict:
    return r["summary"]["first_divergence_detail"] or {}


def test_a_transposed_layout_fails_with_both_shapes(monkeypatch, tmp_path):
    code, r = _cli(monkeypatch, tmp_path, "transposed")
    assert code == 1 and r["passed"] is False
    assert r["summary"]["first_divergence"] == "model.layers.1.post_attention_layernorm"
    rows = [m for m in r["modules"] if m["name"] == "model.layers.1.post_attention_layernorm"]
    assert {m["mode"] for m in rows} == {"isolated", "end_to_end", "probing"}  # every replay, probes too
    for m in rows:  # the same elements in another order: compared after a reshape, and said so
        assert m["passed"] is False and m["rel_l2"] > 0.1, m
        assert m["layout"] == {"reference": [2, 40, 96], "test": [40, 2, 96], "compared": [2, 40, 96]}, m
        assert "layout differs" in m["detail"]
    assert "layout differs" in _first(r)["why"]


def test_a_nan_fails_as_non_finite(monkeypatch, tmp_path):
    code, r = _cli(monkeypatch, tmp_path, "nan")
    assert code == 1 and r["passed"] is False
    assert r["summary"]["first_divergence"] == "model.layers.2.post_feedforward_layernorm"
    d = _first(r)
    assert d["mode"] == "isolated" and d["why"] == "non-finite values: 1 in the system's output", d


def test_a_module_called_once_too_often_fails(monkeypatch, tmp_path):
    code, r = _cli(monkeypatch, tmp_path, "extra-call")
    assert code == 1 and r["passed"] is False
    assert r["summary"]["first_divergence"] == "model.layers.3.post_attention_layernorm"
    d = _first(r)
    assert d["mode"] == "end_to_end" and d["why"].startswith("called 2 times by the system, 1 times by HF"), d
    row = next(m for m in r["modules"] if m["name"] == d["name"] and m["mode"] == "end_to_end")
    assert row["calls"] == [1, 2]


def test_a_crash_in_forward_fails_at_the_module_that_raised(monkeypatch, tmp_path):
    code, r = _cli(monkeypatch, tmp_path, "crash")
    assert code == 1 and r["passed"] is False and r["checks"]["system"] is False
    assert [f["phase"] for f in r["failures"]] == ["end_to_end"]
    assert r["failures"][0]["method"] == "forward"
    assert "planted: illegal memory access" in r["failures"][0]["error"]
    assert r["failures"][0]["where"].endswith("in crash")
    # isolated replay still runs every module alone: the one that raises is named
    assert r["summary"]["first_divergence"] == "model.layers.4.mlp"
    d = _first(r)
    assert d["mode"] == "isolated" and "planted: illegal memory access" in d["why"], d
    assert r["summary"]["logits"]["why"].startswith("no logits from the system")
    assert any("running its forward" in f for f in r["summary"]["failures"])


def test_a_crash_while_building_is_a_failing_phase(monkeypatch, tmp_path):
    code, r = _cli(monkeypatch, tmp_path, "build")
    assert code == 1 and r["passed"] is False
    assert r["failures"] == [{"phase": "build", "method": "build",
                              "error": "RuntimeError: planted: no kernel for this shape",
                              "where": r["failures"][0]["where"]}]
    assert r["modules"] == [] and all(not m["ran"] for m in r["modes"])
    assert r["summary"]["failures"] == [("the system raised while building: build raised RuntimeError: planted: no "
                                         f"kernel for this shape (at {r['failures'][0]['where']})")]
    assert "test_verdicts.py:" in r["failures"][0]["where"] and r["failures"][0]["where"].endswith(" in build")


def test_a_harness_error_is_still_exit_3(monkeypatch, tmp_path, capsys):
    """An error of the engine itself (here its metrics) is a bug, not a verdict about the system."""
    from parity.engine import compare

    def broken(*a, **kw):
        raise ZeroDivisionError("planted harness bug")

    monkeypatch.setattr(compare, "_BY_TOKEN", broken)
    assert cli.main(["run", "--case", CASE, "--out", str(tmp_path / "h")]) == 3
    assert "internal error" in capsys.readouterr().err


def test_hf_feeding_a_norm_the_flattened_tokens_is_compared_after_a_reshape(monkeypatch):
    """The issue's HF-side wiring error: layer 1's post-attention norm called on [b*s, H]. Exit 3 before; now the
    row is compared after a reshape and says so (a layout only: the values agree, the run holds)."""
    from transformers.models.gemma4 import modeling_gemma4 as hf

    forward = hf.Gemma4TextDecoderLayer.forward

    class Flat(torch.nn.Module):  # present only while layer 1 runs: HF's own norm module is called on [b*s, H]
        def __init__(self, norm):
            super().__init__()
            self.norm = norm

        def forward(self, x):
            return self.norm(x.reshape(-1, x.shape[-1])).reshape(x.shape)

    def planted(self, hidden_states, *a, **kw):
        if self.layer_idx != 1:
            return forward(self, hidden_states, *a, **kw)
        norm = self.post_attention_layernorm
        self._modules["post_attention_layernorm"] = Flat(norm)  # BUG (a layout only): the norm on flat tokens
        try:
            return forward(self, hidden_states, *a, **kw)
        finally:
            self._modules["post_attention_layernorm"] = norm

    monkeypatch.setattr(hf.Gemma4TextDecoderLayer, "forward", planted)
    with cpu_threads("cpu"):
        r = run(load_case(CASE), device="cpu")
    assert r["passed"] is True
    e2e = next(m for m in r["modules"] if m["name"] == "model.layers.1.post_attention_layernorm"
               and m["mode"] == "end_to_end")
    assert e2e["layout"] == {"reference": [80, 96], "test": [2, 40, 96], "compared": [80, 96]}
    assert e2e["detail"].startswith("layout differs") and e2e["passed"] is True


@pytest.mark.parametrize("ref_shape,test_shape", [((2, 40, 96), (2, 40, 95)), ((80, 96), (2, 41, 96))])
def test_another_size_is_a_failing_row_with_both_shapes(ref_shape, test_shape):
    from parity.engine.alignment import Aligned, Kind, Row
    from parity.engine.compare import Where, compare

    m = compare(Kind.NORM, torch.zeros(ref_shape), torch.zeros(test_shape), Where(valid=torch.ones(2, 40).bool()))
    assert m["rel_l2"] == float("inf") and m["layout"] == {"reference": list(ref_shape), "test": list(test_shape),
                                                           "compared": None}
    assert "the element counts differ" in m["detail"]
    del Aligned, Row
