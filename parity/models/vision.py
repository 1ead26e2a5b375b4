"""The Gemma 4 vision tower and ``embed_vision`` on megatron-core parts, from ``VisionArgs`` + state dict only.

Module boundaries mirror HF's (``Gemma4VisionModel`` -> ``patch_embedder`` / ``encoder.layers.{i}`` /
``pooler``, then ``Gemma4MultimodalEmbedder``) so every HF vision module has a Megatron twin (the rows:
``parity.engine.alignment``; these modules' names: ``parity.systems.ours``). Layout stays batch-first
``[num_images, N, Hv]`` as in HF (no sequence parallelism here, and the alignment needs no transpose).

Dataflow (HF ``modeling_gemma4.py``, transformers 5.24):
    padding = positions == (-1, -1)
    h = input_proj(2 * (pixel_values - 0.5)) + x_table[x] + y_table[y]      (position term 0 at padding)
    per layer: h += post_attn_norm(attn(in_norm(h))); h += post_mlp_norm(mlp(pre_mlp_norm(h)))
        attn: q = rope(q_norm(q_proj h)), k = rope(k_norm(k_proj h)), v = v_norm(v_proj h) (no weight),
              softmax(q k^T * 1.0) v over the real patches of the image (padded queries see them too)
        rope: 2-D axial, first half of head_dim rotated by x, second half by y, rotate_half per half
        every projection is a ClippableLinear: clamp(input) -> linear -> clamp(output)
    pooler: padded rows zeroed, k x k average by position, x sqrt(Hv) in fp32; padding slots dropped
    standardize (fp32): (h - std_bias) * std_scale; cast back to the working dtype
    embed_vision: weightless RMSNorm (vision eps) -> Linear(Hv, H_text)
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from parity import compat
from parity.vlm_config import VisionArgs, soft_tokens_per_image

compat.apply()

from megatron.core import parallel_state  # noqa: E402
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear  # noqa: E402
from megatron.core.transformer import TransformerConfig  # noqa: E402
from megatron.core.transformer.module import MegatronModule  # noqa: E402

from parity.models.norms import Gemma4RMSNorm  # noqa: E402


def vision_transformer_config(args: VisionArgs, params_dtype: torch.dtype = torch.float32) -> TransformerConfig:
    """The megatron config the parallel linears read (shapes, dtype, TP size, CPU init)."""
    return TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.intermediate_size,
        num_attention_heads=args.num_heads,
        num_query_groups=args.num_kv_heads,
        kv_channels=args.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=args.rms_norm_eps,
        add_bias_linear=False,
        gated_linear_unit=True,
        softmax_scale=args.attention_scale,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=True,
    )


class ClippableLinear(nn.Module):
    """``clamp(x, input_min, input_max) -> linear -> clamp(y, output_min, output_max)``; the four bounds are
    scalar buffers (state-dict entries). ``parallel`` picks megatron's column (output split over TP) or row
    (input split, output all-reduced before the output clamp) linear."""

    def __init__(self, in_features: int, out_features: int, *, config: TransformerConfig, parallel: str,
                 clip: bool, gather_output: bool = False):
        super().__init__()
        if parallel == "column":
            self.linear = ColumnParallelLinear(in_features, out_features, config=config, init_method=config.init_method,
                                               bias=False, gather_output=gather_output)
        else:
            self.linear = RowParallelLinear(in_features, out_features, config=config,
                                            init_method=config.output_layer_init_method, bias=False,
                                            input_is_parallel=True, skip_bias_add=False)
        self.clip = clip
        if clip:
            for name, value in (("input_min", -1), ("input_max", 1), ("output_min", -1), ("output_max", 1)):
                self.register_buffer(name, torch.tensor(value * float("inf"), dtype=config.params_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.clip:
            x = torch.clamp(x, self.input_min, self.input_max)
        y, _ = self.linear(x)
        if self.clip:
            y = torch.clamp(y, self.output_min, self.output_max)
        return y


class VisionPatchEmbedder(MegatronModule):
    """Twin of ``vision_tower.patch_embedder``: ``input_proj(2(pv - 0.5)) + x_table[x] + y_table[y]``."""

    def __init__(self, args: VisionArgs, config: TransformerConfig):
        super().__init__(config)
        self.input_proj = ColumnParallelLinear(3 * args.patch_size**2, args.hidden_size, config=config,
                                               init_method=config.init_method, bias=False, gather_output=True)
        self.position_embedding_table = nn.Parameter(
            torch.zeros(2, args.position_embedding_size, args.hidden_size, dtype=config.params_dtype))

    def forward(self, pixel_values: torch.Tensor, positions: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        x = (2 * (pixel_values - 0.5)).to(self.input_proj.weight.dtype)  # no processor normalisation: done here
        h, _ = self.input_proj(x)
        pos = positions.clamp(min=0)  # padding (-1) looks up row 0, then is zeroed
        table = self.position_embedding_table
        pe = table[0][pos[..., 0]] + table[1][pos[..., 1]]
        pe = torch.where(padding[..., None], 0.0, pe)
        return h + pe


def axial_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE angles ``[b, N, head_dim]`` laid out (x, x, y, y): each half of head_dim rotates by one axis."""
    freqs = positions[..., None].float() * inv_freq  # [b, N, 2, head_dim/4]
    fx, fy = freqs[..., 0, :], freqs[..., 1, :]
    return torch.cat([fx, fx, fy, fy], dim=-1)


class VisionRotaryEmbedding(nn.Module):
    """Twin of ``vision_tower.encoder.rotary_emb``: returns ``(cos, sin)`` in the working dtype.
    Frequencies use head_dim/2 as the denominator (one axis spans half the head). Padding patches keep
    their raw position -1 (HF does not clamp here)."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        spatial = args.head_dim // 2
        inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, spatial, 2, dtype=torch.float) / spatial))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = axial_angles(positions, self.inv_freq)
        return angles.cos().to(x.dtype), angles.sin().to(x.dtype)


def apply_axial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [b, N, heads, d]``; standard rotate_half RoPE applied separately to each half of d."""
    cos, sin = cos[:, :, None], sin[:, :, None]
    half = x.shape[-1] // 2
    parts = []
    for lo, hi in ((0, half), (half, x.shape[-1])):
        xp, q = x[..., lo:hi], (hi - lo) // 2
        rotated = torch.cat([-xp[..., q:], xp[..., :q]], dim=-1)
        parts.append(xp * cos[..., lo:hi] + rotated * sin[..., lo:hi])
    return torch.cat(parts, dim=-1)


class VisionCoreAttention(nn.Module):
    """``softmax(q k^T * scale + mask) v`` with an explicit boolean mask (True = attend), GQA, through torch's
    SDPA as HF's vision attention runs it (its fused kernels accumulate in fp32: with scale 1.0 the logits are
    large, and rounding them or the probabilities to bf16 would cost ~1e-2 rel-L2). An explicit fp32
    softmax here differed from HF's kernel by ~4e-7 rel-L2 in fp32, which the text stack amplified."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n = q.shape[:2]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, heads, N, d]
        rep = q.shape[1] // k.shape[1]
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return out.transpose(1, 2).reshape(b, n, -1)


class VisionSelfAttention(MegatronModule):
    """Twin of ``encoder.layers.{i}.self_attn``; heads split over TP. Returns ``(output, None)``."""

    def __init__(self, args: VisionArgs, config: TransformerConfig):
        super().__init__(config)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.head_dim = args.head_dim
        hv, d, clip = args.hidden_size, args.head_dim, args.use_clipped_linears
        col = dict(config=config, parallel="column", clip=clip)
        self.linear_q = ClippableLinear(hv, args.num_heads * d, **col)
        self.linear_k = ClippableLinear(hv, args.num_kv_heads * d, **col)
        self.linear_v = ClippableLinear(hv, args.num_kv_heads * d, **col)
        self.q_layernorm = Gemma4RMSNorm(d, eps=args.rms_norm_eps, dtype=config.params_dtype)
        self.k_layernorm = Gemma4RMSNorm(d, eps=args.rms_norm_eps, dtype=config.params_dtype)
        self.v_layernorm = Gemma4RMSNorm(d, eps=args.rms_norm_eps, with_scale=False)
        self.core_attention = VisionCoreAttention(args.attention_scale)
        self.linear_proj = ClippableLinear(args.num_heads * d, hv, config=config, parallel="row", clip=clip)
        assert args.num_kv_heads % tp == 0, "vision KV heads must split evenly over TP"

    def forward(self, h, cos, sin, mask):
        shape = (*h.shape[:2], -1, self.head_dim)
        q = apply_axial_rope(self.q_layernorm(self.linear_q(h).view(shape)), cos, sin)
        k = apply_axial_rope(self.k_layernorm(self.linear_k(h).view(shape)), cos, sin)
        v = self.v_layernorm(self.linear_v(h).view(shape))
        return self.linear_proj(self.core_attention(q, k, v, mask)), None


class VisionMLP(MegatronModule):
    """Twin of ``encoder.layers.{i}.mlp``: ``fc2(gelu_tanh(fc1_gate x) * fc1_up x)``. Gate and up stay
    separate linears: each has its own clip bounds."""

    def __init__(self, args: VisionArgs, config: TransformerConfig):
        super().__init__(config)
        hv, i, clip = args.hidden_size, args.intermediate_size, args.use_clipped_linears
        self.linear_fc1_gate = ClippableLinear(hv, i, config=config, parallel="column", clip=clip)
        self.linear_fc1_up = ClippableLinear(hv, i, config=config, parallel="column", clip=clip)
        self.activation_func = nn.GELU(approximate="tanh")
        self.linear_fc2 = ClippableLinear(i, hv, config=config, parallel="row", clip=clip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.activation_func(self.linear_fc1_gate(x)) * self.linear_fc1_up(x))


class VisionEncoderLayer(MegatronModule):
    """Twin of ``encoder.layers.{i}``: sandwich norms around attention and MLP."""

    def __init__(self, args: VisionArgs, config: TransformerConfig):
        super().__init__(config)
        norm = lambda: Gemma4RMSNorm(args.hidden_size, eps=args.rms_norm_eps, dtype=config.params_dtype)  # noqa: E731
        self.input_layernorm = norm()
        self.self_attention = VisionSelfAttention(args, config)
        self.post_attention_layernorm = norm()
        self.pre_mlp_layernorm = norm()
        self.mlp = VisionMLP(args, config)
        self.post_mlp_layernorm = norm()

    def forward(self, h, cos, sin, mask):
        attn, _ = self.self_attention(self.input_layernorm(h), cos, sin, mask)
        h = h + self.post_attention_layernorm(attn)
        return h + self.post_mlp_layernorm(self.mlp(self.pre_mlp_layernorm(h)))


class VisionEncoder(MegatronModule):
    """Twin of ``vision_tower.encoder``: builds its own mask and RoPE tables from the raw positions."""

    def __init__(self, args: VisionArgs, config: TransformerConfig):
        super().__init__(config)
        self.rotary_emb = VisionRotaryEmbedding(args)
        self.layers = nn.ModuleList(VisionEncoderLayer(args, config) for _ in range(args.num_layers))

    def forward(self, h: torch.Tensor, positions: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        mask = (~padding)[:, None, None, :]  # bidirectional; padded keys hidden from every query
        cos, sin = self.rotary_emb(h, positions)
        for layer in self.layers:
            h = layer(h, cos, sin, mask)
        return h


class VisionPooler(nn.Module):
    """Twin of ``vision_tower.pooler``. Returns ``(features fp32 [b, N/k^2, Hv], valid [b, N/k^2])`` with the
    padding slots still present. Patch (x, y) of an image ``W`` patches wide lands in slot
    ``x//k + (W//k) * (y//k)``; padded patches (zeroed) are counted at (0, 0) exactly as HF does."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.k = args.pooling_kernel_size
        self.root_hidden_size = args.hidden_size**0.5

    def forward(self, h: torch.Tensor, positions: torch.Tensor, padding: torch.Tensor):
        b, n, d = h.shape
        k2 = self.k * self.k
        assert n % k2 == 0, f"{n} patches do not pool by {self.k}x{self.k}"
        h = h.masked_fill(padding[..., None], 0.0)
        pos = positions.clamp(min=0)
        width = pos[..., 0].max(dim=-1, keepdim=True).values + 1
        slot = pos[..., 0] // self.k + (width // self.k) * (pos[..., 1] // self.k)  # [b, N]
        summed = torch.zeros(b, n // k2, d, dtype=torch.float32, device=h.device)
        summed.scatter_add_(1, slot[..., None].expand(b, n, d), h.float())
        pooled = (summed / k2).to(h.dtype)
        valid = torch.zeros(b, n // k2, dtype=torch.bool, device=h.device).scatter_(1, slot, True)
        # sqrt(Hv) can overflow fp16: kept in fp32 until standardisation, as HF does.
        return pooled.float() * self.root_hidden_size, valid


class VisionModel(MegatronModule):
    """Twin of ``model.vision_tower``: soft tokens ``[sum of real slots, Hv]``, padding dropped, standardised."""

    def __init__(self, args: VisionArgs, config: TransformerConfig):
        super().__init__(config)
        self.args = args
        self.patch_embedder = VisionPatchEmbedder(args, config)
        self.encoder = VisionEncoder(args, config)
        self.pooler = VisionPooler(args)
        if args.standardize:
            self.register_buffer("std_bias", torch.zeros(args.hidden_size, dtype=config.params_dtype))
            self.register_buffer("std_scale", torch.ones(args.hidden_size, dtype=config.params_dtype))

    def standardize(self, h: torch.Tensor) -> torch.Tensor:
        if not self.args.standardize:
            return h
        return (h - self.std_bias.float()) * self.std_scale.float()  # fp32: the bias cancels large values

    def forward(self, pixel_values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        padding = (positions == -1).all(dim=-1)
        h = self.patch_embedder(pixel_values, positions, padding)
        dtype = h.dtype
        h = self.encoder(h, positions, padding)
        pooled, valid = self.pooler(h, positions, padding)
        return self.standardize(pooled[valid]).to(dtype)


class VisionEmbedder(MegatronModule):
    """Twin of ``model.embed_vision``: weightless RMSNorm with the *vision* eps, then ``Linear(Hv, H_text)``.
    No sqrt(H) scaling on image features."""

    def __init__(self, args: VisionArgs, config: TransformerConfig):
        super().__init__(config)
        self.pre_projection_norm = Gemma4RMSNorm(args.hidden_size, eps=args.rms_norm_eps, with_scale=False)
        self.linear_proj = ColumnParallelLinear(args.hidden_size, args.text_hidden_size, config=config,
                                                init_method=config.init_method, bias=False, gather_output=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.linear_proj(self.pre_projection_norm(x))
        return y


class Gemma4VisionTowerMC(MegatronModule):
    """Vision tower + embed_vision: ``forward(pixel_values [I, N, 3p^2], image_position_ids [I, N, 2])``
    returns image features ``[total soft tokens, H_text]``, images concatenated in order."""

    def __init__(self, args: VisionArgs, params_dtype: torch.dtype = torch.float32):
        config = vision_transformer_config(args, params_dtype)
        super().__init__(config)
        self.args = args
        self.vision_model = VisionModel(args, config)
        self.embed_vision = VisionEmbedder(args, config)

    def forward(self, pixel_values: torch.Tensor, image_position_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_vision(self.vision_model(pixel_values, image_position_ids))

    def soft_tokens_per_image(self, image_position_ids: torch.Tensor) -> list[int]:
        return soft_tokens_per_image(image_position_ids, self.args.pooling_kernel_size)
