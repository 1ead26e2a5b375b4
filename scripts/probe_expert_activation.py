"""Probe for a Megatron-Bridge finding: is its bf16 routed-expert error (isolated truth ratio up to 1.33 at the
26B shape on an H200, 1.08 on CPU) the activation it uses, megatron-core's ``fast_gelu`` (the tanh formula
written out op by op), where HF uses ``gelu_pytorch_tanh`` (one fused kernel)?

HF's own ``Gemma4TextExperts`` at the 26B-A4B expert shape (random weights and routing, 4,096 tokens), in fp32
(the truth) and bf16, once with HF's activation and once with megatron-core's ``fast_gelu`` put in its place;
prints the error of each against the fp32 truth and their ratio, and the activations alone.

    python scripts/probe_expert_activation.py [--device cuda] [--tokens 4096]
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
        out["ratio"] = out["fast_gelu_bf16"] / out["hf_bf16"]
        z = torch.randn(1 << 22, device=a.device) * 3
        ref = torch.nn.functional.gelu(z.double(), approximate="tanh")
        out["activation_alone"] = {"hf": rel(hf_act(z.bfloat16()), ref), "fast_gelu": rel(fast_gelu(z.bfloat16()), ref)}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
