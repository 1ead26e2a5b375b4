"""LoRA on the routed experts (issue 21): HF with peft's LoRA on the experts' parameters (``target_parameters``)
against Megatron-Bridge's recipe LoRA on its grouped experts (one adapter per layer shared by all experts, or one per
expert), on ``gemma4-text-tiny-lora-experts`` (the MLPs: HF's dense MLP and the routed experts).

Forward with adapters (end to end, isolated), the adapters' gradients (a shared adapter's against HF's per-expert
gradients summed over the experts), the merged export against peft's ``merge_and_unload``; its adapter export fails
(finding 18: the experts' adapters written transposed, which peft refuses to load). Its training step's findings 10,
11 and 2 are removed in the runs that judge the rest (``causes_removed``), as in ``tests/test_lora.py``. Planted
errors in the experts' adapter mapping fail at their row. System ``parity`` refuses the case (one line).

Skips (with the reason) where megatron-bridge or peft is not importable; the case-data tests run everywhere.
"""
from __future__ import annotations

import importlib.util
import math
import shutil

import pytest

from parity import mbridge, registry
from parity.cases import CaseError, load_case, parse_case
from tests.plants import EXPERT_LORA_PLANTS

OK, WHY = mbridge.available()
PEFT = importlib.util.find_spec("peft") is not None
needs_bridge = pytest.mark.skipif(not (OK and PEFT), reason=f"Megatron-Bridge or peft not importable: {WHY or 'peft'}")

CASE = "gemma4-text-tiny-lora-experts"
SYSTEM = "megatron-bridge"
LAYERS, EXPERTS, R = 6, 8, 4
EXPERT_TENSORS = [f"model.layers.{i}.experts{m}.lora_{t}.weight" for i in range(LAYERS) for m in (".base_layer", "")
                  for t in "AB"]


# ---------------------------------------------------------------------------------------------------
# Case data

def _lora(**fields):
    return load_case(CASE).replace(lora=fields)


def test_case_data_for_the_experts():
    case = load_case(CASE)
    assert case.lora.targets[-1] == "experts" and case.lora.experts == "shared" and case.lora.dropout == 0
    assert case.lora.modules == ("gate_proj", "up_proj", "down_proj")
    assert case.train.steps == 0 and case.system.name == SYSTEM
    assert 2 * case.model.overrides["moe_intermediate_size"] != 96  # gate_up's and down's adapters differ in shape
    assert _lora(experts="per_expert").lora.experts == "per_expert"
    with pytest.raises(CaseError, match=r"lora\.dropout: must be 0 with \"experts\" in targets \(peft's LoRA on "
                                        r"parameters refuses dropout\), got 0\.1"):
        _lora(dropout=0.1)
    with pytest.raises(CaseError, match=r"lora\.experts: expected one of shared, per_expert, got 'each'"):
        _lora(experts="each")
    with pytest.raises(CaseError, match=r"lora\.experts: only with \"experts\" in targets"):
        _lora(targets=["gate_proj", "up_proj", "down_proj"])
    data = load_case(CASE).to_dict()
    data["train"].pop("no_step")
    data["train"]["steps"] = 1
    with pytest.raises(CaseError, match=r"train\.steps: must be 0 with lora\.experts = \"shared\""):
        parse_case(data, source=CASE, stem=CASE)


def test_system_parity_refuses_expert_adapters_in_one_line():
    case = load_case(CASE)
    why = registry.unavailable("parity", case)
    assert why == ("system parity: LoRA on the routed experts: our experts (parity.models.text.Gemma4Experts) read "
                   "their stacked weights directly, with no linear module Megatron-Bridge's LoRA transform can wrap")
    assert registry.refuses("parity", load_case("gemma4-text-tiny-lora")) is None
    assert registry.refuses(SYSTEM, case) is None
    from parity.engine import pipeline
    from parity.errors import UserError

    with pytest.raises(UserError, match=r"^system parity cannot run case gemma4-text-tiny-lora-experts: LoRA on the "
                                        r"routed experts: our experts"):
        pipeline.run_systems(case, ["parity"], device="cpu")  # refused before anything is built
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "parity", "run", "--case", CASE, "--system", "parity", "--device", "cpu"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == \
        f"parity: error: system parity cannot run case {CASE}: {registry.REFUSES['parity']['lora.experts']}", p.stderr


# ---------------------------------------------------------------------------------------------------
# Megatron-Bridge: forward, gradients and merged export agree; its adapter export does not load (finding 18)

_REFS: dict = {}


def _reference(experts: str, seed: int):
    from parity.engine import pipeline
    from parity.engine.launch import cpu_threads

    key = (experts, seed)
    if key not in _REFS:
        with cpu_threads("cpu"):
            _REFS[key] = pipeline.reference(_lora(experts=experts), device="cpu", seed=seed)
    return _REFS[key]


def _against(experts: str = "shared", seed: int = 0, plant=None, folder=None) -> dict:
    from parity.engine import pipeline
    from parity.engine.launch import cpu_threads
    from parity.mbridge import lora as L
    from test_megatron_bridge_backward import ALL_CAUSES, causes_removed

    mp, ref = pytest.MonkeyPatch(), None
    try:
        if plant is not None:  # a plant may act on HF's side too (its gradients are read with the reference)
            plant(mp)
            with cpu_threads("cpu"):
                ref = pipeline.reference(_lora(experts=experts), device="cpu", seed=seed)
        if folder is not None:  # keep its adapter export (the mode writes it to a temporary folder)
            save = L.save
            mp.setattr(L, "save", lambda bm, lora, out: (save(bm, lora, out), shutil.copytree(out, folder)))
        with cpu_threads("cpu"), causes_removed(*ALL_CAUSES):
            return pipeline.against(ref or _reference(experts, seed), SYSTEM)
    finally:
        mp.undo()
        if ref is not None:
            ref.close()


def _rows(r: dict, mode: str) -> list[dict]:
    return [m for m in r["modules"] if m["mode"] == mode]


_RUNS: dict = {}


def _clean(experts: str = "shared", seed: int = 0, folder=None) -> dict:
    if (experts, seed) not in _RUNS:
        _RUNS[(experts, seed)] = _against(experts, seed, folder=folder)
    return _RUNS[(experts, seed)]


@needs_bridge
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shared_expert_adapters_agree_on_three_seeds(seed):
    """Its recipe's shared expert adapters against peft's per-expert copies of one adapter: every forward row (end
    to end, isolated) and every gradient row (each shared adapter's against HF's 8 per-expert gradients summed) pass,
    the merged export is bit-exact (132/132, the experts' 12 included); only its adapter export fails (finding 18)."""
    r = _clean("shared", seed)
    assert r["checks"] == {"logits": True, "modules": True, "router": True, "gradients": True, "lora": False,
                           "roundtrip": True, "loss": True}
    failing = {(m["name"], m["mode"]) for m in r["modules"] if not m["passed"]}
    assert failing == {(n, "adapter_export") for n in EXPERT_TENSORS} | {("logits[export]", "adapter_logits")}
    for mode in ("end_to_end", "isolated"):
        rows = [m for m in _rows(r, mode) if m["name"].endswith(".experts")]
        assert len(rows) == LAYERS and max(m["rel_l2"] for m in rows) < 1e-6
    grads = _rows(r, "param_grad")
    experts = [m for m in grads if ".experts." in m["name"]]
    assert len(grads) == 6 * 5 + 24 and len(experts) == 24  # the dense MLP's 5 a layer, the experts' 4
    assert max(m["rel_l2"] for m in grads) < 2e-6
    lora = r["lora"]
    assert lora["merged"]["bit_exact"] == lora["merged"]["hf"] == 132
    assert {f"model.layers.{i}.experts.{p}" for i in range(LAYERS) for p in ("gate_up_proj", "down_proj")} <= \
        set(lora["merged"]["adapted_weights"])
    assert lora["merged_logits"]["vs_peft_rel_l2"] == 0.0
    assert lora["export"]["bit_exact"] == 36  # the dense MLP's 6 x 3 x 2


@needs_bridge
def test_per_expert_adapters_agree():
    """``share_expert_adapters=False``: one adapter per expert (every expert's drawn on its own in peft's layout),
    every forward and gradient row passes (each expert's gradient in peft's layout), the merged export is bit-exact;
    its adapter export fails as the shared one's does."""
    r = _clean("per_expert")
    assert r["checks"]["modules"] and r["checks"]["gradients"] and r["checks"]["logits"] and not r["checks"]["lora"]
    failing = {(m["name"], m["mode"]) for m in r["modules"] if not m["passed"]}
    assert failing == {(n, "adapter_export") for n in EXPERT_TENSORS} | {("logits[export]", "adapter_logits")}
    experts = [m for m in _rows(r, "param_grad") if ".experts." in m["name"]]
    assert len(experts) == 24 and max(m["rel_l2"] for m in experts) < 2e-6
    assert r["lora"]["merged"]["bit_exact"] == 132


@needs_bridge
def test_finding_18_its_expert_adapter_export_does_not_load_into_peft(tmp_path):
    """``save_hf_adapter`` writes each expert adapter as if Gemma 4's experts were ``[E, in, out]``: the lora_A slot
    holds every expert's B transposed (``cat_e(B_e^T)``), the lora_B slot every A transposed (``cat_e(A_e^T)``). With
    2 x moe_intermediate_size != hidden_size (as at 26B-A4B) all 24 expert tensors have another shape, and peft
    refuses the folder: the export's logits row fails with peft's reason."""
    import torch
    from safetensors.torch import load_file

    from parity.engine import adapters as A

    folder = tmp_path / "export"
    r = _against("shared", 0, folder=folder)
    detail = r["summary"]["first_divergence_detail"]
    assert (detail["name"], detail["mode"]) == ("model.layers.0.experts.base_layer.lora_A.weight", "adapter_export")
    assert detail["why"] == "shape [32, 64] in the export, [32, 96] in HF's"
    shapes = {m["name"]: m["missing"] for m in _rows(r, "adapter_export") if not m["passed"]}
    assert shapes["model.layers.3.experts.lora_A.weight"] == "shape [32, 96] in the export, [32, 32] in HF's"
    assert shapes["model.layers.3.experts.lora_B.weight"] == "shape [32, 32] in the export, [96, 32] in HF's"
    assert r["lora"]["export"]["shape_mismatch"] == EXPERT_TENSORS
    loads = r["lora"]["export_loads"]
    assert loads.startswith("RuntimeError: Error(s) in loading state_dict for PeftModelForCausalLM: size mismatch "
                            "for base_model.model.model.layers.0.experts.base_layer.lora_A.default.weight"), loads
    row = next(m for m in _rows(r, "adapter_logits") if m["name"] == "logits[export]")
    assert not row["passed"] and row["missing"] == f"peft cannot load the export: {loads}"
    assert {"model.layers.0.experts.gate_up_proj", "model.layers.5.experts.down_proj"} <= \
        set(r["lora"]["config"]["target_parameters"])
    # the report's LoRA table: each expert tensor's export (failing), its gradient and its merged weight (passing)
    from parity.report.lora import section

    html = section(r)
    cells = html.split("<code>model.layers.0.experts.base_layer.lora_A.weight</code></td>", 1)[1].split("</tr>", 1)[0]
    assert cells.count('class="fail"') == 1 and cells.count('class="pass"') == 2, cells
    # the cause: the adapter's A and B transposed into each other's slot
    mine = load_file(str(folder / "adapter_model.safetensors"))
    hf = _reference("shared", 0).adapters.state()
    for module in ("model.layers.0.experts.base_layer", "model.layers.4.experts"):
        a = A.per_expert("A", hf[f"{A.FILE_PREFIX}{module}.lora_A.weight"], EXPERTS)
        b = A.per_expert("B", hf[f"{A.FILE_PREFIX}{module}.lora_B.weight"], EXPERTS)
        assert torch.equal(mine[f"{A.FILE_PREFIX}{module}.lora_A.weight"], torch.cat(list(b.transpose(1, 2)), 0))
        assert torch.equal(mine[f"{A.FILE_PREFIX}{module}.lora_B.weight"], torch.cat(list(a.transpose(1, 2)), 1))


# ---------------------------------------------------------------------------------------------------
# Planted errors in the experts' adapter mapping: FAIL at their row

@needs_bridge
@pytest.mark.parametrize("plant", EXPERT_LORA_PLANTS, ids=[p.name for p in EXPERT_LORA_PLANTS])
def test_expert_plant_is_caught_where_it_is(plant):
    clean = {(m["name"], m["mode"]) for m in _clean(plant.experts)["modules"] if not m["passed"]}
    r = _against(plant.experts, plant=plant.plant)
    assert r["passed"] is False
    detail = r["summary"]["first_divergence_detail"]
    assert (detail["name"], detail["mode"]) == (plant.where, plant.mode), (detail["name"], detail["mode"], detail)
    value = detail["value"]
    assert value is None or math.isnan(value) or value > detail["gate"], detail
    new = {(m["name"], m["mode"]) for m in r["modules"] if not m["passed"]} - clean
    assert (plant.where, plant.mode) in new


@needs_bridge
def test_a_shared_adapter_refuses_experts_that_differ():
    """HF's expert B read in blocks under a shared adapter: the experts' copies no longer agree, and its import says
    so (the system's adapters phase fails, naming the linear) instead of taking one expert's."""
    from tests.plants import expert_b_read_in_blocks

    r = _against("shared", plant=expert_b_read_in_blocks)
    failure = next(f for f in r["failures"] if f["phase"] == "adapters")
    assert ("decoder.layers.0.mlp.experts.linear_fc1: one adapter for all experts of "
            "model.layers.0.experts.gate_up_proj, HF's differ between experts") in failure["error"], failure
