"""Probe for Megatron-Bridge finding 9, stage by stage on its own MoE layer: which rounding makes its bf16 routed
experts further from HF-fp32 than HF-bf16 is?

Builds Megatron-Bridge's Gemma 4 (its provider and its own HF -> Megatron mapping; ``parity.mbridge``) for a
tiny config with 26B-like routing (32 experts, top-8, hidden 512), runs layer 0's routed path (preprocess,
dispatch, experts, combine) under one random routing, and checks each stage against the same operation done
the HF way on the same inputs: fc1, the activation times the probability, fc2, the sum. Then the error of
variants against HF-fp32, over HF-bf16's (the isolated truth ratio): as it runs; with the combine in fp32; with
the probability-scaled activation left unrounded before the down projection. Prints JSON.

    python scripts/probe_bridge_experts.py [--tokens 1024] [--seed 1]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    from transformers import Gemma4ForCausalLM

    from parity import config as C
    from parity.engine.randomize import randomize_
    from parity.mbridge import model as MB

    F = torch.nn.functional
    shape = dict(sliding_window=8, num_experts=32, top_k_experts=8, moe_intermediate_size=256, hidden_size=512)
    cfg = C.make_text_config(C.text_config_kwargs(**shape))
    hf = randomize_(Gemma4ForCausalLM._from_config(cfg, torch_dtype=torch.float32), seed=0).eval()
    hf16 = copy.deepcopy(hf).to(torch.bfloat16)
    bm = MB.build(cfg, dtype=torch.bfloat16)
    MB.load_hf(bm, hf16)
    moe = bm.model.decoder.layers[0].mlp
    ex16, ex32 = hf16.model.layers[0].experts, hf.model.layers[0].experts
    torch.manual_seed(a.seed)
    n, h, e, k = a.tokens, cfg.hidden_size, cfg.num_experts, cfg.top_k_experts
    x = torch.randn(n, h).bfloat16()
    top_w, top_i = torch.softmax(torch.randn(n, e), -1).topk(k, -1)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    rel = lambda y, ref: float((y.double() - ref.double()).norm() / ref.double().norm())  # noqa: E731
    seen: dict = {}
    moe.experts.register_forward_pre_hook(lambda m, args: seen.update(probs=args[2]))
    moe.experts.linear_fc1.register_forward_hook(lambda m, i, o: seen.update(fc1_in=i[0], fc1_out=o[0]))
    moe.experts.linear_fc2.register_forward_hook(lambda m, i, o: seen.update(fc2_in=i[0], fc2_out=o[0]))
    with torch.no_grad():
        truth, ref16 = ex32(x.float(), top_i, top_w), ex16(x, top_i, top_w)
        probs = torch.zeros(n, e).scatter(1, top_i, top_w)
        routing_map = torch.zeros(n, e, dtype=torch.bool).scatter(1, top_i, True)
        hidden, p = moe.preprocess(x[:, None].contiguous(), probs, routing_map)
        hidden, p = moe.dispatch(hidden, p)
        out, _ = moe.routed_experts_compute(hidden, p)
        y = moe.token_dispatcher.combine_postprocess(moe.combine(out)).reshape(n, h)
        y_fp32_sum = moe.token_dispatcher.combine_postprocess(moe.combine(out.float())).reshape(n, h).bfloat16()
        toks = [routing_map[:, j].nonzero()[:, 0] for j in range(e)]  # its permutation: expert-major, tokens in order
        seg = [0]
        for t in toks:
            seg.append(seg[-1] + len(t))
        gate, up = seen["fc1_out"].chunk(2, -1)
        act = F.gelu(gate, approximate="tanh") * up  # HF's activation (bf16)
        pp = seen["probs"].reshape(-1, 1)
        stages = {
            "fc1_input_is_x_permuted": torch.equal(seen["fc1_in"], torch.cat([x[t] for t in toks])),
            "fc1_equals_hf_gate_up": torch.equal(seen["fc1_out"], torch.cat(
                [F.linear(x[t], ex16.gate_up_proj[j]) for j, t in enumerate(toks)])),
            "probs_dtype": str(seen["probs"].dtype),
            "fc2_input_equals_bf16_of_act_times_prob": torch.equal(seen["fc2_in"], (act * pp).to(act.dtype)),
            "fc2_equals_hf_down_proj_on_it": torch.equal(seen["fc2_out"], torch.cat(
                [F.linear(seen["fc2_in"][seg[j]:seg[j + 1]], ex16.down_proj[j]) for j in range(e)])),
        }
        unrounded = torch.cat([F.linear((act.float() * pp)[seg[j]:seg[j + 1]], ex16.down_proj[j].float()).bfloat16()
                               for j in range(e)])
        y_unrounded = torch.zeros(n, h).index_add_(0, torch.cat(toks), unrounded.float()).bfloat16()
    base = rel(ref16, truth)
    print(json.dumps({"shape": {"tokens": n, **shape}, "torch": torch.__version__, "stages": stages,
                      "hf_bf16_vs_fp32": base,
                      "truth_ratio": {"as_it_runs": rel(y, truth) / base, "combine_in_fp32": rel(y_fp32_sum, truth) / base,
                                      "prob_scaled_activation_unrounded": rel(y_unrounded, truth) / base}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
