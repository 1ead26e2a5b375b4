"""Planted Megatron-side errors (issue 11, item 8; the eps and long-position plants: issue 22): each one a small, realistic bug in one place of the Megatron
Gemma 4 or its bridge, planted through ``monkeypatch`` for one run, with the HF module path the run must name as
its first divergence (DESIGN.md section 8: inline steps by the name of their parent, masks and RoPE tables by
the first affected ``self_attn`` / ``rotary_emb``).

A plant is data: ``name``, ``kind`` (the class of error), ``where`` (the expected ``first_divergence``),
``plant(monkeypatch)``, and per dtype an optional reason why today's engine is expected to miss it
(``misses``); a precision-only error is a no-op in fp32 (``fp32_noop``: it computes exactly what HF does there,
so an fp32 run *must* pass). ``tests/test_plants.py`` runs every plant in tiny fp32 and tiny bf16;
``scripts/gpu_plants.py`` runs the same list at the 26B-A4B shape.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

# The padded cases: left padding, mixed lengths and offset positions make padding and position bugs visible
# (with right padding only, causal attention never sees a padded key and positions are the index).
CASES = {"float32": "gemma4-text-tiny-padded", "bfloat16": "gemma4-text-tiny-padded-bf16"}


@dataclass(frozen=True)
class Shape:
    """What the plants need to know of a case's model: the first full (K=V, proportional RoPE) layer, the full
    layers' head_dim (tiny: 2 and 32; 26B-A4B: 5 and 512), and the last layer and last full layer, the first the
    backward reaches (tiny: 5 and 5; 26B-A4B: 29 and 29)."""

    first_full: int
    global_hd: int
    last: int = 5
    last_full: int = 5

    @classmethod
    def of(cls, case) -> "Shape":
        from parity import config as C

        builders = {"tiny_text": C.text_config_kwargs, "full_text": C.full_text_config_kwargs}
        args = C.TextArgs.from_hf(C.make_text_config(builders[case.model.builder](**case.model.overrides)))
        full = [i for i, la in enumerate(args.layers) if not la.is_sliding]
        return cls(first_full=full[0], global_hd=args.layers[full[0]].head_dim, last=len(args.layers) - 1,
                   last_full=full[-1])

TINY = Shape(first_full=2, global_hd=32)  # the tiny text cases' model (``Shape.of`` any of them)


def _at(where: str, shape: Shape | None) -> str:
    """A plant's module name with the layers of ``shape``'s model filled in (None: the tiny cases')."""
    shape = shape or TINY
    return where.format(full=shape.first_full, last=shape.last, last_full=shape.last_full)


BF16_ROUNDING = ("under bf16 rounding: the floor-relative bf16 gates (4 x floor + 1e-3) exceed this error; needs "
                 "the fp32 replay of every module (issue 11 item 1, phase 2)")
PRECISION = ("precision-only: visible only against the fp32 truth (err(Megatron-bf16 vs HF-fp32) <= rho x "
             "err(HF-bf16 vs HF-fp32)); needs the truth records (issue 11 item 2, phase 2)")


@dataclass(frozen=True)
class Plant:
    name: str
    kind: str
    where: str  # expected summary.first_divergence; "{full}" is the first full layer, "{last}" / "{last_full}" the
    # last layer / last full layer (``Shape``)
    plant: Callable  # plant(monkeypatch, shape)
    misses: dict = field(default_factory=dict)  # dtype -> why today's engine misses it (xfail, strict)
    fp32_noop: bool = False  # precision-only: identical to HF in fp32, so the fp32 run must pass
    megatron_name: str | None = None  # expected first_divergence_detail.megatron_name, when it says more
    info: dict = field(default_factory=dict, compare=False)  # what the planting realised (sensitivity plants)
    isolated: str | None = None  # backward plants: the first failing isolated-backward row, where not ``where``
    isolated_bf16: str | None = None  # ... in a bf16 run, where not ``isolated``
    every: str | None = None  # a plant on a class: every module matching this pattern (fnmatch) is planted, and a
    # first divergence at any of them localises it (``where`` is the first of them in the run's order)

    def expected(self, shape: Shape | None = None) -> str:
        """``where`` in the model of ``shape`` (None: the tiny cases')."""
        return _at(self.where, shape)

    def expected_isolated(self, shape: Shape | None = None, bf16: bool = False) -> str:
        """A backward plant's first failing isolated-backward row (``isolated_bf16`` in a bf16 run, then
        ``isolated``, then ``where``) in the model of ``shape``."""
        return _at((self.isolated_bf16 if bf16 else None) or self.isolated or self.where, shape)

    def localised_at(self, name: str | None, shape: Shape) -> bool:
        """Whether a first divergence at ``name`` is this plant's module: ``where``, a backward plant's module alone
        (``isolated``, ``isolated_bf16``), or any module ``every`` plants."""
        places = {self.expected(shape)} | ({_at(x, shape) for x in (self.isolated, self.isolated_bf16) if x}
                                           if self.kind == "backward" else set())
        return name in places or (name is not None and self.every is not None and fnmatch.fnmatchcase(name, self.every))


def _text():
    from parity.models import text
    return text


def _after_init(mp, fn):
    """Run ``fn(model)`` on every Megatron Gemma 4 model right after it is built."""
    text = _text()
    init = text.Gemma4Model.__init__

    def planted(self, *a, **kw):
        init(self, *a, **kw)
        fn(self)

    mp.setattr(text.Gemma4Model, "__init__", planted)


def _converted(mp, fn):
    """Pass every converted (Megatron name, tensor) through ``fn`` on its way into the model."""
    from parity.bridge import convert

    iter_hf_to_megatron = convert.iter_hf_to_megatron

    def planted(*a, **kw):
        for key, w in iter_hf_to_megatron(*a, **kw):
            yield key, fn(key, w)

    mp.setattr(convert, "iter_hf_to_megatron", planted)


# ------------------------------------------------------------------------------------------- mapping

def swap_experts(mp, shape):
    keys = {f"decoder.layers.1.moe.experts.{p}.weight" for p in ("linear_fc1", "linear_fc2")}

    def fn(key, w):
        if key in keys:
            w = w.clone()
            w[[0, 1]] = w[[1, 0]]  # BUG: experts 0 and 1 of layer 1 swapped by the bridge
        return w
    _converted(mp, fn)


def swap_q_k_norm(mp, shape):
    from parity.bridge import convert

    q, k = ("decoder.layers.0.self_attention.q_layernorm.weight", "decoder.layers.0.self_attention.k_layernorm.weight")
    iter_hf_to_megatron = convert.iter_hf_to_megatron

    def planted(*a, **kw):  # BUG: layer 0's q_norm and k_norm weights swapped by the bridge (same shape)
        held = {}
        for key, w in iter_hf_to_megatron(*a, **kw):
            if key in (q, k):
                held[key] = w
                if len(held) == 2:
                    yield q, held[k]
                    yield k, held[q]
                continue
            yield key, w
    mp.setattr(convert, "iter_hf_to_megatron", planted)


# -------------------------------------------------------------------------------------------- scales

def router_without_scale(mp, shape):
    text = _text()

    def gating(self, input):  # noqa: A002 - megatron's signature
        x = text.rms_norm(input, self.config.layernorm_epsilon)
        x = x * (self.config.hidden_size**-0.5)  # BUG: `* self.scale` dropped
        return F.linear(x, self.weight)
    mp.setattr(text.Gemma4Router, "gating", gating)


def _routing(per_expert_scale=True, renormalise=True, softmax_dtype=torch.float32):
    def routing(self, logits, padding_mask=None):
        logits = logits.reshape(-1, self.config.num_moe_experts)
        probs = torch.softmax(logits, dim=-1, dtype=softmax_dtype)
        top_w, top_i = torch.topk(probs, k=self.topk, dim=-1)
        if renormalise:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        if per_expert_scale:
            top_w = top_w * self.per_expert_scale[top_i]
        self.last_top_k = (top_w, top_i)
        dense = torch.zeros_like(probs).scatter(1, top_i, top_w)
        routing_map = torch.zeros_like(probs, dtype=torch.bool).scatter(1, top_i, True)
        return dense, routing_map
    return routing


def dropped_per_expert_scale(mp, shape):
    mp.setattr(_text().Gemma4Router, "routing", _routing(per_expert_scale=False))  # BUG


def layer_scalar_ignored(mp, shape):
    def fn(model):
        layer = model.decoder.layers[3]
        forward = layer.forward
        layer.forward = lambda *a, **kw: forward(*a, **kw) / layer.layer_scalar  # BUG: layer 3 forgets it
    _after_init(mp, fn)


def embedding_unscaled(mp, shape):
    text = _text()
    mp.setattr(text.Gemma4Embedding, "forward", lambda self, input_ids, position_ids=None, **_:
               self.word_embeddings(input_ids))  # BUG: no * sqrt(H)


# --------------------------------------------------------------------------------------------- norms

def dropped_post_attention_norm(mp, shape):
    def fn(model):
        model.decoder.layers[3].post_attention_layernorm.forward = lambda x: x  # BUG: identity
    _after_init(mp, fn)


def one_plus_w_norm(mp, shape):
    from parity.models import norms

    def rms_norm(x, eps, weight=None):  # BUG: Gemma 1-3's (1 + w) on the pre-MLP norm of layer 0 only
        return norms.rms_norm(x, eps, None if weight is None else 1 + weight.float())

    def fn(model):
        n = model.decoder.layers[0].pre_mlp_layernorm
        n.forward = lambda x: rms_norm(x, n.eps, n.weight)
    _after_init(mp, fn)


def v_norm_skipped(mp, shape):
    from parity.models import rope
    text = _text()

    def forward(self, hidden_states, attention_mask, rotary_pos_emb=None, **_):
        query, key, value = self.get_query_key_value_tensors(hidden_states, None)
        # BUG: no v_norm
        query = rope.apply_rotary(query, rotary_pos_emb)
        key = rope.apply_rotary(key, rotary_pos_emb)
        context = self.core_attention(query, key, value, attention_mask)
        return self.linear_proj(context)
    mp.setattr(text.Gemma4SelfAttention, "forward", forward)


def v_after_k_norm(mp, shape):
    from parity.models import rope
    text = _text()

    def forward(self, hidden_states, attention_mask, rotary_pos_emb=None, **_):
        query, key, value = self.get_query_key_value_tensors(hidden_states, None)
        if self.config.kv_channels == shape.global_hd:  # BUG: on K=V layers V taken after k_norm
            value = text.rms_norm(value, self.k_layernorm.eps, self.k_layernorm.weight)
        value = text.rms_norm(value, self.config.layernorm_epsilon)
        query = rope.apply_rotary(query, rotary_pos_emb)
        key = rope.apply_rotary(key, rotary_pos_emb)
        context = self.core_attention(query, key, value, attention_mask)
        return self.linear_proj(context)
    mp.setattr(text.Gemma4SelfAttention, "forward", forward)


# ---------------------------------------------------------------------------------------------- RoPE

def rope_megatron_lanes(mp, shape):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from parity.models import rope
    apply_rotary = rope.apply_rotary

    def planted(t, freqs):
        hd = shape.global_hd
        if t.shape[-1] != hd:
            return apply_rotary(t, freqs)
        rot = hd // 4  # partial_rotary_factor 0.25
        half, r2 = hd // 2, rot // 2
        same = torch.cat([freqs[..., :r2], freqs[..., half:half + r2]], dim=-1)  # inv_freq values right
        return _apply_rotary_pos_emb_bshd(t, same, rotary_interleaved=False)  # BUG: pairs (i, i + rot/2)
    mp.setattr(rope, "apply_rotary", planted)


def rope_ignores_position_ids(mp, shape):
    from parity.models import rope
    rotary_freqs = rope.rotary_freqs

    def planted(layer, position_ids):  # BUG: positions are the index (arange), not position_ids
        b, s = position_ids.shape
        return rotary_freqs(layer, torch.arange(s, device=position_ids.device)[None].expand(b, s))
    mp.setattr(rope, "rotary_freqs", planted)


# --------------------------------------------------------------------------------------- masks, padding

def sliding_window_off_by_one(mp, shape):
    from parity.models import masks
    build_mask = masks.build_mask

    def planted(seq_len, *, sliding_window, **kw):
        return build_mask(seq_len, sliding_window=None if sliding_window is None else sliding_window + 1, **kw)
    mp.setattr(masks, "build_mask", planted)


def padding_mask_ignored(mp, shape):
    text = _text()
    build_masks = text.Gemma4Model.build_masks
    mp.setattr(text.Gemma4Model, "build_masks", lambda self, b, s, padding_mask=None, mm_token_type_ids=None,
               device="cpu": build_masks(self, b, s, None, mm_token_type_ids, device))  # BUG: padding dropped


def attention_scale(mp, shape):
    text = _text()
    forward = text.Gemma4CoreAttention.forward

    def planted(self, query, key, value, attention_mask, attn_mask_type=None, **kw):
        return forward(self, query * query.shape[-1] ** -0.5, key, value, attention_mask)  # BUG: 1/sqrt(d)
    mp.setattr(text.Gemma4CoreAttention, "forward", planted)


# ----------------------------------------------------------------------------- routing weights, experts

def no_top_k_renormalisation(mp, shape):
    mp.setattr(_text().Gemma4Router, "routing", _routing(renormalise=False))  # BUG


def router_softmax_in_bf16(mp, shape):
    mp.setattr(_text().Gemma4Router, "routing", _routing(softmax_dtype=None))  # BUG: softmax in the logits dtype


def _experts_forward(act=None, combine_fp32=True, scale=None):
    text = _text()
    act = act or text.gelu_tanh

    def forward(self, x, tokens_per_expert, probs, **_):
        w1, w2 = self.linear_fc1.weight, self.linear_fc2.weight
        outs = []
        for e, chunk in enumerate(torch.split(x, tokens_per_expert.tolist())):
            gate, up = F.linear(chunk, w1[e]).chunk(2, dim=-1)
            outs.append(F.linear(act(gate) * up, w2[e]))
        out = torch.cat(outs) if outs else x.new_zeros(0, w2.shape[1])
        if scale is not None:
            out = out * scale
        if combine_fp32:
            return out.float() * probs.float()[:, None], None
        return out * probs.to(out.dtype)[:, None], None  # the top-k sum then runs in the activation dtype
    return forward


def experts_combine_in_bf16(mp, shape):
    mp.setattr(_text().Gemma4Experts, "forward", _experts_forward(combine_fp32=False))  # BUG


def experts_exact_gelu(mp, shape):
    mp.setattr(_text().Gemma4Experts, "forward", _experts_forward(act=F.gelu))  # BUG: erf gelu, not tanh


def experts_output_scaled(mp, shape):
    mp.setattr(_text().Gemma4Experts, "forward", _experts_forward(scale=1.01))  # BUG: 1 % too large


def missing_final_softcap(mp, shape):
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region
    text = _text()

    def output_logits(self, hidden):
        weight = self.embedding.word_embeddings.weight if self.args.tie_word_embeddings else None
        logits, _ = self.output_layer(hidden, weight=weight)
        return gather_from_tensor_model_parallel_region(logits).transpose(0, 1)  # BUG: no tanh softcap
    mp.setattr(text.Gemma4Model, "output_logits", output_logits)


# ------------------------------------------------------------------------- where probing looks (issue 22)

def post_attention_norm_eps(mp, shape):
    """Megatron-Bridge finding 2's class: the post-attention norms built with eps 1e-5 (TE's default), not the
    config's 1e-6. At the inputs' natural scale it moves the norm by ~7e-6 (under the fp32 gate); the probing rows
    at input RMS 1e-3 fail it by orders of magnitude."""
    text = _text()
    init = text.Gemma4TransformerLayer.__init__

    def planted(self, *a, **kw):  # every layer built (the model's and the fp32 replay's copies)
        init(self, *a, **kw)
        self.post_attention_layernorm.eps = 1e-5  # BUG
    mp.setattr(text.Gemma4TransformerLayer, "__init__", planted)


def rope_positions_bf16(mp, shape):
    """Position ids cast to bf16 before the angles: exact up to 256, then rounded (257 -> 256, 131,071 ->
    131,072): right on short sequences, wrong at long positions (the probing rows at the end of the context)."""
    from parity.models import rope
    rotary_freqs = rope.rotary_freqs
    mp.setattr(rope, "rotary_freqs", lambda layer, position_ids: rotary_freqs(
        layer, position_ids.to(torch.bfloat16).to(position_ids.dtype)))  # BUG


def image_block_past_the_window(mp, shape=None):
    """Sliding layers of a vision-bidirectional VLM letting a whole image span through, window or not:
    ``(window AND causal) OR same image block`` where HF has ``window AND (causal OR same image block)``. The same
    masks wherever an image is no longer than the window: the 26B-A4B VLM's 256-token images under its 1,024-token
    window never show it; an image span longer than the window does."""
    from parity.models import masks

    build = masks.build_mask

    def planted(seq_len, *, sliding_window, padding_mask=None, block_ids=None, batch=1, device="cpu"):
        if sliding_window is None or block_ids is None:
            return build(seq_len, sliding_window=sliding_window, padding_mask=padding_mask, block_ids=block_ids,
                         batch=batch, device=device)
        allowed = build(seq_len, sliding_window=sliding_window, padding_mask=padding_mask, block_ids=None,
                        batch=batch, device=device)
        same = (block_ids[:, :, None] == block_ids[:, None, :]) & (block_ids[:, :, None] >= 0)
        if padding_mask is not None:
            same = same & padding_mask.bool()[:, None, :]
        return allowed | same[:, None]  # BUG: the block reaches past the window
    mp.setattr(masks, "build_mask", planted)


def rope_angles_bf16(mp, shape):
    """The RoPE angles (position x inverse frequency) rounded to bf16 before cos/sin: 2^-9 of the angle, so
    already wrong at short positions and wildly so at long ones."""
    from parity.models import rope
    rotary_freqs = rope.rotary_freqs
    mp.setattr(rope, "rotary_freqs", lambda layer, position_ids: rotary_freqs(layer, position_ids).to(
        torch.bfloat16).float())  # BUG


PLANTS = [
    Plant("swap_experts", "mapping", "model.layers.1.experts", swap_experts),
    Plant("swap_q_k_norm", "mapping", "model.layers.0.self_attn.q_norm", swap_q_k_norm),
    Plant("router_without_scale", "scales", "model.layers.0.router", router_without_scale),
    Plant("dropped_per_expert_scale", "scales", "model.layers.0.router", dropped_per_expert_scale),
    Plant("layer_scalar_ignored", "scales", "model.layers.3", layer_scalar_ignored),
    Plant("embedding_unscaled", "scales", "model.embed_tokens", embedding_unscaled),
    Plant("dropped_post_attention_norm", "norms", "model.layers.3.post_attention_layernorm",
          dropped_post_attention_norm),
    Plant("one_plus_w_norm", "norms", "model.layers.0.pre_feedforward_layernorm", one_plus_w_norm),
    Plant("v_norm_skipped", "norms", "model.layers.0.self_attn", v_norm_skipped),
    Plant("v_after_k_norm", "norms", "model.layers.{full}.self_attn", v_after_k_norm),
    Plant("rope_megatron_lanes", "rope", "model.layers.{full}.self_attn", rope_megatron_lanes),
    Plant("rope_ignores_position_ids", "rope", "model.rotary_emb", rope_ignores_position_ids),
    Plant("sliding_window_off_by_one", "masks", "model.layers.0.self_attn", sliding_window_off_by_one,
          megatron_name="masks[sliding_attention]"),
    Plant("padding_mask_ignored", "padding", "model.layers.0.self_attn", padding_mask_ignored,
          megatron_name="masks[sliding_attention]"),
    Plant("attention_scale", "attention", "model.layers.0.self_attn", attention_scale),
    Plant("no_top_k_renormalisation", "routing weights", "model.layers.0.router", no_top_k_renormalisation),
    Plant("router_softmax_in_bf16", "precision", "model.layers.0.router", router_softmax_in_bf16,
          fp32_noop=True),
    Plant("experts_combine_in_bf16", "precision", "model.layers.0.experts", experts_combine_in_bf16,
          fp32_noop=True),
    Plant("experts_exact_gelu", "experts", "model.layers.0.experts", experts_exact_gelu),  # ~2e-4 relative
    Plant("experts_output_scaled", "experts", "model.layers.0.experts", experts_output_scaled),  # 1e-2 relative
    Plant("missing_final_softcap", "logits", "logits", missing_final_softcap),
    Plant("post_attention_norm_eps", "eps", "model.layers.0.post_attention_layernorm", post_attention_norm_eps),
    Plant("rope_positions_bf16", "rope", "model.rotary_emb", rope_positions_bf16),
    Plant("rope_angles_bf16", "rope", "model.rotary_emb", rope_angles_bf16),
]


# Planted errors in Megatron-Bridge's model (system ``megatron-bridge``): one weight scaled by 1.01 after its own
# HF -> Megatron import, where its forward fuses or inlines the HF module, so that only its isolated replay of
# the part holding the weight (``MegatronBridgeSystem.replays``) can localise it. Same layers at both shapes.

def bridge_weight_scaled(name: str) -> Callable:
    def plant(mp, shape=None):
        from parity.systems.megatron_bridge import MegatronBridgeSystem
        load = MegatronBridgeSystem.load

        def planted(self, hf_state, folder=None):
            load(self, hf_state, folder)
            with torch.no_grad():
                dict(self.model.named_parameters())[name].mul_(1.01)  # BUG
        mp.setattr(MegatronBridgeSystem, "load", planted)
    return plant


BRIDGE_PLANTS = [
    # the input norm fused into linear_qkv: replayed on HF input_layernorm's input, first compared at q_proj
    Plant("bridge_fused_input_norm", "fused norm", "model.layers.2.self_attn.q_proj",
          bridge_weight_scaled("decoder.layers.2.self_attention.linear_qkv.layer_norm_weight"),
          megatron_name="decoder.layers.2.self_attention.linear_qkv"),
    # the pre-norms the layer applies as functions of these modules' weights (no hook ever sees them)
    Plant("bridge_shared_pre_norm", "function norm", "model.layers.1.pre_feedforward_layernorm",
          bridge_weight_scaled("decoder.layers.1.pre_shared_expert_layernorm.weight"),
          megatron_name="decoder.layers.1.pre_shared_expert_layernorm"),
    Plant("bridge_experts_pre_norm", "function norm", "model.layers.1.pre_feedforward_layernorm_2",
          bridge_weight_scaled("decoder.layers.1.pre_mlp_layernorm.weight"),
          megatron_name="decoder.layers.1.pre_mlp_layernorm"),
    # one routed expert, replayed under HF's routing: its router (and its input) agree
    Plant("bridge_one_expert", "experts", "model.layers.0.experts",
          bridge_weight_scaled("decoder.layers.0.mlp.experts.linear_fc1.weight3"), megatron_name="decoder.layers.0.mlp"),
    # o_proj inside linear_proj (TERowParallelLinearLayerNorm): read at its post-norm's input
    Plant("bridge_o_proj", "fused norm", "model.layers.3.self_attn.o_proj",
          bridge_weight_scaled("decoder.layers.3.self_attention.linear_proj.weight"),
          megatron_name="decoder.layers.3.self_attention.linear_proj"),
]
# Planted errors in our audio tower (issue 24), run on ``AUDIO_CASE`` (fp32): each one realistic slip in one place.

AUDIO_CASE = "gemma4-vlm-audio-tiny"


def audio_scatter_order(mp, shape=None):
    from parity.models.vlm import ImageScatter

    forward = ImageScatter.forward

    def planted(self, emb, feats, mask):  # BUG: the audio soft tokens scattered last clip first
        return forward(self, emb, feats.flip(0) if self.what == "audio" else feats, mask)
    mp.setattr(ImageScatter, "forward", planted)


def audio_relative_position_offset(mp, shape=None):
    from parity.models import audio

    def relative_shift(self, bd):  # BUG: key j of query i reads position column j - i + 1 (one distance off)
        i = torch.arange(self.chunk, device=bd.device)[:, None]
        col = torch.arange(self.context, device=bd.device) - i + 1
        ok = (col >= 0) & (col < bd.shape[-1])
        out = bd.gather(-1, col.clamp(0, bd.shape[-1] - 1).expand(*bd.shape[:-1], self.context))
        return out.masked_fill(~ok, 0.0)
    mp.setattr(audio.AudioChunkedAttention, "relative_shift", relative_shift)


def audio_conv_not_causal(mp, shape=None):
    from parity.models import audio

    def forward(self, x):  # BUG: "same" padding, half on each side: frame t sees 2 frames of its future
        half = self.left_pad // 2
        return torch.nn.Conv1d.forward(self, F.pad(x, (half, self.left_pad - half)))
    mp.setattr(audio.CausalDepthwiseConv1d, "forward", forward)


def audio_subsampling_stride(mp, shape=None):
    from parity.models import audio

    init = audio.AudioSubsampleBlock.__init__

    def planted(self, *a, **kw):
        init(self, *a, **kw)
        self.conv.stride = (1, 2)  # BUG: the first block strides the mel bins only, not time
    mp.setattr(audio.AudioSubsampleBlock, "__init__", planted)


def audio_window_off_by_one(mp, shape=None):
    from parity.models import audio

    build = audio.blocked_attention_mask

    def planted(frames, args):  # BUG: the window reaches context_left frames back (HF: context_left - 1)
        mask = build(frames, args).clone()
        i = torch.arange(args.chunk_size)
        mask[..., i, i] = True  # key j = i of query i's context is exactly context_left - 1 frames back
        return mask
    mp.setattr(audio, "blocked_attention_mask", planted)


AUDIO_PLANTS = [
    Plant("audio_scatter_order", "audio scatter", "merged_embeddings", audio_scatter_order,
          megatron_name="audio_scatter"),
    Plant("audio_relative_position_offset", "relative positions", "model.audio_tower.layers.0.self_attn",
          audio_relative_position_offset),
    Plant("audio_conv_not_causal", "conv padding", "model.audio_tower.layers.0.lconv1d.depthwise_conv1d",
          audio_conv_not_causal),
    Plant("audio_window_off_by_one", "masks", "model.audio_tower.layers.0.self_attn", audio_window_off_by_one,
          megatron_name="audio.masks[blocked]"),
    Plant("audio_subsampling_stride", "subsampling", "model.audio_tower.subsample_conv_projection.layer0.conv",
          audio_subsampling_stride),
]
BY_NAME = {p.name: p for p in PLANTS + BRIDGE_PLANTS + AUDIO_PLANTS}


def failing(r: dict) -> set:
    """(name, mode) of every failing module row of a run."""
    return {(m["name"], m["mode"]) for m in r["modules"] if not m["passed"]}


def first_new(r: dict, known: set) -> dict:
    """The engine's own first-divergence rule (``gates.summarise``) over the rows that fail in ``r`` but not in
    the clean run (``known``): where a plant shows when the clean run itself fails (a system with findings,
    e.g. Megatron-Bridge's bf16 embedding scale, finding 3, at ``model.embed_tokens``)."""
    from parity.engine import gates as G
    from parity.engine.record import Record

    records = [Record.from_dict({**m, "passed": m["passed"] or (m["name"], m["mode"]) in known}) for m in r["modules"]]
    return G.summarise(records, {"logits_ok": True}, {})["summary"]["first_divergence_detail"] or {}


def bridge_probing_finding(row: dict) -> int | None:
    """The Megatron-Bridge finding a failing probing row of a clean run shows (docs/megatron-bridge-findings.md),
    or None: 2, its post-attention norm's eps 1e-5, at small input magnitudes; 8, its masks on a left-padded
    batch (the positions probe moves the run's own batch); 10, its RoPE from the sequence index instead of the
    position ids, at long positions (HF's fp32 angles there carry rounding it has not; on a left-padded batch
    finding 8 adds to it)."""
    if row.get("mode") != "probing":
        return None
    probe = row.get("probe") or ""
    if row["name"].endswith(".post_attention_layernorm") and probe.startswith("magnitude"):
        return 2
    if row.get("kind") == "mask" and probe.startswith("positions"):
        return 8
    if row.get("kind") == "attention" and probe.startswith("positions"):
        return 10
    return None


def exceeds(row: dict) -> bool:
    """The row's gated metric really exceeds its gate (or a stated reason fails it)."""
    g = row["gate"]
    value = row.get(g["metric"])
    return value is None or (isinstance(value, float) and math.isnan(value)) or value > g["max"] or bool(row.get("why"))


# ------------------------------------------------------------------------------------ sensitivity (item 8)
# A planted relative error of size ``eps`` in one module of layer 0, for the sensitivity sweep of
# ``scripts/gpu_plants.py --sensitivity``: the smallest ``eps`` that still fails the run *at that module* is what
# the comparison can see there. Deterministic: the weight noise comes from a generator seeded per tensor, the
# runtime errors are exact scales, so a rerun gives the same numbers.

SENSITIVITY_SEED = 1234
SENSITIVITY = {  # class -> (expected first_divergence, converted Megatron tensor or None for a runtime error)
    "norm weight": ("model.layers.0.pre_feedforward_layernorm", "decoder.layers.0.pre_mlp_layernorm.weight"),
    "projection": ("model.layers.0.self_attn.o_proj", "decoder.layers.0.self_attention.linear_proj.weight"),
    "routing weights": ("model.layers.0.router", None),
    "expert output": ("model.layers.0.experts", None),
}


class Unrepresentable(ValueError):
    """The planted error cannot exist in the tensor's dtype (nothing would be planted)."""


def perturbed(w: torch.Tensor, eps: float, seed: int = SENSITIVITY_SEED, info: dict | None = None) -> torch.Tensor:
    """``w`` with a relative error of ``eps`` (rel-L2 of the change) as realised in ``w``'s own dtype; what was
    realised goes into ``info`` (method, numel, changed, rel_l2).

    Dense first: ``w x (1 + eps N(0,1))`` in fp32, rounded once to the dtype. A weight already on the bf16 grid
    rounds back unless its change exceeds half an ulp (2^-9 to 2^-8 relative), so below ~2e-3 a bf16 weight would
    not change at all (the error would not exist); there, and wherever the dense change realises less than
    0.8 eps, the error is one-ulp moves (up or down, at random) of a random subset of the non-zero elements, taken
    in a seeded random order until the change's rel-L2 reaches ``eps``. All randomness from a CPU generator
    seeded with ``seed``: a rerun plants the same tensor. Where even that realises a rel-L2 outside
    [eps/2, 2 eps] (one ulp of one element is already more than 2 eps), the dtype cannot carry this error in this
    tensor: ``Unrepresentable``, nothing is planted."""
    g = torch.Generator().manual_seed(seed)
    n = torch.randn(w.shape, generator=g, dtype=torch.float32).to(w.device)
    ref = w.float()
    norm = float(ref.norm())
    out, method = (ref * (1 + eps * n)).to(w.dtype), "dense"
    if float((out.float() - ref).norm()) < 0.8 * eps * norm:
        bits = {2: torch.int16, 4: torch.int32}[w.element_size()]
        step = torch.randint(0, 2, w.shape, generator=g).to(w.device, bits) * 2 - 1
        moved = (w.contiguous().view(bits) + step).view(w.dtype)  # sign-magnitude: +-1 is one ulp in magnitude
        ok = (w != 0) & torch.isfinite(moved)
        d2 = torch.where(ok, (moved.float() - ref) ** 2, 0).flatten().double()
        order = torch.randperm(d2.numel(), generator=g).to(w.device)
        k = int(torch.searchsorted(torch.cumsum(d2[order], 0), (eps * norm) ** 2)) + 1  # first k reach eps
        pick = torch.zeros(d2.numel(), dtype=torch.bool, device=w.device)
        pick[order[:k]] = True
        out, method = torch.where(pick.view(w.shape) & ok, moved, w), "ulp"
    realised = float((out.float() - ref).norm()) / norm
    if info is not None:
        info.update(method=method, numel=w.numel(), changed=int((out != w).sum()), rel_l2=realised)
    if not 0.5 * eps <= realised <= 2 * eps:
        raise Unrepresentable(f"a relative error of {eps:g} does not exist in this {w.dtype} tensor of {w.numel()} "
                              f"elements: the nearest it carries is {realised:.3g}")
    return out


def _layer0_moe(mp, fn):
    """``fn(moe)`` on the MoE block of decoder layer 0 (megatron layer_number 1) whenever one is built: the
    model under test and the fp32 copy its fp32 replay builds from the same spec."""
    text = _text()
    init = text.Gemma4MoE.__init__

    def planted(self, *a, **kw):
        init(self, *a, **kw)
        if self.layer_number == 1:
            fn(self)

    mp.setattr(text.Gemma4MoE, "__init__", planted)


def _scaled_routing(eps):
    def fn(moe):
        router = moe.router
        routing = router.routing

        def planted(logits, padding_mask=None):  # the top-k routing weights x (1 + eps)
            dense, routing_map = routing(logits, padding_mask)
            top_w, top_i = router.last_top_k
            router.last_top_k = (top_w * (1 + eps), top_i)
            return dense * (1 + eps), routing_map
        router.routing = planted
    return fn


def _scaled_experts(eps):
    def fn(moe):
        experts = moe.experts
        forward = experts.forward

        def planted(*a, **kw):  # the prob-weighted expert outputs x (1 + eps), before the combine
            out, bias = forward(*a, **kw)
            return out * (1 + eps), bias
        experts.forward = planted
    return fn


def sensitivity_plant(cls: str, eps: float) -> Plant:
    """The class ``cls`` of ``SENSITIVITY`` with a relative error ``eps`` planted in layer 0: a weight (norm weight,
    projection) as the converted tensor x (1 + eps N(0,1)), seeded; routing weights (the router's top-k
    weights) and an expert output (the experts' prob-weighted outputs) x (1 + eps) at runtime."""
    if cls not in SENSITIVITY:
        raise KeyError(f"unknown sensitivity class {cls!r} (known: {', '.join(SENSITIVITY)})")
    where, key = SENSITIVITY[cls]

    info: dict = {}  # what the last planting realised (weights: method, numel, changed, rel_l2)
    if key is not None:
        def plant(mp, shape):
            _converted(mp, lambda k, w: perturbed(w, eps, info=info) if k == key else w)
    elif cls == "routing weights":
        def plant(mp, shape):
            info.update(method="scale", rel_l2=eps)
            _layer0_moe(mp, _scaled_routing(eps))
    else:
        def plant(mp, shape):
            info.update(method="scale", rel_l2=eps)
            _layer0_moe(mp, _scaled_experts(eps))
    return Plant(f"sensitivity[{cls}, {eps:g}]", cls, where, plant, info=info)


# ------------------------------------------------------------------------------ backward-only (train cases)
# Each leaves the forward bit for bit as it was and changes only what flows back (checked by
# tests/test_backward.py: the forward rows stay exact, a gradient row fails first). ``where`` names the row the
# backward mode's first divergence must be (the tiny model's last layer is the first the backward reaches).

class _GradOnly(torch.autograd.Function):
    """Identity forward (the same tensor, still requiring grad: the same kernels run); ``fn`` on the gradient."""

    @staticmethod
    def forward(ctx, x, fn):
        ctx.fn = fn
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return ctx.fn(g), None


class _StraightThroughSoftcap(torch.autograd.Function):
    """``tanh(x / cap) * cap`` forward, bit for bit; its derivative replaced by 1."""

    @staticmethod
    def forward(ctx, x, cap):
        return torch.tanh(x / cap) * cap

    @staticmethod
    def backward(ctx, g):
        return g, None


def _patch_layer(mp, i: int, fn):
    """``fn(layer)`` on decoder layer ``i`` of every Megatron model built (-1: the last)."""
    _after_init(mp, lambda model: fn(model.decoder.layers[i]))


def rms_detached(mp, shape):
    """The pre-MLP norm of the last layer with its 1/rms detached (a norm's scale taken as a constant)."""
    from parity.models import norms

    def detach(layer):
        norm = layer.pre_mlp_layernorm

        def forward(x):
            h = x.float()
            h = h * torch.pow(h.pow(2).mean(-1, keepdim=True) + norm.eps, -0.5).detach()
            return (h * norm.weight.float()).type_as(x)
        assert norms.rms_norm  # the formula above is norms.rms_norm's, bit for bit
        norm.forward = forward
    _patch_layer(mp, -1, detach)


def straight_through_softcap(mp, shape):
    text = _text()

    def output_logits(self, hidden):
        from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

        weight = self.embedding.word_embeddings.weight if self.args.tie_word_embeddings else None
        logits, _ = self.output_layer(hidden, weight=weight)
        logits = gather_from_tensor_model_parallel_region(logits)
        return _StraightThroughSoftcap.apply(logits, self.args.final_logit_softcapping).transpose(0, 1)
    mp.setattr(text.Gemma4Model, "output_logits", output_logits)


def kv_tie_without_gradient(mp, shape):
    """K=V layers with V = K detached: the tie holds in the forward, K's weights miss V's gradient."""
    text = _text()
    tied = text.Gemma4SelfAttention._qkv_tied

    def planted(self, hidden_states):
        q, k, v = tied(self, hidden_states)
        return q, k, v.detach()
    mp.setattr(text.Gemma4SelfAttention, "_qkv_tied", planted)


def logits_grad_bf16(mp, shape):
    """The gradient the output layer sends back to the final hidden state rounded to bf16 (a lossy fused
    logits/loss kernel): inline between the final norm and the output layer, it shows at the final norm's own
    gradients (the output layer's input gradient, read after it, is exact)."""
    text = _text()
    output_logits = text.Gemma4Model.output_logits

    def planted(self, hidden):
        weight = self.embedding.word_embeddings.weight if self.args.tie_word_embeddings else None
        logits, _ = self.output_layer(_GradOnly.apply(hidden, lambda g: g.bfloat16().to(g.dtype)), weight=weight)
        assert output_logits  # the rest as the original: gather (TP=1: identity), softcap, batch-first
        cap = self.args.final_logit_softcapping
        return (torch.tanh(logits / cap) * cap).transpose(0, 1)
    mp.setattr(text.Gemma4Model, "output_logits", planted)


def tied_head_grad_dropped(mp, shape):
    """The output layer uses the tied embedding weight without its gradient: the embedding misses the head's."""
    text = _text()

    def output_logits(self, hidden):
        logits, _ = self.output_layer(hidden, weight=_GradOnly.apply(self.embedding.word_embeddings.weight,
                                                                     torch.zeros_like))
        cap = self.args.final_logit_softcapping
        return (torch.tanh(logits / cap) * cap).transpose(0, 1)
    mp.setattr(text.Gemma4Model, "output_logits", output_logits)


def combine_probs_detached(mp, shape):
    """The expert outputs weighted by routing probabilities detached: the router learns nothing from them."""
    text = _text()
    forward = text.Gemma4Experts.forward

    def planted(self, x, tokens_per_expert, probs, **kw):
        return forward(self, x, tokens_per_expert, probs.detach(), **kw)
    mp.setattr(text.Gemma4Experts, "forward", planted)


def loss_over_padding(mp, shape):
    """The loss averaged over every position, padded ones included (a loss mask that forgot the padding)."""
    from parity.systems import ours

    loss_on = ours.ParitySystem.loss_on

    def planted(self, logits, labels):
        ids = self.inputs["input_ids"].to(labels.device)  # the isolated loss's labels sit beside HF's logits
        return loss_on(self, logits, torch.where(labels == -100, ids, labels))
    mp.setattr(ours.ParitySystem, "loss_on", planted)


def aux_loss_left_on(mp, shape):
    """A load-balancing loss still attached to the router's probabilities (megatron's MoEAuxLossAutoScaler: the
    forward is untouched, its gradient is added in the backward)."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    text = _text()
    forward = text.Gemma4Router.forward
    # its backward sets a class-wide loss scale on first use: restored with the plant (other runs set their own)
    mp.setattr(MoEAuxLossAutoScaler, "main_loss_backward_scale", MoEAuxLossAutoScaler.main_loss_backward_scale)

    def planted(self, input, padding_mask=None):

        probs, routing_map = forward(self, input, padding_mask)
        aux = 1e-2 * (probs.float().sum(0) * routing_map.float().sum(0)).sum() / probs.shape[0] ** 2
        return MoEAuxLossAutoScaler.apply(probs, aux), routing_map
    mp.setattr(text.Gemma4Router, "forward", planted)


BACKWARD_PLANTS = [
    # bf16: end to end it moves the norm's input gradient by 1.6 %, under its bf16 gate (4 x HF's own bf16-vs-fp32
    # gradient error of ~5 % + 1e-3); the norm alone fails its truth gate (HF's norm alone in bf16 is 0.16 % off)
    Plant("rms detached", "backward", "model.layers.{last}.pre_feedforward_layernorm", rms_detached),
    # inline after lm_head in HF's forward: the first module whose own gradients it feeds
    Plant("straight-through softcap", "backward", "lm_head", straight_through_softcap, isolated="logits"),
    Plant("K=V tie without gradient", "backward", "model.layers.{last_full}.self_attn.k_proj.weight",
          kv_tie_without_gradient, isolated="model.layers.{last_full}.self_attn"),  # the tie is inside the attention, not in k_proj
    Plant("logits gradient in bf16", "backward", "model.norm.weight", logits_grad_bf16, isolated="logits",
          misses={"bfloat16": "a bf16 run's gradients are bf16 already: rounding to bf16 changes nothing"}),
    Plant("tied head gradient dropped", "backward", "model.embed_tokens.weight", tied_head_grad_dropped,
          isolated="lm_head.weight"),  # the head's share of the tied weight
    # the routing weights' gradient reaches the router's parameters: per_expert_scale is the last it multiplies
    Plant("combine probabilities detached", "backward", "model.layers.{last}.router.per_expert_scale",
          combine_probs_detached, isolated="model.layers.{last}.experts[top_k_weights]"),
    Plant("loss over padding", "backward", "loss", loss_over_padding),
    # bf16: end to end a coefficient of 1e-2 moves the router's gradients by ~5 %, under their bf16 gates (4 x HF's
    # own bf16-vs-fp32 error of 4-28 % + 1e-3); the router alone: its per_expert_scale gradient fails its truth gate,
    # narrowly (8.1 % from HF's module alone in fp32 against a gate of 1.5 x 4.9 %)
    Plant("aux loss left on", "backward", "model.layers.{last}.router.per_expert_scale", aux_loss_left_on,
          isolated="model.layers.{last}.router", isolated_bf16="model.layers.{last}.router.per_expert_scale",
          every="model.layers.*.router*"),  # every router carries it
]
BY_NAME.update({p.name: p for p in BACKWARD_PLANTS})  # scripts/gpu_plants.py --plants names them too


def decay_everything(mp, shape):
    """The system's optimizer decays every parameter, norms and scales too."""
    from parity.engine.modes import step
    from parity.systems import ours

    groups = step.param_groups

    def every(named, weight_decay):
        return [{"params": [p for g in groups(named, weight_decay) for p in g["params"]], "weight_decay": weight_decay}]
    mp.setattr(ours.ParitySystem, "optimizer_step", _with(ours.ParitySystem.optimizer_step, step, "param_groups", every))


def _with(method, module, name, value):
    """``method`` run with ``module.name`` set to ``value`` for its duration."""
    def planted(self, *a, **kw):
        old = getattr(module, name)
        setattr(module, name, value)
        try:
            return method(self, *a, **kw)
        finally:
            setattr(module, name, old)
    return planted


def adam_eps_1e6(mp, shape):
    """The system's AdamW with eps 1e-6 instead of the case's 1e-8 (a default that moves small updates)."""
    import dataclasses

    from parity.systems import ours

    step = ours.ParitySystem.optimizer_step

    def planted(self, spec):
        spec = dataclasses.replace(spec, optimizer=dataclasses.replace(spec.optimizer, eps=1e-6))
        return step(self, spec)
    mp.setattr(ours.ParitySystem, "optimizer_step", planted)


def optimizer_changed(**change):
    """The system's AdamW with ``change`` to the case's hyper-parameters (a default of its own left in place)."""
    def plant(mp, shape=None):
        import dataclasses

        from parity.systems import ours

        step = ours.ParitySystem.optimizer_step

        def planted(self, spec):
            return step(self, dataclasses.replace(spec, optimizer=dataclasses.replace(spec.optimizer, **change)))
        mp.setattr(ours.ParitySystem, "optimizer_step", planted)
    return plant


# Seen by the trajectory alone: Adam's first update does not depend on its betas (bias correction), so every
# first-update row agrees and the second step is the first to move (megatron's default adam_beta2 is 0.999; the
# cases' 0.95 is what Gemma fine-tunes use).
TRAJECTORY_PLANTS = [Plant("Adam beta2 0.999", "step", "train.trajectory", optimizer_changed(betas=(0.9, 0.999)))]


STEP_PLANTS = [
    Plant("weight decay on norms", "step", "model.layers.0.self_attn.q_norm.weight", decay_everything,
          misses={"bfloat16": "a norm's weight near 1 decays by lr x wd = 1e-6 per step, far below one unit in the "
                              "last place of a bf16 parameter there (2^-7): the fp32 main weight holds it, the "
                              "bf16 parameter and the 10-step trajectory do not move (0.06 of its gate)"}),
    Plant("Adam eps 1e-6", "step", "model.embed_tokens.weight", adam_eps_1e6,
          misses={"bfloat16": "eps 1e-6 moves the updates of elements whose gradient is below ~1e-5, which bf16 "
                              "parameters do not resolve; the 10-step trajectory stays at 0.05 of its gate (HF's own "
                              "bf16-vs-fp32 band), and bf16 first updates are reported, not gated"}),
]


# ------------------------------------------------------------------------- parallel-only backward (TP / EP worlds)
# Each exists only in a world of several ranks and leaves the forward bit for bit as it was (checked by
# tests/test_parallel_backward.py, where the clean TP=2 and EP=2 train runs pass).

def qk_norm_grads_not_reduced(mp, shape):
    """At TP > 1 the q/k norms' weight gradients left unsummed over the TP ranks: each rank keeps the part of the
    heads it holds (megatron's finalize_model_grads sums them: ``_allreduce_non_tensor_model_parallel_grads``)."""
    import importlib

    finalize = importlib.import_module("megatron.core.distributed.finalize_model_grads")  # the package's name is
    mp.setattr(finalize, "_allreduce_non_tensor_model_parallel_grads", lambda *a, **kw: None)  # its function too


def qkv_input_grad_not_reduced(mp, shape):
    """The last layer's column-parallel QKV projection without the all-reduce of its input gradient over the TP
    ranks (neither ``allreduce_dgrad`` in its backward nor the copy-to-region before it): each rank sends back the
    part of the input gradient its own heads make."""
    def drop(layer):
        qkv = layer.self_attention.linear_qkv
        qkv.allreduce_dgrad, qkv.disable_grad_reduce = False, True
    _patch_layer(mp, -1, drop)


def moe_tokens_from_every_tp_rank(mp, shape):
    """The MoE layer at TP > 1 dispatching every token from every TP rank (no sequence split before megatron's
    all-gather dispatcher, which spans TP x EP): the forward unchanged, the experts' weight gradients TP times."""
    text = _text()

    def experts_forward(self, expert_input, probs, routing_map):
        x, probs = self.preprocess(expert_input.contiguous(), probs, routing_map)
        x, probs = self.dispatch(x, probs)
        out, _ = self.routed_experts_compute(x, probs)
        return self.postprocess(self.combine(out), None).to(expert_input.dtype)
    mp.setattr(text.Gemma4MoE, "experts_forward", experts_forward)


def experts_not_dp_averaged(mp, shape):
    """The experts' gradients left as the sum over the data-parallel ranks' losses (their 1/dp of megatron's DDP
    forgotten: a reduction over the expert-data-parallel group alone, of size 1 here, averages nothing)."""
    from megatron.core import parallel_state as ps

    from parity.systems import ours

    finalize = ours.ParitySystem.finalize_grads

    def planted(self):
        pending = not getattr(self, "_finalized", True)
        finalize(self)
        if pending:
            for m in self.model.modules():
                if isinstance(m, _text().Gemma4Experts):
                    for p in (p for p in m.parameters() if p.grad is not None):
                        p.grad.mul_(ps.get_data_parallel_world_size())
    mp.setattr(ours.ParitySystem, "finalize_grads", planted)


def tp_replicas_in_the_norm(mp, shape):
    """The optimizer's global gradient norm counting a TP-replicated parameter's gradient (norms, the router) on
    every TP rank, not once (megatron's ``param_is_not_tensor_parallel_duplicate`` left out): the norm too large, the
    clip too strong. Gradients and forward unchanged."""
    from parity import megatron_layout

    mp.setattr(megatron_layout, "tp_unique", lambda p, first_tp: True)


PARALLEL_STEP_PLANTS = [  # planted in the TP=2 world: the optimizer step only
    # the trajectory's gradient norm is 11.5 % off at every step; Adam's first update is nearly scale-free, so the
    # clip's extra shrinking moves it only through eps: the first param_step row over its gate is 1.6 x the gate
    Plant("TP replicas counted in the gradient norm", "step", "model.layers.0.mlp.gate_proj.weight",
          tp_replicas_in_the_norm),
]

PARALLEL_PLANTS = [  # planted in the TP=2 or EP=2 world (tests/test_parallel_backward.py PLANTED_IN)
    Plant("q/k norm gradients not summed over TP", "backward", "model.layers.5.self_attn.k_norm.weight",
          qk_norm_grads_not_reduced),
    Plant("QKV input gradient not all-reduced", "backward", "model.layers.5.self_attn.q_proj",
          qkv_input_grad_not_reduced),
    Plant("MoE tokens from every TP rank", "backward", "model.layers.5.experts.down_proj",
          moe_tokens_from_every_tp_rank, isolated="model.layers.5.experts.gate_up_proj"),
    Plant("experts not averaged over DP", "backward", "model.layers.5.experts.down_proj", experts_not_dp_averaged,
          isolated="model.layers.5.experts.gate_up_proj"),
]


# ------------------------------------------------------------------ the Gemma 4 family (issue 24): PLE, KV sharing
# Each plant runs on the tiny case of the member that has the feature (``FAMILY_PLANTS``: case -> plants).

def ple_gate_without_activation(mp, shape=None):
    """Layer 2 multiplies its per-layer input by the raw gate (gelu dropped): an inline step of the layer, so
    the layer itself (its isolated replay) is the first divergence."""
    text = _text()
    forward = text.Gemma4TransformerLayer.forward

    def planted(self, hidden_states, attention_mask, rotary_pos_emb, per_layer_input=None, shared_kv=None):
        if self.layer_number != 3:
            return forward(self, hidden_states, attention_mask, rotary_pos_emb, per_layer_input, shared_kv)
        act, text.gelu_tanh = text.gelu_tanh, lambda x: x  # BUG: no activation on layer 2's PLE gate
        try:
            return forward(self, hidden_states, attention_mask, rotary_pos_emb, per_layer_input, shared_kv)
        finally:
            text.gelu_tanh = act
    mp.setattr(text.Gemma4TransformerLayer, "forward", planted)
    mp.setattr(text.Gemma4TransformerLayer, "layer_number", property(lambda self: self.self_attention.layer_number),
               raising=False)


def ple_projection_packed_wrong(mp, shape=None):
    """The bridge packs PLE's model projection as [P, L] instead of HF's [L, P] (each layer's rows interleaved)."""
    def fn(key, w):
        if key == "per_layer_model_projection.weight":
            n_layers = w.shape[0] // 8  # the tiny E2B/E4B shapes: 8 per layer
            w = w.reshape(n_layers, 8, -1).transpose(0, 1).reshape(w.shape)  # BUG
        return w
    _converted(mp, fn)


def ple_mix_unscaled(mp, shape=None):
    """The per-layer inputs mixed as (projection + token table) without HF's 1/sqrt(2): an inline step of the text
    model, first seen where layer 0 multiplies its gate by it (the input of its per-layer projection)."""
    text = _text()
    per_layer_inputs = text.Gemma4Model.per_layer_inputs
    mp.setattr(text.Gemma4Model, "per_layer_inputs",
               lambda self, ids, h: per_layer_inputs(self, ids, h) * 2.0**0.5)  # BUG: the scale undone


def kv_wrong_source(mp, shape=None):
    """The first KV-shared sliding layer (5) reuses layer 2's K/V (an earlier sliding layer) instead of the last one
    before the shared layers (3): a wrong source in the model's wiring, seen end to end at that attention."""
    def fn(model):
        model.decoder.layers[2].self_attention.kv_store = True
        model.decoder.layers[5].self_attention.kv_source = 2  # BUG: should be 3
    _after_init(mp, fn)


def kv_recomputed(mp, shape=None):
    """KV-shared layer 6 computes K/V again from its own input with its source layer's weights (weights shared
    instead of K/V): its attention fails, end to end and alone."""
    text = _text()
    forward = text.Gemma4SharedKVSelfAttention.forward

    def planted(self, hidden_states, attention_mask, rotary_pos_emb=None, shared_kv=None, **kw):
        if self.layer_number == 7 and getattr(self, "source_module", None) is not None:
            src = self.source_module  # BUG: K/V recomputed here, from this layer's input, with the source's weights
            hn = src.hidden_size_per_attention_head
            ng = src.num_query_groups_per_partition
            mixed = F.linear(hidden_states, src.linear_qkv.weight).view(*hidden_states.shape[:2], ng, -1, hn)
            key, value = mixed[:, :, :, -2], mixed[:, :, :, -1]
            key = text.rms_norm(key, src.k_layernorm.eps, src.k_layernorm.weight)
            value = text.rms_norm(value, self.config.layernorm_epsilon)
            shared_kv = {**shared_kv, self.kv_source: (text.rope.apply_rotary(key, rotary_pos_emb), value)}
        return forward(self, hidden_states, attention_mask, rotary_pos_emb, shared_kv)
    mp.setattr(text.Gemma4SharedKVSelfAttention, "forward", planted)

    def fn(model):
        att = model.decoder.layers[6].self_attention
        object.__setattr__(att, "source_module", model.decoder.layers[att.kv_source].self_attention)
    _after_init(mp, fn)


def double_wide_mlp_off_by_one(mp, shape=None):
    """The double-wide MLP given to the layers from the last KV-storing one on (4..9) instead of the KV-shared ones
    (5..9): the weights of layer 4 do not fit; the import refuses, naming the tensor."""
    from parity import config as C
    from_hf = C.TextArgs.from_hf

    def planted(config):
        args = from_hf(config)
        first = min(i for i, la in enumerate(args.layers) if la.kv_shared)
        layers = tuple(dataclasses.replace(la, intermediate_size=2 * args.intermediate_size) if i == first - 1 else la
                       for i, la in enumerate(args.layers))  # BUG
        return dataclasses.replace(args, layers=layers)
    mp.setattr(C.TextArgs, "from_hf", staticmethod(planted))


def double_wide_mlp_half_used(mp, shape=None):
    """A double-wide layer's MLP (layer 7) computes with only the first half of its intermediate features (the
    config's width, not the layer's): its MLP fails, end to end and alone."""
    def fn(model):
        mlp = model.decoder.layers[7].mlp

        def planted(x, *a, **kw):
            fc1, _ = mlp.linear_fc1(x)
            gate, up = fc1.chunk(2, dim=-1)
            half = gate.shape[-1] // 2
            inter = _text().gelu_tanh(gate[..., :half]) * up[..., :half]  # BUG: half the features
            w2 = mlp.linear_fc2.weight[:, :half]
            return F.linear(inter, w2), None
        mlp.forward = planted
    _after_init(mp, fn)


def ple_placeholder_rows(mp, shape=None):
    """The VLM hands its language model the raw ids: the per-layer token table looks up the image and audio
    placeholders' own rows, where HF looks up the pad token's (its Gemma4Model maps every placeholder to pad first)."""
    from parity.models import vlm

    forward = vlm.Gemma4VLModel.forward

    def planted(self, input_ids, *args, **kwargs):
        lm = self.language_model
        real = lm.forward
        lm.forward = lambda **kw: real(**{**kw, "input_ids": input_ids})  # BUG: the raw ids reach PLE
        try:
            return forward(self, input_ids, *args, **kwargs)
        finally:
            del lm.forward
    mp.setattr(vlm.Gemma4VLModel, "forward", planted)


def ple_before_the_merge(mp, shape=None):
    """PLE's projection of the text embeddings before the images and audio are merged in (placeholder rows: the
    pad token's embedding), where HF projects the merged embeddings."""
    text = _text()
    per_layer = text.Gemma4Model.per_layer_inputs

    def planted(self, input_ids, h):
        emb = self.embedding.word_embeddings(input_ids)  # BUG: the text-only embeddings (its scale as the module's)
        emb = emb * torch.tensor(self.embedding.embed_scale, dtype=torch.float32).to(emb.dtype)
        return per_layer(self, input_ids, emb.transpose(0, 1).to(h.dtype))
    mp.setattr(text.Gemma4Model, "per_layer_inputs", planted)


def pad_row_trained(mp, shape=None):
    """The embeddings' pad row trained by its own lookups (megatron's vocab-parallel embedding as it comes, no
    ``padding_idx``): HF's ``nn.Embedding(padding_idx=pad)`` gives it none. In a VLM the image and audio placeholders
    are looked up as the pad token by PLE's table, and those lookups reach the loss: the table's pad row gradient
    differs, everything else agrees. (Found in our own system by gemma4-e2b-vlm-tiny-train, and fixed.)"""
    text = _text()
    mp.setattr(text, "_no_pad_gradient", lambda emb, input_ids, pad_id: emb)


FAMILY_PLANTS = {
    "gemma4-e2b-tiny": [
        Plant("ple_gate_without_activation", "PLE", "model.layers.2", ple_gate_without_activation),
        Plant("ple_projection_packed_wrong", "PLE", "model.per_layer_model_projection", ple_projection_packed_wrong),
        Plant("ple_mix_unscaled", "PLE", "model.layers.0.per_layer_projection", ple_mix_unscaled),
        Plant("kv_wrong_source", "KV sharing", "model.layers.5.self_attn", kv_wrong_source),
        Plant("kv_recomputed", "KV sharing", "model.layers.6.self_attn", kv_recomputed),
        Plant("double_wide_mlp_half_used", "double-wide MLP", "model.layers.7.mlp", double_wide_mlp_half_used),
    ],
    "gemma4-e2b-vlm-tiny-train": [  # training PLE inside the VLM: placeholders are looked up as the pad token
        Plant("pad_row_trained", "PLE", "model.language_model.embed_tokens_per_layer.weight", pad_row_trained),
    ],
    "gemma4-e2b-vlm-tiny": [  # PLE inside the VLM: what the language model's per-layer inputs see of the merge
        Plant("ple_placeholder_rows", "PLE", "model.language_model.embed_tokens_per_layer", ple_placeholder_rows),
        Plant("ple_before_the_merge", "PLE", "model.language_model.per_layer_model_projection",
              ple_before_the_merge),
    ],
}
# ------------------------------------------------------------------------------------ LoRA (issue 21)
# Errors planted in Megatron-Bridge's own LoRA (its transform, adapter layers, adapter export and merge), each with the
# row the run must name as its first divergence on ``gemma4-text-tiny-lora`` (``targets``: the case's targets it needs;
# the merge plant needs targets without q/k/v_proj, whose merged export the bridge cannot make on K=V layers: finding
# 14). ``tests/test_lora.py`` runs them.

@dataclass(frozen=True)
class LoraPlant:
    name: str
    where: str  # the expected first divergence (an HF module, an adapter tensor or a merged weight)
    mode: str  # the row mode it fails in first
    plant: Callable
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")
    also: tuple[tuple[str, str], ...] = ()  # (name, mode) of further rows that must fail


def _adapter_cls():
    from megatron.bridge.peft.utils import ParallelLinearAdapter
    return ParallelLinearAdapter


def lora_scale_alpha_not_over_r(mp):  # BUG: the adapter output scaled by alpha, not alpha / r
    cls = _adapter_cls()
    forward = cls.forward
    mp.setattr(cls, "forward", lambda self, x, *a, **kw: forward(self, x, *a, **kw) * self.dim)


def lora_dropout_on_in_eval(mp):  # BUG: the adapters' dropout stays on in evaluation
    cls = _adapter_cls()
    forward = cls.forward

    def planted(self, x, *a, **kw):
        self.dropout.train(True)
        return forward(self, x, *a, **kw)
    mp.setattr(cls, "forward", planted)


def _split_qkv(mp, change):
    from megatron.bridge.models.gemma import gemma4_bridge as G
    split = G.Gemma4Bridge._split_qkv_linear_out_weight
    mp.setattr(G.Gemma4Bridge, "_split_qkv_linear_out_weight", lambda self, m, w: change(split(self, m, w)))


def lora_export_q_k_swapped(mp):  # BUG: the fused linear_out split hands q's rows to k_proj and k's to q_proj
    _split_qkv(mp, lambda out: {**out, "q_proj": out["k_proj"], "k_proj": out["q_proj"]})


def lora_export_absent_v(mp):  # BUG: K=V layers export a v_proj adapter (v_proj does not exist there)
    from megatron.bridge.models.conversion.peft_bridge import ABSENT_PROJECTION
    _split_qkv(mp, lambda out: {**out, "v_proj": out["k_proj"]} if out.get("v_proj") is ABSENT_PROJECTION else out)


def lora_export_tensor_dropped(mp):  # BUG: one adapter tensor left out of the written adapter file
    from megatron.bridge.models.conversion import peft_bridge as P
    convert = P.convert_adapter_weights_to_peft_state

    def planted(weights, *a, **kw):
        state, *rest = convert(weights, *a, **kw)
        state = {k: v for k, v in state.items() if "layers.3.mlp.down_proj.lora_B" not in k}
        return (state, *rest)
    mp.setattr(P, "convert_adapter_weights_to_peft_state", planted)


def lora_merge_one_adapter_left_out(mp):  # BUG: the merged export leaves one adapted weight unmerged
    from megatron.bridge.models.conversion import peft_bridge as P
    merge = P.MegatronPeftBridge._merge_lora_adapter_weights

    def planted(self, model, converted, adapter_weights):
        if any("layers.3.mlp.down_proj" in k for k in converted):
            return converted
        return merge(self, model, converted, adapter_weights)
    mp.setattr(P.MegatronPeftBridge, "_merge_lora_adapter_weights", planted)


LORA_PLANTS = (
    LoraPlant("scale_alpha_not_over_r", "model.layers.0.self_attn.q_proj", "isolated", lora_scale_alpha_not_over_r),
    # the same split reads the adapters' gradients back (its adapter export applied to them): the first row is the
    # first gradient read through it, in backward order (the last layer's k_proj B, with q's shape)
    LoraPlant("q_k_swapped_in_split", "model.layers.5.self_attn.k_proj.lora_B.default.weight", "param_grad",
              lora_export_q_k_swapped, also=(("model.layers.0.self_attn.q_proj.lora_B.weight", "adapter_export"),
                                             ("model.layers.0.self_attn.k_proj.lora_B.weight", "adapter_export"))),
    LoraPlant("v_proj_exported_on_k_eq_v", "model.layers.2.self_attn.v_proj.lora_A.weight", "adapter_export",
              lora_export_absent_v),
    LoraPlant("dropout_on_in_eval", "model.layers.0.self_attn.q_proj", "isolated", lora_dropout_on_in_eval),
    LoraPlant("tensor_missing_from_export", "model.layers.3.mlp.down_proj.lora_B.weight", "adapter_export",
              lora_export_tensor_dropped),
    LoraPlant("merge_one_adapter_left_out", "model.layers.3.mlp.down_proj.weight", "adapter_merged",
              lora_merge_one_adapter_left_out, targets=("gate_proj", "up_proj", "down_proj")),
)


# ------------------------------------------------------------------------------------ LoRA on the routed experts
# Errors planted in the mapping of the routed experts' adapters between peft's layout (A in expert blocks, B
# interleaved: ``parity.engine.adapters``) and Megatron-Bridge's grouped-expert LoRA, each with the row the run of
# ``gemma4-text-tiny-lora-experts`` (its training-step findings removed) must name as its first divergence, with the
# case's ``lora.experts`` it runs under. ``tests/test_lora_experts.py`` runs them.

@dataclass(frozen=True)
class ExpertLoraPlant:
    name: str
    where: str  # the expected first divergence
    mode: str  # the row mode it fails in first
    plant: Callable
    experts: str = "shared"  # the case's lora.experts


def expert_b_read_in_blocks(mp):  # BUG: peft's expert B read in expert blocks (columns e*r + k), not interleaved
    from parity.engine import adapters as A
    per_expert = A.per_expert
    mp.setattr(A, "per_expert", lambda table, t, experts: per_expert(table, t, experts) if table == "A"
               else t.reshape(t.shape[0], experts, -1).permute(1, 0, 2))


def expert_shared_gradient_from_one_expert(mp):  # BUG: a shared adapter's gradient compared with expert 0's, not the sum
    from parity.engine import adapters as A
    mp.setattr(A, "fold", lambda name, grad, r: grad.reshape(-1, r, grad.shape[-1])[0] if ".lora_A." in name
               else grad.reshape(grad.shape[0], r, -1)[..., 0])


def expert_gradient_b_back_in_blocks(mp):  # BUG: every expert's B gradient put back in expert blocks, not interleaved
    from parity.engine import adapters as A
    from_experts = A.from_experts
    mp.setattr(A, "from_experts", lambda table, t: from_experts(table, t) if table == "A"
               else t.permute(1, 0, 2).reshape(t.shape[1], -1))


EXPERT_LORA_PLANTS = (
    ExpertLoraPlant("b_read_in_expert_blocks", "model.layers.0.experts", "isolated", expert_b_read_in_blocks,
                    experts="per_expert"),
    ExpertLoraPlant("shared_gradient_from_one_expert", "model.layers.5.experts.base_layer.lora_B.default.weight",
                    "param_grad", expert_shared_gradient_from_one_expert),
    ExpertLoraPlant("gradient_b_back_in_blocks", "model.layers.5.experts.base_layer.lora_B.default.weight",
                    "param_grad", expert_gradient_b_back_in_blocks, experts="per_expert"),
)
