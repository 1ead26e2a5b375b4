"""Gemma 4 parity: the checks of each case, sharing ONE engine run per case (see ``parity.pytest_plugin``).

Ids are the case (``test_logits[gemma4-text-tiny]``), so ``-k vlm``, ``-k bf16``, ``-k tiny`` or
``-k gemma4-26b-a4b`` select cases and ``-k logits`` a check; ids and JUnit names are the same serially and
under ``-n N``. A failure says the module, metric, value, gate and report. Every gate number comes from the
case file.
"""
import pytest


def test_logits(parity_run):
    """Final logits (after the softcap) within the case's rel-L2 and per-token KL gates."""
    parity_run.require("logits")


def test_modules(parity_run):
    """Every aligned module, end to end and in isolated replay, within its gate (exact rows bit for bit)."""
    parity_run.require("modules")


def test_roundtrip(parity_run):
    """HF -> Megatron -> HF weights come back bit-exact, every tensor."""
    parity_run.require("roundtrip")


def test_router(parity_run):
    """MoE routers: probabilities within gate and no decisive top-k flip when replayed in isolation."""
    if not parity_run.has_router():
        pytest.skip(f"no router in this model (case {parity_run.target.case.name})")
    parity_run.require("router")


def test_gradients(parity_run):
    """Train cases: the loss, every parameter's gradient and every module's output and input gradient within the
    case's gradient gate (first divergence in backward order)."""
    if "gradients" not in (parity_run.results.get("checks") or {}):
        pytest.skip(f"not a train case (case {parity_run.target.case.name})")
    if "loss" in parity_run.results["checks"]:  # fp32; a bf16 run gates its loss row with the gradients
        parity_run.require("loss")
    parity_run.require("gradients")


def test_step(parity_run):
    """Train cases: the first optimizer step's update of every parameter and the loss and gradient norm along a short
    trajectory (the case's AdamW on its batch) within the case's gradient gate."""
    if "step" not in (parity_run.results.get("checks") or {}):
        pytest.skip(f"not a train case (case {parity_run.target.case.name})")
    parity_run.require("step")
    parity_run.require("trajectory")


def test_lora(parity_run):
    """LoRA cases: the system's adapter export (every tensor accounted for, bit for bit, loaded by peft) and merged
    export (against peft's merge_and_unload) and their logits within the case's gates; the system raising while
    making them fails it too (forward and gradient rows with adapters: the checks above)."""
    checks = parity_run.results.get("checks") or {}
    if "lora" not in checks:
        pytest.skip(f"not a LoRA case (case {parity_run.target.case.name})")
    parity_run.require("lora")
    if any(f.get("phase") in ("lora", "adapters") for f in parity_run.results.get("failures") or []):
        pytest.fail(parity_run.explain("lora"), pytrace=False)
