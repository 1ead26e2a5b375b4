"""Megatron-Bridge's Gemma 4 as a system under test: its provider builds the model, its HF -> Megatron
mapping loads the weights, its export gives them back, its forward gives the logits.

Only what cannot run here is replaced (``parity.mbridge.substitutes``); the HF config is adapted to what the
bridge (written for transformers <= 5.12.1) reads (``adapt_config``). The caller must have called
``parity.compat.apply_megatron_bridge()`` (``parity.mbridge`` does, on import of this module).
"""
from __future__ import annotations

import copy
import importlib.util
import os
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterator

import torch

from parity import compat

compat.apply_megatron_bridge()

# Import order matters: gemma4_bridge before hf_pretrained.causal_lm (else a circular import fails).
from megatron.bridge.models.gemma import gemma4_bridge  # noqa: E402,F401  (registers the text bridge)
from megatron.bridge.models.gemma_vl import gemma4_vl_bridge  # noqa: E402,F401  (registers the VLM bridge)
from megatron.bridge.models.conversion.auto_bridge import AutoBridge  # noqa: E402
from megatron.bridge.models.gemma import modeling_gemma4  # noqa: E402
from megatron.bridge.models.hf_pretrained.causal_lm import PreTrainedCausalLM  # noqa: E402
from megatron.core.transformer.identity_op import IdentityOp  # noqa: E402
from megatron.core.transformer.moe.experts import GroupedMLPSubmodules, TEGroupedMLP  # noqa: E402

from parity import megatron_env  # noqa: E402
from parity.mbridge import substitutes as S  # noqa: E402
from parity.megatron_layout import tp_gather  # noqa: E402  (the one TP gather both systems use)

TEXT_ARCH = "Gemma4ForCausalLM"
VLM_ARCH = "Gemma4ForConditionalGeneration"


@dataclass
class BridgeModel:
    """A built Megatron-Bridge model and what it was built from."""

    model: torch.nn.Module
    bridge: Any  # AutoBridge
    hf_config: Any  # the adapted config the bridge read
    provider: Any
    kind: str  # "text" | "vlm"
    dense: bool
    vocab_size: int
    substituted: list = field(default_factory=list)


def _adapt_text(text_config) -> None:
    """In place: what the bridge reads from a Gemma4TextConfig of transformers >= 5.15."""
    # getattr(cfg, "head_dim", 256) raises AmbiguousGlobalPerLayerAttributeError (not AttributeError) in 5.24:
    text_config.allow_global_per_layer_attribute_access = True
    # global_head_dim / num_global_key_value_heads moved into per_layer_config: without them the bridge
    # silently falls back to 512 / 2.
    full = [i for i, t in enumerate(text_config.layer_types) if t == "full_attention"]
    if full and getattr(text_config, "per_layer_config", None) is not None:
        per_layer = text_config.per_layer_config[full[0]]
        text_config.global_head_dim = int(per_layer.head_dim)
        text_config.num_global_key_value_heads = int(per_layer.num_key_value_heads)


def adapt_config(hf_config):
    """A copy of an HF Gemma 4 config (text or VLM) that Megatron-Bridge 0.6.2 reads correctly."""
    cfg = copy.deepcopy(hf_config)
    if getattr(cfg, "text_config", None) is not None and getattr(cfg, "vision_config", None) is not None:
        _adapt_text(cfg.text_config)
        cfg.architectures = [VLM_ARCH]
    else:
        _adapt_text(cfg)
        cfg.architectures = [TEXT_ARCH]
    return cfg


def te_free_block_spec(config, **kwargs):
    """The bridge's own Gemma 4 MoE block spec, built without TE, with the TE-only leaves replaced by
    ``parity.mbridge.substitutes`` (input norm fused into linear_qkv as in the TE spec; experts as
    megatron-core's TEGroupedMLP over grouped-linear stand-ins). With sequence parallelism the TE spec's TENorms
    (q/k norms, the pre-MLP norm whose weight its layer applies, the final norm) are TENorm's stand-in: the local
    spec's norm refuses sequence parallelism."""
    spec = modeling_gemma4._gemma4_block_spec(config, use_transformer_engine=False, **kwargs)
    if config.sequence_parallel:
        spec.layer_norm = S.TENormSubstitute
    for layer in spec.layer_specs:
        layer.submodules.input_layernorm = IdentityOp
        attn = layer.submodules.self_attention.submodules
        attn.linear_qkv = S.LayerNormColumnParallelLinearSubstitute
        attn.core_attention = S.CoreAttentionSubstitute
        attn.linear_proj = S.RowParallelLinearPostNormSubstitute
        if config.sequence_parallel:
            attn.q_layernorm = attn.k_layernorm = layer.submodules.pre_mlp_layernorm = S.TENormSubstitute
        mlp = layer.submodules.mlp
        moe_submodules = mlp.keywords["submodules"] if isinstance(mlp, partial) else mlp.submodules
        moe_submodules.experts = partial(TEGroupedMLP, submodules=GroupedMLPSubmodules(
            linear_fc1=S.ColumnParallelGroupedLinearSubstitute, linear_fc2=S.RowParallelGroupedLinearSubstitute))
    return spec


def bridge_divisor(vocab_size: int) -> int:
    return gemma4_bridge.Gemma4Bridge().make_vocab_size_divisible_by(vocab_size)


def _configure(provider, dtype: torch.dtype, device: str, tp: int, ep: int, dense: bool,
               sequence_parallel: bool = False) -> None:
    provider.params_dtype = dtype
    provider.bf16 = dtype == torch.bfloat16
    provider.fp16 = False
    provider.autocast_dtype = dtype
    provider.tensor_model_parallel_size = tp
    provider.expert_model_parallel_size = ep
    provider.sequence_parallel = sequence_parallel
    provider.gradient_accumulation_fusion = False
    provider.use_cpu_initialization = device == "cpu"
    provider.perform_initialization = False  # every weight is loaded through the bridge's mapping
    if dense:
        # Finding: Gemma4DenseProvider.build pads the vocab to a multiple of make_vocab_size_divisible_by (128)
        # whatever should_pad_vocab says, and the bridge's HF -> Megatron load does not pad: a vocab that 128
        # does not divide fails to load. Use the divisor the bridge's MoE path computes (largest power of 2
        # <= 128 dividing the vocab), so that the dense model's vocab is not padded.
        provider.make_vocab_size_divisible_by = bridge_divisor(provider.vocab_size)
        if importlib.util.find_spec("scaled_masked_softmax_cuda") is None:
            provider.masked_softmax_fusion = False  # megatron's fused softmax extension is not installed here
    if not dense:
        provider.moe_permute_fusion = False  # TE's fused permute kernels
        if device == "cpu":
            provider.moe_token_dispatcher_type = "allgather"  # the alltoall dispatcher creates a CUDA stream
        provider.transformer_layer_spec = te_free_block_spec


def build(hf_config, *, dtype: torch.dtype = torch.float32, device: str = "cpu", tp: int = 1, ep: int = 1,
          seed: int = 0, sequence_parallel: bool = False) -> BridgeModel:
    """Megatron-Bridge's model for an HF Gemma 4 config, via its own provider (``AutoBridge.from_hf_config``
    -> ``to_megatron_provider``), in ``dtype`` on ``device``; ``sequence_parallel``: its provider's (its Gemma 4
    recipes' at TP > 1). Parameters are uninitialised: ``load_hf``."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    adapted = adapt_config(hf_config)
    kind = "vlm" if adapted.architectures == [VLM_ARCH] else "text"
    text = adapted.text_config if kind == "vlm" else adapted
    dense = not bool(getattr(text, "enable_moe_block", False))
    bridge = AutoBridge.from_hf_config(adapted)
    provider = bridge.to_megatron_provider(load_weights=False)
    _configure(provider, dtype, device, tp, ep, dense, sequence_parallel)
    provider.finalize()
    # megatron's parallel state as its own initialize_model_parallel sets it from the finalized provider: its experts'
    # tensor parallelism is the provider's (1, as its Gemma 4 recipes set it), not megatron's default (= TP, which
    # would shard the experts its config says are whole)
    megatron_env.init(tp=tp, ep=ep, seed=seed, sequence_parallel=sequence_parallel,
                      etp=provider.expert_tensor_parallel_size)
    provider._pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    # PP=1: first and last stage. Explicit, because Gemma4VLModelProvider.provide() passes pre_process=None on
    # to Gemma4VLModel, which then builds no vision tower and embeds the image placeholder ids as text.
    model = provider.provide(pre_process=True, post_process=True)
    if dtype != torch.float32:
        # As the bridge's own get_model does through megatron-core's Float16Module (module.bfloat16()): every
        # floating buffer too (the dense layers register layer_scalar in fp32, which would promote activations).
        model = model.to(dtype=dtype)
    model = model.to(device=device).eval()
    subs = list(S.DENSE) if dense else list(S.SUBSTITUTED) + (list(S.CPU_ONLY) if device == "cpu" else [])
    if dense and provider.masked_softmax_fusion:
        subs = []
    return BridgeModel(model=model, bridge=bridge, hf_config=adapted, provider=provider, kind=kind, dense=dense,
                       vocab_size=int(text.vocab_size), substituted=subs)


def _pretrained(bm: BridgeModel, hf) -> PreTrainedCausalLM:
    """The bridge's HF-side wrapper around an in-memory HF model, an HF state dict (a mapping) or a checkpoint
    folder (a path: its lazy safetensors state source reads the shards, as ``from_pretrained`` sets it up)."""
    from megatron.bridge.models.hf_pretrained.state import StateDict

    if isinstance(hf, (str, os.PathLike)):
        pre = PreTrainedCausalLM.from_pretrained(str(hf))
        pre.config = bm.hf_config  # adapted: its own config read cannot parse transformers >= 5.15's Gemma 4
        return pre
    pre = PreTrainedCausalLM()
    pre.config = bm.hf_config
    if isinstance(hf, torch.nn.Module):
        pre.model = hf
    else:
        pre._state_dict_accessor = StateDict(dict(hf))
    return pre


def _loadable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = dict(model.named_parameters())
    state.update({k: v for k, v in model.named_buffers() if k in model.state_dict()})
    return {k: v for k, v in state.items() if v.is_floating_point()}


@torch.no_grad()
def load_hf(bm: BridgeModel, hf_model) -> list[str]:
    """Load an in-memory HF model's (or an HF state dict's, or a checkpoint folder's) weights through the bridge's own HF -> Megatron mapping
    (``load_weights_hf_to_megatron``). Every parameter and persistent buffer is NaN-filled first; returns
    the names that the mapping left unloaded (still NaN), ``[]`` when every tensor was written."""
    tensors = _loadable(bm.model)
    for t in tensors.values():
        t.fill_(float("nan"))
    bm.bridge._model_bridge.load_weights_hf_to_megatron(_pretrained(bm, hf_model), [bm.model])
    return sorted(k for k, t in tensors.items() if torch.isnan(t).any())


@torch.no_grad()
def export_hf(bm: BridgeModel, hf_model=None, merge: bool = False,
              want: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(hf_key, tensor)`` for every tensor the bridge's own export (``export_hf_weights``) yields, in the
    model's dtype. ``hf_model`` (optional) is handed to the bridge as its reference HF state. ``merge``: LoRA
    adapters merged into the weights (its default; here off unless asked: the base weights). ``want``: only its
    conversion tasks one of whose HF names it accepts run (its own tasks, built as its export builds them, then
    filtered: the same on every rank)."""
    bridge = AutoBridge(_pretrained(bm, hf_model)) if hf_model is not None else bm.bridge
    dtype = next(bm.model.parameters()).dtype
    if want is None:
        stream = bridge.export_hf_weights([bm.model], cpu=False, show_progress=False, weight_dtype=dtype,
                                          merge_adapter_weights=merge)
    else:
        mb = bridge._model_bridge
        tasks = [t for t in mb.build_conversion_tasks(bridge.hf_pretrained, [bm.model], weight_dtype=dtype)
                 if t is not None and any(want(n) for n in _hf_names(t.mapping.hf_param))]
        stream = mb.stream_weights_megatron_to_hf([bm.model], bridge.hf_pretrained, cpu=False, show_progress=False,
                                                  conversion_tasks=tasks, merge_adapter_weights=merge)
    for name, tensor in stream:
        yield name, tensor


def _hf_names(hf_param) -> list[str]:
    return list(hf_param.values()) if isinstance(hf_param, dict) else [hf_param]


def megatron_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Megatron's GPT attention mask from a 2-D padding mask (1 = real token): ``[b, 1, s, s]`` bool,
    True = masked (a future key, or a padded key)."""
    b, s = attention_mask.shape
    causal = torch.ones(s, s, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None, None] & attention_mask.bool()[:, None, None, :]
    return ~allowed


@torch.no_grad()
def forward(bm: BridgeModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
            position_ids: torch.Tensor | None = None, **vision) -> torch.Tensor:
    """Logits ``[b, s, vocab]`` (HF layout, vocab padding removed) for raw inputs: the model's own masks
    are built from the 2-D padding mask (text) or by the bridge's VLM from the token ids."""
    device = next(bm.model.parameters()).device
    input_ids = input_ids.to(device)
    b, s = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones(b, s, dtype=torch.long, device=device)
    if position_ids is None:
        position_ids = torch.arange(s, device=device)[None].expand(b, s)
    if bm.kind == "vlm":
        vision = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vision.items()}
        out = bm.model(input_ids=input_ids, position_ids=position_ids.to(device),
                       attention_mask=attention_mask.to(device), **vision)
    else:
        out = bm.model(input_ids=input_ids, position_ids=position_ids.to(device),
                       attention_mask=megatron_attention_mask(attention_mask.to(device)))
    logits = tp_gather(out[0] if isinstance(out, tuple) else out)  # output_layer: parallel_output (vocab shards)
    if logits.shape[0] != b:  # [s, b, v]
        logits = logits.transpose(0, 1)
    return logits[..., : bm.vocab_size].contiguous()
