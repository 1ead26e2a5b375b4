"""The one place that says what each HF module maps to on the Megatron side and how it is compared.

Each ``Align`` row: HF module path pattern (the name users see), Megatron module path pattern, the
``kind`` that says how outputs are brought to a common layout and how the Megatron module is replayed
on the HF module's captured inputs, and the ``gate`` class. ``{i}`` is the decoder layer index.
Layouts: HF is ``[b, s, ...]`` (router/experts ``[b*s, ...]``); Megatron is ``[s, b, ...]``.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Align:
    hf: str
    mc: str
    kind: str
    gate: str = "module"  # "module" | "exact" (bit-exact even in bf16)
    moe_only: bool = False


TEXT_MODEL = (
    Align("model.embed_tokens", "embedding", "embedding", gate="exact"),
    Align("model.norm", "decoder.final_layernorm", "norm"),
    Align("lm_head", "output_layer", "lm_head"),
    Align("logits", "logits", "logits"),  # lm_head + softcap: not a module in HF
)

TEXT_LAYER = (
    Align("model.layers.{i}", "decoder.layers.{i}", "layer"),
    Align("model.layers.{i}.input_layernorm", "decoder.layers.{i}.input_layernorm", "norm"),
    Align("model.layers.{i}.self_attn", "decoder.layers.{i}.self_attention", "attention"),
    Align("model.layers.{i}.self_attn.q_proj", "decoder.layers.{i}.self_attention.linear_qkv", "qkv:q"),
    Align("model.layers.{i}.self_attn.k_proj", "decoder.layers.{i}.self_attention.linear_qkv", "qkv:k"),
    Align("model.layers.{i}.self_attn.v_proj", "decoder.layers.{i}.self_attention.linear_qkv", "qkv:v"),
    Align("model.layers.{i}.self_attn.q_norm", "decoder.layers.{i}.self_attention.q_layernorm", "head_norm"),
    Align("model.layers.{i}.self_attn.k_norm", "decoder.layers.{i}.self_attention.k_layernorm", "head_norm"),
    Align("model.layers.{i}.self_attn.o_proj", "decoder.layers.{i}.self_attention.linear_proj", "linear"),
    Align("model.layers.{i}.post_attention_layernorm", "decoder.layers.{i}.post_attention_layernorm", "norm"),
    Align("model.layers.{i}.pre_feedforward_layernorm", "decoder.layers.{i}.pre_mlp_layernorm", "norm"),
    Align("model.layers.{i}.mlp", "decoder.layers.{i}.mlp", "mlp"),
    Align("model.layers.{i}.mlp.gate_proj", "decoder.layers.{i}.mlp.linear_fc1", "fc1:gate"),
    Align("model.layers.{i}.mlp.up_proj", "decoder.layers.{i}.mlp.linear_fc1", "fc1:up"),
    Align("model.layers.{i}.mlp.down_proj", "decoder.layers.{i}.mlp.linear_fc2", "linear"),
    Align("model.layers.{i}.post_feedforward_layernorm_1", "decoder.layers.{i}.post_mlp_layernorm_1", "norm", moe_only=True),
    Align("model.layers.{i}.router", "decoder.layers.{i}.moe.router", "router", moe_only=True),
    Align("model.layers.{i}.pre_feedforward_layernorm_2", "decoder.layers.{i}.pre_moe_layernorm", "flat_norm", moe_only=True),
    Align("model.layers.{i}.experts", "decoder.layers.{i}.moe", "experts", moe_only=True),
    Align("model.layers.{i}.post_feedforward_layernorm_2", "decoder.layers.{i}.post_moe_layernorm", "norm", moe_only=True),
    Align("model.layers.{i}.post_feedforward_layernorm", "decoder.layers.{i}.post_mlp_layernorm", "norm"),
)


def text_rows(args, hf_prefix: str = "model.", mc_prefix: str = "") -> list[tuple[str, str, Align]]:
    """Concrete (hf_name, mc_name, row) for a text model. ``hf_prefix`` is where HF's text model lives
    (``model.`` for Gemma4ForCausalLM, ``model.language_model.`` inside the VLM)."""
    def hf_name(pattern: str, i: int | None = None) -> str:
        name = pattern.format(i=i) if i is not None else pattern
        return hf_prefix + name[len("model."):] if name.startswith("model.") else name

    def mc_name(pattern: str, i: int | None = None) -> str:
        name = pattern.format(i=i) if i is not None else pattern
        return mc_prefix + name if name != "logits" else name

    rows = []
    for row in TEXT_MODEL:
        rows.append((hf_name(row.hf), mc_name(row.mc), row))
    for i, layer in enumerate(args.layers):
        for row in TEXT_LAYER:
            if row.moe_only and not args.enable_moe_block:
                continue
            if row.kind == "qkv:v" and layer.k_eq_v:
                continue  # HF has no v_proj on K=V layers: V is the raw k_proj output
            rows.append((hf_name(row.hf, i), mc_name(row.mc, i), row))
    return rows


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a == "layers" and b.isdigit():
            return int(b)
    return None
