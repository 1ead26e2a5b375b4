"""The capture store's device budget (``[run] device_reserve_gib``): what an offloading run keeps on the device."""
from __future__ import annotations

import pytest
import torch

from parity.cases import CaseError, load_case, parse_case
from parity.engine.compare import Store
from parity.engine.reference import device_budget


def test_captures_stay_on_the_device_until_one_does_not_fit_then_none_does():
    s = Store(offload=True, device_budget=100)
    x = torch.zeros(15, dtype=torch.float32)  # 60 bytes
    assert s._to_host(x) is False and s.device_bytes == 60 and not s.overflowed
    assert s._to_host(torch.zeros(10)) is False and s.device_bytes == 100  # fits exactly
    assert s._to_host(torch.zeros(1)) is True and s.overflowed
    s = Store(offload=True, device_budget=100)
    assert s._to_host(torch.zeros(30)) is True  # 120 > 100
    assert s._to_host(torch.zeros(1)) is True and s.device_bytes == 0  # a smaller one after it too: all or nothing


def test_no_budget_sends_everything_to_the_host():
    s = Store(offload=True)
    assert s._to_host(torch.zeros(1)) is True and s.device_bytes == 0
    assert s._to_host(torch.zeros(0)) is True and not s.overflowed  # an empty one too (HostStage copies it over)


def test_the_budget_is_zero_off_cuda_without_the_setting_or_when_not_sequential():
    case = load_case("gemma4-26b-a4b")
    assert case.run.device_reserve_gib == 24 and case.run.sequential
    assert device_budget(case, "cpu", 0) == 0
    assert device_budget(load_case("gemma4-text-tiny"), "cuda", 0) == 0
    resident = case.replace(run={"sequential": False})  # HF beside the system (gpu_plants on an H200): no room
    assert resident.run.device_reserve_gib == 24 and device_budget(resident, "cuda", 0) == 0


def _with_run(**run):
    data = load_case("gemma4-text-tiny").to_dict()
    data["run"] = {**data.get("run", {}), **run}
    return parse_case(data, source="t", stem=data["name"])


def test_the_reserve_needs_offload_and_a_positive_integer():
    assert _with_run(offload=True, device_reserve_gib=8).run.device_reserve_gib == 8
    with pytest.raises(CaseError, match="device_reserve_gib: only with offload"):
        _with_run(offload=False, device_reserve_gib=8)
    with pytest.raises(CaseError, match="device_reserve_gib: must be >= 1"):
        _with_run(offload=True, device_reserve_gib=0)


class _Offloading(Store):
    """A store that treats host tensors as the device's (the placement rules, without a GPU): ``_put``'s host copy
    is a new tensor, so what moved is told by identity."""

    @staticmethod
    def _offloadable(y):
        return True


def _capture(store, tensors):
    from parity.engine.compare import Call, Capture

    cap = Capture()
    for i, t in enumerate(tensors):
        cap.calls[f"m{i}"] = [Call((store.keep(t),), {"k": store.keep(t)}, store.keep((t * 2, t * 3)), i)]
    return cap


def test_within_the_budget_every_capture_stays_and_settle_moves_nothing():
    s = _Offloading(offload=True, device_budget=10_000)
    ts = [torch.randn(10) for _ in range(3)]
    cap = _capture(s, ts)
    kept = [c.output for calls in cap.calls.values() for c in calls]
    s.settle(cap)
    assert not s.overflowed and s.device_bytes == 3 * 3 * 40
    assert all(a is b for a, b in zip(kept, [c.output for calls in cap.calls.values() for c in calls]))
    assert not s._on_device  # the store keeps no device memory of its own once settled


def test_over_the_budget_every_capture_ends_on_the_host_values_and_sharing_kept():
    s = _Offloading(offload=True, device_budget=200)  # the first module's three tensors fit (120 bytes), not more
    ts = [torch.randn(10) for _ in range(3)]
    cap = _capture(s, ts)
    first_in = cap.calls["m0"][0].args[0]
    assert s.overflowed and id(first_in) in s._on_device
    s.settle(cap)
    c0 = cap.calls["m0"][0]
    assert c0.args[0] is not first_in and torch.equal(c0.args[0], ts[0])  # moved, same values
    assert c0.kwargs["k"] is c0.args[0]  # one storage kept once stays one tensor
    assert torch.equal(c0.output[1], ts[0] * 3)
    assert s.device_bytes == 0 and not s._on_device
    for i, t in enumerate(ts):
        c = cap.calls[f"m{i}"][0]
        assert torch.equal(c.output[0], t * 2) and torch.equal(c.kwargs["k"], t)
