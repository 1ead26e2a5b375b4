"""Megatron-Bridge's Gemma 4 at TP=2 and at EP=2: a 2-process gloo world on the CPU runs its sharded model.

Each rank builds its shard with the bridge's provider, loads it through the bridge's own HF -> Megatron
mapping (which scatters the TP shards and picks this rank's experts), runs the pipeline in both modes
(column-parallel outputs gathered over TP, vocab-parallel logits gathered) and exports through the
bridge's own ``export_hf_weights`` (which gathers TP shards and EP experts). The same case at TP=1/EP=1
is ``tests/test_megatron_bridge.py::test_pipeline_text_tiny_holds_and_names_the_system``.
Skips (with the reason) where megatron-bridge is not importable.
"""
from __future__ import annotations

import pytest
import torch

from parity import mbridge
from tests.gloo import join, spawn

OK, WHY = mbridge.available()
pytestmark = pytest.mark.skipif(not OK, reason=f"Megatron-Bridge not importable: {WHY}")


def _case(tp: int, ep: int):
    import dataclasses

    from parity.cases import ModelSpec, Parallel, load_case

    case = load_case("gemma4-text-tiny")  # the shapes of gemma4-text-tiny-tp2 / -ep2, gates fp32 1e-5 / KL 1e-6
    assert case.inputs.pad_tail == 5 and case.gates.float32.rel_l2 == 1e-5
    # a gloo world of CPU processes: the case file's own validation keeps tp*ep > 1 cases on CUDA
    return dataclasses.replace(case, name=f"tiny-tp{tp}-ep{ep}", model=ModelSpec(builder="tiny_text"),
                               parallel=Parallel(tp=tp, ep=ep))


def _digest(r: dict) -> dict:
    compared = [m for m in r["modules"] if m.get("rel_l2") is not None]
    return {"passed": r["passed"], "checks": r["checks"], "first": r["summary"]["first_divergence"],
            "logits_rel_l2": r["summary"]["logits"]["rel_l2"], "kl_max": r["summary"]["logits"]["kl_max"],
            "tensors": r["roundtrip"]["tensors"], "bit_exact": r["roundtrip"]["bit_exact"],
            "e2e": sum(m["mode"] == "end_to_end" for m in compared), "iso": sum(m["mode"] == "isolated" for m in compared),
            "failed": sorted(m["name"] for m in compared if not m.get("passed", True)),
            "worst": max(m["rel_l2"] for m in compared if m["kind"] != "mask"),
            "parallel": r["parallel"], "system": r["system"]["name"]}


def _without_tp_reduction(self, x):
    """A planted fault: the row-parallel attention output projection's partial sums left un-reduced."""
    return self.post_layernorm(torch.nn.functional.linear(x, self.weight)), None


def _worker(rank, world, port, tp, ep, plant, path):
    join(rank, world, port)
    from parity import registry
    from parity.engine.pipeline import run

    if plant:
        from parity.mbridge import substitutes as S
        S.RowParallelLinearPostNormSubstitute.forward = _without_tp_reduction
    built = []  # the system the pipeline builds, kept to read its shard shapes afterwards
    get = registry.get
    registry.get = lambda name: built.append(get(name)) or built[-1]
    r = run(_case(tp, ep), device="cpu", system="megatron-bridge")
    params = dict(built[0].model.named_parameters())
    shards = {"qkv_rows": params["decoder.layers.0.self_attention.linear_qkv.weight"].shape[0],
              "proj_cols": params["decoder.layers.0.self_attention.linear_proj.weight"].shape[1],
              "vocab_rows": params["embedding.word_embeddings.weight"].shape[0],
              "local_experts": sum(k.startswith("decoder.layers.0.mlp.experts.linear_fc1.weight") for k in params),
              "expert_fc1_rows": params["decoder.layers.0.mlp.experts.linear_fc1.weight0"].shape[0]}
    if rank == 0:
        torch.save({**_digest(r), "shards": shards}, path)


def _world(tp: int, ep: int, plant: bool = False) -> dict:
    return spawn(_worker, tp * ep, tp, ep, plant)


# Layer 0 of the tiny model (sliding: 8 heads, 4 KV groups, head_dim 16), hidden 96, vocab 320, 8 experts of
# intermediate 48: per rank, linear_qkv (8 + 2*4)*16 = 256 rows, linear_proj 8*16 = 128 input features,
# the vocab (not padded: 320 rows split over TP), gated expert fc1 2*48 rows (expert TP = TP).
SHARDS = {
    (2, 1): {"qkv_rows": 128, "proj_cols": 64, "vocab_rows": 160, "local_experts": 8, "expert_fc1_rows": 48},
    (1, 2): {"qkv_rows": 256, "proj_cols": 128, "vocab_rows": 320, "local_experts": 4, "expert_fc1_rows": 96},
}


@pytest.mark.parametrize("tp,ep", [(2, 1), (1, 2)], ids=["tp2", "ep2"])
def test_bridge_sharded_world_matches_hf_and_exports_bit_exact(tp, ep):
    r = _world(tp, ep)
    assert r["system"] == "megatron-bridge" and r["parallel"] == {"tp": tp, "ep": ep, "world_size": tp * ep}
    assert r["passed"], r
    assert r["first"] is None and r["failed"] == []
    assert r["logits_rel_l2"] <= 1e-5 and r["kl_max"] <= 1e-6  # the case's fp32 gates
    assert r["worst"] <= 1e-5
    assert r["e2e"] == 117 and r["iso"] == 121  # as many rows as at TP=1
    assert r["tensors"] == r["bit_exact"] == 132  # its own export, gathered from both ranks' shards
    # really sharded: TP splits attention, vocab and (expert TP = TP) the experts' fc1; EP splits the experts
    assert r["shards"] == SHARDS[(tp, ep)]


def test_bridge_tp2_without_the_row_parallel_reduction_fails_at_o_proj():
    """The sharded comparison can fail: each rank's half of ``o_proj`` un-summed is caught at its first row."""
    r = _world(2, 1, plant=True)
    assert not r["passed"] and not r["checks"]["logits"]
    assert r["first"] == "model.layers.0.self_attn.o_proj"
    assert r["logits_rel_l2"] > 0.1
    assert r["tensors"] == r["bit_exact"] == 132  # the weights themselves are intact
