"""Gemma 4 text model on megatron-core (26B-A4B architecture), computed from config + state dict only.

Built from megatron-core parts: ``TransformerConfig`` (one per attention layer type), ``SelfAttention``
with tensor-parallel ``ColumnParallelLinear``/``RowParallelLinear``, ``MLP``, ``MoELayer`` with a
``TopKRouter``-derived router and megatron's token dispatcher, ``LanguageModelEmbedding``. Layers are
composed from ``ModuleSpec``s; only what differs from stock megatron is our own small module:

- ``Gemma4RMSNorm``: fp32 norm with plain ``weight`` (not ``1 + w``), optional weightless;
- ``Gemma4CoreAttention``: softmax scale 1.0, GQA, an explicit boolean mask (sliding window, padding,
  bidirectional vision blocks) that really reaches the softmax;
- ``Gemma4SelfAttention``: megatron's fused QKV + q/k norms, then weightless v-norm and HF-form RoPE;
  on K=V layers the fused weight carries V = K rows so V is the *raw* K projection; the last layer of each
  type before the KV-shared ones keeps its K/V for them;
- ``Gemma4SharedKVSelfAttention``: a KV-shared layer (E2B/E4B): a Q-only projection, K/V taken from its
  source layer;
- ``Gemma4PerLayerEmbedding``: the per-layer embeddings (PLE) table, scaled; the model projects and mixes it
  with the input embeddings, and each layer gates it into its residual stream;
- ``Gemma4Router``: rmsnorm(residual) * scale * H^-0.5 -> logits -> fp32 softmax -> top-k ->
  renormalise -> * per_expert_scale;
- ``Gemma4Experts``: stacked expert weights, grouped GEMM on CUDA bf16, per-expert loop otherwise;
- ``Gemma4MoE``: router reads the raw residual, experts their own pre-norm;
- ``Gemma4TransformerLayer``: HF's decoder-layer dataflow, top to bottom.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from parity import compat

compat.apply()

from megatron.core import parallel_state  # noqa: E402
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding  # noqa: E402
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding  # noqa: E402
from megatron.core.tensor_parallel.mappings import (  # noqa: E402
    gather_from_sequence_parallel_region, gather_from_tensor_model_parallel_region, scatter_to_sequence_parallel_region)
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.mlp import MLP, MLPSubmodules  # noqa: E402
from megatron.core.transformer.module import MegatronModule  # noqa: E402
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules  # noqa: E402
from megatron.core.transformer.moe.router import TopKRouter  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec, build_module  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from parity.config import LayerArgs, TextArgs  # noqa: E402
from parity.models import masks as mask_lib  # noqa: E402
from parity.models.norms import Gemma4RMSNorm, rms_norm  # noqa: E402,F401  (re-exported)
from parity.models import rope  # noqa: E402


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class Gemma4CoreAttention(MegatronModule):
    """softmax(q k^T * 1.0 + mask) v with GQA; q [s, b, np, d], k/v [s, b, ng, d] -> [s, b, np*d]."""

    def __init__(self, config: TransformerConfig, layer_number: int = 1, **_):
        super().__init__(config=config)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, **_):
        s, b, n_q, d = query.shape
        n_kv = key.shape[2]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        if n_q != n_kv:
            k = k.repeat_interleave(n_q // n_kv, dim=1)
            v = v.repeat_interleave(n_q // n_kv, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=1.0)
        return out.permute(2, 0, 1, 3).reshape(s, b, n_q * d)


class Gemma4SelfAttention(SelfAttention):
    """Megatron self-attention with Gemma 4's forward: q/k norms (in megatron's split), weightless v-norm,
    HF-form RoPE, scale 1.0, explicit mask."""

    k_eq_v = False  # set by its layer: full-attention layers of the 26B-A4B use the raw K projection as V
    kv_store = False  # set by its layer: its K/V (after norms and RoPE) are kept for the KV-shared layers

    def forward(self, hidden_states, attention_mask, rotary_pos_emb=None, shared_kv=None, **_):
        if self.k_eq_v:
            query, key, value = self._qkv_tied(hidden_states)
        else:
            query, key, value = self.get_query_key_value_tensors(hidden_states, None)
        value = rms_norm(value, self.config.layernorm_epsilon)  # v_norm: weightless, on the raw V (= raw K on K=V)
        query = rope.apply_rotary(query, rotary_pos_emb)
        key = rope.apply_rotary(key, rotary_pos_emb)
        if self.kv_store and shared_kv is not None:
            shared_kv[self.layer_number - 1] = (key, value)
        context = self.core_attention(query, key, value, attention_mask)
        output, bias = self.linear_proj(context)
        return output, bias

    def _qkv_tied(self, hidden_states):
        """K=V: V *is* the raw K projection, as in HF (``value_states = key_states`` before k_norm), so its gradient
        reaches K's weights during training. The fused weight keeps megatron's [q; k; v] layout; its V rows (copies
        of K, for the layout) take no part."""
        if self.config.num_query_groups < self.world_size:
            raise NotImplementedError("K=V with fewer KV groups than tensor-parallel ranks")
        mixed, split = self.get_query_key_value_tensors(hidden_states, None, split_qkv=False)
        query, key, _ = torch.split(mixed, split, dim=3)
        query = query.reshape(query.size(0), query.size(1), -1, self.hidden_size_per_attention_head)
        return self.q_layernorm(query), self.k_layernorm(key), key


class Gemma4SharedKVSelfAttention(Gemma4SelfAttention):
    """A KV-shared layer (HF's ``is_kv_shared_layer``): its own queries (``linear_q``, q-norm, RoPE) against the
    K/V that layer ``kv_source`` computed (``shared_kv[kv_source]``, kept there by that layer). It has no K/V
    weights: megatron's fused ``linear_qkv`` and k-norm are replaced by a Q-only column-parallel projection."""

    kv_source: int  # set by its layer

    def __init__(self, config: TransformerConfig, submodules: SelfAttentionSubmodules, **kw):
        super().__init__(config, submodules, **kw)
        del self.linear_qkv
        self.k_layernorm = None
        self.linear_q = build_module(
            submodules.linear_qkv, config.hidden_size, self.query_projection_size, config=config,
            init_method=config.init_method, gather_output=False, bias=False, skip_bias_add=False, is_expert=False)

    def forward(self, hidden_states, attention_mask, rotary_pos_emb=None, shared_kv=None, **_):
        query, _ = self.linear_q(hidden_states)
        query = query.view(*query.shape[:2], -1, self.hidden_size_per_attention_head)
        query = rope.apply_rotary(self.q_layernorm(query), rotary_pos_emb)
        key, value = shared_kv[self.kv_source]
        context = self.core_attention(query, key, value, attention_mask)
        output, bias = self.linear_proj(context)
        return output, bias


class Gemma4Router(TopKRouter):
    """Gemma 4 routing on megatron's router: returns (probs [T, E] dense, routing_map [T, E] bool)."""

    def __init__(self, config: TransformerConfig, pg_collection=None, is_mtp_layer: bool = False, **_):
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)
        self.scale = nn.Parameter(torch.ones(config.hidden_size, dtype=config.params_dtype))
        self.per_expert_scale = nn.Parameter(torch.ones(config.num_moe_experts, dtype=config.params_dtype))
        self.last_top_k: tuple[torch.Tensor, torch.Tensor] | None = None  # (weights, index) for inspection

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        x = rms_norm(input, self.config.layernorm_epsilon)
        x = x * self.scale * (self.config.hidden_size**-0.5)
        return F.linear(x, self.weight)  # in the activation dtype, as HF's router.proj

    def routing(self, logits: torch.Tensor, padding_mask=None):
        logits = logits.reshape(-1, self.config.num_moe_experts)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        top_w, top_i = torch.topk(probs, k=self.topk, dim=-1)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        top_w = top_w * self.per_expert_scale[top_i]
        self.last_top_k = (top_w, top_i)
        dense = torch.zeros_like(probs).scatter(1, top_i, top_w)
        routing_map = torch.zeros_like(probs, dtype=torch.bool).scatter(1, top_i, True)
        return dense, routing_map

    def forward(self, input: torch.Tensor, padding_mask=None):
        return self.routing(self.gating(input))


class _Stacked(nn.Module):
    def __init__(self, *shape: int, dtype: torch.dtype, device):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(*shape, dtype=dtype, device=device))


class Gemma4Experts(MegatronModule):
    """Local experts with stacked weights: fc1 [E_l, 2*Ie_l, H] (gate rows, then up), fc2 [E_l, H, Ie_l].

    Returns the prob-weighted outputs in fp32 so the top-k sum in the combine step runs in fp32 (as HF's
    grouped_mm backend does) before the cast back.
    """

    def __init__(self, num_local_experts: int, config: TransformerConfig, pg_collection=None, name=None, **_):
        super().__init__(config=config)
        etp = parallel_state.get_expert_tensor_parallel_world_size() or 1
        ie = config.moe_ffn_hidden_size // etp
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.num_local_experts = num_local_experts
        self.linear_fc1 = _Stacked(num_local_experts, 2 * ie, config.hidden_size, dtype=config.params_dtype, device=device)
        self.linear_fc2 = _Stacked(num_local_experts, config.hidden_size, ie, dtype=config.params_dtype, device=device)

    def forward(self, x, tokens_per_expert, probs, **_):
        w1, w2 = self.linear_fc1.weight, self.linear_fc2.weight
        if x.is_cuda and hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16 and x.shape[0] > 0:
            offs = torch.cumsum(tokens_per_expert.to(x.device), 0).to(torch.int32)
            h = torch._grouped_mm(x, w1.transpose(-2, -1), offs=offs)
            gate, up = h.chunk(2, dim=-1)
            out = torch._grouped_mm(gelu_tanh(gate) * up, w2.transpose(-2, -1), offs=offs)
        else:
            outs = []
            for e, chunk in enumerate(torch.split(x, tokens_per_expert.tolist())):
                gate, up = F.linear(chunk, w1[e]).chunk(2, dim=-1)
                outs.append(F.linear(gelu_tanh(gate) * up, w2[e]))
            out = torch.cat(outs) if outs else x.new_zeros(0, w2.shape[1])
        return out.float() * probs.float()[:, None], None


class Gemma4MoE(MoELayer):
    """Megatron MoE layer whose router reads the raw residual while the experts read their own pre-norm."""

    def experts_forward(self, expert_input, probs, routing_map):
        """Dispatch -> experts -> combine for given routing (also used for forced-routing replays).

        At TP > 1 each rank dispatches its 1/TP of the tokens (megatron's sequence-parallel layout inside the MoE)
        and the combined outputs are gathered back. Megatron's all-gather dispatcher spans TP x EP: tokens
        replicated over the TP ranks would each reach their experts once per TP rank -- the forward unchanged (the
        reduce-scatter hands every rank its own copy back), the experts' weight gradients TP times too large."""
        x, tp = expert_input.contiguous(), parallel_state.get_tensor_model_parallel_world_size()
        if tp > 1:
            if x.shape[0] % tp:
                raise ValueError(f"MoE at TP={tp}: {x.shape[0]} tokens (its first dim) do not split into {tp}")
            x = scatter_to_sequence_parallel_region(x)  # backward: the gradients of every rank's tokens gathered
            probs = scatter_to_sequence_parallel_region(probs)  # [tokens, E] in the same order as x's first dims
            routing_map = routing_map.chunk(tp)[parallel_state.get_tensor_model_parallel_rank()]
        x, probs = self.preprocess(x, probs, routing_map)
        x, probs = self.dispatch(x, probs)
        out, _ = self.routed_experts_compute(x, probs)
        out = self.postprocess(self.combine(out), None)
        if tp > 1:  # every rank's outputs, whole again; backward: this rank's slice (its downstream is replicated)
            out = gather_from_sequence_parallel_region(out, tensor_parallel_output_grad=False)
        return out.to(expert_input.dtype)

    def forward(self, router_input, expert_input):
        probs, routing_map = self.router(router_input)
        return self.experts_forward(expert_input, probs, routing_map)


def _no_pad_gradient(emb: torch.Tensor, input_ids: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """The pad token's lookups detached: no gradient reaches the table's pad row through them, as HF's embeddings
    (``nn.Embedding`` with ``padding_idx = pad_token_id``) keep it. It matters where pad lookups reach the loss: a
    VLM maps its image and audio placeholders to the pad id, and PLE's table is looked up there."""
    if pad_id is None:
        return emb
    return torch.where((input_ids == pad_id)[..., None], emb.detach(), emb)


class Gemma4Embedding(LanguageModelEmbedding):
    """Megatron's vocab-parallel embedding times sqrt(H), the scale rounded to the weight dtype (as HF); the pad row
    takes no gradient from its lookups (HF's ``padding_idx``)."""

    def __init__(self, config: TransformerConfig, vocab_size: int, embed_scale: float, pad_id: int | None = None):
        super().__init__(config, vocab_size=vocab_size, max_sequence_length=1, position_embedding_type="none")
        self.embed_scale, self.pad_id = embed_scale, pad_id

    def forward(self, input_ids: torch.Tensor, position_ids=None, **_) -> torch.Tensor:
        """ids [b, s] -> [b, s, H]."""
        emb = _no_pad_gradient(self.word_embeddings(input_ids), input_ids, self.pad_id)
        return emb * torch.tensor(self.embed_scale, dtype=torch.float32).to(emb.dtype)


class Gemma4PerLayerEmbedding(MegatronModule):
    """PLE's token table: megatron's vocab-parallel embedding of width ``num_layers * per_layer_size``, times
    sqrt(per_layer_size) rounded to the weight dtype (as HF's ``embed_tokens_per_layer``; its pad row takes no
    gradient from its lookups, HF's ``padding_idx``)."""

    def __init__(self, config: TransformerConfig, vocab_size: int, width: int, embed_scale: float,
                 pad_id: int | None = None):
        super().__init__(config=config)
        self.word_embeddings = VocabParallelEmbedding(vocab_size, width, init_method=config.init_method,
                                                      config=config)
        self.embed_scale, self.pad_id = embed_scale, pad_id

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """ids [b, s] -> [b, s, L*P]."""
        emb = _no_pad_gradient(self.word_embeddings(input_ids), input_ids, self.pad_id)
        return emb * torch.tensor(self.embed_scale, dtype=torch.float32).to(emb.dtype)


class Gemma4TransformerLayer(MegatronModule):
    """One Gemma 4 decoder layer; the forward mirrors HF's ``Gemma4TextDecoderLayer``."""

    def __init__(self, config: TransformerConfig, submodules: dict, layer_number: int, layer_args: LayerArgs,
                 enable_moe: bool, pg_collection=None, per_layer_size: int = 0):
        super().__init__(config=config)
        h, eps = config.hidden_size, config.layernorm_epsilon
        norm = functools.partial(Gemma4RMSNorm, h, config=config, eps=eps)
        self.layer_args = layer_args
        self.input_layernorm = norm()
        attention = submodules["shared_kv_attention" if layer_args.kv_shared else "self_attention"]
        self.self_attention = build_module(attention, config=config, layer_number=layer_number,
                                           attn_mask_type=AttnMaskType.arbitrary)
        self.self_attention.k_eq_v = layer_args.k_eq_v
        self.self_attention.kv_store = layer_args.kv_store
        if layer_args.kv_shared:
            self.self_attention.kv_source = layer_args.kv_source
        self.post_attention_layernorm = norm()
        self.pre_mlp_layernorm = norm()
        self.mlp = build_module(submodules["mlp"], config=config)
        self.enable_moe = enable_moe
        if enable_moe:
            self.post_mlp_layernorm_1 = norm()
            self.pre_moe_layernorm = norm()
            self.moe = build_module(submodules["moe"], config=config, layer_number=layer_number)
            self.post_moe_layernorm = norm()
        self.post_mlp_layernorm = norm()
        self.per_layer_size = per_layer_size
        if per_layer_size:
            self.per_layer_input_gate = ColumnParallelLinear(h, per_layer_size, config=config, bias=False,
                                                             init_method=config.init_method, gather_output=True)
            self.per_layer_projection = RowParallelLinear(per_layer_size, h, config=config, bias=False,
                                                          init_method=config.init_method, input_is_parallel=False,
                                                          skip_bias_add=False)
            self.post_per_layer_input_norm = norm()
        self.register_buffer("layer_scalar", torch.ones(1, dtype=config.params_dtype))

    def forward(self, hidden_states, attention_mask, rotary_pos_emb, per_layer_input=None, shared_kv=None):
        residual = hidden_states
        h = self.input_layernorm(hidden_states)
        h, _ = self.self_attention(h, attention_mask, rotary_pos_emb=rotary_pos_emb, shared_kv=shared_kv)
        h = residual + self.post_attention_layernorm(h)

        residual = h
        m, _ = self.mlp(self.pre_mlp_layernorm(h))
        if self.enable_moe:
            m1 = self.post_mlp_layernorm_1(m)
            m2 = self.moe(residual, self.pre_moe_layernorm(residual))  # the router sees the raw residual
            m = m1 + self.post_moe_layernorm(m2)
        h = residual + self.post_mlp_layernorm(m)
        if self.per_layer_size:  # PLE: gate this layer's per-layer input into the residual stream
            residual = h
            g, _ = self.per_layer_input_gate(h)
            g, _ = self.per_layer_projection(gelu_tanh(g) * per_layer_input)
            h = residual + self.post_per_layer_input_norm(g)
        return h * self.layer_scalar


def layer_spec(enable_moe: bool) -> dict:
    """Submodule specs of a Gemma 4 layer: swap these to change a backend (e.g. TE linears)."""
    attention = SelfAttentionSubmodules(
        linear_qkv=ColumnParallelLinear,
        core_attention=Gemma4CoreAttention,
        linear_proj=RowParallelLinear,
        q_layernorm=Gemma4RMSNorm,
        k_layernorm=Gemma4RMSNorm,
    )
    spec = {
        "self_attention": ModuleSpec(module=Gemma4SelfAttention, submodules=attention),
        "shared_kv_attention": ModuleSpec(module=Gemma4SharedKVSelfAttention, submodules=attention),
        "mlp": ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                               linear_fc2=RowParallelLinear)),
    }
    if enable_moe:
        spec["moe"] = ModuleSpec(module=Gemma4MoE, submodules=MoESubmodules(experts=Gemma4Experts, router=Gemma4Router))
    return spec


def transformer_config(args: TextArgs, layer: LayerArgs, dtype: torch.dtype, device: str) -> TransformerConfig:
    """One megatron config per attention layer type and MLP width (kv_channels / num_query_groups differ by type;
    ffn_hidden_size on double-wide layers)."""
    moe = dict(
        num_moe_experts=args.num_experts,
        moe_router_topk=args.top_k,
        moe_ffn_hidden_size=args.moe_intermediate_size,
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="allgather",
        moe_router_dtype=None,
    ) if args.enable_moe_block else {}
    return TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_heads,
        num_query_groups=layer.num_kv_heads,
        kv_channels=layer.head_dim,
        ffn_hidden_size=layer.intermediate_size or args.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=args.rms_norm_eps,
        qk_layernorm=True,
        add_bias_linear=False,
        add_qkv_bias=False,
        gated_linear_unit=True,
        activation_func=gelu_tanh,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        softmax_scale=1.0,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=device == "cpu",
        perform_initialization=False,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=parallel_state.get_expert_tensor_parallel_world_size(),
        sequence_parallel=False,
        **moe,
    )


def config_key(layer: LayerArgs) -> tuple[str, int]:
    return layer.layer_type, layer.intermediate_size


class Gemma4Decoder(MegatronModule):
    def __init__(self, args: TextArgs, configs: dict[tuple[str, int], TransformerConfig]):
        super().__init__(config=configs[config_key(args.layers[0])])
        spec = layer_spec(args.enable_moe_block)
        self.layers = nn.ModuleList(
            Gemma4TransformerLayer(configs[config_key(la)], spec, i + 1, la, args.enable_moe_block,
                                   per_layer_size=args.per_layer_size)
            for i, la in enumerate(args.layers)
        )
        self.final_layernorm = Gemma4RMSNorm(args.hidden_size, config=self.config, eps=args.rms_norm_eps)


class Gemma4Model(MegatronModule):
    """Megatron Gemma 4 language model: ids (or merged input embeddings) -> softcapped logits [b, s, V]."""

    def __init__(self, args: TextArgs, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        self.args = args
        configs = {config_key(la): transformer_config(args, la, dtype, device) for la in args.layers}
        super().__init__(config=configs[config_key(args.layers[0])])
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if args.vocab_size % tp:
            raise ValueError(f"vocab_size {args.vocab_size} is not divisible by TP={tp}")
        self.embedding = Gemma4Embedding(self.config, args.vocab_size, args.embed_scale, args.pad_token_id)
        self.decoder = Gemma4Decoder(args, configs)
        if args.per_layer_size:  # PLE: the token table, and the projection of the input embeddings mixed into it
            width = args.num_layers * args.per_layer_size
            self.per_layer_embedding = Gemma4PerLayerEmbedding(self.config, args.per_layer_vocab_size, width,
                                                               args.per_layer_size**0.5, args.pad_token_id)
            self.per_layer_model_projection = ColumnParallelLinear(
                args.hidden_size, width, config=self.config, init_method=self.config.init_method, bias=False,
                gather_output=True)
            self.per_layer_projection_norm = Gemma4RMSNorm(args.per_layer_size, config=self.config,
                                                           eps=args.rms_norm_eps)
        self.output_layer = ColumnParallelLinear(
            args.hidden_size, args.vocab_size, config=self.config, init_method=self.config.init_method,
            bias=False, gather_output=False, skip_weight_param_allocation=args.tie_word_embeddings)
        if device != "cpu":
            self.to(device)

    def build_masks(self, batch: int, seq: int, padding_mask=None, mm_token_type_ids=None, device="cpu"):
        return mask_lib.build_masks(seq, batch=batch, sliding_window=self.args.sliding_window,
                                    padding_mask=padding_mask, mm_token_type_ids=mm_token_type_ids,
                                    bidirectional=self.args.use_bidirectional_attention, device=device)

    def rotary_tables(self, position_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        tables = {}
        for la in self.args.layers:
            if la.layer_type not in tables:
                tables[la.layer_type] = rope.rotary_freqs(la, position_ids)
        return tables

    def per_layer_inputs(self, input_ids: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """PLE: ids [b, s] and the input embeddings h [s, b, H] -> every layer's per-layer input [s, b, L, P]:
        (rmsnorm(projection(h) / sqrt(H)) + table(ids)) / sqrt(2)."""
        shape = (*h.shape[:2], self.args.num_layers, self.args.per_layer_size)
        proj, _ = self.per_layer_model_projection(h)
        proj = self.per_layer_projection_norm((proj * self.args.hidden_size**-0.5).reshape(shape))
        tokens = self.per_layer_embedding(input_ids).transpose(0, 1).reshape(shape)
        return (proj + tokens) * 2.0**-0.5

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[s, b, H] final hidden -> softcapped logits [b, s, V] (TP-gathered)."""
        weight = self.embedding.word_embeddings.weight if self.args.tie_word_embeddings else None
        logits, _ = self.output_layer(hidden, weight=weight)
        logits = gather_from_tensor_model_parallel_region(logits)
        cap = self.args.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits.transpose(0, 1)

    def forward(self, input_ids=None, position_ids=None, padding_mask=None, inputs_embeds=None,
                mm_token_type_ids=None) -> torch.Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.embedding(input_ids)
        b, s, _ = inputs_embeds.shape
        device = inputs_embeds.device
        if position_ids is None:
            position_ids = torch.arange(s, device=device)[None].expand(b, s)
        masks = self.build_masks(b, s, padding_mask, mm_token_type_ids, device)
        tables = self.rotary_tables(position_ids)
        h = inputs_embeds.transpose(0, 1).contiguous()  # megatron layout [s, b, H]
        per_layer = self.per_layer_inputs(input_ids, h) if self.args.per_layer_size else None
        shared_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # KV sharing: source layer -> its (K, V)
        for i, layer in enumerate(self.decoder.layers):
            lt = layer.layer_args.layer_type
            h = layer(h, masks[lt], tables[lt], per_layer_input=None if per_layer is None else per_layer[:, :, i],
                      shared_kv=shared_kv)
        h = self.decoder.final_layernorm(h)
        return self.output_logits(h)
