"""Our VLM over two TP ranks in a gloo world of CPU processes (``gemma4-vlm-tiny-train-tp2``, system parity, no
sequence parallelism): the vision tower's heads and MLP features split over TP as the text model's (q/k/v and gate/up
column-parallel, o_proj and down_proj row-parallel; the patch and soft-token embedders' linears gathered), its weights
loaded as this rank's slices and gathered back for the export and the gradients, its outputs gathered for the rows
(``parity.systems.ours._vision_whole``). Every row of the training step agrees as at TP=1; the vision tower's per-head
q/k norms left out of megatron's finalize (each rank's weight gradient then only its heads' part) fail at exactly
those gradients."""
from __future__ import annotations

import pytest

from tests.gloo import run_case

CASE = "gemma4-vlm-tiny-train-tp2"
VISION_LAYERS = 2


def vision_left_out_of_finalize(mp):
    """Megatron's finalize run on the text model alone (the chunk's language model): the vision tower's q/k norm
    gradients are not summed over the TP ranks. The forward unchanged."""
    from parity.systems import ours

    finalize = ours.finalize_grads
    mp.setattr(ours, "finalize_grads", lambda chunk, config, experts:
               finalize(getattr(chunk, "language_model", chunk), config, experts))


@pytest.fixture(scope="module")
def world() -> dict:
    return run_case(CASE, "parity", 2, clean=(None, (), None), planted=(None, (), vision_left_out_of_finalize))


def test_vlm_training_step_over_two_tp_ranks(world):
    """Every row within the fp32 gates: the forward (the vision tower's column-parallel outputs and per-head norms
    gathered), the loss, every gradient (the vision tower's 29 parameters through the gathering export), each module
    alone, the first updates and the 3-step trajectory (measured seed 0: forward <= 1.7e-6, gradients <= 4.1e-6,
    first updates <= 1.2e-8)."""
    r = world["clean"]
    assert r["parallel"] == {"tp": 2, "ep": 1, "world_size": 2}
    assert r["passed"] is True and r["failed"] == [] and r["first"] is None
    assert r["modes"]["backward"] is None and r["modes"]["step"] is None and r["modes"]["isolated_backward"] is None
    grads = {n: v for (n, m), v in r["rows"].items() if m == "param_grad"}
    assert len(grads) == 155 and max(grads.values()) < 1e-5
    assert sum(n.startswith("model.vision_tower.") or n.startswith("model.embed_vision.") for n in grads) == 29
    vision = [v for (n, m), v in r["rows"].items() if n.startswith("model.vision_tower.encoder.layers.")
              and m in ("end_to_end", "isolated", "grad_output", "grad_input", "isolated_grad_input")]
    assert len(vision) > 100 and max(vision) < 1e-5


def test_vision_qk_norm_gradients_not_summed_over_tp_fail_there(world):
    """The vision tower left out of megatron's finalize: exactly its q/k norm weights' gradients fail (each rank's is
    its heads' part) with their first updates; the forward and every other gradient as in the clean run."""
    r, clean = world["planted"], world["clean"]
    norms = {f"model.vision_tower.encoder.layers.{i}.self_attn.{n}_norm.weight" for i in range(VISION_LAYERS)
             for n in ("q", "k")}
    assert r["passed"] is False
    assert {n for n, m in r["failed"] if m == "param_grad"} == norms, r["failed"]
    assert {n for n, _ in r["failed"]} <= norms, r["failed"]
    assert r["first"]["name"] in norms and r["first"]["mode"] in ("param_grad", "isolated_param_grad")
    assert all(r["rows"][k] == v for k, v in clean["rows"].items() if k[1] in ("end_to_end", "isolated"))
