"""Megatron-Bridge at TP=4, its Gemma 4 SFT recipe's tensor parallelism, in a gloo world of 4 CPU processes
(``gemma4-text-tiny-train-tp4-megatron-bridge``, sequence parallelism on): the full-attention layers have 2 KV heads
(``num_global_key_value_heads``), fewer than the TP ranks, so megatron-core computes each on two ranks
(``num_query_groups < tp``: the fused QKV output all-gathered, each rank its group's slice, then its own query heads).
The harness lays out such a per-head norm's value from a head's first rank and its gradient as the sum over the
head's ranks (``megatron_layout.split_heads`` / ``gather_heads``: each rank's attention reads the head with its own
query heads only). Its training-step findings removed (10, 11, 2): every row agrees; a replicated KV group read from
the wrong rank's slot fails at the first full-attention layer's q norm. Skips where megatron-bridge is not
importable."""
from __future__ import annotations

import pytest
import torch

from parity import mbridge
from tests.gloo import run_case

OK, WHY = mbridge.available()
pytestmark = pytest.mark.skipif(not OK, reason=f"Megatron-Bridge not importable: {WHY}")

CASE = "gemma4-text-tiny-train-tp4-megatron-bridge"


def groups_misread(mp):
    """Its attention's TP rank, as read for the replicated KV groups, shifted by two (the other group's ranks): on the
    full-attention layers each rank takes the other KV group and that group's query heads; the sliding layers (KV
    heads = TP) never read it."""
    from megatron.core.transformer import attention

    rank = attention.get_pg_rank
    mp.setattr(attention, "get_pg_rank", lambda group: (rank(group) + 2) % 4)


def _layout(rank: int) -> dict:
    """``split_heads`` then ``gather_heads`` on an HF-layout ``[b, s, 2 heads, d]`` tensor at TP=4, and the gradient
    of a weighted sum through them; a gradient gathered with ``grad``."""
    from parity.megatron_layout import gather_heads, split_heads

    x = torch.randn(2, 3, 2, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
    c = torch.randn(2, 3, 2, 5, generator=torch.Generator().manual_seed(1))
    local = split_heads(x)
    y = gather_heads(local, 2)
    (y * c).sum().backward()
    g = gather_heads(torch.full((2, 3, 1, 5), float(rank + 1)), 2, grad=True)
    return {"local_head": torch.equal(local.detach(), x.detach()[:, :, rank // 2:rank // 2 + 1]),
            "values": torch.equal(y.detach(), x.detach()), "input_grad": torch.equal(x.grad, c),
            "grad_sum": g[0, 0, :, 0].tolist()}


@pytest.fixture(scope="module")
def world() -> dict:
    """Its findings removed (10, 11, 2); the layout checked in the world (megatron's parallel state as the clean run
    left it: TP=4), then its KV groups misread."""
    from tests.test_megatron_bridge_backward import ALL_CAUSES

    return run_case(CASE, "megatron-bridge", 4, clean=(None, ALL_CAUSES, None), layout=_layout,
                    misread=(None, ALL_CAUSES, groups_misread))


def test_replicated_heads_layout(world):
    """Rank r holds KV head r // 2; gathered back, the values are HF's exactly, and the gradient of the whole input is
    the output's (zero from a head's second rank, summed over TP); a gradient gathered with ``grad`` sums a head's
    ranks (ranks 1 + 2 and 3 + 4)."""
    assert world["layout"] == {"local_head": True, "values": True, "input_grad": True, "grad_sum": [3.0, 7.0]}


def test_tp4_training_step_with_its_findings_removed_holds(world):
    """Every row of the run -- the full layers' k norms included (end to end, each alone, their gradients) -- within
    its gate, as at TP=2 (measured: gradients <= 2.5e-6, first updates <= 4.1e-9)."""
    r = world["clean"]
    assert r["parallel"] == {"tp": 4, "ep": 1, "world_size": 4, "sequence_parallel": True}
    assert r["passed"] is True and r["failed"] == [] and r["first"] is None
    k_norms = {(n, m): v for (n, m), v in r["rows"].items() if n in ("model.layers.2.self_attn.k_norm",
                                                                     "model.layers.5.self_attn.k_norm")}
    assert {m for _, m in k_norms} >= {"end_to_end", "isolated", "grad_output", "grad_input", "isolated_grad_input"}
    assert all(v is not None and v < 1e-5 for v in k_norms.values()), k_norms


def test_replicated_kv_groups_misread_fail_at_the_first_full_layer(world):
    """Each rank reading the other KV group's slot (and its query heads) on the full layers: the first divergence is
    the first full layer's attention alone (rel-L2 1.41), its q and k norms fail end to end, the layers before it
    agree bit for bit end to end."""
    r, clean = world["misread"], world["clean"]
    assert r["passed"] is False
    assert (r["first"]["name"], r["first"]["mode"]) == ("model.layers.2.self_attn", "isolated")
    assert r["first"]["value"] > 1.0
    assert {("model.layers.2.self_attn.q_norm", "end_to_end"), ("model.layers.2.self_attn.k_norm", "end_to_end")} <= \
        set(r["failed"])
    assert all(r["rows"][k] == clean["rows"][k] for k in clean["rows"]
               if k[1] == "end_to_end" and k[0].startswith(("model.layers.0.", "model.layers.1.")))
