"""HF <-> Megatron weight mapping of the Gemma 4 audio tower and ``embed_audio``, as data.

``WEIGHTS`` maps every state-dict entry, parameters and persistent buffers (clip bounds) alike; every audio
tensor is a plain copy (q/k/v and the feed-forward linears stay separate: each ClippableLinear has its own clip
bounds), so the rows are names only (TP = 1: the VLM kind runs unsharded). ``{i}`` is a conformer layer,
``{clip}`` one of the four clip-bound buffers. The non-persistent buffers (the attention's softcap, the
relative positions' timescales) are not state: each side computes its own.
"""
from __future__ import annotations

import torch

from parity.bridge.vision import _regex

_L = "audio_tower.layers.{i}"
_M = "audio_model.layers.{i}"
_S, _SM = "audio_tower.subsample_conv_projection", "audio_model.subsample"

# Clippable linears: (HF module under the layer, Megatron module under the layer)
_CLIPPABLE = [
    *[(f"feed_forward{f}.{hf}", f"feed_forward{f}.{mc}") for f in (1, 2)
      for hf, mc in (("ffw_layer_1", "linear_fc1"), ("ffw_layer_2", "linear_fc2"))],
    ("self_attn.q_proj", "self_attention.linear_q"),
    ("self_attn.k_proj", "self_attention.linear_k"),
    ("self_attn.v_proj", "self_attention.linear_v"),
    ("self_attn.post", "self_attention.linear_proj"),
    ("lconv1d.linear_start", "lconv.linear_start"),
    ("lconv1d.linear_end", "lconv.linear_end"),
]
# Other per-layer tensors: (HF, Megatron) under the layer
_LAYER = [
    *[(f"feed_forward{f}.{hf}.weight", f"feed_forward{f}.{mc}.weight") for f in (1, 2)
      for hf, mc in (("pre_layer_norm", "pre_norm"), ("post_layer_norm", "post_norm"))],
    ("self_attn.relative_k_proj.weight", "self_attention.linear_pos.weight"),
    ("self_attn.per_dim_scale", "self_attention.per_dim_scale"),
    ("lconv1d.pre_layer_norm.weight", "lconv.pre_norm.weight"),
    ("lconv1d.depthwise_conv1d.weight", "lconv.depthwise_conv.weight"),
    ("lconv1d.conv_norm.weight", "lconv.conv_norm.weight"),
    ("norm_pre_attn.weight", "pre_attn_norm.weight"),
    ("norm_post_attn.weight", "post_attn_norm.weight"),
    ("norm_out.weight", "out_norm.weight"),
]

# (HF state-dict key under the prefix, Megatron state-dict key of Gemma4AudioTowerMC)
WEIGHTS: list[tuple[str, str]] = [
    *[(f"{_S}.layer{j}.{p}.weight", f"{_SM}.layer{j}.{p}.weight") for j in (0, 1) for p in ("conv", "norm")],
    (f"{_S}.input_proj_linear.weight", f"{_SM}.input_proj.weight"),
    *[(f"{_L}.{hf}.linear.weight", f"{_M}.{mc}.linear.weight") for hf, mc in _CLIPPABLE],
    *[(f"{_L}.{hf}.{{clip}}", f"{_M}.{mc}.{{clip}}") for hf, mc in _CLIPPABLE],
    *[(f"{_L}.{hf}", f"{_M}.{mc}") for hf, mc in _LAYER],
    ("audio_tower.output_proj.weight", "audio_model.output_proj.weight"),
    ("audio_tower.output_proj.bias", "audio_model.output_proj.bias"),
    ("embed_audio.embedding_projection.weight", "embed_audio.linear_proj.weight"),
]

AUDIO_ROOTS = ("audio_tower.", "embed_audio.")
_HF_TO_MC = [(_regex(hf), mc) for hf, mc in WEIGHTS]
_MC_TO_HF = [(_regex(mc), hf) for hf, mc in WEIGHTS]


def _rename(key: str, rules) -> str:
    for regex, target in rules:
        m = regex.match(key)
        if m:
            return target.format(**m.groupdict())
    raise KeyError(f"no audio mapping for {key!r}")


def hf_to_megatron_audio(hf_state: dict[str, torch.Tensor], prefix: str = "model.") -> dict[str, torch.Tensor]:
    """Audio-tower and embed_audio entries of an HF state dict (``{prefix}audio_tower.*``,
    ``{prefix}embed_audio.*``; other keys are ignored) -> ``Gemma4AudioTowerMC`` state dict. Unknown audio keys
    raise ``KeyError``."""
    return {_rename(key[len(prefix):], _HF_TO_MC): value for key, value in hf_state.items()
            if key.startswith(prefix) and key[len(prefix):].startswith(AUDIO_ROOTS)}


def megatron_to_hf_audio(mc_state: dict[str, torch.Tensor], prefix: str = "model.") -> dict[str, torch.Tensor]:
    """``Gemma4AudioTowerMC`` state dict -> HF keys under ``prefix`` (``_extra_state`` entries dropped)."""
    return {prefix + _rename(key, _MC_TO_HF): value for key, value in mc_state.items()
            if not key.endswith("._extra_state")}
