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
