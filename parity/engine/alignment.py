"""The alignment table: every HF module (and every mask and RoPE table) that is compared, and how.

One ``Row`` per HF module pattern: its path under its ``Stack`` (``{i}`` = layer index), the ``Kind`` that
says how outputs are brought to one layout, compared and replayed (with the explicit ``Part`` of a fused
Megatron output: q/k/v of ``linear_qkv``, gate/up of ``linear_fc1``), the gate class, and ``when``, a
predicate of ``parity.config.WHEN`` deciding per layer whether the row applies. Where each row lives
on the Megatron side is a second table per system under test, keyed by ``Row.key``
(``parity.systems``). A model kind says where each stack sits in its HF model (``model.`` or
``model.language_model.`` for the text stack); a stack it lacks drops its rows.
Layouts: HF is ``[b, s, ...]`` (router/experts ``[b*s, ...]``), vision ``[images, patches, ...]``, audio
``[clips, frames, ...]``.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from parity.config import WHEN


class Kind(enum.Enum):
    EMBEDDING = "embedding"
    NORM = "norm"
    HEAD_NORM = "head_norm"  # per-head q/k norm [b, s, heads, d]
    FLAT_NORM = "flat_norm"  # a norm on flattened tokens [b*s, H]
    LAYER = "layer"
    ATTENTION = "attention"
    QKV = "qkv"  # one part of Megatron's fused linear_qkv
    LINEAR = "linear"
    MLP = "mlp"
    FC1 = "fc1"  # one part of Megatron's fused [gate; up] linear_fc1
    ROUTER = "router"
    EXPERTS = "experts"
    LM_HEAD = "lm_head"
    LOGITS = "logits"  # lm_head + softcap: not an HF module
    MERGED = "merged"  # text embeddings after the image scatter: the inputs_embeds HF's language model receives
    MASK = "mask"  # an attention mask, each side's own from raw inputs
    ROPE = "rope"  # a RoPE table (cos, sin), each side's own from raw inputs
    PATCHES = "vision_patches"  # [I, N, ...]; real rows = patches whose position is not (-1, -1)
    VISION_ROPE = "vision_rope"  # (cos, sin), each [I, N, d]; same real rows
    POOLED = "vision_pooled"  # (features [I, N/k^2, Hv], valid-slot mask): real rows = the mask
    TOKENS = "vision_tokens"  # [soft tokens of all images, ...], every row real
    AUDIO_FRAMES = "audio_frames"  # [clips, frames, ...] at the tower's rate; real rows = the tower's frame mask
    AUDIO_CONV = "audio_conv"  # subsampling maps, the depthwise conv's [clips, Ha, frames], relative positions: whole


class Part(enum.Enum):
    Q = "q"
    K = "k"
    V = "v"
    GATE = "gate"
    UP = "up"


class Stack(enum.Enum):
    TEXT = "text"  # the text model (``model.`` / ``model.language_model.``)
    VISION = "vision"  # vision tower and embed_vision (``model.``)
    ROOT = "root"  # the model root (lm_head, logits)
    VLM = "vlm"  # the VLM root (merged embeddings)
    AUDIO = "audio"  # audio tower and embed_audio (``model.``)


TABLE_KINDS = (Kind.MASK, Kind.ROPE)  # compared from each side's own tables, not from hooked modules


@dataclass(frozen=True)
class Row:
    hf: str
    kind: Kind
    part: Part | None = None
    stack: Stack = Stack.TEXT
    gate: str = "module"  # "module" | "exact" (bit-exact even in bf16)
    when: str | None = None  # key of parity.config.WHEN, per text layer
    key: str | None = None  # key of the systems' name tables when ``hf`` is not unique (masks)
    feeds: tuple[tuple[Stack, str], ...] = ()  # replayed on these HF modules' outputs (inline steps)
    input_of: str | None = None  # captured as the ``inputs_embeds`` this HF module receives
    note: str | None = None  # detail of a table row ({layer_type}, {n} mismatching entries)
    per_type: bool = False  # one row per layer type, at its first layer (masks, RoPE)

    @property
    def name_key(self) -> str:
        return self.key or self.hf

    @property
    def label(self) -> str:
        """The kind as results.json writes it: ``qkv:q``, ``fc1:gate``, ``vision_patches``, ``norm``."""
        return f"{self.kind.value}:{self.part.value}" if self.part else self.kind.value


_L = "vision_tower.encoder.layers.{i}"
_CLIPPABLE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj")
_V = Stack.VISION

VISION = (
    Row("vision_tower", Kind.TOKENS, stack=_V),
    Row("vision_tower.patch_embedder", Kind.PATCHES, stack=_V),
    Row("vision_tower.patch_embedder.input_proj", Kind.PATCHES, stack=_V),
    Row("vision_tower.encoder", Kind.PATCHES, stack=_V),
    Row("vision_tower.encoder.rotary_emb", Kind.VISION_ROPE, stack=_V),
    *(Row(f"{_L}{sub}", Kind.PATCHES, stack=_V) for sub in (
        "", ".input_layernorm", ".self_attn", *(f".self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "q_norm",
                                                                            "k_norm", "v_norm", "o_proj")),
        ".post_attention_layernorm", ".pre_feedforward_layernorm", ".mlp", ".mlp.gate_proj", ".mlp.up_proj",
        ".mlp.act_fn", ".mlp.down_proj", ".post_feedforward_layernorm")),
    Row("vision_tower.pooler", Kind.POOLED, stack=_V),
    Row("embed_vision", Kind.TOKENS, stack=_V),
    Row("embed_vision.embedding_pre_projection_norm", Kind.TOKENS, stack=_V),
    Row("embed_vision.embedding_projection", Kind.TOKENS, stack=_V),
    *(Row(f"{_L}.{p}.linear", Kind.PATCHES, stack=_V) for p in _CLIPPABLE),  # the bare linear before the clamp
)

_AL = "audio_tower.layers.{i}"
_SUB = "audio_tower.subsample_conv_projection"
_AF, _AC, _A_ = Kind.AUDIO_FRAMES, Kind.AUDIO_CONV, Stack.AUDIO
_FF = ("", ".pre_layer_norm", ".ffw_layer_1", ".ffw_layer_1.linear", ".ffw_layer_2", ".ffw_layer_2.linear",
       ".post_layer_norm")

AUDIO = (
    Row("audio_tower", _AF, stack=_A_),
    Row(_SUB, _AF, stack=_A_),
    *(Row(f"{_SUB}.layer{j}{sub}", _AC, stack=_A_) for j in (0, 1) for sub in ("", ".conv", ".norm")),
    Row(f"{_SUB}.input_proj_linear", _AF, stack=_A_),
    Row("audio_tower.rel_pos_enc", _AC, stack=_A_),
    *(Row(f"{_AL}{sub}", _AF, stack=_A_) for sub in (
        "", *(f".feed_forward1{s}" for s in _FF), ".norm_pre_attn", ".self_attn",
        *(f".self_attn.{p}{lin}" for p in ("q_proj", "k_proj", "v_proj", "post") for lin in ("", ".linear")),
        ".norm_post_attn", ".lconv1d", ".lconv1d.pre_layer_norm", ".lconv1d.linear_start",
        ".lconv1d.linear_start.linear", ".lconv1d.conv_norm", ".lconv1d.linear_end", ".lconv1d.linear_end.linear",
        *(f".feed_forward2{s}" for s in _FF), ".norm_out")),
    Row(f"{_AL}.self_attn.relative_k_proj", _AC, stack=_A_),  # [P, Ha]: no clip axis
    Row(f"{_AL}.lconv1d.depthwise_conv1d", _AC, stack=_A_),  # [clips, Ha, frames]
    Row("audio_tower.output_proj", _AF, stack=_A_),
    Row("embed_audio", _AF, stack=_A_),
    Row("embed_audio.embedding_pre_projection_norm", _AF, stack=_A_),
    Row("embed_audio.embedding_projection", _AF, stack=_A_),
)

# The inputs_embeds HF's language model receives: after the image scatter and (with an audio tower) the audio one.
MERGED = Row("merged_embeddings", Kind.MERGED, stack=Stack.VLM, input_of="model.language_model",
             feeds=((Stack.TEXT, "embed_tokens"), (_V, "embed_vision"), (_A_, "embed_audio")))

TEXT = (
    Row("embed_tokens", Kind.EMBEDDING, gate="exact"),
    # per-layer embeddings (E2B/E4B): the token table (scaled), the projection of the input embeddings, its norm
    Row("embed_tokens_per_layer", Kind.EMBEDDING, gate="exact", when="ple"),
    Row("per_layer_model_projection", Kind.LINEAR, when="ple"),
    Row("per_layer_projection_norm", Kind.NORM, when="ple"),
    Row("norm", Kind.NORM),
    Row("lm_head", Kind.LM_HEAD, stack=Stack.ROOT),
    Row("logits", Kind.LOGITS, stack=Stack.ROOT, feeds=((Stack.TEXT, "norm"),)),
)

_A = "layers.{i}.self_attn"
LAYER = (
    Row("layers.{i}", Kind.LAYER),
    Row("layers.{i}.input_layernorm", Kind.NORM),
    Row(_A, Kind.ATTENTION),
    Row(f"{_A}.q_proj", Kind.QKV, Part.Q, when="own_kv"),
    Row(f"{_A}.q_proj", Kind.LINEAR, when="kv_shared", key=f"{_A}.q_proj (kv shared)"),  # a Q-only projection
    Row(f"{_A}.k_proj", Kind.QKV, Part.K, when="own_kv"),  # KV-shared layers have no k_proj, v_proj, k_norm
    Row(f"{_A}.v_proj", Kind.QKV, Part.V, when="separate_v"),  # K=V layers have no v_proj: V is k_proj's output
    Row(f"{_A}.q_norm", Kind.HEAD_NORM),
    Row(f"{_A}.k_norm", Kind.HEAD_NORM, when="own_kv"),
    Row(f"{_A}.o_proj", Kind.LINEAR),
    Row("layers.{i}.post_attention_layernorm", Kind.NORM),
    Row("layers.{i}.pre_feedforward_layernorm", Kind.NORM),
    Row("layers.{i}.mlp", Kind.MLP),
    Row("layers.{i}.mlp.gate_proj", Kind.FC1, Part.GATE),
    Row("layers.{i}.mlp.up_proj", Kind.FC1, Part.UP),
    Row("layers.{i}.mlp.down_proj", Kind.LINEAR),
    Row("layers.{i}.post_feedforward_layernorm_1", Kind.NORM, when="moe"),
    Row("layers.{i}.router", Kind.ROUTER, when="moe"),
    Row("layers.{i}.pre_feedforward_layernorm_2", Kind.FLAT_NORM, when="moe"),
    Row("layers.{i}.experts", Kind.EXPERTS, when="moe"),
    Row("layers.{i}.post_feedforward_layernorm_2", Kind.NORM, when="moe"),
    Row("layers.{i}.post_feedforward_layernorm", Kind.NORM),
    Row("layers.{i}.per_layer_input_gate", Kind.LINEAR, when="ple"),
    Row("layers.{i}.per_layer_projection", Kind.LINEAR, when="ple"),
    Row("layers.{i}.post_per_layer_input_norm", Kind.NORM, when="ple"),
)

TABLES = (  # the mask of ``X.self_attn`` is the ``attention_mask`` its parent ``X`` receives
    Row("rotary_emb", Kind.ROPE, per_type=True, note="{layer_type}"),
    Row(_A, Kind.MASK, gate="exact", key="masks", per_type=True,
        note="attention mask ({layer_type}): {n} mismatching entries"),
    Row("vision_tower.encoder.layers.0.self_attn", Kind.MASK, stack=_V, gate="exact", key="vision_masks",
        note="vision encoder attention mask: {n} mismatching entries"),
    Row("audio_tower.layers.0.self_attn", Kind.MASK, stack=_A_, gate="exact", key="audio_masks",
        note="audio chunked attention mask [clips, 1, blocks, chunk, context]: {n} mismatching entries"),
)


@dataclass(frozen=True)
class Aligned:
    """One concrete row: the full HF path, its row, and the slots it was expanded with."""

    hf: str
    row: Row
    slots: dict = field(default_factory=dict)
    feeds: tuple[str, ...] = ()  # full HF names of the modules whose outputs ``row.feeds`` names

    @property
    def layer(self) -> int | None:
        return layer_of(self.hf)

    def group(self) -> str:
        return {Stack.VISION: "vision", Stack.AUDIO: "audio"}.get(self.row.stack, "text")


def expand(prefixes: dict[Stack, str], text_args, vision_layers: int = 0, audio_layers: int = 0) -> list[Aligned]:
    """Every compared row of a model: vision rows (pattern by pattern), audio rows (a model with an audio
    tower: ``audio_layers`` > 0), merged embeddings, the text model (decoder layer by layer, as its forward
    visits them), then the mask and RoPE tables. ``prefixes`` says where each stack sits in the HF model; rows
    of a stack it lacks are left out, and so are the feeds from it."""
    if not audio_layers:
        prefixes = {s: p for s, p in prefixes.items() if s is not Stack.AUDIO}
    types = list(dict.fromkeys(la.layer_type for la in text_args.layers))
    first = {t: [la.layer_type for la in text_args.layers].index(t) for t in types}
    rows = [(r, {"i": i}) for r in VISION for i in (range(vision_layers) if "{i}" in r.hf else [None])]
    rows += [(r, {"i": i}) for r in AUDIO for i in (range(audio_layers) if "{i}" in r.hf else [None])]
    rows += [(MERGED, {})] + [(r, {}) for r in TEXT if r.when is None or WHEN[r.when](text_args, None)]
    rows += [(r, {"i": i}) for i in range(text_args.num_layers) for r in LAYER
             if r.when is None or WHEN[r.when](text_args, i)]
    rows += [(r, {"i": first[t], "layer_type": t} if t else {}) for r in TABLES for t in (types if r.per_type else [None])]
    return [Aligned(prefixes[r.stack] + r.hf.format(**slots), r, slots,
                    tuple(prefixes[s] + n for s, n in r.feeds if s in prefixes))
            for r, slots in rows if r.stack in prefixes]


_TEXT_LAYER = r"^model\.(?:language_model\.)?layers\.(\d+)\."  # HF's text decoder layers (text model, VLM)
TEXT_LAYER = re.compile(_TEXT_LAYER)
# A text layer's MoE block and what sums its output (the post-feedforward norm after the two branches are added): their
# outputs, and their parameters' gradients, take each token's experts' contributions -- a token routed elsewhere moves
# them wholesale (``gates.note_routing``)
MOE_BLOCK = re.compile(_TEXT_LAYER + r"(?:router|experts|pre_feedforward_layernorm_2|post_feedforward_layernorm(?:_2)?)"
                       r"(?:\.|$)")


def text_layer_of(name: str) -> int | None:
    """The text decoder layer an HF module or parameter path belongs to (None: outside them, e.g. a vision layer)."""
    m = TEXT_LAYER.match(name)
    return None if m is None else int(m.group(1))


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a == "layers" and b.isdigit():
            return int(b)
    return None
