"""Random test weights that make mapping bugs visible and give trained-like logits (DESIGN.md section 7).

Every parameter and every *persistent* buffer gets independent per-element values; non-persistent
computed buffers (``inv_freq``, ``embed_scale``) are left alone. Scales (norm weights, router scales,
``layer_scalar``) become ``1 + 0.1*N(0,1)`` so a norm mapped to the wrong tensor shows; clip bounds of
clippable linears become finite values that really clip.

The output head and the routers are drawn so that decisions look like a trained model's at every size:
- Logits: logit ``v`` is ``<final_norm(h), E_v>`` with ``E`` the tied token table (std 1) and ``h`` a residual
  stream dominated by the scaled input embedding ``sqrt(H) * E_x``. With the usual positive norm gains
  (``1 + 0.1 N``) the logits have std ~``sqrt(H)`` and the input token's own row adds ~``H``: measured at the
  26B-A4B shape (H 2816, vocab 262,144, softcap 30) std 54, every logit saturated at the softcap, 0 %
  decisive positions (top-1/top-2 gap above one bf16 step), the input token top-1 at 98 % of positions.
  The final norm's gain is therefore zero-mean, ``LOGIT_STD / sqrt(H) * N(0, 1)`` (still independent per
  element, and unlike every other norm): the logits get std ``LOGIT_STD`` at every size and the input token's
  own logit is one more draw of comparable spread. Measured: 88 % decisive positions at the 26B shape, 96 %
  at the tiny one (``tests/test_randomize.py``); a smaller token table instead (std ``1/H``) also fixed the
  logits but let the layers' output dominate the residual, and routing flips then raised HF's own tiny bf16
  logits KL floor from 0.03 to 2-5 nats.
- Routers: ``router.proj`` reads a normalised input of rms ``H^-0.5 * scale`` per element, so its weights get
  std ``ROUTER_LOGIT_STD`` (router logits of std ~1, top-k choices mostly decisive) instead of a linear's
  ``H^-0.5`` (logits of std ``H^-0.5``: near-uniform routing that flips under any rounding).
"""
from __future__ import annotations

import re

import torch
from torch import nn

LOGIT_STD = 4.0  # std of the pre-softcap logits over the vocab; the top-1 lands ~5 sigma up (20 < the cap 30)

ROUTER_LOGIT_STD = 1.0  # std of the router logits (per token, over the experts)
_SCALE_SUFFIXES = ("norm.weight", "layernorm.weight", "layernorm_1.weight", "layernorm_2.weight",
                   "router.scale", "per_expert_scale", "layer_scalar", "std_scale")
_FINAL_NORM = re.compile(r"^(model\.)?(language_model\.)?norm\.weight$")  # the text model's final norm


def _is_scale(name: str) -> bool:
    return name.endswith(_SCALE_SUFFIXES) or ".norm" in name and name.endswith("weight")


def persistent_buffer_names(model: nn.Module) -> list[str]:
    return [k for k in model.state_dict().keys() if k not in dict(model.named_parameters())]


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Fill every parameter and persistent buffer of ``model`` in place, deterministically from ``seed``."""
    gens: dict[str, torch.Generator] = {}
    seen: set[int] = set()
    names = dict(model.named_parameters())
    names.update({k: v for k, v in model.named_buffers() if k in model.state_dict()})
    for name in sorted(names):
        t = names[name]
        if id(t) in seen:  # tied weights: one tensor, one fill
            continue
        seen.add(id(t))
        shape = t.shape
        dev = t.device
        gen = gens.setdefault(str(dev), torch.Generator(device=dev).manual_seed(seed))
        noise = torch.randn(shape, generator=gen, dtype=torch.float32, device=dev)
        if name.endswith(("input_min", "output_min")):
            value = -(1.0 + 0.5 * torch.rand(shape, generator=gen, device=dev))
        elif name.endswith(("input_max", "output_max")):
            value = 1.0 + 0.5 * torch.rand(shape, generator=gen, device=dev)
        elif name.endswith("std_bias"):
            value = 0.1 * noise
        elif _FINAL_NORM.match(name):
            value = LOGIT_STD * shape[-1] ** -0.5 * noise  # zero-mean gain: see the module docstring
        elif _is_scale(name):
            value = 1.0 + 0.1 * noise
        elif name.endswith("position_embedding_table"):
            value = 0.5 * noise
        elif name.endswith("router.proj.weight"):
            value = noise * ROUTER_LOGIT_STD  # input rms 1 (normed, * H^-0.5 * scale * sqrt(H)): logits std ROUTER_LOGIT_STD
        elif "embed" in name and name.endswith("weight") and t.dim() == 2 and shape[0] > shape[1]:
            value = noise  # other token tables (embed_vision): O(1) entries
        else:
            fan_in = shape[-1] if t.dim() >= 2 else 1
            value = noise * (std if t.dim() < 2 else min(std * 4, fan_in**-0.5))
        t.copy_(value.to(t.dtype))
    return model
