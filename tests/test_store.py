"""The capture store's device budget (``[run] device_reserve_gib``): what an offloading run keeps on the device."""
from __future__ import annotations

import pytest
import torch

from parity.cases import CaseError, load_case, parse_case
from parity.engine.compare import Store
from parity.engine.reference import device_budget


def test_captures_stay_on_the_device_in_capture_order_while_they_fit():
    s = Store(offload=True, device_budget=100)
    x = torch.zeros(15, dtype=torch.float32)  # 60 bytes
    assert s._to_host(x) is False and s.device_bytes == 60
    assert s._to_host(x) is True and s.device_bytes == 60  # 120 > 100: to the host
    assert s._to_host(torch.zeros(10)) is False and s.device_bytes == 100  # a smaller one still fits, exactly
    assert s._to_host(torch.zeros(1)) is True


def test_no_budget_sends_everything_to_the_host():
    s = Store(offload=True)
    assert s._to_host(torch.zeros(1)) is True and s.device_bytes == 0


def test_the_budget_is_zero_off_cuda_or_without_the_setting():
    case = load_case("gemma4-26b-a4b")
    assert case.run.device_reserve_gib == 24
    assert device_budget(case, "cpu", 0) == 0
    assert device_budget(load_case("gemma4-text-tiny"), "cuda", 0) == 0


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
