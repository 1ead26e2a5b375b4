"""Gemma 4 vision-language configs: what the Megatron vision tower reads, and the tiny / full shapes.

``VisionArgs.from_hf`` reads an HF ``Gemma4Config`` (or a ``Gemma4VisionConfig`` plus the text hidden
size) once into a flat dataclass; the Megatron vision tower never holds an HF config object.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from parity.config import (UnsupportedConfig, check_supported, full_text_config_kwargs, g31b_tiny_config_kwargs,
                           text_config_kwargs)


@dataclass(frozen=True)
class VisionArgs:
    hidden_size: int  # Hv
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    patch_size: int  # p: a patch is p x p pixels, 3*p*p values ordered (py, px, c)
    pooling_kernel_size: int  # k: k x k patches pool into one soft token
    position_embedding_size: int  # rows of each of the x and y position tables
    rms_norm_eps: float  # all vision norms *and* embed_vision's pre-projection norm
    rope_theta: float  # axial 2-D RoPE
    hidden_activation: str
    use_clipped_linears: bool
    standardize: bool  # (h - std_bias) * std_scale after pooling
    text_hidden_size: int  # H: output width of embed_vision
    attention_scale: float = 1.0  # HF's Gemma4VisionAttention.scaling (q/k are RMS-normed instead)

    @classmethod
    def from_hf(cls, config: Any, text_hidden_size: int | None = None) -> "VisionArgs":
        """Read a ``Gemma4Config`` (text hidden size from its text part) or a ``Gemma4VisionConfig``."""
        vision = getattr(config, "vision_config", None) or config
        if text_hidden_size is None:
            text_hidden_size = config.text_config.hidden_size
        check_supported_vision(vision)
        return cls(
            hidden_size=vision.hidden_size,
            intermediate_size=vision.intermediate_size,
            num_layers=vision.num_hidden_layers,
            num_heads=vision.num_attention_heads,
            num_kv_heads=vision.num_key_value_heads,
            head_dim=vision.head_dim,
            patch_size=vision.patch_size,
            pooling_kernel_size=vision.pooling_kernel_size,
            position_embedding_size=vision.position_embedding_size,
            rms_norm_eps=vision.rms_norm_eps,
            rope_theta=float(vision.rope_parameters["rope_theta"]),
            hidden_activation=vision.hidden_activation,
            use_clipped_linears=bool(vision.use_clipped_linears),
            standardize=bool(vision.standardize),
            text_hidden_size=int(text_hidden_size),
        )


@dataclass(frozen=True)
class AudioArgs:
    """What the Megatron audio tower reads of HF's ``Gemma4AudioConfig`` (a USM-style conformer)."""

    hidden_size: int  # Ha
    num_layers: int
    num_heads: int
    subsampling_conv_channels: tuple[int, int]  # two stride-2 3x3 Conv2d blocks; the mel width is channels[0]
    conv_kernel_size: int  # the light conv's causal depthwise Conv1d
    residual_weight: float  # feed-forward output scale before the residual add
    chunk_size: int  # chunked local attention: queries per block
    context_left: int  # keys to the left, the query itself included (the mask allows context_left - 1 past)
    context_right: int
    logit_cap: float
    invalid_logits_value: float
    use_clipped_linears: bool
    rms_norm_eps: float  # the light conv's norms, the subsampling LayerNorms and embed_audio's norm
    gradient_clipping: float
    output_proj_dims: int
    hidden_activation: str
    text_hidden_size: int  # H: output width of embed_audio

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, config: Any) -> "AudioArgs":
        """Read a ``Gemma4Config`` with an ``audio_config``."""
        audio = config.audio_config
        check_supported_audio(audio)
        return cls(
            hidden_size=audio.hidden_size,
            num_layers=audio.num_hidden_layers,
            num_heads=audio.num_attention_heads,
            subsampling_conv_channels=tuple(int(c) for c in audio.subsampling_conv_channels),
            conv_kernel_size=audio.conv_kernel_size,
            residual_weight=float(audio.residual_weight),
            chunk_size=audio.attention_chunk_size,
            context_left=audio.attention_context_left,
            context_right=audio.attention_context_right,
            logit_cap=float(audio.attention_logit_cap),
            invalid_logits_value=float(audio.attention_invalid_logits_value),
            use_clipped_linears=bool(audio.use_clipped_linears),
            rms_norm_eps=audio.rms_norm_eps,
            gradient_clipping=float(audio.gradient_clipping),
            output_proj_dims=audio.output_proj_dims,
            hidden_activation=audio.hidden_act,
            text_hidden_size=int(config.text_config.hidden_size),
        )


def check_supported_audio(audio: Any) -> None:
    """Raise ``UnsupportedConfig`` (one line) for audio features the Megatron tower does not implement."""
    problems = []
    if audio.hidden_act != "silu":
        problems.append(f"audio hidden_act={audio.hidden_act!r}")
    if audio.hidden_size % audio.num_attention_heads:
        problems.append("audio hidden_size not a multiple of num_attention_heads")
    if len(audio.subsampling_conv_channels) != 2:
        problems.append(f"audio subsampling_conv_channels={list(audio.subsampling_conv_channels)} (HF builds two blocks)")
    past, chunk, right = audio.attention_context_left - 1, audio.attention_chunk_size, audio.attention_context_right
    if (chunk + past + right) // 2 != past:  # HF's relative shift reads position (context // 2) - (j - i)
        problems.append(f"audio attention chunk {chunk} / context_left {audio.attention_context_left} / "
                        f"context_right {right} (relative positions only line up when (chunk + left - 1 + right) "
                        "// 2 == left - 1)")
    if problems:
        raise UnsupportedConfig("unsupported Gemma 4 feature(s): " + ", ".join(problems))


def check_supported_vlm(config: Any) -> None:
    """The text part's refusals, then the audio tower's (``check_supported_audio``)."""
    check_supported(config.text_config)
    if getattr(config, "audio_config", None) is not None:
        check_supported_audio(config.audio_config)


def check_supported_vision(vision: Any) -> None:
    """Raise ``UnsupportedConfig`` (one line) for vision features the Megatron tower does not implement."""
    problems = []
    rope_type = (vision.rope_parameters or {}).get("rope_type", "axial")
    if rope_type != "axial":
        problems.append(f"vision rope_type={rope_type!r}")
    if vision.hidden_activation != "gelu_pytorch_tanh":
        problems.append(f"vision hidden_activation={vision.hidden_activation!r}")
    if getattr(vision, "attention_bias", False):
        problems.append("vision attention_bias=True")
    if vision.head_dim % 4:
        problems.append(f"vision head_dim={vision.head_dim} (axial RoPE needs a multiple of 4)")
    if vision.pooling_kernel_size == 1:  # HF then returns the padding mask as the valid mask (5.24)
        problems.append("vision pooling_kernel_size=1 (HF keeps padding rows and drops real ones when it does not pool)")
    if vision.num_attention_heads % vision.num_key_value_heads:
        problems.append("vision num_attention_heads not a multiple of num_key_value_heads")
    if problems:
        raise UnsupportedConfig("unsupported Gemma 4 feature(s): " + ", ".join(problems))


# ---------------------------------------------------------------------------------------------------
# Shapes used by the cases.

# Special token ids of the tiny VLM: inside the tiny vocab (320), clear of pad 0 / eos 1 / bos 2.
TINY_TOKEN_IDS = dict(
    boi_token_id=300,
    image_token_id=301,
    eoi_token_id=302,
    video_token_id=303,
    boa_token_id=304,
    audio_token_id=305,
    eoa_token_index=306,
)


def tiny_vision_config_kwargs(**overrides: Any) -> dict[str, Any]:
    """Tiny Gemma 4 vision tower: Hv 48 (not a perfect square, so sqrt(Hv) is inexact), 2 layers,
    4 heads of 12, patch 4, pooling 2, standardize and clipped linears on. Its eps (1e-3) differs
    from the text eps (1e-6) so a vision norm reading the text eps shows (rel-L2 ~1e-2 at the output;
    embed_vision's own norm sees inputs too large for its eps to matter)."""
    kw: dict[str, Any] = dict(
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=12,
        hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=1e-3,
        patch_size=4,
        pooling_kernel_size=2,
        position_embedding_size=64,
        rope_parameters={"rope_type": "axial", "rope_theta": 100.0},
        standardize=True,
        use_clipped_linears=True,
    )
    kw.update(overrides)
    return kw


def full_vision_config_kwargs(**overrides: Any) -> dict[str, Any]:
    """The 26B-A4B vision tower (SigLIP-400M-like, ~550M params), as in Google's config.json:
    standardize on, clipped linears off (the small E2B/E4B towers use clipped linears instead)."""
    kw = tiny_vision_config_kwargs(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
        num_key_value_heads=16,
        head_dim=72,
        rms_norm_eps=1e-6,
        patch_size=16,
        pooling_kernel_size=3,
        position_embedding_size=10_240,
        standardize=True,
        use_clipped_linears=False,
    )
    kw.update(overrides)
    return kw


def tiny_audio_config_kwargs(**overrides: Any) -> dict[str, Any]:
    """Tiny Gemma 4 audio tower, shaped like E2B/E4B's (transformers' ``Gemma4AudioConfig`` defaults: hidden 1024,
    12 layers, 8 heads, subsampling channels (128, 32), light-conv kernel 5, chunks of 12 with 13 keys of left
    context, logit cap 50, output 1536, clipped linears) scaled down: hidden 48 (4 heads of 12), 2 layers,
    output 64 (not the text width, so embed_audio really projects). The subsampling channels and the chunk
    geometry stay the real ones: HF sizes its input projection as ``channels[0] // 4 * channels[1]``, which only
    fits the 128-bin mel features when ``channels[0]`` is 128, and the chunk / context values are the ones the
    relative-position shift is written for."""
    kw: dict[str, Any] = dict(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_act="silu",
        subsampling_conv_channels=[128, 32],
        conv_kernel_size=5,
        residual_weight=0.5,
        attention_chunk_size=12,
        attention_context_left=13,
        attention_context_right=0,
        attention_logit_cap=50.0,
        attention_invalid_logits_value=-1.0e9,
        use_clipped_linears=True,
        rms_norm_eps=1e-6,
        gradient_clipping=1e10,
        output_proj_dims=64,
    )
    kw.update(overrides)
    return kw


def vlm_audio_config_kwargs(*, audio: dict | None = None, **overrides: Any) -> dict[str, Any]:
    """The tiny VLM (26B-A4B-shaped text, no per-layer embeddings) with the tiny audio tower."""
    return vlm_config_kwargs(audio_config=tiny_audio_config_kwargs(**(audio or {})), **overrides)


def vlm_config_kwargs(*, text: dict | None = None, vision: dict | None = None, **overrides: Any) -> dict[str, Any]:
    """Tiny ``Gemma4Config`` kwargs: the 26B-A4B-shaped tiny text model with vision-bidirectional
    sliding attention, the tiny vision tower, no audio."""
    kw: dict[str, Any] = dict(
        text_config=text_config_kwargs(use_bidirectional_attention="vision", **(text or {})),
        vision_config=tiny_vision_config_kwargs(**(vision or {})),
        audio_config=None,
        tie_word_embeddings=True,
        **TINY_TOKEN_IDS,
    )
    kw.update(overrides)
    return kw


def full_vlm_config_kwargs(*, text: dict | None = None, vision: dict | None = None, **overrides: Any) -> dict[str, Any]:
    """The 26B-A4B-it shape; special token ids are HF's ``Gemma4Config`` defaults (Google's values)."""
    kw: dict[str, Any] = dict(
        text_config=full_text_config_kwargs(use_bidirectional_attention="vision", **(text or {})),
        vision_config=full_vision_config_kwargs(**(vision or {})),
        audio_config=None,
        tie_word_embeddings=True,
    )
    kw.update(overrides)
    return kw


def g31b_vlm_tiny_config_kwargs(*, text: dict | None = None, vision: dict | None = None,
                                **overrides: Any) -> dict[str, Any]:
    """Tiny 31B-shaped VLM: the tiny 31B dense text model (12 layers of 5 sliding + 1 full, K=V, window 16) with
    vision-bidirectional sliding attention, and the tiny vision tower set as the 31B's (standardize on, clipped
    linears off, as the large towers; the E2B/E4B towers clip instead)."""
    kw = vlm_config_kwargs(vision={"use_clipped_linears": False, **(vision or {})}, **overrides)
    kw["text_config"] = g31b_tiny_config_kwargs(use_bidirectional_attention="vision", **(text or {}))
    return kw


def e2b_vlm_tiny_config_kwargs(*, text: dict | None = None, vision: dict | None = None, audio: dict | None = None,
                               with_audio: bool = True, **overrides: Any) -> dict[str, Any]:
    """Tiny E2B-shaped VLM as E2B ships: the tiny E2B text model (per-layer embeddings, the last 5 of 10 layers
    KV-shared, double-wide MLP there) with the tiny vision tower (clipped linears, as the E2B/E4B towers) and the tiny
    audio tower (``with_audio``). ``use_bidirectional_attention`` left None, as HF's forward describes the smaller
    Gemma 4 models (standard causal masks, images included)."""
    from parity.config import e2b_tiny_config_kwargs

    return _ple_vlm_tiny(e2b_tiny_config_kwargs, text, vision, audio, with_audio, overrides)


def e4b_vlm_tiny_config_kwargs(*, text: dict | None = None, vision: dict | None = None, audio: dict | None = None,
                               with_audio: bool = True, **overrides: Any) -> dict[str, Any]:
    """Tiny E4B-shaped VLM as E4B ships: the tiny E4B text model (per-layer embeddings, the last 5 of 12 layers
    KV-shared, 2 KV heads on every layer, no double-wide MLP) with the tiny vision and audio towers of
    ``e2b_vlm_tiny``."""
    from parity.config import e4b_tiny_config_kwargs

    return _ple_vlm_tiny(e4b_tiny_config_kwargs, text, vision, audio, with_audio, overrides)


def _ple_vlm_tiny(text_kwargs, text, vision, audio, with_audio: bool, overrides: dict) -> dict[str, Any]:
    kw = vlm_config_kwargs(vision={"use_clipped_linears": True, **(vision or {})},
                           audio_config=tiny_audio_config_kwargs(**(audio or {})) if with_audio else None, **overrides)
    kw["text_config"] = text_kwargs(**(text or {}))
    return kw


# Builder name (a VLM case's ``[model] builder``) -> the ``Gemma4Config`` kwargs it makes.
VLM_BUILDERS = {"tiny_vlm": vlm_config_kwargs, "tiny_vlm_audio": vlm_audio_config_kwargs,
                "full_vlm": full_vlm_config_kwargs, "31b_vlm_tiny": g31b_vlm_tiny_config_kwargs,
                "e2b_vlm_tiny": e2b_vlm_tiny_config_kwargs, "e4b_vlm_tiny": e4b_vlm_tiny_config_kwargs}


def make_vlm_config(kwargs: dict[str, Any] | None = None):
    from transformers import Gemma4Config

    return Gemma4Config(**(kwargs if kwargs is not None else vlm_config_kwargs()))


def soft_tokens_per_image(image_position_ids, pooling_kernel_size: int) -> list[int]:
    """Real patches / k^2 per image (what the processor writes as image tokens between BOI and EOI)."""
    real = (image_position_ids != -1).all(dim=-1).sum(dim=-1)
    return (real // pooling_kernel_size**2).tolist()
