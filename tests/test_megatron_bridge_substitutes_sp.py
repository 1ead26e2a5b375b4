"""The Transformer Engine stand-ins (``parity.mbridge.substitutes``) under sequence parallelism, pinned in one gloo
world of two CPU processes (TP=2) against megatron-core's own non-TE parallel linears with ``sequence_parallel=True``
and against one process computing the whole sequence:

- ``LayerNormColumnParallelLinearSubstitute`` (TE ``LayerNormLinear``, column): the norm on this rank's sequence shard,
  then megatron's ``ColumnParallelLinear`` (its all-gather along the sequence before the GEMM, the reduce-scatter of
  the input gradient), bit for bit: output, input gradient, weight gradient;
- ``RowParallelLinearPostNormSubstitute`` (TE ``Linear``, row, + ``TENorm``): megatron's ``RowParallelLinear`` (its
  reduce-scatter along the sequence), then the norm on the shard, bit for bit;
- their norm weights (and ``TENormSubstitute``'s) marked ``sequence_parallel``: megatron-core's own
  ``_allreduce_non_tensor_model_parallel_grads`` (``megatron_layout.finalize_grads``) sums their gradients over TP, to
  the whole sequence's gradient of one process (float32 sums in another order: within 1e-6).

Skips where megatron-bridge is not importable."""
from __future__ import annotations

import pytest
import torch

from parity import mbridge
from tests.gloo import join, spawn

OK, WHY = mbridge.available()
pytestmark = pytest.mark.skipif(not OK, reason=f"Megatron-Bridge not importable: {WHY}")

S, B, H, F = 6, 2, 8, 12  # sequence, batch, hidden, features (split over TP=2)


def _max(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def _worker(rank, world, port, path):
    join(rank, world, port)
    from megatron.core.model_parallel_config import ModelParallelConfig  # noqa: F401  (megatron first: compat)
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig

    from parity import megatron_env
    from parity.mbridge import substitutes as Sub
    from parity.megatron_layout import finalize_grads

    megatron_env.init(tp=2, ep=1, sequence_parallel=True)
    config = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=2, tensor_model_parallel_size=2,
                               sequence_parallel=True, normalization="RMSNorm", layernorm_epsilon=1e-6,
                               use_cpu_initialization=True, perform_initialization=False,
                               gradient_accumulation_fusion=False, params_dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    x, gamma = torch.randn(S, B, H, generator=gen), torch.rand(H, generator=gen) + 0.5
    w1, g1 = torch.randn(F, H, generator=gen), torch.randn(S, B, F, generator=gen)  # column: weight, output grad
    z, w2 = torch.randn(S, B, F, generator=gen), torch.randn(H, F, generator=gen)  # row: input, weight
    gamma2, g2 = torch.rand(H, generator=gen) + 0.5, torch.randn(S, B, H, generator=gen)
    rows, cols = slice(rank * S // 2, (rank + 1) * S // 2), slice(rank * F // 2, (rank + 1) * F // 2)
    out = {}

    def leaf(t):
        return t.clone().requires_grad_(True)

    # column: the stand-in on this rank's sequence shard, against RMSNorm + megatron's ColumnParallelLinear
    ln = Sub.LayerNormColumnParallelLinearSubstitute(H, F, config=config)
    mc = ColumnParallelLinear(H, F, config=config, init_method=None, bias=False, gather_output=False)
    with torch.no_grad():
        ln.weight.copy_(w1[cols]), ln.layer_norm_weight.copy_(gamma), mc.weight.copy_(w1[cols])
    xa, xb = leaf(x[rows]), leaf(x[rows])
    ya, _ = ln(xa)
    yb, _ = mc(Sub.te_rms_norm(xb, gamma, 1e-6, False))
    ya.backward(g1[:, :, cols]), yb.backward(g1[:, :, cols])
    out["column"] = {"shape": tuple(ya.shape), "y": _max(ya, yb), "dx": _max(xa.grad, xb.grad),
                     "dw": _max(ln.weight.grad, mc.weight.grad)}
    ln.return_layernorm_output = True  # what Megatron-Bridge's LoRA sets: the normed input, local or gathered (TE)
    with torch.no_grad():
        whole = torch.nn.functional.rms_norm(x, (H,), gamma, 1e-6)
        (_, local), _ = ln(x[rows])
        ln.return_layernorm_output_gathered = True
        (_, gathered), _ = ln(x[rows])
    out["normed"] = {"local": _max(local, whole[rows]), "gathered": _max(gathered, whole)}

    # row + post-norm: the stand-in on this rank's features, against megatron's RowParallelLinear, then the norm
    rp = Sub.RowParallelLinearPostNormSubstitute(F, H, config=config)
    mr = RowParallelLinear(F, H, config=config, init_method=None, bias=False, input_is_parallel=True,
                           skip_bias_add=True)
    with torch.no_grad():
        rp.weight.copy_(w2[:, cols]), rp.post_layernorm.weight.copy_(gamma2), mr.weight.copy_(w2[:, cols])
    za, zb = leaf(z[:, :, cols]), leaf(z[:, :, cols])
    ya, _ = rp(za)
    yb = Sub.te_rms_norm(mr(zb)[0], gamma2, Sub.TE_NORM_DEFAULT_EPS, False)
    ya.backward(g2[rows]), yb.backward(g2[rows])
    out["row"] = {"shape": tuple(ya.shape), "y": _max(ya, yb), "dx": _max(za.grad, zb.grad),
                  "dw": _max(rp.weight.grad, mr.weight.grad)}

    # the norms' weights: marked, summed over TP by megatron's finalize, to one process's whole-sequence gradient
    chunk = torch.nn.ModuleDict({"ln": ln, "rp": rp, "norm": Sub.TENormSubstitute(config, H)})
    out["marked"] = {n: getattr(p, "sequence_parallel", None) for n, p in chunk.named_parameters()}
    finalize_grads(chunk, config, set())
    whole_g, whole_g2 = leaf(gamma), leaf(gamma2)
    (Sub.te_rms_norm(x, whole_g, 1e-6, False) @ w1.T).backward(g1)
    Sub.te_rms_norm(z @ w2.T, whole_g2, Sub.TE_NORM_DEFAULT_EPS, False).backward(g2)
    out["norm_grads"] = {"ln": _max(ln.layer_norm_weight.grad, whole_g.grad),
                         "post": _max(rp.post_layernorm.weight.grad, whole_g2.grad),
                         "scale": float(whole_g.grad.abs().max() + whole_g2.grad.abs().max())}
    if rank == 0:
        torch.save(out, path)


@pytest.fixture(scope="module")
def world() -> dict:
    return spawn(_worker, 2)


def test_layernorm_linear_is_megatrons_column_parallel_linear_under_sequence_parallelism(world):
    """Its output holds the whole sequence and this rank's features; output, input and weight gradients exact."""
    r = world["column"]
    assert r["shape"] == (S, B, F // 2)
    assert r["y"] == 0 and r["dx"] == 0 and r["dw"] == 0


def test_layernorm_linear_returns_its_normed_input_local_or_gathered(world):
    """TE's ``return_layernorm_output`` (this rank's shard) and ``return_layernorm_output_gathered`` (the whole
    sequence): against torch's RMSNorm on the whole input."""
    assert world["normed"]["local"] < 1e-6 and world["normed"]["gathered"] < 1e-6


def test_row_linear_post_norm_is_megatrons_row_parallel_linear_under_sequence_parallelism(world):
    """Its output is this rank's sequence shard (the reduce-scatter), post-normed; every gradient exact."""
    r = world["row"]
    assert r["shape"] == (S // 2, B, H)
    assert r["y"] == 0 and r["dx"] == 0 and r["dw"] == 0


def test_norm_weights_are_summed_over_tp_by_megatrons_finalize(world):
    """Norm weights marked sequence-parallel (the linears' weights not), and finalize's TP sum gives the whole
    sequence's gradient."""
    assert world["marked"] == {"ln.weight": None, "ln.layer_norm_weight": True, "rp.weight": None,
                               "rp.post_layernorm.weight": True, "norm.weight": True}
    g = world["norm_grads"]
    assert g["ln"] < 1e-5 and g["post"] < 1e-5 and g["scale"] > 1
