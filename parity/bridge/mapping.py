"""The HF <-> Megatron weight mapping of the Gemma 4 text model, as data.

One row per Megatron tensor. HF names are relative to the text model (``layers.{i}.…``; the prefix
``model.`` / ``model.language_model.`` / none is detected per checkpoint) except ``root`` rows
(``lm_head``), which sit at the model root. ``{i}`` is the decoder layer index.

Shapes are templates over the per-layer sizes of :func:`sizes`; they are the *full* (TP1/EP1) shapes.
``tp`` / ``ep`` / ``etp`` name the dimension that tensor, expert and expert-tensor parallelism split;
``gated`` says that dimension holds ``[gate; up]`` and each rank takes its rows of both halves.
``when`` names a predicate of :data:`parity.config.WHEN` that decides whether the row applies to a layer.
"""
from __future__ import annotations

from dataclasses import dataclass

from parity.config import WHEN, TextArgs  # noqa: F401  (WHEN: the per-layer predicates rules name)


@dataclass(frozen=True)
class Rule:
    hf: tuple[str, ...]  # HF tensors the Megatron tensor is built from (in transform order)
    mcore: str
    transform: str  # key of parity.bridge.convert.TRANSFORMS
    hf_shapes: tuple[tuple[str, ...], ...]
    mcore_shape: tuple[str, ...]
    tp: int | None = None
    ep: int | None = None
    etp: int | None = None
    gated: bool = False
    when: str | None = None
    root: bool = False  # HF name is relative to the model root, not the text model

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.mcore


def _norm(hf: str, mcore: str, when: str | None = None) -> Rule:
    return Rule((f"layers.{{i}}.{hf}",), f"decoder.layers.{{i}}.{mcore}", "copy", (("H",),), ("H",), when=when)


_A = "layers.{i}.self_attn."
_M = "layers.{i}.mlp."

EMBEDDING_RULES: tuple[Rule, ...] = (
    Rule(("embed_tokens.weight",), "embedding.word_embeddings.weight", "copy", (("V", "H"),), ("V", "H"), tp=0),
    # per-layer embeddings (E2B/E4B): the token table and the projection of the input embeddings, all layers packed
    Rule(("embed_tokens_per_layer.weight",), "per_layer_embedding.word_embeddings.weight", "copy",
         (("Vp", "LP"),), ("Vp", "LP"), tp=0, when="ple"),
    Rule(("per_layer_model_projection.weight",), "per_layer_model_projection.weight", "copy",
         (("LP", "H"),), ("LP", "H"), tp=0, when="ple"),
    Rule(("per_layer_projection_norm.weight",), "per_layer_projection_norm.weight", "copy", (("P",),), ("P",),
         when="ple"),
)

LAYER_RULES: tuple[Rule, ...] = (
    # attention block
    _norm("input_layernorm.weight", "input_layernorm.weight"),
    _norm("post_attention_layernorm.weight", "post_attention_layernorm.weight"),
    Rule((_A + "q_proj.weight", _A + "k_proj.weight", _A + "v_proj.weight"),
         "decoder.layers.{i}.self_attention.linear_qkv.weight", "qkv_pack",
         (("q", "H"), ("kv", "H"), ("kv", "H")), ("qkv", "H"), tp=0, when="separate_v"),
    Rule((_A + "q_proj.weight", _A + "k_proj.weight"),
         "decoder.layers.{i}.self_attention.linear_qkv.weight", "kv_equal",
         (("q", "H"), ("kv", "H")), ("qkv", "H"), tp=0, when="k_eq_v"),
    Rule((_A + "q_proj.weight",), "decoder.layers.{i}.self_attention.linear_q.weight", "copy",
         (("q", "H"),), ("q", "H"), tp=0, when="kv_shared"),  # KV-shared layers: no k_proj, v_proj, k_norm
    Rule((_A + "q_norm.weight",), "decoder.layers.{i}.self_attention.q_layernorm.weight", "copy", (("hn",),), ("hn",)),
    Rule((_A + "k_norm.weight",), "decoder.layers.{i}.self_attention.k_layernorm.weight", "copy", (("hn",),), ("hn",),
         when="own_kv"),
    Rule((_A + "o_proj.weight",), "decoder.layers.{i}.self_attention.linear_proj.weight", "copy",
         (("H", "q"),), ("H", "q"), tp=1),
    # dense MLP (always present)
    _norm("pre_feedforward_layernorm.weight", "pre_mlp_layernorm.weight"),
    Rule((_M + "gate_proj.weight", _M + "up_proj.weight"), "decoder.layers.{i}.mlp.linear_fc1.weight", "gated_fc1",
         (("I", "H"), ("I", "H")), ("2I", "H"), tp=0, gated=True),
    Rule((_M + "down_proj.weight",), "decoder.layers.{i}.mlp.linear_fc2.weight", "copy", (("H", "I"),), ("H", "I"), tp=1),
    _norm("post_feedforward_layernorm.weight", "post_mlp_layernorm.weight"),
    # MoE block beside the dense MLP
    _norm("post_feedforward_layernorm_1.weight", "post_mlp_layernorm_1.weight", when="moe"),
    _norm("pre_feedforward_layernorm_2.weight", "pre_moe_layernorm.weight", when="moe"),
    _norm("post_feedforward_layernorm_2.weight", "post_moe_layernorm.weight", when="moe"),
    Rule(("layers.{i}.router.proj.weight",), "decoder.layers.{i}.moe.router.weight", "copy",
         (("E", "H"),), ("E", "H"), when="moe"),
    Rule(("layers.{i}.router.scale",), "decoder.layers.{i}.moe.router.scale", "copy", (("H",),), ("H",), when="moe"),
    Rule(("layers.{i}.router.per_expert_scale",), "decoder.layers.{i}.moe.router.per_expert_scale", "copy",
         (("E",),), ("E",), when="moe"),
    Rule(("layers.{i}.experts.gate_up_proj",), "decoder.layers.{i}.moe.experts.linear_fc1.weight",
         "stacked_experts_fc1", (("E", "2Ie", "H"),), ("E", "2Ie", "H"), ep=0, etp=1, gated=True, when="moe"),
    Rule(("layers.{i}.experts.down_proj",), "decoder.layers.{i}.moe.experts.linear_fc2.weight",
         "stacked_experts_fc2", (("E", "H", "Ie"),), ("E", "H", "Ie"), ep=0, etp=2, when="moe"),
    # per-layer embeddings: this layer's gate, projection and norm of its per-layer input
    Rule(("layers.{i}.per_layer_input_gate.weight",), "decoder.layers.{i}.per_layer_input_gate.weight", "copy",
         (("P", "H"),), ("P", "H"), tp=0, when="ple"),
    Rule(("layers.{i}.per_layer_projection.weight",), "decoder.layers.{i}.per_layer_projection.weight", "copy",
         (("H", "P"),), ("H", "P"), tp=1, when="ple"),
    _norm("post_per_layer_input_norm.weight", "post_per_layer_input_norm.weight", when="ple"),
    # a persistent buffer that multiplies the whole residual stream
    Rule(("layers.{i}.layer_scalar",), "decoder.layers.{i}.layer_scalar", "copy", (("1",),), ("1",)),
)

OUTPUT_RULES: tuple[Rule, ...] = (
    Rule(("norm.weight",), "decoder.final_layernorm.weight", "copy", (("H",),), ("H",)),
    Rule(("lm_head.weight",), "output_layer.weight", "copy", (("V", "H"),), ("V", "H"), tp=0, when="untied", root=True),
)

RULES = EMBEDDING_RULES + LAYER_RULES + OUTPUT_RULES


# Keys of a ``Gemma4ForConditionalGeneration`` that are not the text model's: routed elsewhere
# (``parity.bridge.vision``), returned as leftovers by ``split_hf_state``.
NON_TEXT_PREFIXES = ("model.vision_tower.", "model.embed_vision.", "model.audio_tower.", "model.embed_audio.")

# HF architecture -> prefix of the text model inside it (lm_head always sits at the root).
TEXT_PREFIX = {
    "Gemma4ForCausalLM": "model.",
    "Gemma4TextModel": "",
    "Gemma4ForConditionalGeneration": "model.language_model.",
}


def kv_shared_leftovers(args: TextArgs) -> tuple[str, ...]:
    """Name prefixes (relative to the text model) of tensors a checkpoint may still carry for KV-shared layers and
    HF's loader drops (``Gemma4TextModel._keys_to_ignore_on_load_unexpected``): their K/V projections and norms.
    Nothing reads them; the import skips them as HF does."""
    return tuple(f"layers.{i}.self_attn.{n}." for i, la in enumerate(args.layers) if la.kv_shared
                 for n in ("k_proj", "v_proj", "k_norm", "v_norm"))


def sizes(args: TextArgs, i: int | None = None) -> dict[str, int]:
    """The symbols of the shape templates; the attention ones belong to layer ``i``."""
    s = {
        "1": 1,
        "H": args.hidden_size,
        "V": args.vocab_size,
        "I": args.intermediate_size,
        "2I": 2 * args.intermediate_size,
        "E": args.num_experts,
        "Ie": args.moe_intermediate_size,
        "2Ie": 2 * args.moe_intermediate_size,
        "P": args.per_layer_size,
        "LP": args.num_layers * args.per_layer_size,
        "Vp": args.per_layer_vocab_size,
    }
    if i is not None:
        layer = args.layers[i]
        if layer.intermediate_size:  # the double-wide MLP of KV-shared layers (E2B)
            s.update(I=layer.intermediate_size, **{"2I": 2 * layer.intermediate_size})
        hn, nq, ng = layer.head_dim, args.num_heads, layer.num_kv_heads
        s.update(hn=hn, np=nq, ng=ng, q=nq * hn, kv=ng * hn, qkv=(nq + 2 * ng) * hn)
    return s


def shape(template: tuple[str, ...], size: dict[str, int]) -> tuple[int, ...]:
    return tuple(size[s] for s in template)


def expand(args: TextArgs):
    """Yield ``(rule, layer index or None, hf names, megatron name)`` for every tensor of this config,
    in checkpoint order (embedding, layer by layer, output)."""
    rows = [(r, None) for r in EMBEDDING_RULES]
    rows += [(r, i) for i in range(args.num_layers) for r in LAYER_RULES]
    rows += [(r, None) for r in OUTPUT_RULES]
    for rule, i in rows:
        if rule.when and not WHEN[rule.when](args, i):
            continue
        yield rule, i, tuple(n.format(i=i) for n in rule.hf), rule.mcore.format(i=i)
