"""The LoRA mode's HF copies at full size: where a copy of HF's model does not fit the card beside the system (the
26B-A4B shape on an 80 GB card: 47 GiB each), the system's weights step aside to the host (its ``parked``) and the
section says so; the same tensors come back."""
from __future__ import annotations

import torch

from parity.engine.modes import lora
from parity.tensors import parked

GIB = 2**30


def test_an_hf_copy_that_fits_beside_the_system_parks_nothing():
    assert lora.park_reason("parity", 47 * GIB, None, True) is None  # not a CUDA device
    assert lora.park_reason("parity", 47 * GIB, 47 * GIB + lora.WORKING, True) is None  # H200: 139 - 47 GiB free


def test_an_80_gb_card_parks_the_system_and_says_why():
    why = lora.park_reason("parity", int(47.2 * GIB), int(29.5 * GIB), True)
    assert why.startswith("an HF copy (47.2 GiB) and 12 GiB of working memory do not fit the device's 29.5 GiB "
                          "beside parity: its weights went to the host"), why
    assert "merged export was computed there" in why
    # just short of the copy and its working memory: still parked
    assert lora.park_reason("x", 10 * GIB, 10 * GIB + lora.WORKING - 1, True) is not None


def test_a_system_that_cannot_park_is_named():
    why = lora.park_reason("other", 47 * GIB, 30 * GIB, False)
    assert why.endswith("and other has no parked(): its weights stayed"), why


def test_parking_keeps_the_tensors_and_their_values():
    """The same Parameter objects before, during and after (an optimizer's state and ties key on them); values and
    gradients bit for bit; on the host nothing moves."""
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    m[0].weight.grad = torch.randn(3, 4)
    ids = [id(p) for p in m.parameters()]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    grad = m[0].weight.grad.clone()
    with parked(m) as moved:
        assert moved == 0  # already on the host
        assert [id(p) for p in m.parameters()] == ids
    assert [id(p) for p in m.parameters()] == ids
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert torch.equal(m[0].weight.grad, grad)


def test_a_parked_run_gives_the_rows_of_one_that_is_not(monkeypatch):
    """The whole LoRA mode with the system parked (the device's room made too small; on the host parking moves
    nothing, so this checks the port's path and the section, not the device move): the system's ``parked`` is entered
    through the engine's guard, the section says why, and every row is the unparked run's."""
    import importlib.util

    import pytest

    from parity import mbridge

    ok, why = mbridge.available()
    if not ok or importlib.util.find_spec("peft") is None:
        pytest.skip(f"Megatron-Bridge or peft not importable: {why or 'peft'}")
    from parity.cases import load_case
    from parity.engine import pipeline
    from parity.engine.launch import cpu_threads
    from parity.systems.ours import ParitySystem

    entered = []
    park = ParitySystem.parked

    def counted(self):
        entered.append(self.name)
        return park(self)
    with cpu_threads("cpu"):
        ref = pipeline.reference(load_case("gemma4-text-tiny-lora-bf16"), device="cpu")
    try:
        with cpu_threads("cpu"):
            plain = pipeline.against(ref, "parity")
        monkeypatch.setattr(lora, "device_room", lambda device: 0)
        monkeypatch.setattr(ParitySystem, "parked", counted)
        with cpu_threads("cpu"):
            parked_run = pipeline.against(ref, "parity")
    finally:
        ref.close()
    assert plain["lora"]["system_parked"] is None and entered == ["parity"]
    assert parked_run["lora"]["system_parked"].startswith("an HF copy (") and "went to the host" in \
        parked_run["lora"]["system_parked"]
    assert parked_run["passed"] is True and parked_run["modules"] == plain["modules"]


def test_tensors_that_shared_a_storage_share_its_copy():
    """``tensors.one_copy_each`` (what ``parked`` moves with): two parameters viewing one flat buffer, and a buffer
    viewing it too, come out as views of one copy of it, each at its own offset, size and stride, with their values;
    another tensor gets its own copy. Before, each came back with a storage of its own (the tie lost)."""
    from parity.tensors import one_copy_each

    flat = torch.arange(24.0)
    a, b = torch.nn.Parameter(flat[:12].view(3, 4)), torch.nn.Parameter(flat[12:].view(4, 3).t())
    c, other = flat[4:8], torch.randn(5)
    out = one_copy_each([a, b, c, other], torch.device("cpu"))
    ptr = {t.untyped_storage().data_ptr() for t in out[:3]}
    assert len(ptr) == 1 and ptr != {flat.untyped_storage().data_ptr()}
    assert out[3].untyped_storage().data_ptr() not in ptr
    for new, old in zip(out, [a, b, c, other]):
        assert torch.equal(new, old) and new.stride() == old.stride() and new.storage_offset() == old.storage_offset()
    out[0].data[1, 0] = -1.0  # one memory: a write through one view (flat element 4) shows in the other (c's first)
    assert out[2][0] == -1.0 and c[0] == 4.0 and out[0].untyped_storage().nbytes() == 24 * 4
