"""Probe for Megatron-Bridge finding 9: where does its bf16 routed-expert error come from (isolated truth ratio
1.32-1.33 at the 26B shape on an H200, 1.07-1.11 on CPU)?

HF's own ``Gemma4TextExperts`` at the 26B-A4B expert shape (random weights and routing, 4,096 tokens) in fp32 is
the truth; against it, in bf16: HF as is; HF with megatron-core's ``fast_gelu`` (the bridge's activation) in
place of ``gelu_pytorch_tanh``; and HF's loop with the probabilities applied as megatron-core's ``TEGroupedMLP``
applies them (on the activation before the down projection, rounded to bf16), summed as its unpermute sums
(``scatter_add_`` into a bf16 buffer). Prints each error and its ratio to HF-bf16's.

    python scripts/probe_expert_precision.py [--device cuda] [--tokens 4096]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Lambda(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def megatron_order(experts, x, top_i, top_w):
    """HF's expert loop with megatron-core's order: ``act(gate) * up`` times the probability (fp32), rounded to
    the activation dtype, then the down projection; the outputs summed by ``scatter_add_`` in the input dtype."""
    out = torch.zeros_like(x)
    for e in range(experts.num_experts):
        tok, slot = (top_i == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        gate, up = torch.nn.functional.linear(x[tok], experts.gate_up_proj[e]).chunk(2, dim=-1)
        a = experts.act_fn(gate) * up
        a = (a * top_w[tok, slot, None]).to(a.dtype)
        y = torch.nn.functional.linear(a, experts.down_proj[e])
        out.scatter_add_(0, tok[:, None].expand(-1, y.shape[-1]), y)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=4096)
    a = ap.parse_args()
    from parity import compat

    compat.apply()
    from megatron.core.activations import fast_gelu
    from transformers import Gemma4TextConfig
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextExperts

    from parity.config import full_text_config_kwargs

    torch.manual_seed(0)
    cfg = Gemma4TextConfig(**full_text_config_kwargs())
    experts = Gemma4TextExperts(cfg).to(a.device)
    h, e, k = cfg.hidden_size, cfg.num_experts, cfg.top_k_experts
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, h ** -0.5)
        experts.down_proj.normal_(0, cfg.moe_intermediate_size ** -0.5)
        x = torch.randn(a.tokens, h, device=a.device)
        top_i = torch.rand(a.tokens, e, device=a.device).topk(k, dim=-1).indices
        top_w = torch.softmax(torch.randn(a.tokens, k, device=a.device), -1)
        truth = experts(x, top_i, top_w)
        out = {"device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu", "torch": torch.__version__,
               "shape": {"tokens": a.tokens, "hidden": h, "experts": e, "top_k": k,
                         "intermediate": cfg.moe_intermediate_size}, "fast_gelu_type": type(fast_gelu).__name__}
        rel = lambda y, ref: float((y.double() - ref.double()).norm() / ref.double().norm())  # noqa: E731
        bf = experts.to(torch.bfloat16)
        hf_act = bf.act_fn
        out["hf_bf16"] = rel(bf(x.bfloat16(), top_i, top_w), truth)
        bf.act_fn = Lambda(fast_gelu)
        out["fast_gelu_bf16"] = rel(bf(x.bfloat16(), top_i, top_w), truth)
        out["fast_gelu_ratio"] = out["fast_gelu_bf16"] / out["hf_bf16"]
        bf.act_fn = hf_act
        out["probs_before_down_proj_bf16"] = rel(megatron_order(bf, x.bfloat16(), top_i, top_w), truth)
        out["probs_before_down_proj_ratio"] = out["probs_before_down_proj_bf16"] / out["hf_bf16"]
        z = torch.randn(1 << 22, device=a.device) * 3
        ref = torch.nn.functional.gelu(z.double(), approximate="tanh")
        out["activation_alone"] = {"hf": rel(hf_act(z.bfloat16()), ref), "fast_gelu": rel(fast_gelu(z.bfloat16()), ref)}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
