"""LoRA over several ranks in a gloo world of CPU processes (``docs/lora.md``, "Over several ranks").

System ``parity`` at TP=2 (``gemma4-text-tiny-lora-tp2``): Megatron-Bridge's LoRA transform on our megatron-core
linears, every rank its shards of HF's adapters (A and B split as the adapter's own parallel linears split them;
``linear_fc1``'s B in its base weight's per-rank gate/up interleave), the adapters' gradients, the adapter export and
the merged export gathered back: forward, gradients, the adapters' step and both exports as at TP=1. Each
parallel-only error planted in the adapters (a row-parallel adapter's output all-reduced a second time, a
column-parallel adapter's input gradient left un-reduced, ``linear_fc1``'s B gathered without its interleave) fails
at its exact row, the rows it cannot touch bit for bit as in the clean run. EP=2 and TP=2 x EP=2 (the adapters are
dense: replicated over the data-parallel ranks) are measured by hand (docs).

System ``megatron-bridge``: at EP=2 (``gemma4-text-tiny-lora-experts-ep2``, its per-expert adapters on the rank of
their expert; train-less here, its gradients measured by hand) every forward row passes and its merged export gives
the experts of EP rank 1 the adapters of rank 0's (finding 19); at TP=2 (``gemma4-text-tiny-lora-tp2-megatron-bridge``,
evaluation only: megatron-core's MoE layer trains at TP > 1 with sequence parallelism only) its recipe LoRA's q/k/v,
MLP adapters and its adapter export agree, and its LoRA findings 13 (o_proj) and 14 (the merged export raises) are
the same as at TP=1.

Skips (with the reason) where Megatron-Bridge or peft is not importable.
"""
from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from parity import mbridge
from tests.gloo import join, spawn

OK, WHY = mbridge.available()
PEFT = importlib.util.find_spec("peft") is not None
pytestmark = pytest.mark.skipif(not (OK and PEFT), reason=f"Megatron-Bridge or peft not importable: {WHY or 'peft'}")

FORWARD = ("end_to_end", "isolated")
GRADIENTS = ("loss", "grad_output", "grad_input", "param_grad")
LORA = ("adapter_export", "adapter_merged", "adapter_logits")


# ---------------------------------------------------------------------------------------------------
# Parallel-only errors planted in the adapters (each a no-op at TP=1)

def adapter_output_reduced_twice(mp):
    """A row-parallel adapter's output (B's, already gathered whole) all-reduced once more as if it were the base
    linear's partial sums: the adapter's contribution counted once per TP rank."""
    from megatron.bridge.peft.utils import ParallelLinearAdapter
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    forward = ParallelLinearAdapter.forward

    def planted(self, x, *args, **kwargs):
        y = forward(self, x, *args, **kwargs)
        return reduce_from_tensor_model_parallel_region(y) if self.input_is_parallel else y
    mp.setattr(ParallelLinearAdapter, "forward", planted)


def adapter_input_grad_not_reduced(mp):
    """A column-parallel adapter's A built as under sequence parallelism (``disable_grad_reduce``: the gradient of its
    input left to the sequence-parallel gather) in a run without it: the input gradient through the adapter stays
    this rank's part. The forward is untouched."""
    from megatron.bridge.peft.utils import ParallelLinearAdapter

    init = ParallelLinearAdapter.__init__

    def planted(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if not self.input_is_parallel:
            self.linear_in.disable_grad_reduce, self.linear_in.allreduce_dgrad = True, False
    mp.setattr(ParallelLinearAdapter, "__init__", planted)


def fc1_b_gathered_plain(mp):
    """``linear_fc1``'s B shards gathered by plain concatenation (``[gate_0; up_0; gate_1; up_1]`` read as
    ``[gate; up]``), in the gathers of the export, the merged export and the gradients; the forward is untouched."""
    from parity.bridge import adapters as BA

    unshard = BA.unshard
    mp.setattr(BA, "unshard", lambda parts, dim, gated=False: unshard(parts, dim, False))


# (name, plant, the case's [train] kept, expected first divergence (name, mode), modes left bit for bit)
PLANTS = (
    ("row-parallel adapter output all-reduced twice", adapter_output_reduced_twice, False,
     ("model.layers.0.self_attn.o_proj", "end_to_end"), ()),
    ("column-parallel adapter input gradient not all-reduced", adapter_input_grad_not_reduced, True,
     ("model.layers.5.mlp.gate_proj", "grad_input"), FORWARD),
    ("fc1 adapter B gathered without the gate/up interleave", fc1_b_gathered_plain, False,
     ("model.layers.0.mlp.gate_proj.lora_B.weight", "adapter_export"), FORWARD),
)


def _digest(r: dict) -> dict:
    rows = {(m["name"], m["mode"]): m.get("rel_l2") for m in r["modules"] if m.get("rel_l2") is not None}
    lora = r.get("lora", {})
    return {"passed": r["passed"], "checks": r["checks"], "first": r["summary"]["first_divergence_detail"],
            "rows": rows, "failed": sorted((m["name"], m["mode"]) for m in r["modules"] if m.get("passed") is False),
            "failures": [(f["phase"], f.get("method"), f["error"]) for f in r.get("failures") or []],
            "export": {k: lora.get("export", {}).get(k) for k in ("hf", "exported", "bit_exact")},
            "merged": {k: lora.get("merged", {}).get(k) for k in ("hf", "exported", "bit_exact")},
            "logits": {k: lora.get(f"{k}_logits") for k in ("export", "merged")},
            "export_loads": lora.get("export_loads"), "parallel": r["parallel"],
            "modes": {m["name"]: m.get("why") for m in r["modes"]}}


def _untrained(case):
    return dataclasses.replace(case, train=None)  # forward and exports only: no backward, no step


def _parity_world(rank, world, port, path):
    join(rank, world, port)
    from parity.cases import load_case
    from parity.engine import pipeline

    out = {}
    case = load_case("gemma4-text-tiny-lora-tp2")  # a CUDA case file (torchrun + NCCL), run in a gloo world of CPUs
    refs = {True: pipeline.reference(case, device="cpu", seed=0)}
    out["clean"] = _digest(pipeline.against(refs[True], "parity"))
    for name, plant, train, _, _ in PLANTS:
        if train not in refs:
            refs[train] = pipeline.reference(_untrained(case), device="cpu", seed=0)
        mp = pytest.MonkeyPatch()
        try:
            plant(mp)
            out[name] = _digest(pipeline.against(refs[train], "parity"))
        finally:
            mp.undo()
    for ref in refs.values():
        ref.close()
    if rank == 0:
        torch.save(out, path)


def _bridge_world(rank, world, port, path):
    join(rank, world, port)
    from parity.cases import load_case
    from parity.engine import pipeline

    out = {}
    for key, case in (("ep2", _untrained(load_case("gemma4-text-tiny-lora-experts-ep2").replace(
            lora={"experts": "per_expert"}))), ("tp2", load_case("gemma4-text-tiny-lora-tp2-megatron-bridge"))):
        ref = pipeline.reference(case, device="cpu", seed=0)
        out[key] = _digest(pipeline.against(ref, "megatron-bridge"))
        ref.close()
    if rank == 0:
        torch.save(out, path)


@pytest.fixture(scope="module")
def parity_world():
    return spawn(_parity_world, 2)


@pytest.fixture(scope="module")
def bridge_world():
    return spawn(_bridge_world, 2)
