"""Where the metrics of an aligned pair run: on the accelerator side whenever one side is there.

A sequential GPU run keeps HF's captured activations in host memory; moving the GPU side to the host instead
would compute every metric on the CPU (a 26B-A4B noise floor went from 7 s to 237 s that way). No GPU here:
the ``meta`` device stands in for the accelerator, and a spy on ``tensor_metrics`` records the devices it sees.
"""
from __future__ import annotations

import pytest
import torch

from parity.engine import metrics as M
from parity.engine.alignment import Kind
from parity.engine.compare import Where, compare, device_of
from parity.engine.compare import floor_value

ACCEL = torch.device("meta")


@pytest.fixture
def seen(monkeypatch) -> list[tuple]:
    calls = []

    def spy(ref, test, mask=None):
        calls.append((ref.device, test.device, None if mask is None else mask.device))
        return {"cosine": 1.0, "rel_l2": 0.0, "max_abs": 0.0}

    monkeypatch.setattr(M, "tensor_metrics", spy)
    return calls


def _pair(kind: Kind, b: int = 2, s: int = 5, h: int = 4) -> tuple[torch.Tensor, torch.Tensor, Where]:
    where = Where(valid=torch.ones(b, s, dtype=torch.bool), real=torch.ones(b, s, dtype=torch.bool))
    shape = (b * s, h) if kind in (Kind.EXPERTS, Kind.FLAT_NORM) else (b, s, h)
    return torch.randn(shape), torch.randn(shape), where


@pytest.mark.parametrize("kind", [Kind.NORM, Kind.LAYER, Kind.EXPERTS, Kind.FLAT_NORM, Kind.MERGED, Kind.LOGITS,
                                  Kind.PATCHES, Kind.TOKENS])
@pytest.mark.parametrize("accelerated", ["ref", "test"])
def test_metrics_run_on_the_accelerator_side(seen, kind, accelerated):
    ref, test, where = _pair(kind)
    if accelerated == "ref":
        ref = ref.to(ACCEL)
    else:
        test = test.to(ACCEL)
    compare(kind, ref, test, where)
    assert seen == [(ACCEL, ACCEL, ACCEL if kind is not Kind.TOKENS else None)]


def test_host_pairs_stay_on_the_host(seen):
    ref, test, where = _pair(Kind.NORM)
    compare(Kind.NORM, ref, test, where)
    assert seen == [(torch.device("cpu"),) * 3]


def test_noise_floor_runs_where_the_fp32_output_is(seen):
    """The bf16 capture (host-staged) goes to the fp32 output's device, not the other way round."""
    out32, out16, where = _pair(Kind.NORM)
    floor_value(Kind.NORM, out32.to(ACCEL), out16.bfloat16(), where)
    assert seen == [(ACCEL, ACCEL, ACCEL)]


def test_device_of_prefers_any_accelerator():
    host, accel = torch.zeros(1), torch.zeros(1, device=ACCEL)
    assert device_of(host, accel) == device_of(accel, host) == ACCEL
    assert device_of(host, host) == torch.device("cpu")


def test_store_keeps_a_tensor_again_after_an_in_place_change():
    """HF's audio feed-forward returns its post-norm's output after ``*=`` and ``+=``: the same tensor object, a
    new value. The capture's deduplication (by storage) must not hand back the first value kept."""
    from parity.engine.compare import Store

    store = Store(offload=False)
    x = torch.ones(3)
    first = store.keep(x)
    assert store.keep(x) is first  # unchanged: deduplicated
    x.mul_(2.0).add_(1.0)
    again = store.keep(x)
    assert torch.equal(first, torch.ones(3)) and torch.equal(again, torch.full((3,), 3.0))
