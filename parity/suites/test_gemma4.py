"""Gemma 4 parity: four checks per case, sharing ONE engine run per case (see ``parity.pytest_plugin``).

Ids are ``<case>-<check>`` (``test_logits[gemma4-text-tiny-logits]``), so ``-k vlm``, ``-k bf16``,
``-k tiny`` or ``-k gemma4-26b-a4b`` select what they say. Every gate number comes from the case file.
"""
import pytest


def test_logits(parity_run):
    """Final logits (after the softcap) within the case's rel-L2 and per-token KL gates."""
    assert parity_run.passed("logits"), parity_run.explain("logits")


def test_modules(parity_run):
    """Every aligned module, end to end and in isolated replay, within its gate (exact rows bit for bit)."""
    assert parity_run.passed("modules"), parity_run.explain("modules")


def test_roundtrip(parity_run):
    """HF -> Megatron -> HF weights come back bit-exact, every tensor."""
    assert parity_run.passed("roundtrip"), parity_run.explain("roundtrip")


def test_router(parity_run):
    """MoE routers: probabilities within gate and no decisive top-k flip when replayed in isolation."""
    if not parity_run.has_router():
        pytest.skip(f"no router in this model (case {parity_run.target.case.name})")
    assert parity_run.passed("router"), parity_run.explain("router")
