"""Gemma 4 configs: what the Megatron side reads, the tiny and full-size shapes, and the refusals.

The Megatron model never holds an HF config object: ``TextArgs.from_hf`` reads every knob once into a
flat dataclass (torchtitan style), resolving the per-layer attention shapes and RoPE parameters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


class UnsupportedConfig(ValueError):
    """A config the Megatron Gemma 4 does not (yet) implement; the message says which feature."""


@dataclass(frozen=True)
class LayerArgs:
    """Attention shape and RoPE of one decoder layer."""

    layer_type: str  # "sliding_attention" | "full_attention"
    head_dim: int
    num_kv_heads: int
    k_eq_v: bool  # V is the raw K projection (no v_proj)
    rope_type: str  # "default" | "proportional"
    rope_theta: float
    partial_rotary_factor: float

    @property
    def is_sliding(self) -> bool:
        return self.layer_type == "sliding_attention"


@dataclass(frozen=True)
class TextArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    layers: tuple[LayerArgs, ...]
    sliding_window: int
    rms_norm_eps: float
    hidden_activation: str
    final_logit_softcapping: float | None
    tie_word_embeddings: bool
    enable_moe_block: bool
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    attention_bias: bool
    use_bidirectional_attention: str | None
    pad_token_id: int | None

    @property
    def embed_scale(self) -> float:
        return self.hidden_size**0.5

    @classmethod
    def from_hf(cls, config: Any) -> "TextArgs":
        """Read an HF ``Gemma4TextConfig`` (or the text part of a ``Gemma4Config``) after refusing what we lack."""
        config = getattr(config, "text_config", None) or config
        check_supported(config)
        layers = []
        for i, layer_type in enumerate(config.layer_types):
            per_layer = config.per_layer_config[i]
            rope = dict(config.rope_parameters[layer_type])
            k_eq_v = bool(config.attention_k_eq_v) and layer_type == "full_attention"
            layers.append(
                LayerArgs(
                    layer_type=layer_type,
                    head_dim=int(per_layer.head_dim),
                    num_kv_heads=int(per_layer.num_key_value_heads),
                    k_eq_v=k_eq_v,
                    rope_type=rope.get("rope_type", "default"),
                    rope_theta=float(rope["rope_theta"]),
                    partial_rotary_factor=float(rope.get("partial_rotary_factor", 1.0)),
                )
            )
        moe = bool(config.enable_moe_block)
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            layers=tuple(layers),
            sliding_window=config.sliding_window,
            rms_norm_eps=config.rms_norm_eps,
            hidden_activation=config.hidden_activation,
            final_logit_softcapping=config.final_logit_softcapping,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", True)),
            enable_moe_block=moe,
            num_experts=int(config.num_experts or 0) if moe else 0,
            top_k=int(config.top_k_experts or 0) if moe else 0,
            moe_intermediate_size=int(config.moe_intermediate_size or 0) if moe else 0,
            attention_bias=bool(config.attention_bias),
            use_bidirectional_attention=config.use_bidirectional_attention,
            pad_token_id=config.pad_token_id,
        )


def check_supported(config: Any) -> None:
    """Raise ``UnsupportedConfig`` (one line) for Gemma 4 features the Megatron side does not implement."""
    problems = []
    if getattr(config, "hidden_size_per_layer_input", 0):
        problems.append("per-layer embeddings (hidden_size_per_layer_input > 0)")
    if getattr(config, "num_kv_shared_layers", 0):
        problems.append("KV sharing (num_kv_shared_layers > 0)")
    if getattr(config, "use_double_wide_mlp", False) and getattr(config, "num_kv_shared_layers", 0):
        problems.append("double-wide MLP")
    if getattr(config, "use_bidirectional_attention", None) == "all":
        problems.append("use_bidirectional_attention='all'")
    if getattr(config, "attention_bias", False):
        problems.append("attention_bias=True")
    if getattr(config, "hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        problems.append(f"hidden_activation={config.hidden_activation!r}")
    for layer_type, rope in (getattr(config, "rope_parameters", None) or {}).items():
        if rope and rope.get("rope_type", "default") not in ("default", "proportional"):
            problems.append(f"rope_type={rope.get('rope_type')!r} on {layer_type}")
    if problems:
        raise UnsupportedConfig("unsupported Gemma 4 feature(s): " + ", ".join(problems))


def check_supported_vlm(config: Any) -> None:
    """The text part's refusals, then the audio tower's (``parity.vlm_config.check_supported_audio``)."""
    check_supported(config.text_config)
    if getattr(config, "audio_config", None) is not None:
        from parity.vlm_config import check_supported_audio

        check_supported_audio(config.audio_config)


# ---------------------------------------------------------------------------------------------------
# Shapes used by the cases. Always built explicitly: Gemma4TextConfig() defaults are not 26B-A4B.

def text_config_kwargs(**overrides: Any) -> dict[str, Any]:
    """Tiny 26B-A4B-shaped text config: K=V, global head_dim 2x sliding, fewer global KV heads,
    MoE + dense, 2 full and 4 sliding layers, softcap, hidden 96 (not a perfect square)."""
    kw: dict[str, Any] = dict(
        vocab_size=320,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=16,
        global_head_dim=32,
        num_global_key_value_heads=2,
        attention_k_eq_v=True,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
        sliding_window=8,
        enable_moe_block=True,
        num_experts=8,
        top_k_experts=2,
        moe_intermediate_size=48,
        hidden_size_per_layer_input=0,
        num_kv_shared_layers=0,
        final_logit_softcapping=30.0,
        rms_norm_eps=1e-6,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
        },
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    kw.update(overrides)
    return kw


def full_text_config_kwargs(**overrides: Any) -> dict[str, Any]:
    """The 26B-A4B text shape, as Google released it."""
    layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(30)]
    kw = text_config_kwargs(
        vocab_size=262_144,
        hidden_size=2816,
        intermediate_size=2112,
        num_hidden_layers=30,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=256,
        global_head_dim=512,
        num_global_key_value_heads=2,
        layer_types=layer_types,
        sliding_window=1024,
        num_experts=128,
        top_k_experts=8,
        moe_intermediate_size=704,
        max_position_embeddings=262_144,
    )
    kw.update(overrides)
    return kw


def make_text_config(kwargs: dict[str, Any]):
    from transformers import Gemma4TextConfig

    return Gemma4TextConfig(**kwargs)


def config_hash(config: Any) -> str:
    import hashlib
    import json

    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_perfect_square(n: int) -> bool:
    r = math.isqrt(n)
    return r * r == n


# Per-layer predicates that tables name by key (the weight mapping's rules, the alignment table's rows).
WHEN = {
    "untied": lambda args, i: not args.tie_word_embeddings,
    "moe": lambda args, i: args.enable_moe_block,
    "k_eq_v": lambda args, i: args.layers[i].k_eq_v,
    "separate_v": lambda args, i: not args.layers[i].k_eq_v,
}
