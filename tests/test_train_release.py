"""What a train run holds of HF's side on the host, and what it lets go of (the 26B-A4B train case's host budget,
docs/training.md): after the last system's backward (``Reference.final``) HF's parameter and input gradients and its
whole fp32 side are released, the isolated backward reading only the output gradients; the rows stay the same."""
from __future__ import annotations

import pytest
import torch

from parity.cases import load_case
from parity.engine import pipeline
from parity.engine.hoststage import host_bytes
from parity.engine.launch import cpu_threads
from parity.engine.modes import backward as B

CASE_BF16 = "gemma4-text-tiny-train-bf16"


def test_the_last_systems_backward_releases_hfs_gradients():
    """The numbers: every bf16 parameter gradient of HF's and its fp32 twin held until the last system's backward,
    none after; the output gradients (what the isolated backward reads) kept. That the rows are those of a run that
    keeps them: ``test_backward.py::test_the_full_size_train_path_on_a_tiny_model`` (``pipeline.run``: one system, the
    last) against ``pipeline.against`` (no release), field by field."""
    with cpu_threads("cpu"):
        ref = pipeline.reference(load_case(CASE_BF16), device="cpu")
    try:
        grads = ref.extra[B.MODE]["grads"].out
        n16 = sum(p.numel() * 2 for p in ref.model.parameters())  # HF's bf16 gradient of every parameter
        outputs = host_bytes([g for k, g in grads.items() if k[0] not in (B.PARAM, B.INPUT)])
        before = ref.held()
        assert before["param grads"] == n16 and before["fp32 param grads"] == 2 * n16 and n16 > 500_000
        assert before["fp32 row grads"] > 0 and before["row grads"] > outputs > 0
        ref.final = True
        with cpu_threads("cpu"):
            r = pipeline.against(ref, "parity")
        after = ref.held()
        assert after["param grads"] == after["fp32 param grads"] == after["fp32 row grads"] == 0
        assert "backward32" not in ref.extra and not any(k[0] in (B.PARAM, B.INPUT) for k in grads)
        assert after["row grads"] == outputs  # the output (and routing) gradients stay: the isolated backward's
        weights = ("weights staged", "HF model")  # the systems' weights: HF's own tensors in a run on one device
        assert sum(after[k] for k in weights) == sum(before[k] for k in weights) > n16 / 2
        assert after["activations"] == before["activations"] > 0 and after["other"] == before["other"]
        # released after every row that reads them: the backward's parameter rows, each with its truth
        params = [m for m in r["modules"] if m["mode"] == "param_grad"]
        assert len(params) == 126 and all(m.get("truth_rel_l2") is not None for m in params)
        assert r["passed"] is True and sum(m["mode"] == "isolated_param_grad" for m in r["modules"]) == 127
    finally:
        ref.close()


def test_without_an_isolated_backward_the_output_gradients_go_too():
    """A LoRA case has no isolated backward (its fused parts share one A): after the last system's backward nothing
    reads HF's output gradients either, so they go with the rest (8.4 GiB of host memory at the 26B LoRA shape, where
    the system parked on the host took it to 123.5 GiB of 125). The rows are those of a run that keeps them."""
    with cpu_threads("cpu"):
        ref = pipeline.reference(load_case("gemma4-text-tiny-lora-bf16"), device="cpu")
    try:
        with cpu_threads("cpu"):
            kept = pipeline.against(ref, "parity")
        before = ref.held()
        assert before["row grads"] > 0 and before["param grads"] > 0
        ref.final = True
        with cpu_threads("cpu"):
            r = pipeline.against(ref, "parity")
        assert ref.held()["row grads"] == 0 and not ref.extra[B.MODE]["grads"].out
        assert r["passed"] is True and len(r["modules"]) == len(kept["modules"]) > 400
        assert all(a == b for a, b in zip(r["modules"], kept["modules"])), "the rows of a run that keeps them"
    finally:
        ref.close()


def test_host_bytes_counts_each_storage_once():
    x = torch.zeros(1000)
    seen: set = set()
    assert host_bytes([x, x[:10], {"a": (x.view(10, 100),)}], seen) == 4000
    assert host_bytes([x, torch.zeros(3, dtype=torch.bfloat16)], seen) == 6  # x is in ``seen`` already


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (page-locked staging of HF's gradients)")
def test_hfs_parameter_gradients_are_staged_page_locked_and_unpinned_at_the_release():
    with cpu_threads("cuda"):
        ref = pipeline.reference(load_case(CASE_BF16), device="cuda")
    try:
        hf = ref.extra[B.MODE]
        params = [g for k, g in hf["grads"].out.items() if k[0] == B.PARAM]
        assert len(params) == 126 and all(g.device.type == "cpu" for g in params)
        assert hf["stage"].pinned_bytes >= sum(g.numel() * g.element_size() for g in params)
        stage, stage32 = hf["stage"], ref.extra["backward32"]["stage"]  # and the fp32 ones kept for the truth
        assert stage32.pinned_bytes >= 2 * sum(g.numel() * g.element_size() for g in params)
        assert B.release(ref) >= 3 * sum(g.numel() * g.element_size() for g in params)
        assert stage.pinned_bytes == stage32.pinned_bytes == 0 and "stage" not in hf
        assert ref.held()["param grads"] == ref.held()["fp32 param grads"] == 0
    finally:
        ref.close()


def test_a_system_that_outlives_its_run_is_said(monkeypatch, capsys):
    """A run whose system is still referred to after it (the next build finds its memory taken: a 26B plant table's
    next plant ran out of memory so) says it in its progress; a run whose system is freed says nothing."""
    from parity.systems import ours

    kept, build = [], ours.ParitySystem.build

    def keeping(self, *a, **kw):
        kept.append(self)  # BUG: a module-level reference to the system
        return build(self, *a, **kw)
    with cpu_threads("cpu"):
        ref = pipeline.reference(load_case("gemma4-text-tiny"), device="cpu", progress=True)
        pipeline.against(ref, "parity")
        assert "outlived its run" not in capsys.readouterr().err
        monkeypatch.setattr(ours.ParitySystem, "build", keeping)
        pipeline.against(ref, "parity")
    ref.close()
    err = capsys.readouterr().err
    assert len(kept) == 1 and "the system's model outlived its run (host " in err, err[-500:]


def test_a_system_that_raises_in_the_last_mode_is_freed(monkeypatch):
    """The backward mode's hooks on the system's tensors are removed with its module hooks. They hold the system, and
    a tensor its model keeps after the mode (our router keeps its last top-k weights, whose graph saved the hooked
    input) kept the whole system alive whenever no later forward replaced it: on the 26B backward plants, a run whose
    isolated backward raised first thing (its planted loss compared token ids on the device with labels on the
    host) left ~30 GiB on the device, and the next plant's build ran out of memory. Before the fix, this system
    outlived its run."""
    from parity.systems import ours

    seen, freed, loss_on = [], pipeline.freed, ours.ParitySystem.loss_on

    def spy(ref, device):
        seen.append(freed(ref, device))
        return seen[-1]

    calls = []

    def raising(self, logits, labels):  # the isolated loss (the second call) raises from torch, as on the GPU
        calls.append(1)
        ids = self.inputs["input_ids"][:, :None if len(calls) == 1 else -1]
        return loss_on(self, logits, torch.where(labels == -100, ids, labels))
    monkeypatch.setattr(pipeline, "freed", spy)
    monkeypatch.setattr(ours.ParitySystem, "loss_on", raising)
    case = load_case(CASE_BF16).replace(train={"steps": 0, "no_step": "a test: no step after the isolated backward"})
    with cpu_threads("cpu"):
        ref = pipeline.reference(case, device="cpu")
        r = pipeline.against(ref, "parity")
    ref.close()
    assert [f["phase"] for f in r["failures"]] == ["isolated_backward"] and "must match" in r["failures"][0]["error"]
    assert seen == [True]
