"""HF <-> Megatron weight mapping of the Gemma 4 vision tower and ``embed_vision``, as data.

``WEIGHTS`` maps every state-dict entry, parameters and persistent buffers (clip bounds, std_bias / std_scale,
position tables) alike (which modules are compared is the alignment table's, ``parity.engine.alignment``). Every vision tensor is a plain copy -- nothing is fused: q/k/v and
gate/up stay separate because each ClippableLinear carries its own clip bounds -- so the only per-row
datum besides the names is ``tp_dim``, the dimension megatron splits over tensor parallelism (None =
replicated). ``{i}`` is a layer index, ``{clip}`` one of the four clip-bound buffers.
"""
from __future__ import annotations

import re

import torch

_L = "vision_tower.encoder.layers.{i}"
_M = "vision_model.encoder.layers.{i}"

# Clippable linears: (HF module, Megatron module, tp_dim of the weight); column-parallel split rows (0),
# row-parallel split columns (1).
_CLIPPABLE = [
    ("self_attn.q_proj", "self_attention.linear_q", 0),
    ("self_attn.k_proj", "self_attention.linear_k", 0),
    ("self_attn.v_proj", "self_attention.linear_v", 0),
    ("self_attn.o_proj", "self_attention.linear_proj", 1),
    ("mlp.gate_proj", "mlp.linear_fc1_gate", 0),
    ("mlp.up_proj", "mlp.linear_fc1_up", 0),
    ("mlp.down_proj", "mlp.linear_fc2", 1),
]

# (HF state-dict key under the prefix, Megatron state-dict key, tp_dim)
WEIGHTS: list[tuple[str, str, int | None]] = [
    ("vision_tower.patch_embedder.input_proj.weight", "vision_model.patch_embedder.input_proj.weight", 0),
    ("vision_tower.patch_embedder.position_embedding_table",
     "vision_model.patch_embedder.position_embedding_table", None),
    *[(f"{_L}.{hf}.linear.weight", f"{_M}.{mc}.linear.weight", dim) for hf, mc, dim in _CLIPPABLE],
    *[(f"{_L}.{hf}.{{clip}}", f"{_M}.{mc}.{{clip}}", None) for hf, mc, _ in _CLIPPABLE],
    (f"{_L}.self_attn.q_norm.weight", f"{_M}.self_attention.q_layernorm.weight", None),
    (f"{_L}.self_attn.k_norm.weight", f"{_M}.self_attention.k_layernorm.weight", None),
    (f"{_L}.input_layernorm.weight", f"{_M}.input_layernorm.weight", None),
    (f"{_L}.post_attention_layernorm.weight", f"{_M}.post_attention_layernorm.weight", None),
    (f"{_L}.pre_feedforward_layernorm.weight", f"{_M}.pre_mlp_layernorm.weight", None),
    (f"{_L}.post_feedforward_layernorm.weight", f"{_M}.post_mlp_layernorm.weight", None),
    ("vision_tower.std_bias", "vision_model.std_bias", None),
    ("vision_tower.std_scale", "vision_model.std_scale", None),
    ("embed_vision.embedding_projection.weight", "embed_vision.linear_proj.weight", 0),
]

_SLOTS = {"{i}": r"(?P<i>\d+)", "{clip}": r"(?P<clip>input_min|input_max|output_min|output_max)"}
VISION_ROOTS = ("vision_tower.", "embed_vision.")


def _regex(pattern: str) -> re.Pattern:
    text = re.escape(pattern)
    for slot, group in _SLOTS.items():
        text = text.replace(re.escape(slot), group)
    return re.compile(text + r"\Z")


_HF_TO_MC = [(_regex(hf), mc, dim) for hf, mc, dim in WEIGHTS]
_MC_TO_HF = [(_regex(mc), hf, dim) for hf, mc, dim in WEIGHTS]


def _rename(key: str, rules) -> tuple[str, int | None]:
    for regex, target, dim in rules:
        m = regex.match(key)
        if m:
            return target.format(**m.groupdict()), dim
    raise KeyError(f"no vision mapping for {key!r}")


def hf_to_megatron_vision(hf_state: dict[str, torch.Tensor], prefix: str = "model.") -> dict[str, torch.Tensor]:
    """Vision-tower and embed_vision entries of an HF state dict (``{prefix}vision_tower.*``,
    ``{prefix}embed_vision.*``; other keys are ignored) -> ``Gemma4VisionTowerMC`` state dict.
    Unknown vision keys raise ``KeyError``."""
    out = {}
    for key, value in hf_state.items():
        if key.startswith(prefix) and key[len(prefix):].startswith(VISION_ROOTS):
            name, _ = _rename(key[len(prefix):], _HF_TO_MC)
            out[name] = value
    return out


def megatron_to_hf_vision(mc_state: dict[str, torch.Tensor], prefix: str = "model.") -> dict[str, torch.Tensor]:
    """``Gemma4VisionTowerMC`` state dict (TP=1 or gathered) -> HF keys under ``prefix``. Megatron's
    ``_extra_state`` entries (``None`` for local linears; no tensor) are dropped."""
    return {prefix + _rename(key, _MC_TO_HF)[0]: value for key, value in mc_state.items()
            if not key.endswith("._extra_state")}


def tp_dim(mc_key: str) -> int | None:
    """Dimension of ``mc_key`` split over tensor parallelism (None = replicated)."""
    return _rename(mc_key, _MC_TO_HF)[1]


def shard_vision(mc_state: dict[str, torch.Tensor], tp_rank: int, tp_size: int) -> dict[str, torch.Tensor]:
    """This TP rank's slice of a full Megatron vision state dict."""
    out = {}
    for key, value in mc_state.items():
        if key.endswith("._extra_state"):
            continue
        dim = tp_dim(key)
        out[key] = value if dim is None else value.chunk(tp_size, dim=dim)[tp_rank].clone()
    return out


def gather_vision(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Inverse of ``shard_vision``: concatenate the TP ranks' slices (rank order)."""
    out = {}
    for key, value in shards[0].items():
        dim = tp_dim(key)
        out[key] = value if dim is None else torch.cat([s[key] for s in shards], dim=dim)
    return out

