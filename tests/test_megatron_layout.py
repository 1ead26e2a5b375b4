"""``parity.megatron_layout`` on its own: which module inputs a TP rank holds a slice of (gathered for HF's layout)
and which it reads whole. TP is faked (``tp_size`` 2, ``tp_gather`` concatenating two copies) so that a gather shows
in the shape; the gathers themselves are pinned in gloo worlds (tests/test_megatron_bridge_tp_over_kv_heads.py)."""
from __future__ import annotations

import pytest
import torch

from parity import megatron_layout as L
from parity.engine.alignment import Aligned, Kind, Row


class _Linear(torch.nn.Module):
    def __init__(self, input_is_parallel: bool | None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(3, 4))
        self.weight.partition_dim = 1  # as megatron marks a row-parallel linear's weight
        if input_is_parallel is not None:
            self.input_is_parallel = input_is_parallel


@pytest.fixture
def two_ranks(monkeypatch):
    monkeypatch.setattr(L, "tp_size", lambda: 2)
    monkeypatch.setattr(L, "tp_gather", lambda x: torch.cat([x, x], dim=-1))


@pytest.mark.parametrize("input_is_parallel, width", [(True, 8), (None, 8), (False, 4)])
def test_a_row_parallel_linear_input_is_gathered_unless_it_reads_it_whole(two_ranks, input_is_parallel, width):
    """A row-parallel linear's input is this rank's slice of the features (gathered: width 2 x 4), unless the linear
    was built with ``input_is_parallel=False`` (it takes the whole input and slices it itself: our per-layer
    projection), whose input -- and input gradient -- is HF's as it is."""
    a = Aligned("model.layers.0.per_layer_projection", Row("layers.{i}.per_layer_projection", Kind.LINEAR))
    x = torch.randn(5, 2, 4)  # [s, b, features]
    assert L.input_to_hf(a, x, 2, 5, _Linear(input_is_parallel)).shape == (2, 5, width)


def test_a_head_on_two_ranks_value_once_gradient_summed(two_ranks):
    """A k norm whose layer has 1 KV head at TP=2 (megatron computes it on both ranks): its value is one rank's, its
    gradient the sum of both ranks' parts (here two equal copies: twice the value), both ``[b, s, 1, d]``; a q norm
    (8 heads, 4 a rank) gathered to 8 either way."""
    from types import SimpleNamespace

    args = SimpleNamespace(num_heads=8, layers=[SimpleNamespace(num_kv_heads=1)])
    k = Aligned("model.layers.0.self_attn.k_norm", Row("layers.{i}.self_attn.k_norm", Kind.HEAD_NORM))
    q = Aligned("model.layers.0.self_attn.q_norm", Row("layers.{i}.self_attn.q_norm", Kind.HEAD_NORM))
    x = torch.randn(5, 2, 1, 3)  # [s, b, heads on this rank, d]
    assert torch.equal(L.to_hf(k, x, 2, 5, args), x.transpose(0, 1))
    assert torch.equal(L.to_hf(k, x, 2, 5, args, grad=True), 2 * x.transpose(0, 1))
    assert L.to_hf(q, torch.randn(5, 2, 4, 3), 2, 5, args, grad=True).shape == (2, 5, 8, 3)
