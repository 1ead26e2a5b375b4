"""The VLM over two EP ranks in a gloo world of CPU processes (``gemma4-vlm-tiny-train-ep2``, system parity): the
vision tower whole on every rank (data-parallel size 2: its gradients averaged by megatron's data-parallel
reduction), the text model's experts split (4 of 8 a rank), its weights loaded as this rank's shards, exported and
its gradients gathered from every rank. Every row of the training step agrees as at EP=1."""
from __future__ import annotations

import pytest

from tests.gloo import run_case

CASE = "gemma4-vlm-tiny-train-ep2"


@pytest.fixture(scope="module")
def world() -> dict:
    return run_case(CASE, "parity", 2, run=(None, (), None))["run"]


def test_vlm_training_step_over_two_ep_ranks(world):
    """Loss, every gradient (the vision tower's and the split experts'), each module alone and the first updates
    within 1e-5 (measured seeds 0-2: gradients <= 1.6e-6, first updates <= 6.5e-9), the 3-step trajectory too."""
    r = world
    assert r["parallel"] == {"tp": 1, "ep": 2, "world_size": 2}
    assert r["passed"] is True and r["failed"] == [] and r["first"] is None
    assert r["modes"]["backward"] is None and r["modes"]["step"] is None and r["modes"]["isolated_backward"] is None
    grads = {n: v for (n, m), v in r["rows"].items() if m == "param_grad"}
    assert len(grads) == 155 and max(grads.values()) < 1e-5
    assert sum(n.startswith("model.vision_tower.") for n in grads) > 0
    assert sum(".experts." in n for n in grads) == 12  # 6 layers x (gate_up_proj, down_proj), gathered from both ranks
