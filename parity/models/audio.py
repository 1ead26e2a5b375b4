"""The Gemma 4 audio tower and ``embed_audio`` on megatron-core parts, from ``AudioArgs`` + state dict only.

Module boundaries mirror HF's (``Gemma4AudioModel`` -> ``subsample_conv_projection`` / ``rel_pos_enc`` /
``layers.{i}`` / ``output_proj``, then ``Gemma4MultimodalEmbedder``) so every HF audio module has a Megatron
twin (rows: ``parity.engine.alignment.AUDIO``; names: ``parity.systems.ours``). Layout stays batch-first
``[clips, frames, Ha]`` as in HF. Tensor parallelism: TP = 1 (the VLM kind runs at TP = EP = 1).

Dataflow (HF ``modeling_gemma4.py``, transformers 5.24):
    subsample: x = mel [A, T, F] as one channel; twice: x *= mask (time); Conv2d 3x3 stride 2 pad 1 (no bias);
               LayerNorm over channels (no bias); ReLU; mask = mask[:, ::2]. Then [A, T/4, F/4 * C1] -> Linear.
    rel_pos:   sinusoids of the relative distances P-1 .. 0 (P = context // 2 + 1), [sin | cos]
    mask:      key k visible from query q iff k is a real frame and 0 <= q - k < context_left - 1
               (and q - k > -context_right); blocked per chunk of queries over its context of keys
    layer:     x = ff1(x); x = norm_out(ff2(lconv(x + norm_post(attn(norm_pre(x))))))   (clamps at gradient_clipping)
        ff:    x + residual_weight * post_norm(fc2(silu(fc1(pre_norm(x)))))     (pre/post norms: eps 1e-6 always)
        attn:  q = q_proj(x) / sqrt(d) / ln 2 * softplus(per_dim_scale), k = k_proj(x) * ln(1 + e) / ln 2, in fp32;
               logits = q k^T (content) + q r^T (position, relative-shifted); cap * tanh(logits / cap);
               invalid -> invalid_logits_value; softmax; @ v; post
        lconv: x + linear_end(silu(conv_norm(causal_depthwise_conv(glu(linear_start(pre_norm(x)))))))
    output_proj: Linear with bias to output_proj_dims
    embed_audio: weightless RMSNorm (audio eps) -> Linear(output_proj_dims, H_text)
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from parity import compat
from parity.vlm_config import AudioArgs

compat.apply()

from megatron.core.tensor_parallel import ColumnParallelLinear  # noqa: E402
from megatron.core.transformer import TransformerConfig  # noqa: E402
from megatron.core.transformer.module import MegatronModule  # noqa: E402

from parity.models.norms import Gemma4RMSNorm  # noqa: E402
from parity.models.vision import ClippableLinear  # noqa: E402

FIXED_EPS = 1e-6  # HF builds the feed-forward and layer norms as Gemma4RMSNorm(hidden): its default eps, not the config's


def audio_transformer_config(args: AudioArgs, params_dtype: torch.dtype = torch.float32) -> TransformerConfig:
    """The megatron config the linears read (shapes, dtype, CPU init); TP = 1."""
    return TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=4 * args.hidden_size,
        num_attention_heads=args.num_heads,
        kv_channels=args.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=args.rms_norm_eps,
        add_bias_linear=False,
        tensor_model_parallel_size=1,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=True,
    )


def _linear(in_features: int, out_features: int, config: TransformerConfig, bias: bool = False) -> ColumnParallelLinear:
    return ColumnParallelLinear(in_features, out_features, config=config, init_method=config.init_method, bias=bias,
                                gather_output=True)


def _clip_value(args: AudioArgs, dtype: torch.dtype) -> float:
    """``gradient_clipping`` within the dtype's range (HF: "avoid any underflow/overflow issues when clipping")."""
    return min(args.gradient_clipping, torch.finfo(dtype).max)


class AudioSubsampleBlock(nn.Module):
    """Twin of ``subsample_conv_projection.layer{j}``: ``[A, C, T, F] -> [A, C', T/2, F/2]`` and the mask at half
    the frame rate. Padded frames are zeroed before the conv."""

    def __init__(self, in_channels: int, out_channels: int, eps: float, dtype: torch.dtype, stride: int = 2):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False, dtype=dtype)
        self.norm = nn.LayerNorm(out_channels, eps=eps, bias=False, dtype=dtype)
        self.activation_func = nn.ReLU()

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x * mask[:, None, :, None]
        x = self.conv(x.to(self.conv.weight.dtype))
        x = self.activation_func(self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous())
        return x, self.frame_mask(mask)

    def frame_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The real frames after this block: every ``stride``-th input frame (what the conv centres on)."""
        return mask[:, ::self.stride]


class AudioSubsample(MegatronModule):
    """Twin of ``audio_tower.subsample_conv_projection``: ``(mel [A, T, F], mask [A, T])`` ->
    ``(h [A, T/4, Ha], mask [A, T/4])``."""

    def __init__(self, args: AudioArgs, config: TransformerConfig):
        super().__init__(config)
        c0, c1 = args.subsampling_conv_channels
        dtype = config.params_dtype
        self.layer0 = AudioSubsampleBlock(1, c0, args.rms_norm_eps, dtype)
        self.layer1 = AudioSubsampleBlock(c0, c1, args.rms_norm_eps, dtype)
        self.input_proj = _linear((c0 // 4) * c1, args.hidden_size, config)  # HF's width: the mel has c0 bins

    def masks(self, mask: torch.Tensor) -> list[torch.Tensor]:
        """The frame mask each block receives, then the output one."""
        out = [mask]
        for block in (self.layer0, self.layer1):
            out.append(block.frame_mask(out[-1]))
        return out

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, mask = self.layer0(features[:, None], mask)
        x, mask = self.layer1(x, mask)
        a, c, t, f = x.shape
        h, _ = self.input_proj(x.permute(0, 2, 3, 1).reshape(a, t, f * c))  # features ordered (freq, channel)
        return h, mask


class AudioRelativePositions(nn.Module):
    """Twin of ``audio_tower.rel_pos_enc``: ``[1, P, Ha]`` sinusoids of the distances ``P-1, ..., 0`` (P = context //
    2 + 1, context = chunk + context_left - 1 + context_right), laid out ``[sin | cos]``, timescales 1 .. 1e4."""

    def __init__(self, args: AudioArgs, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.max_distance = (args.chunk_size + args.context_left - 1 + args.context_right) // 2
        n = args.hidden_size // 2
        step = math.log(1.0e4) / max(n - 1, 1)
        # in the model's dtype, as HF's buffer is (built under the default dtype its model is made in): a bf16
        # model's timescales, angles and sinusoids are bf16
        self.register_buffer("inv_timescales", torch.exp(torch.arange(n).to(dtype) * -step), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        distance = torch.arange(self.max_distance, -1, -1, device=x.device)[:, None]
        angles = distance * self.inv_timescales.to(x.device)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)[None].to(x.dtype)


def blocked_attention_mask(frames: torch.Tensor, args: AudioArgs) -> torch.Tensor:
    """``[A, 1, blocks, chunk, context]`` bool, True = attend: query ``q = b*chunk + i`` sees key
    ``k = b*chunk - (context_left - 1) + j`` when ``k`` is a real frame and ``0 <= q - k < context_left - 1`` (or
    ``0 < k - q < context_right``). ``frames``: ``[A, T]`` real-frame mask at the tower's rate."""
    a, t = frames.shape
    chunk, past = args.chunk_size, args.context_left - 1
    blocks = (t + chunk - 1) // chunk
    context = chunk + past + args.context_right
    q = torch.arange(blocks, device=frames.device)[:, None, None] * chunk + torch.arange(chunk, device=frames.device)[:, None]
    k = torch.arange(blocks, device=frames.device)[:, None, None] * chunk - past + torch.arange(context, device=frames.device)
    dist = q - k  # [blocks, chunk, context]
    in_window = ((dist >= 0) & (dist < past)) | ((dist < 0) & (-dist < args.context_right))
    inside = (k >= 0) & (k < t)
    real = frames[:, k.clamp(0, t - 1)] & inside  # [A, blocks, chunk, context]
    return (real & in_window)[:, None]


class AudioChunkedAttention(MegatronModule):
    """Twin of ``layers.{i}.self_attn``: chunked local attention with a relative-position term, computed in fp32.
    Returns ``(output, None)``."""

    def __init__(self, args: AudioArgs, config: TransformerConfig):
        super().__init__(config)
        ha, d, clip = args.hidden_size, args.head_dim, args.use_clipped_linears
        self.args, self.num_heads, self.head_dim = args, args.num_heads, d
        self.q_scale = d**-0.5 / math.log(2)
        self.k_scale = math.log(1 + math.e) / math.log(2)
        self.chunk, self.past, self.future = args.chunk_size, args.context_left - 1, args.context_right
        self.context = self.chunk + self.past + self.future
        col = dict(config=config, parallel="column", clip=clip, gather_output=True)
        self.linear_q = ClippableLinear(ha, ha, **col)
        self.linear_k = ClippableLinear(ha, ha, **col)
        self.linear_v = ClippableLinear(ha, ha, **col)
        self.linear_proj = ClippableLinear(ha, ha, **col)
        self.linear_pos = _linear(ha, ha, config)
        self.per_dim_scale = nn.Parameter(torch.zeros(d, dtype=config.params_dtype))

    def blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Queries ``[A, T, n, d] -> [A, blocks, chunk, n, d]`` (zero-padded to whole chunks)."""
        a, t = x.shape[:2]
        nb = (t + self.chunk - 1) // self.chunk
        return F.pad(x, (0, 0, 0, 0, 0, nb * self.chunk - t)).reshape(a, nb, self.chunk, *x.shape[2:])

    def contexts(self, x: torch.Tensor) -> torch.Tensor:
        """Keys / values ``[A, T, n, d] -> [A, blocks, context, n, d]``: block ``b`` sees frames
        ``b*chunk - past ... b*chunk + chunk + future - 1`` (zeros outside the clip)."""
        t = x.shape[1]
        nb = (t + self.chunk - 1) // self.chunk
        x = F.pad(x, (0, 0, 0, 0, self.past, self.future + self.chunk - 1))
        index = torch.arange(nb, device=x.device)[:, None] * self.chunk + torch.arange(self.context, device=x.device)
        return x[:, index]

    def relative_shift(self, bd: torch.Tensor) -> torch.Tensor:
        """``[.., chunk, P]`` position scores -> ``[.., chunk, context]``: key ``j`` of query ``i`` reads position
        column ``j - i`` (distance ``past + i - j``), zero where that column does not exist."""
        i = torch.arange(self.chunk, device=bd.device)[:, None]
        j = torch.arange(self.context, device=bd.device)
        col = j - i
        ok = (col >= 0) & (col < bd.shape[-1])
        out = bd.gather(-1, col.clamp(0, bd.shape[-1] - 1).expand(*bd.shape[:-1], self.context))
        return out.masked_fill(~ok, 0.0)

    def forward(self, x: torch.Tensor, position_embeddings: torch.Tensor, mask: torch.Tensor):
        a, t, _ = x.shape
        n, d = self.num_heads, self.head_dim
        q = self.linear_q(x).float().view(a, t, n, d) * self.q_scale * F.softplus(self.per_dim_scale)
        k = self.linear_k(x).float().view(a, t, n, d) * self.k_scale
        v = self.linear_v(x).float().view(a, t, n, d)
        q, k, v = self.blocks(q), self.contexts(k), self.contexts(v)
        nb = q.shape[1]
        r, _ = self.linear_pos(position_embeddings)
        r = r.view(-1, n, d).float()  # [1, P, Ha] -> [P, n, d]
        q = q.permute(0, 3, 1, 2, 4)  # [A, n, blocks, chunk, d]
        content = q @ k.permute(0, 3, 1, 4, 2)  # [A, n, blocks, chunk, context]
        position = (q.reshape(a, n, -1, d) @ r.permute(1, 2, 0)).reshape(a, n, nb, self.chunk, -1)
        logits = content + self.relative_shift(position)
        cap = self.args.logit_cap
        logits = torch.tanh(logits / cap) * cap
        logits = logits.masked_fill(~mask, self.args.invalid_logits_value)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        out = probs @ v.permute(0, 3, 1, 2, 4)  # [A, n, blocks, chunk, d]
        out = out.permute(0, 2, 3, 1, 4).reshape(a, nb * self.chunk, n * d)[:, :t]
        return self.linear_proj(out.to(x.dtype)), None


class AudioFeedForward(MegatronModule):
    """Twin of ``layers.{i}.feed_forward{1,2}``: a half-step (``residual_weight``) macaron feed-forward."""

    def __init__(self, args: AudioArgs, config: TransformerConfig):
        super().__init__(config)
        ha, clip = args.hidden_size, args.use_clipped_linears
        self.args = args
        self.pre_norm = Gemma4RMSNorm(ha, eps=FIXED_EPS, dtype=config.params_dtype)
        self.linear_fc1 = ClippableLinear(ha, 4 * ha, config=config, parallel="column", clip=clip, gather_output=True)
        self.activation_func = nn.SiLU()
        self.linear_fc2 = ClippableLinear(4 * ha, ha, config=config, parallel="column", clip=clip, gather_output=True)
        self.post_norm = Gemma4RMSNorm(ha, eps=FIXED_EPS, dtype=config.params_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = _clip_value(self.args, x.dtype)
        h = self.pre_norm(torch.clamp(x, -c, c))
        h = self.linear_fc2(self.activation_func(self.linear_fc1(h)))
        h = self.post_norm(torch.clamp(h, -c, c))
        return h * self.args.residual_weight + x


class CausalDepthwiseConv1d(nn.Conv1d):
    """Twin of ``lconv1d.depthwise_conv1d``: ``[A, Ha, T]``, one filter per channel, padded on the left only
    (``kernel - 1`` frames) so frame ``t`` sees frames ``t - kernel + 1 .. t``."""

    def __init__(self, channels: int, kernel_size: int, dtype: torch.dtype):
        super().__init__(channels, channels, kernel_size, groups=channels, bias=False, dtype=dtype)
        self.left_pad = kernel_size - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.left_pad, 0)))


class AudioLightConv(MegatronModule):
    """Twin of ``layers.{i}.lconv1d``: GLU -> causal depthwise conv -> norm -> SiLU -> linear, plus the residual."""

    def __init__(self, args: AudioArgs, config: TransformerConfig):
        super().__init__(config)
        ha, clip, eps, dtype = args.hidden_size, args.use_clipped_linears, args.rms_norm_eps, config.params_dtype
        self.args = args
        self.pre_norm = Gemma4RMSNorm(ha, eps=eps, dtype=dtype)
        self.linear_start = ClippableLinear(ha, 2 * ha, config=config, parallel="column", clip=clip, gather_output=True)
        self.depthwise_conv = CausalDepthwiseConv1d(ha, args.conv_kernel_size, dtype)
        self.conv_norm = Gemma4RMSNorm(ha, eps=eps, dtype=dtype)
        self.activation_func = nn.SiLU()
        self.linear_end = ClippableLinear(ha, ha, config=config, parallel="column", clip=clip, gather_output=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.glu(self.linear_start(self.pre_norm(x)), dim=-1)
        h = self.depthwise_conv(h.transpose(1, 2)).transpose(1, 2)
        c = _clip_value(self.args, h.dtype)
        h = self.activation_func(self.conv_norm(torch.clamp(h, -c, c)))
        return self.linear_end(h) + x


class AudioConformerLayer(MegatronModule):
    """Twin of ``audio_tower.layers.{i}``: ff1, attention, light conv, ff2, then the output norm."""

    def __init__(self, args: AudioArgs, config: TransformerConfig):
        super().__init__(config)
        norm = lambda: Gemma4RMSNorm(args.hidden_size, eps=FIXED_EPS, dtype=config.params_dtype)  # noqa: E731
        self.args = args
        self.feed_forward1 = AudioFeedForward(args, config)
        self.pre_attn_norm = norm()
        self.self_attention = AudioChunkedAttention(args, config)
        self.post_attn_norm = norm()
        self.lconv = AudioLightConv(args, config)
        self.feed_forward2 = AudioFeedForward(args, config)
        self.out_norm = norm()

    def forward(self, x: torch.Tensor, position_embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        c = _clip_value(self.args, self.pre_attn_norm.weight.dtype)
        x = self.feed_forward1(x)
        h, _ = self.self_attention(self.pre_attn_norm(torch.clamp(x, -c, c)), position_embeddings, mask)
        x = self.post_attn_norm(torch.clamp(h, -c, c)) + x
        x = self.feed_forward2(self.lconv(x))
        return self.out_norm(torch.clamp(x, -c, c))


class AudioModel(MegatronModule):
    """Twin of ``model.audio_tower``: ``(mel [A, T, F], mask [A, T])`` -> ``(h [A, T/4, out], mask [A, T/4])``.
    It builds its own relative positions and blocked mask from the raw frame mask."""

    def __init__(self, args: AudioArgs, config: TransformerConfig):
        super().__init__(config)
        self.args = args
        self.subsample = AudioSubsample(args, config)
        self.rel_pos = AudioRelativePositions(args, config.params_dtype)
        self.layers = nn.ModuleList(AudioConformerLayer(args, config) for _ in range(args.num_layers))
        self.output_proj = _linear(args.hidden_size, args.output_proj_dims, config, bias=True)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, frames = self.subsample(features, mask.bool())
        positions = self.rel_pos(h)
        attend = blocked_attention_mask(frames, self.args)
        for layer in self.layers:
            h = layer(h, positions, attend)
        h, _ = self.output_proj(h)
        return h, frames


class AudioEmbedder(MegatronModule):
    """Twin of ``model.embed_audio``: weightless RMSNorm (audio eps) -> ``Linear(output_proj_dims, H_text)``."""

    def __init__(self, args: AudioArgs, config: TransformerConfig):
        super().__init__(config)
        self.pre_projection_norm = Gemma4RMSNorm(args.output_proj_dims, eps=args.rms_norm_eps, with_scale=False)
        self.linear_proj = _linear(args.output_proj_dims, args.text_hidden_size, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.linear_proj(self.pre_projection_norm(x))
        return y


class Gemma4AudioTowerMC(MegatronModule):
    """Audio tower + embed_audio: ``forward(input_features [A, T, F], input_features_mask [A, T])`` returns the
    audio soft tokens ``[real frames of all clips, H_text]``, clips concatenated in order."""

    def __init__(self, args: AudioArgs, params_dtype: torch.dtype = torch.float32):
        config = audio_transformer_config(args, params_dtype)
        super().__init__(config)
        self.args = args
        self.audio_model = AudioModel(args, config)
        self.embed_audio = AudioEmbedder(args, config)

    def forward(self, input_features: torch.Tensor, input_features_mask: torch.Tensor) -> torch.Tensor:
        h, frames = self.audio_model(input_features, input_features_mask)
        return self.embed_audio(h)[frames]
