"""The optimizer step on a subset of the text decoder layers (``train.step_layers``: at the 26B-A4B shape no AdamW
state for all 25.2B parameters fits one GPU). Both sides train those layers only, every other parameter frozen; HF's
trajectories (bf16 and its fp32 band) train HF's model in place and give it back bit for bit."""
from __future__ import annotations

import pytest
import torch

from parity.cases import CaseError, load_case
from parity.engine import pipeline
from parity.engine.alignment import text_layer_of
from parity.engine.launch import cpu_threads
from parity.engine.modes import step
from parity.engine.progress import Progress
from parity.errors import UserError
from parity.megatron_layout import train_layers

LAYERS = {"step_layers": [1, 2], "step_layers_why": "a test: layer 1 (sliding) and 2 (full, K=V) of the tiny model"}


def _case(name: str = "gemma4-text-tiny-train", **train):
    return load_case(name).replace(train={**LAYERS, **train})


@pytest.fixture(scope="module")
def reference_bf16():
    with cpu_threads("cpu"):
        ref = pipeline.reference(_case("gemma4-text-tiny-train-bf16"), device="cpu")
    yield ref
    ref.close()


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=False).items()}


def test_hf_trains_the_layers_in_place_and_is_given_back_bit_for_bit(reference_bf16):
    """The bf16 trajectory and its fp32 band (fp32 masters, one fp32 layer at a time) leave HF's model as it was: every
    tensor bit for bit, in its dtype, no gradient, ``requires_grad`` as before; what trained is layers 1 and 2 only."""
    ref = reference_bf16
    model = ref.model
    before, flags = _state(model), {k: p.requires_grad for k, p in model.named_parameters()}
    hf = step.prepare(ref, Progress(False))
    after = _state(model)
    assert before.keys() == after.keys()
    assert all(after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]) for k in before)
    assert all(p.grad is None and p.requires_grad == flags[k] for k, p in model.named_parameters())
    assert hf["after"].keys() == hf["before"].keys() == hf["fp32"]["after"].keys()
    assert {text_layer_of(k) for k in hf["after"]} == {1, 2}
    assert all(hf["fp32"]["after"][k].dtype == torch.float32 for k in hf["after"])
    assert any(not torch.equal(hf["after"][k], hf["before"][k]) for k in hf["after"])  # it did train
    assert len(hf["losses"]) == 10 and hf["losses"][-1] < hf["losses"][0]


def _fp32_both_ways(ref):
    """HF-fp32's trajectory as the band runs it (fp32 masters, one fp32 layer resident) and on a whole fp32 copy."""
    import copy

    spec, layers = ref.case.train, ref.case.train.step_layers
    with step.trains_in_place(ref.model, layers) as saved:
        streamed = step.trajectory_fp32(ref, Progress(False), spec, saved)
    whole = copy.deepcopy(ref.model).float()
    with step.trains_in_place(whole, layers) as saved:
        cast = step.trajectory(ref, whole, spec, saved)
    return streamed, cast


@pytest.mark.parametrize("name", ["gemma4-text-tiny-train-bf16", "gemma4-text-tiny-lora-bf16", "layers"])
def test_the_fp32_band_streamed_is_the_model_cast_to_fp32_bit_for_bit(name, reference_bf16):
    """The band's fp32 trajectory keeps what trains as fp32 masters and runs HF one fp32 layer at a time (at the 26B-A4B
    shape the model cast to fp32 was 94 GiB): losses, gradient norms, the final loss, the first step's meaningful
    elements and every trained parameter after it equal those of HF's model cast to fp32, bit for bit. Whole-model
    training (the tied embedding and head trained too: one master for both), LoRA adapters, two layers."""
    if name == "layers":
        ref = reference_bf16
    else:
        with cpu_threads("cpu"):
            ref = pipeline.reference(load_case(name), device="cpu")
    try:
        a, b = _fp32_both_ways(ref)
    finally:
        if ref is not reference_bf16:
            ref.close()
    assert a["losses"] == b["losses"] and a["norms"] == b["norms"] and a["final"] == b["final"]
    assert a["losses"][-1] < a["losses"][0] or len(a["losses"]) == 1
    assert a["after"].keys() == b["after"].keys() and len(a["after"]) >= 41
    assert all(torch.equal(a["after"][k], b["after"][k]) and a["after"][k].dtype == torch.float32 for k in a["after"])
    assert all(torch.equal(a["meaningful"][k], b["meaningful"][k]) for k in b["meaningful"])
    assert any(not torch.equal(a["after"][k], a["before"][k].float()) for k in a["after"])  # it trained


def test_hf_is_given_back_as_copies_not_as_its_record():
    """fp32 (one trajectory): the trained parameters come back as copies of what was saved, not the very tensors the
    trajectory keeps as "before" (on the host ``to`` would hand those out, and the model would alias the record)."""
    with cpu_threads("cpu"):
        ref = pipeline.reference(_case(steps=1), device="cpu")
    try:
        before = _state(ref.model)
        hf = step.prepare(ref, Progress(False))
        params = dict(ref.model.named_parameters())
        assert all(params[k].data_ptr() != t.data_ptr() for k, t in hf["before"].items())
        assert all(torch.equal(v, before[k]) for k, v in _state(ref.model).items())
    finally:
        ref.close()


def test_clean_bf16_step_on_two_layers(reference_bf16):
    """Our system freezes what HF freezes: its trajectory within HF's own bf16-vs-fp32 band, the first updates
    reported for layers 1 and 2 alone, the report saying what trained and why."""
    with cpu_threads("cpu"):
        r = pipeline.against(reference_bf16, "parity")
    traj = r["train"]["trajectory"]
    assert r["checks"]["trajectory"] is True and r["checks"]["step"] is True, traj
    assert traj["trains"] == {"layers": [1, 2], "why": LAYERS["step_layers_why"]}
    updated = r["train"]["first_update"]["parameters"]
    assert updated and {k.split(".")[2] for k in updated} == {"1", "2"}
    assert traj["worst_ratio"] < 1.0 and len(traj["system"]["loss"]) == 10
    from parity.report.training import trajectory

    assert "Trains text decoder layers 1, 2 only, every other parameter frozen on both sides: a test: layer 1" in \
        trajectory(traj, "bfloat16")


def test_a_system_that_steps_the_frozen_layers_too_fails_its_trajectory(reference_bf16):
    """Planted: the system ignores the freeze (``train_layers`` a no-op): it steps every parameter, its gradient
    norm is over all of them, and its trajectory leaves HF's band at the first step."""
    from parity.systems.ours import ParitySystem

    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(ParitySystem, "train_layers", lambda self, layers: None)
        with cpu_threads("cpu"):
            r = pipeline.against(reference_bf16, "parity")
    finally:
        mp.undo()
    traj = r["train"]["trajectory"]
    assert r["passed"] is False and r["checks"]["trajectory"] is False and r["checks"]["step"] is False
    assert traj["rel_diff"]["grad_norm"][0] > 10 * traj["gate"]["grad_norm"][0], traj["rel_diff"]
    assert r["checks"]["gradients"] is True  # the backward mode ran before any freeze


def test_train_layers_freezes_by_megatron_decoder_layer():
    """megatron names, both systems': a text decoder layer trains, its VLM twin's too; the embedding, the final
    norm, a vision tower's own ``layers`` do not."""
    names = ["embedding.word_embeddings.weight", "decoder.layers.0.mlp.linear_fc1.weight",
             "decoder.layers.1.self_attention.linear_qkv.weight", "decoder.layers.11.input_layernorm.weight",
             "language_model.decoder.layers.1.mlp.experts.weight1", "vision.encoder.layers.1.mlp.fc1.weight",
             "decoder.final_layernorm.weight"]
    model = torch.nn.Module()
    for i, n in enumerate(names):
        model.register_parameter(f"p{i}", torch.nn.Parameter(torch.zeros(1)))
    named = dict(zip(names, model.parameters()))
    model.named_parameters = lambda: iter(named.items())  # the names a megatron model gives
    assert train_layers(model, (1,)) == 2
    assert [n for n, p in named.items() if p.requires_grad] == [names[2], names[4]]
    for p in named.values():
        p.requires_grad_(True)
    assert train_layers(model, (1,), embedding=True) == 3  # train.grad_embedding: the word embedding too
    assert [n for n, p in named.items() if p.requires_grad] == [names[0], names[2], names[4]]


@pytest.mark.parametrize("train, message", [
    (dict(step_layers=[1], steps=0, no_step="x"), "needs steps >= 1"),
    ({"step_layers": [1, 1]}, "distinct layer indices"),
    ({"step_layers": []}, "non-empty list"),
    ({"step_layers": [1], "step_layers_why": None}, "step_layers_why: missing"),
    ({"step_layers": None, "step_layers_why": "x"}, "give it only with step_layers"),
    ({"grad_layers": [2], "grad_layers_why": "x"}, "layers \\[1\\] get no gradient"),
    ({"grad_layers": [1, 2]}, "grad_layers_why: missing"),
    ({"grad_layers": [0, 0], "grad_layers_why": "x"}, "distinct layer indices"),
    ({"grad_layers_why": "x"}, "give it only with grad_layers"),
    ({"grad_embedding": True}, "grad_embedding: only with grad_layers"),
    ({**{"grad_layers": [1, 2], "grad_layers_why": "x"}, "grad_embedding": 1}, "expected true or false"),
])
def test_case_file_errors(train, message):
    from parity.cases import parse_case

    base = load_case("gemma4-text-tiny-train").to_dict()
    base["train"].update({k: v for k, v in {**LAYERS, **train}.items() if v is not None})

    with pytest.raises(CaseError, match=message):
        parse_case(base, source="t.toml", stem=base["name"])


def test_a_layer_beyond_the_model_is_a_user_error_before_any_model_is_built(monkeypatch):
    from parity.engine.kinds import KINDS

    case = _case(step_layers=[1, 99])
    kind = KINDS[case.kind]
    monkeypatch.setattr(type(kind), "build", lambda *a, **k: pytest.fail("HF's model built before the check"))
    with cpu_threads("cpu"), pytest.raises(UserError, match="names layer 99, but the model has 6 text decoder"):
        pipeline.reference(case, device="cpu")


def test_a_checkpoints_layers_are_checked_once_its_model_is_built():
    """With a checkpoint the layer count is the folder's: the step's own check (after the build) says so."""
    from types import SimpleNamespace

    from parity.engine.modes import step

    case = _case(step_layers=[1, 7])
    ref = SimpleNamespace(case=case, text_args=SimpleNamespace(layers=[None] * 6))
    with pytest.raises(UserError, match="names layer 7, but the model has 6 text decoder layers \\(0-5\\)"):
        step.prepare(ref, None)


GRAD_LAYERS = {"grad_layers": [1, 2], "grad_layers_why": "a test: gradients of layers 1 and 2 only"}
GRADIENTS = ("loss", "grad_output", "grad_input", "param_grad", "isolated_grad_input", "isolated_param_grad")


def _rows(r: dict, modes=GRADIENTS) -> dict:
    return {(m["name"], m["mode"]): m for m in r["modules"] if m["mode"] in modes}


@pytest.mark.parametrize("system", ["parity", "megatron-bridge"])
def test_gradients_of_some_layers_are_those_of_a_run_with_all(system):
    """``train.grad_layers`` (a memory option: at the 26B-A4B shape every parameter's gradient is 47 GiB on each
    side): both sides freeze every parameter outside layers 1 and 2 before anything runs. Each gradient row the run
    still has is the whole run's, value for value (freezing changes no gradient that is computed); the parameter rows
    are those two layers'; no activation gradient reaches below layer 1 (nothing there needs one); the step and the
    trajectory are the same."""
    if system == "megatron-bridge":
        from parity import mbridge

        ok, why = mbridge.available()
        if not ok:
            pytest.skip(f"Megatron-Bridge not importable: {why}")
    case = load_case("gemma4-text-tiny-train-bf16")
    # megatron-core's fused activations are torch.compile'd until their recompile limit, then eager (a bf16 gelu
    # rounded once or after every op): each run starts from fresh compile caches, as a run in its own process does
    torch._dynamo.reset()
    with cpu_threads("cpu"):
        whole = pipeline.run(case.replace(train=LAYERS), device="cpu", system=system)
    torch._dynamo.reset()
    with cpu_threads("cpu"):
        some = pipeline.run(case.replace(train={**LAYERS, **GRAD_LAYERS}), device="cpu", system=system)
    a, b = _rows(whole, GRADIENTS + ("param_step",)), _rows(some, GRADIENTS + ("param_step",))
    assert len(b) > 250 and set(b) < set(a)
    differ = [(k, a[k]["rel_l2"], b[k]["rel_l2"]) for k in b if b[k]["rel_l2"] != a[k]["rel_l2"]
              or b[k].get("floor") != a[k].get("floor")]
    assert not differ, (len(differ), differ[:5])
    params = [m for m in b.values() if m["mode"] in ("param_grad", "isolated_param_grad")]
    assert {m["layer"] for m in params} == {1, 2} and len(params) > 60
    assert not any(m["layer"] == 0 for m in b.values()) and any(m["layer"] == 0 for m in a.values())
    assert some["train"]["grad_layers"] == {"layers": [1, 2], "why": GRAD_LAYERS["grad_layers_why"]}
    assert "grad_layers" not in whole["train"]
    traj = lambda r: r["train"]["trajectory"]["system"]  # noqa: E731
    assert traj(some) == traj(whole) and some["checks"]["step"] == whole["checks"]["step"] is True


def test_the_embedding_trains_beside_some_layers_as_in_a_run_with_all():
    """``train.grad_embedding`` with ``grad_layers``: the word embedding (tied to the head) trains too, on both sides;
    every layer then gets its activation gradients, each row the whole run's value for value, and the parameter rows
    are those layers' and the embedding's."""
    case = load_case("gemma4-text-tiny-train-bf16")
    with cpu_threads("cpu"):
        whole = pipeline.run(case.replace(train=LAYERS), device="cpu")
        some = pipeline.run(case.replace(train={**LAYERS, **GRAD_LAYERS, "grad_embedding": True}), device="cpu")
    a, b = _rows(whole), _rows(some)
    differ = [(k, a[k]["rel_l2"], b[k]["rel_l2"]) for k in b if b[k]["rel_l2"] != a[k]["rel_l2"]]
    assert set(b) < set(a) and not differ, differ[:5]
    params = {m["name"] for m in b.values() if m["mode"] == "param_grad"}
    assert "model.embed_tokens.weight" in params and {a[k]["layer"] for k in a if k[1] == "param_grad"} - {None} > \
        {b[k]["layer"] for k in b if k[1] == "param_grad"} - {None} == {1, 2}
    assert any(m["layer"] == 0 and m["mode"] == "grad_input" for m in b.values())  # layer 0 gets its gradients
    assert some["train"]["grad_layers"]["embedding"] is True and some["passed"] is True
    from parity.report import training as report

    page = report.section(some)
    assert "text decoder layers 1, 2 and the word embedding, every other parameter frozen" in page
    assert "no activation gradient below layer 1" in report.section(
        {**some, "train": {**some["train"], "grad_layers": {"layers": [1, 2], "why": "x"}}})
