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
    intermediate_size: int = 0  # its dense MLP's width (twice the config's on double-wide layers)
    kv_source: int | None = None  # KV sharing: the earlier layer whose K/V this layer reuses (it has no K/V weights)
    kv_store: bool = False  # KV sharing: the last non-shared layer of its type, whose K/V later layers reuse

    @property
    def is_sliding(self) -> bool:
        return self.layer_type == "sliding_attention"

    @property
    def kv_shared(self) -> bool:
        return self.kv_source is not None


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
    per_layer_size: int = 0  # PLE: hidden_size_per_layer_input (0: no per-layer embeddings)
    per_layer_vocab_size: int = 0  # PLE: vocab_size_per_layer_input

    @property
    def embed_scale(self) -> float:
        return self.hidden_size**0.5

    @classmethod
    def from_hf(cls, config: Any) -> "TextArgs":
        """Read an HF ``Gemma4TextConfig`` (or the text part of a ``Gemma4Config``) after refusing what we lack."""
        config = getattr(config, "text_config", None) or config
        check_supported(config)
        layers = []
        sources = kv_sources(config)
        for i, layer_type in enumerate(config.layer_types):
            per_layer = config.per_layer_config[i]
            rope = dict(config.rope_parameters[layer_type])
            k_eq_v = bool(config.attention_k_eq_v) and layer_type == "full_attention"
            double = bool(getattr(config, "use_double_wide_mlp", False)) and sources[i] is not None
            layers.append(
                LayerArgs(
                    layer_type=layer_type,
                    head_dim=int(per_layer.head_dim),
                    num_kv_heads=int(per_layer.num_key_value_heads),
                    k_eq_v=k_eq_v,
                    rope_type=rope.get("rope_type", "default"),
                    rope_theta=float(rope["rope_theta"]),
                    partial_rotary_factor=float(rope.get("partial_rotary_factor", 1.0)),
                    intermediate_size=int(config.intermediate_size) * (2 if double else 1),
                    kv_source=sources[i],
                    kv_store=i in set(sources) - {None},
                )
            )
        moe = bool(config.enable_moe_block)
        ple = int(getattr(config, "hidden_size_per_layer_input", 0) or 0)
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
            per_layer_size=ple,
            per_layer_vocab_size=int(config.vocab_size_per_layer_input) if ple else 0,
        )


def kv_sources(config: Any) -> list[int | None]:
    """Per layer, the layer whose K/V it reuses (None: it computes its own). The layers from
    ``num_hidden_layers - num_kv_shared_layers`` on reuse the K/V of the last earlier non-shared layer of their
    type, as HF's ``Gemma4TextConfig.kv_sharing_modes`` ("store" / "reuse") says; read from the config's own
    ``layer_types``, never assumed to be a fixed cycle."""
    n, shared = config.num_hidden_layers, int(getattr(config, "num_kv_shared_layers", 0) or 0)
    if not shared:
        return [None] * n
    first = n - shared
    if first <= 0:
        raise UnsupportedConfig("unsupported Gemma 4 feature(s): KV sharing on every layer (no layer computes K/V)")
    types = config.layer_types
    last = {t: max(i for i in range(first) if types[i] == t) for t in set(types[:first])}
    missing = sorted(set(types[first:]) - set(last))
    if missing:
        raise UnsupportedConfig(f"unsupported Gemma 4 config: KV-shared layers of type {missing[0]} have no earlier "
                                "layer of that type to reuse")
    return [None if i < first else last[types[i]] for i in range(n)]


def check_supported(config: Any) -> None:
    """Raise ``UnsupportedConfig`` (one line) for Gemma 4 features the Megatron side does not implement."""
    problems = []
    if getattr(config, "num_kv_shared_layers", 0) and not getattr(config, "hidden_size_per_layer_input", 0):
        # HF 5.24's Gemma4TextModel.forward slices per_layer_inputs (None without PLE) before the KV-shared layers
        problems.append("KV sharing without per-layer embeddings (HF's own forward fails on it)")
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


def _pattern(n_layers: int, period: int) -> list[str]:
    """``period - 1`` sliding layers then one full layer, repeated (the released configs' ``layer_types``)."""
    return ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(n_layers)]


def _ple_tiny_config_kwargs(**shape: Any) -> dict[str, Any]:
    """What the tiny E2B and E4B shapes share: dense (no MoE), no K=V and no global KV-head count, global head_dim 2x
    the sliding one, window 8, per-layer embeddings of 8 per layer, the last 5 layers KV-shared; ``shape`` the rest."""
    return text_config_kwargs(
        num_attention_heads=4,
        head_dim=16,
        global_head_dim=32,
        num_global_key_value_heads=None,
        attention_k_eq_v=False,
        sliding_window=8,
        enable_moe_block=False,
        num_experts=None,
        top_k_experts=None,
        moe_intermediate_size=None,
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=320,
        num_kv_shared_layers=5,
        **shape,
    )


def e2b_tiny_config_kwargs(**overrides: Any) -> dict[str, Any]:
    """Tiny E2B-shaped text config. E2B: 35 layers of 4 sliding + 1 full, hidden 1536, window 512, per-layer
    embeddings of 256 per layer, the last 20 layers reuse K/V (so 15 compute it: 3 periods), the double-wide MLP
    on those 20, no K=V and no global KV-head count (full layers keep ``num_key_value_heads``), no MoE, softcap 30.
    Here: 10 layers of the same period, the last 5 KV-shared (layers 5-9 reuse layer 3's sliding and layer 4's
    full K/V), double-wide there, PLE 8 per layer, hidden 48, window 8."""
    kw = _ple_tiny_config_kwargs(hidden_size=48, intermediate_size=64, num_hidden_layers=10, num_key_value_heads=1,
                                 layer_types=_pattern(10, 5), use_double_wide_mlp=True)
    kw.update(overrides)
    return kw


def e4b_tiny_config_kwargs(**overrides: Any) -> dict[str, Any]:
    """Tiny E4B-shaped text config. E4B: 42 layers of 5 sliding + 1 full, hidden 2560, window 512, PLE 256 per
    layer, the last 18 layers reuse K/V, no double-wide MLP, no K=V, 2 KV heads on every layer. Here: 12 layers
    of the same period, the last 5 KV-shared (layers 7-11 reuse layer 6's sliding and layer 5's full K/V), PLE 8,
    hidden 64, window 8."""
    kw = _ple_tiny_config_kwargs(hidden_size=64, intermediate_size=96, num_hidden_layers=12, num_key_value_heads=2,
                                 layer_types=_pattern(12, 6), use_double_wide_mlp=False)
    kw.update(overrides)
    return kw


def g31b_tiny_config_kwargs(**overrides: Any) -> dict[str, Any]:
    """Tiny 31B-shaped text config. 31B: 60 dense layers of 5 sliding + 1 full, hidden 5376, window 1024, K=V on
    full layers with fewer global KV heads and global head_dim 2x sliding, no PLE, no KV sharing, no MoE. Here:
    12 layers of the same period, 8 heads, 4 sliding / 1 global KV heads, hidden 96, window 16."""
    kw = text_config_kwargs(
        num_hidden_layers=12,
        layer_types=_pattern(12, 6),
        num_key_value_heads=4,
        num_global_key_value_heads=1,
        sliding_window=16,
        enable_moe_block=False,
        num_experts=None,
        top_k_experts=None,
        moe_intermediate_size=None,
    )
    kw.update(overrides)
    return kw


def _full_dense(**overrides: Any) -> dict[str, Any]:
    """What the released dense members share: vocab 262,144, head_dim 256 / global 512, proportional RoPE on full
    layers, softcap 30, no MoE."""
    return text_config_kwargs(**{**dict(vocab_size=262_144, head_dim=256, global_head_dim=512, enable_moe_block=False,
                                        num_experts=None, top_k_experts=None, moe_intermediate_size=None,
                                        max_position_embeddings=131_072), **overrides})


def full_e4b_config_kwargs(**overrides: Any) -> dict[str, Any]:
    """The E4B text shape as far as the issue and Megatron-Bridge's ``Gemma4DenseProvider`` defaults give it
    (42 layers of 5 sliding + 1 full, hidden 2560, MLP 10240, 8 heads, 2 KV heads, window 512, PLE 256, the last
    18 layers KV-shared); not checked against Google's config.json (no network here): a checkpoint run
    (``--checkpoint``) reads the real one."""
    kw = _full_dense(hidden_size=2560, intermediate_size=10_240, num_hidden_layers=42, num_attention_heads=8,
                     num_key_value_heads=2, num_global_key_value_heads=None, attention_k_eq_v=False,
                     layer_types=_pattern(42, 6), sliding_window=512, hidden_size_per_layer_input=256,
                     vocab_size_per_layer_input=262_144, num_kv_shared_layers=18, use_double_wide_mlp=False)
    kw.update(overrides)
    return kw


def full_31b_config_kwargs(**overrides: Any) -> dict[str, Any]:
    """The 31B dense text shape as far as the issue gives it (60 layers of 5 sliding + 1 full, hidden 5376,
    window 1024, K=V on full layers); heads 32 / KV 16 / global KV 4 and MLP 21504 are our reading, not checked
    against Google's config.json (no network here): a checkpoint run reads the real one."""
    kw = _full_dense(hidden_size=5376, intermediate_size=21_504, num_hidden_layers=60, num_attention_heads=32,
                     num_key_value_heads=16, num_global_key_value_heads=4, attention_k_eq_v=True,
                     layer_types=_pattern(60, 6), sliding_window=1024, max_position_embeddings=262_144)
    kw.update(overrides)
    return kw


# Builder name (a case's ``[model] builder``) -> the text config kwargs it makes.
TEXT_BUILDERS = {"tiny_text": text_config_kwargs, "full_text": full_text_config_kwargs,
                 "e2b_tiny": e2b_tiny_config_kwargs, "e4b_tiny": e4b_tiny_config_kwargs,
                 "31b_tiny": g31b_tiny_config_kwargs, "full_e4b": full_e4b_config_kwargs,
                 "full_31b": full_31b_config_kwargs}


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
    "k_eq_v": lambda args, i: args.layers[i].k_eq_v and not args.layers[i].kv_shared,
    "separate_v": lambda args, i: not args.layers[i].k_eq_v and not args.layers[i].kv_shared,
    "own_kv": lambda args, i: not args.layers[i].kv_shared,
    "kv_shared": lambda args, i: args.layers[i].kv_shared,
    "ple": lambda args, i: args.per_layer_size > 0,
}
