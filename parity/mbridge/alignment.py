"""Where each HF Gemma 4 module is observed in Megatron-Bridge's model: a column-shaped table (data).

Keyed by HF ``named_modules()`` paths (``{i}`` = decoder layer), like ``parity.engine.alignment``; the
``kind`` says what the value is (the engine's kinds where the meaning is the same). Two columns, one per
Megatron-Bridge module tree: ``moe`` (``Gemma4ModelProvider``: TE spec, input norm fused into
``linear_qkv``, post-attention norm inside ``linear_proj``, ``shared_experts`` = HF dense MLP, separate
expert / shared / router inputs) and ``dense`` (``Gemma4DenseProvider``: local spec, four norms as modules).

A ``Twin`` names the bridge module and which side of it holds the HF module's output: ``output`` (its
forward's first output) or ``input`` (its forward's first input, e.g. HF ``o_proj``'s output is the
input of ``linear_proj.post_layernorm``). ``observable=False``: the bridge computes the HF module's
output inside another module (a norm applied as a function of its weight, a norm fused into a linear,
the softcap inside ``output_layer``): hooks never see it; the row then names the nearest module whose
output can be compared and says so. Megatron-Bridge activations are ``[s, b, ...]``; HF ``[b, s, ...]``
(router / experts ``[b*s, ...]``). In the VLM the text model is ``language_model.`` on the bridge side
and ``model.language_model.`` on HF's; the vision tower and ``embed_vision`` are HF's own modules
inside the bridge's model (``shared``: the same code, compared for inputs and outputs only).
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Twin:
    module: str
    io: str = "output"  # "output" | "input"
    observable: bool = True
    note: str = ""
    replay: str | None = None  # the module isolated replay runs, where not ``module`` (an enclosing module or
    # the norm whose weight the layer applies as a function); with ``io="input"`` the value is then read as
    # ``module``'s input during that run
    replay_on: str | None = None  # HF module whose captured input the replay runs on, where not the row's own
    replay_note: str = ""
    grad_input: str | None = ""  # the backward mode: the module whose main input is what HF's module of the row
    # receives, where not ``module`` ("": ``module`` itself, when it is observable and read at its output); None:
    # no module's input is (``grad_note`` says why)
    grad_note: str = ""


@dataclass(frozen=True)
class Row:
    hf: str
    kind: str
    moe: Twin | None
    dense: Twin | None
    moe_only: bool = False
    feature: str | None = None  # "ple" | "kv_shared": the row exists only where the model has that feature


_L = "decoder.layers.{i}"
_FUSED_IN = "HF input_layernorm is fused into linear_qkv (layer_norm_weight): its output is never materialised"
_FN_NORM = "applied by Gemma4TransformerLayer as a function of this module's weight: hooks on it never fire"
_ON_NORM_IN = "model.layers.{i}.input_layernorm"  # HF's input norm's input = the fused linear's input
_QKV_REPLAY = "linear_qkv (input norm fused) on HF input_layernorm's input"
_FN_REPLAY = "Megatron-Bridge's _gemma4_rms_norm with this module's weight and the layer's eps, as the layer applies it"
_AFTER_FUSED_NORM = ("input is the input norm's (fused into linear_qkv): compared as input_layernorm's input "
                     "gradient, at linear_qkv")

TEXT_MODEL = (
    Row("model.embed_tokens", "embedding", Twin("embedding"),
        Twin("decoder.layers.0", io="input", observable=False,
             note="the dense embedding module is unscaled; the model's forward scales by sqrt(H) after it")),
    Row("model.rotary_emb", "rope", Twin("rotary_pos_emb", note="megatron frequency tables (local, global), not HF's (cos, sin)"),
        Twin("rotary_pos_emb", note="megatron frequency tables (sliding, full), not HF's (cos, sin)")),
    Row("model.norm", "norm", Twin("decoder.final_layernorm"), Twin("decoder.final_layernorm")),
    Row("lm_head", "lm_head", Twin("output_layer", observable=False, note="output_layer applies the final softcap itself: compared as logits",
                                   grad_input="output_layer"),
        Twin("output_layer", observable=False, note="output_layer applies the final softcap itself: compared as logits")),
    Row("logits", "logits", Twin("output_layer"), Twin("output_layer")),
    # per-layer embeddings (its dense provider): computed batch-first inside _compute_per_layer_inputs, the table
    # unscaled and the mix inline; compared through each layer's per-layer input (its gate, projection, norm)
    Row("model.embed_tokens_per_layer", "embedding", None,
        Twin("per_layer_embedding", observable=False,
             note="its PLE table is unscaled: _compute_per_layer_inputs scales (by a Python float) and mixes it inline"),
        feature="ple"),
    Row("model.per_layer_model_projection", "linear", None,
        Twin("per_layer_model_proj", observable=False,
             note="runs batch-first inside _compute_per_layer_inputs; compared through the layers' per-layer inputs"),
        feature="ple"),
    Row("model.per_layer_projection_norm", "norm", None,
        Twin("per_layer_proj_norm", observable=False,
             note="runs batch-first inside _compute_per_layer_inputs; compared through the layers' per-layer inputs"),
        feature="ple"),
)

TEXT_LAYER = (
    Row("model.layers.{i}", "layer", Twin(_L), Twin(_L)),
    Row("model.layers.{i}.input_layernorm", "norm",
        Twin(f"{_L}.self_attention.linear_qkv", observable=False, note=_FUSED_IN + "; compared at q_proj/k_proj/v_proj",
             grad_input=f"{_L}.self_attention.linear_qkv"),
        Twin(f"{_L}.input_layernorm")),
    Row("model.layers.{i}.self_attn", "attention",
        Twin(f"{_L}.self_attention.linear_proj.post_layernorm", io="input",
             note="self_attention's own output is after the post-attention norm (inside linear_proj)",
             replay=f"{_L}.self_attention", replay_on=_ON_NORM_IN,
             replay_note="self_attention (input norm fused) on HF input_layernorm's input; read before its post-norm",
             grad_input=None, grad_note="self_attention's " + _AFTER_FUSED_NORM),
        Twin(f"{_L}.self_attention")),
    *(Row(f"model.layers.{{i}}.self_attn.{p}_proj", f"qkv:{p}",
          Twin(f"{_L}.self_attention.linear_qkv", replay_on=_ON_NORM_IN, replay_note=_QKV_REPLAY, grad_input=None,
               grad_note="linear_qkv's " + _AFTER_FUSED_NORM),
          Twin(f"{_L}.self_attention.linear_qkv")) for p in "qkv"),
    Row("model.layers.{i}.self_attn.q_norm", "head_norm", Twin(f"{_L}.self_attention.q_layernorm"), Twin(f"{_L}.self_attention.q_layernorm")),
    Row("model.layers.{i}.self_attn.k_norm", "head_norm", Twin(f"{_L}.self_attention.k_layernorm"), Twin(f"{_L}.self_attention.k_layernorm")),
    Row("model.layers.{i}.self_attn.v_norm", "head_norm",
        Twin(f"{_L}.self_attention.core_attention", io="input", observable=False,
             note="v_norm runs inside Gemma4SelfAttention.get_query_key_value_tensors; core_attention's third input is V"),
        Twin(f"{_L}.self_attention.core_attention", io="input", observable=False,
             note="v_norm runs inside Gemma4DenseSelfAttention.get_query_key_value_tensors; core_attention's third input is V")),
    Row("model.layers.{i}.self_attn.o_proj", "linear",
        Twin(f"{_L}.self_attention.linear_proj.post_layernorm", io="input",
             note="linear_proj = o_proj + post-attention norm (TERowParallelLinearLayerNorm)",
             replay=f"{_L}.self_attention.linear_proj", replay_note="linear_proj on HF o_proj's input; read before its post-norm",
             grad_input=f"{_L}.self_attention.linear_proj"),
        Twin(f"{_L}.self_attention.linear_proj")),
    Row("model.layers.{i}.post_attention_layernorm", "norm",
        Twin(f"{_L}.self_attention.linear_proj.post_layernorm"), Twin(f"{_L}.post_self_attn_layernorm")),
    Row("model.layers.{i}.pre_feedforward_layernorm", "norm",
        Twin(f"{_L}.mlp.shared_experts", io="input",
             note="pre_shared_expert_layernorm is " + _FN_NORM + "; its output is shared_experts' input",
             replay=f"{_L}.pre_shared_expert_layernorm", replay_note=_FN_REPLAY, grad_input=None,
             grad_note="pre_shared_expert_layernorm is " + _FN_NORM + "; its input, the layer's residual, is also "
                       "the router's, the other pre-norm's and the residual add's"),
        Twin(f"{_L}.pre_mlp_layernorm")),
    Row("model.layers.{i}.mlp", "mlp", Twin(f"{_L}.mlp.shared_experts"), Twin(f"{_L}.mlp")),
    Row("model.layers.{i}.mlp.gate_proj", "fc1:gate", Twin(f"{_L}.mlp.shared_experts.linear_fc1"), Twin(f"{_L}.mlp.linear_fc1")),
    Row("model.layers.{i}.mlp.up_proj", "fc1:up", Twin(f"{_L}.mlp.shared_experts.linear_fc1"), Twin(f"{_L}.mlp.linear_fc1")),
    Row("model.layers.{i}.mlp.down_proj", "linear", Twin(f"{_L}.mlp.shared_experts.linear_fc2"), Twin(f"{_L}.mlp.linear_fc2")),
    Row("model.layers.{i}.post_feedforward_layernorm_1", "norm",
        Twin(f"{_L}.mlp.post_shared_expert_layernorm"), None, moe_only=True),
    Row("model.layers.{i}.router", "router", Twin(f"{_L}.mlp.router",
        note="megatron router output: (probs [tokens, experts] zero off the top-k, routing_map)"), None, moe_only=True),
    Row("model.layers.{i}.pre_feedforward_layernorm_2", "flat_norm",
        Twin(f"{_L}.mlp.experts", io="input", observable=False,
             note="pre_mlp_layernorm is " + _FN_NORM + "; the routed experts see it permuted by expert",
             replay=f"{_L}.pre_mlp_layernorm", replay_note=_FN_REPLAY),
        None, moe_only=True),
    Row("model.layers.{i}.experts", "experts",
        Twin(f"{_L}.mlp.post_moe_layernorm", io="input", note="routed output after the dispatcher's combine",
             replay=f"{_L}.mlp", replay_note="its MoE layer's dispatch, experts, combine and postprocess under HF's "
             "routing (HF's top-k indices and weights) on HF experts' input; read before post_moe_layernorm",
             grad_input=None, grad_note="its MoE layer runs forward_with_separate_inputs (no hook fires on it) and "
                                        "its experts see their input permuted by expert"),
        None, moe_only=True),
    Row("model.layers.{i}.post_feedforward_layernorm_2", "norm", Twin(f"{_L}.mlp.post_moe_layernorm"), None, moe_only=True),
    Row("model.layers.{i}.post_feedforward_layernorm", "norm", Twin(f"{_L}.post_ffn_layernorm"), Twin(f"{_L}.post_mlp_layernorm")),
    # KV-shared layers (E2B/E4B): its attention keeps the full fused linear_qkv (and k-norm) there, K/V unused
    Row("model.layers.{i}.self_attn.q_proj (kv shared)", "linear", None,
        Twin(f"{_L}.self_attention.linear_qkv", observable=False,
             note="its KV-shared layers keep a full fused linear_qkv whose K/V rows go unused: q is compared at the "
                  "attention"),
        feature="kv_shared"),
    *(Row(f"model.layers.{{i}}.{p}", kind, None, Twin(f"{_L}.{p}"), feature="ple")
      for p, kind in (("per_layer_input_gate", "linear"), ("per_layer_projection", "linear"),
                      ("post_per_layer_input_norm", "norm"))),
)

VLM_PREFIX = ("model.language_model.", "language_model.")
SHARED_VISION = (("model.vision_tower", "vision_tower"), ("model.embed_vision", "embed_vision"))


def rows(num_layers: int, *, moe: bool, k_eq_v_layers: frozenset[int] = frozenset(), vlm: bool = False
         ) -> list[tuple[str, Row, Twin]]:
    """Concrete ``(hf_name, row, twin)`` for one model: the ``moe`` or ``dense`` column, ``{i}`` expanded;
    rows without a twin in that tree are left out, as are the rows of PLE and KV sharing (``feature``) and ``v_proj`` rows of K=V layers (HF has no v_proj
    there; the bridge's v slot holds a copy of k). ``vlm`` prefixes both sides' text paths."""
    hf_pre, mb_pre = VLM_PREFIX if vlm else ("model.", "")

    def name(pattern: str, i: int | None, prefix: str, hf: bool) -> str:
        text = pattern.format(i=i) if i is not None else pattern
        if hf:
            return prefix + text[len("model."):] if text.startswith("model.") else text
        return prefix + text

    out = []
    for row in TEXT_MODEL:
        twin = row.moe if moe else row.dense
        if twin is not None and row.feature is None:
            out.append((name(row.hf, None, hf_pre, True), row, replace(
                twin, module=name(twin.module, None, mb_pre, False),
                grad_input=twin.grad_input and name(twin.grad_input, None, mb_pre, False))))
    for i in range(num_layers):
        for row in TEXT_LAYER:
            twin = row.moe if moe else row.dense
            if twin is None or row.feature is not None or (row.kind == "qkv:v" and i in k_eq_v_layers):
                continue
            out.append((name(row.hf, i, hf_pre, True), row, replace(
                twin, module=name(twin.module, i, mb_pre, False),
                replay=twin.replay and name(twin.replay, i, mb_pre, False),
                replay_on=twin.replay_on and name(twin.replay_on, i, hf_pre, True),
                grad_input=twin.grad_input and name(twin.grad_input, i, mb_pre, False))))
    if vlm:
        for hf, mb in SHARED_VISION:
            out.append((hf, Row(hf, "shared", None, None), Twin(mb, note="HF's own module inside Megatron-Bridge")))
    return out
