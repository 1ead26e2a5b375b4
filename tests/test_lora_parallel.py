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
in evaluation) its recipe LoRA's q/k/v, MLP adapters and its adapter export agree, and its LoRA findings 13 (o_proj)
and 14 (the merged export raises) are the same as at TP=1; at TP=2 with sequence parallelism, as its recipe runs it,
its MLP adapters' training step (its training-step findings removed) agrees with peft's.

Skips (with the reason) where Megatron-Bridge or peft is not importable.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util

import pytest
import torch

from parity import mbridge
from tests.gloo import Variant, run_case

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
     ("model.layers.0.self_attn.o_proj", "isolated"), ()),
    ("column-parallel adapter input gradient not all-reduced", adapter_input_grad_not_reduced, True,
     ("model.layers.5.mlp.gate_proj", "grad_input"), FORWARD),
    ("fc1 adapter B gathered without the gate/up interleave", fc1_b_gathered_plain, False,
     ("model.layers.0.mlp.gate_proj.lora_B.weight", "adapter_export"), FORWARD),
)


def _untrained(case):
    return dataclasses.replace(case, train=None)  # forward and exports only: no backward, no step


def _per_expert_untrained(case):
    return _untrained(case.replace(lora={"experts": "per_expert"}))


def _targets(targets, case):
    return case.replace(lora={"targets": targets})


def _merged_adapters(ref, system) -> dict:
    """Finding 19's cause, read off its merged export: for each expert of layer 0's two expert parameters, the expert
    whose adapter (``W_e + s B_f A_f``) its merged weight equals bit for bit (``None``: none does)."""
    from parity.engine import adapters as A

    merged = dict(system.merged())
    hf, base, s = ref.adapters.state(), ref.adapters.base_copy("cpu").state_dict(), ref.case.lora.scale
    out = {}
    for parameter, module in A.EXPERTS.items():
        key = f"model.layers.0.experts.{parameter}"
        a, b = (A.per_expert(t, hf[f"{A.FILE_PREFIX}model.layers.0.{module}.lora_{t}.weight"], 8) for t in "AB")
        w = base[key]
        out[key] = [next((f for f in range(8) if torch.equal(merged[key][e], (w[e].float() + s * (b[f] @ a[f]))
                                                                 .to(w.dtype))), None) for e in range(8)]
    return out


def _measured(world: dict) -> dict:
    """Each digest with its measured rows only (those with a rel-L2; ``digest`` keeps the others, as None)."""
    return {name: {**d, "rows": {k: v for k, v in d["rows"].items() if v is not None}} for name, d in world.items()}


@pytest.fixture(scope="module")
def parity_world():
    """The clean run, then each plant (against the case without its ``[train]`` where the plant says so)."""
    plants = {name: Variant(plant=plant, edit=None if train else _untrained) for name, plant, train, _, _ in PLANTS}
    # a CUDA case file (torchrun + NCCL), run in a gloo world of CPUs
    return _measured(run_case("gemma4-text-tiny-lora-tp2", "parity", 2, clean=Variant(), **plants))


@pytest.fixture(scope="module")
def bridge_world():
    """EP=2 (train-less, per-expert adapters; finding 19's cause read off the system's merged export), TP=2 in
    evaluation, and TP=2 with sequence parallelism as its recipe lays it out, training the MLP adapters (the
    attention's carry finding 13 end to end, which would hide the rest), then the attention's q/k/v adapters with
    them (o_proj's left out: finding 13), its training-step findings removed."""
    from tests.test_megatron_bridge_backward import ALL_CAUSES

    mlp = ["gate_proj", "up_proj", "down_proj"]
    sp = Variant(causes=ALL_CAUSES, case="gemma4-text-tiny-lora-train-tp2-megatron-bridge")
    return _measured(run_case(
        "gemma4-text-tiny-lora-tp2-megatron-bridge", "megatron-bridge", 2,
        ep2=Variant(case="gemma4-text-tiny-lora-experts-ep2", edit=_per_expert_untrained, after=_merged_adapters),
        tp2=Variant(), tp2_sp=sp._replace(edit=functools.partial(_targets, mlp)),
        tp2_sp_qkv=sp._replace(edit=functools.partial(_targets, ["q_proj", "k_proj", "v_proj", *mlp]))))


# ---------------------------------------------------------------------------------------------------
# System parity at TP=2

def test_parity_lora_at_tp2_agrees_as_at_tp1(parity_world):
    """Every row as at TP=1: forward (end to end, isolated) within 1e-5 (clean: 8.4e-7), the 64 adapter gradients
    gathered through the adjoints within 1e-5 (clean: 1.9e-6), the adapters' first updates and the trajectory,
    the adapter export 80/80 and the merged export 132/132 bit for bit, both loaded into HF as peft's."""
    r = parity_world["clean"]
    assert r["passed"] is True and r["first"] is None and r["failures"] == [], r["first"]
    assert r["parallel"] == {"tp": 2, "ep": 1, "world_size": 2}
    count = lambda mode: sum(m == mode for _, m in r["rows"])  # noqa: E731
    worst = lambda mode: max(v for (_, m), v in r["rows"].items() if m == mode)  # noqa: E731
    assert (count("end_to_end"), count("isolated"), count("param_grad"), count("param_step")) == (129, 128, 64, 64)
    assert max(worst("end_to_end"), worst("isolated"), worst("param_grad"), worst("grad_input")) < 1e-5
    assert r["checks"]["gradients"] and r["checks"]["step"] and r["checks"]["trajectory"] and r["checks"]["lora"]
    assert r["export"] == {"hf": 80, "exported": 80, "bit_exact": 80}
    assert r["merged"] == {"hf": 132, "exported": 132, "bit_exact": 132}
    assert r["export_loads"] is True
    assert r["logits"]["export"]["vs_peft_rel_l2"] == 0.0 and r["logits"]["merged"]["vs_peft_rel_l2"] == 0.0
    assert r["modes"]["backward"] is None and r["modes"]["step"] is None and r["modes"]["lora"] is None


@pytest.mark.parametrize("plant", PLANTS, ids=[p[0] for p in PLANTS])
def test_parallel_only_lora_plant_is_caught_where_it_is(parity_world, plant):
    name, _, _, where, untouched = plant
    clean, r = parity_world["clean"], parity_world[name]
    assert r["passed"] is False and r["failures"] == [], r["failures"]
    assert (r["first"]["name"], r["first"]["mode"]) == where, r["first"]
    assert r["first"]["value"] > r["first"]["gate"], r["first"]
    for mode in untouched:  # the rows the plant cannot reach: bit for bit as in the clean run
        mine = {k: v for k, v in r["rows"].items() if k[1] == mode}
        assert mine and mine == {k: v for k, v in clean["rows"].items() if k[1] == mode}, (name, mode)


def test_a_row_parallel_adapter_reduced_twice_fails_at_o_proj_first(parity_world):
    """The adapter's share of ``o_proj`` (and ``down_proj``) doubled at TP=2: every o_proj fails from layer 0, in
    isolation too; its exports still hold the right tensors (what the model computes is wrong, not the weights)."""
    r = parity_world["row-parallel adapter output all-reduced twice"]
    isolated = {n for n, m in r["failed"] if m == "isolated"}
    assert {f"model.layers.{i}.self_attn.o_proj" for i in range(6)} <= isolated
    assert {f"model.layers.{i}.mlp.down_proj" for i in range(6)} <= isolated
    assert not {n for n in isolated if n.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))}
    assert r["export"]["bit_exact"] == 80 and r["merged"]["bit_exact"] == 132


def test_an_unreduced_adapter_input_gradient_fails_in_the_backward_only(parity_world):
    """A column-parallel adapter's input gradient left per rank: the forward and both exports as in the clean run,
    the first wrong gradient the input gradient of the last layer's ``gate_proj`` (the fused ``linear_fc1``: its
    adapter's A reads the whole input) and then every gradient before it."""
    r = parity_world["column-parallel adapter input gradient not all-reduced"]
    assert r["checks"]["modules"] and r["checks"]["logits"] and r["checks"]["lora"] and not r["checks"]["gradients"]
    assert r["export"]["bit_exact"] == 80 and r["merged"]["bit_exact"] == 132


def test_fc1_b_gathered_without_its_interleave_fails_its_export(parity_world):
    """``linear_fc1``'s B gathered as a plain concatenation: the forward as in the clean run; the 12 gate/up B
    tensors of the export and the 12 gate/up weights of the merged export fail (68/80, 120/132 bit-exact), and both
    loaded into HF compute something else."""
    r = parity_world["fc1 adapter B gathered without the gate/up interleave"]
    assert r["checks"]["modules"] and not r["checks"]["lora"]
    assert r["export"]["bit_exact"] == 68 and r["merged"]["bit_exact"] == 120
    export = {n for n, m in r["failed"] if m == "adapter_export"}
    assert export == {f"model.layers.{i}.mlp.{p}.lora_B.weight" for i in range(6) for p in ("gate_proj", "up_proj")}
    assert r["logits"]["export"]["vs_peft_rel_l2"] > 0.05 and r["logits"]["merged"]["vs_peft_rel_l2"] > 0.05


# ---------------------------------------------------------------------------------------------------
# Megatron-Bridge at EP=2 (per-expert adapters) and at TP=2 (evaluation)

EXPERT_TENSORS = {f"model.layers.{i}.experts{m}.lora_{t}.weight" for i in range(6) for m in (".base_layer", "")
                  for t in "AB"}


def test_bridge_per_expert_adapters_at_ep2(bridge_world):
    """Each rank's 4 local experts' adapters from HF's global experts 4 x rank + local index: every forward row passes
    (the experts' too), the dense MLP's 36 exported adapter tensors are bit-exact; its adapter export of the experts
    fails as at EP=1 (finding 18), and its merged export gives the experts of EP rank 1 the adapters of rank 0's
    (finding 19): the 12 expert weights fail, the 120 others are bit-exact."""
    r = bridge_world["ep2"]
    assert r["parallel"] == {"tp": 1, "ep": 2, "world_size": 2}
    assert r["checks"] == {"logits": True, "modules": True, "router": True, "lora": False, "roundtrip": True}
    experts = [v for (n, m), v in r["rows"].items() if n.endswith(".experts") and m in FORWARD]
    assert len(experts) == 12 and max(experts) < 1e-5
    merged = {f"model.layers.{i}.experts.{p}" for i in range(6) for p in ("gate_up_proj", "down_proj")}
    assert set(r["failed"]) == ({(n, "adapter_export") for n in EXPERT_TENSORS}
                                | {(n, "adapter_merged") for n in merged}
                                | {("logits[export]", "adapter_logits"), ("logits[merged]", "adapter_logits")})
    assert (r["first"]["name"], r["first"]["mode"]) == ("model.layers.0.experts.base_layer.lora_A.weight",
                                                        "adapter_export")
    assert r["export"]["bit_exact"] == 36 and r["merged"] == {"hf": 132, "exported": 132, "bit_exact": 120}
    assert 0.1 < r["logits"]["merged"]["vs_peft_rel_l2"] < 0.15
    # finding 19's cause: global expert e + 4 merged with expert e's adapter, bit for bit
    assert r["after"] == {"model.layers.0.experts.gate_up_proj": [0, 1, 2, 3, 0, 1, 2, 3],
                          "model.layers.0.experts.down_proj": [0, 1, 2, 3, 0, 1, 2, 3]}


def test_bridge_recipe_lora_at_tp2_in_evaluation(bridge_world):
    """Its recipe LoRA over two TP ranks: the q/k/v and MLP adapters' rows pass (isolated), its adapter export gathers
    80/80 bit-exact and loads into peft as HF's own; findings 13 (o_proj on every layer, rel-L2 0.35-0.41) and 14
    (its merged export raises on K=V layers) exactly as at TP=1."""
    r = bridge_world["tp2"]
    assert r["parallel"] == {"tp": 2, "ep": 1, "world_size": 2}
    assert (r["first"]["name"], r["first"]["mode"]) == ("model.layers.0.self_attn.o_proj", "isolated")
    isolated = {n for n, m in r["failed"] if m == "isolated"}
    assert isolated == {f"model.layers.{i}{p}" for i in range(6) for p in ("", ".self_attn", ".self_attn.o_proj")}
    o_proj = [v for (n, m), v in r["rows"].items() if m == "isolated" and n.endswith("o_proj")]
    assert len(o_proj) == 6 and 0.34 < min(o_proj) and max(o_proj) < 0.42
    adapted = [v for (n, m), v in r["rows"].items() if m == "isolated" and
               n.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"))]
    assert len(adapted) == 6 * 5 + 4 and max(adapted) < 1e-5  # v_proj on the 4 sliding layers
    raised = ("RuntimeError: The size of tensor a (256) must match the size of tensor b (384) at non-singleton "
              "dimension 0")
    assert r["failures"] == [("lora", "merged", raised)]
    assert r["export"] == {"hf": 80, "exported": 80, "bit_exact": 80} and r["export_loads"] is True
    assert r["logits"]["export"]["vs_peft_rel_l2"] == 0.0
    assert r["modes"]["backward"] == "not a train case (no [train] table)"


def test_bridge_lora_training_step_at_tp2_with_sequence_parallelism(bridge_world):
    """Its LoRA as its recipe lays it out at TP > 1 (sequence parallelism), training its dense MLP's adapters (its
    training-step findings 10, 11, 2 removed): the forward, every adapter gradient (through its adapters' TP shards and
    the sequence-parallel gathers), the loss, one AdamW step and the exports agree with peft's."""
    r = bridge_world["tp2_sp"]
    assert r["parallel"] == {"tp": 2, "ep": 1, "world_size": 2, "sequence_parallel": True}
    assert r["passed"] and r["failed"] == [] and r["failures"] == []
    assert r["modes"]["backward"] is None and r["modes"]["step"] is None
    grads = [v for (n, m), v in r["rows"].items() if m == "param_grad"]
    assert len(grads) == 30 and max(grads) < 1e-5  # 6 layers x (A of gate/up, fused: once; B of each; down A, B)
    assert r["export"]["bit_exact"] == 36 and r["merged"]["bit_exact"] == 132


def test_bridge_attention_adapters_train_at_tp2_with_sequence_parallelism(bridge_world):
    """Its fused q/k/v adapters (column-parallel, their input gathered from the sequence-parallel region; on K=V
    layers no v_proj adapter) trained with the MLP's at TP=2 with sequence parallelism, its training-step findings
    removed and o_proj's adapter left out (finding 13): every forward row, every adapter gradient, the step and the
    adapter export agree; its merged export raises on the K=V layers (finding 14)."""
    r = bridge_world["tp2_sp_qkv"]
    assert r["failures"] == [("lora", "merged", "RuntimeError: The size of tensor a (256) must match the size of "
                              "tensor b (384) at non-singleton dimension 0")]
    assert r["failed"] == [] and all(v for k, v in r["checks"].items() if k != "system"), r["checks"]
    grads = [v for (n, m), v in r["rows"].items() if m == "param_grad"]
    # 30 MLP (as above) + 22 attention: q's A (the fused A, compared once) and B, k's B on the 6 layers, v's B on the
    # 4 sliding ones (layers 2 and 5 are K=V: no v_proj)
    assert len(grads) == 52 and max(grads) < 1e-5
    assert sum(m == "param_grad" and ".self_attn." in n for n, m in r["rows"]) == 22
    assert r["export"] == {"hf": 68, "exported": 68, "bit_exact": 68} and r["export_loads"] is True
