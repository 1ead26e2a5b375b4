"""Plain-PyTorch stand-ins for the Transformer Engine parts of Megatron-Bridge's Gemma 4 (MoE) model.

Megatron-Bridge builds its Gemma 4 MoE layers from megatron-core's TE spec; without Transformer Engine
(the CPU machines and the lent GPU machines) four leaves of that spec cannot be constructed. Each class
here replaces one leaf, carries the parameter names the bridge's weight mapping expects, and does what
the TE module does *with the same arguments* (TE's documented behaviour: DotProductAttention,
LayerNormLinear, Linear + RMSNorm, GroupedLinear), no kinder. Everything around these leaves --
megatron-core's ``SelfAttention``, ``TEGroupedMLP`` (where routing probabilities are applied), the
token dispatcher, the bridge's ``Gemma4SelfAttention`` / ``Gemma4MoELayer`` / ``Gemma4TopKRouter`` /
``Gemma4TransformerLayer`` -- is the bridge's and megatron-core's own code.

``SUBSTITUTED`` lists every part that does not run as it would with TE, with who runs it instead and why.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.bridge.models.conversion.param_mapping import AutoMapping
from megatron.bridge.models.gemma.gemma3_provider import _is_local_attn_layer

from parity import compat

TE_NORM_DEFAULT_EPS = 1e-5  # megatron-core TENorm(config, hidden_size, eps=1e-5): the eps when a caller passes none

_NO_TE = "Transformer Engine is not installed here (CPU machines, lent GPU machines)"

SUBSTITUTED: list[dict[str, str]] = [
    dict(part="decoder.layers.*.self_attention.core_attention (Gemma4TEDotProductAttention: TE DotProductAttention)",
         by="parity.mbridge.substitutes.CoreAttentionSubstitute (explicit fp32 softmax attention)",
         reason=_NO_TE + "; the bridge's class subclasses TEDotProductAttention, a MagicMock without TE, "
                "so its window rule (sliding layers (window-1, 0), full layers none) is re-stated here"),
    dict(part="decoder.layers.*.self_attention.linear_qkv (TELayerNormColumnParallelLinear: TE LayerNormLinear)",
         by="parity.mbridge.substitutes.LayerNormColumnParallelLinearSubstitute (RMSNorm in fp32 + linear)",
         reason=_NO_TE),
    dict(part="decoder.layers.*.self_attention.linear_proj (TERowParallelLinearLayerNorm: TE Linear + TENorm)",
         by="parity.mbridge.substitutes.RowParallelLinearPostNormSubstitute (linear + RMSNorm in fp32)",
         reason=_NO_TE),
    dict(part="decoder.layers.*.mlp.experts.linear_fc1/linear_fc2 (TE GroupedLinear under TEGroupedMLP)",
         by="parity.mbridge.substitutes.ColumnParallelGroupedLinearSubstitute / RowParallelGroupedLinearSubstitute "
            "(one matmul per expert)",
         reason=_NO_TE + "; megatron-core's TEGroupedMLP itself runs (probabilities applied after the activation)"),
    dict(part="q_layernorm, k_layernorm, decoder.final_layernorm (TENorm), mlp.shared_experts linears "
              "(TEColumnParallelLinear / TERowParallelLinear)",
         by="megatron-core's local spec (WrappedTorchNorm = torch.nn.RMSNorm; ColumnParallelLinear / RowParallelLinear); "
            "with sequence parallelism the norms are parity.mbridge.substitutes.TENormSubstitute (RMSNorm in fp32, "
            "weight marked sequence-parallel)",
         reason=_NO_TE + "; the bridge's block spec is built with use_transformer_engine=False; megatron-core's "
                "WrappedTorchNorm refuses sequence parallelism"),
    dict(part="moe_permute_fusion (TE fused permute kernels)",
         by="megatron-core's unfused permute / unpermute", reason=_NO_TE),
]

# With LoRA on (a LoRA case): Megatron-Bridge's own LoRA layers, around the stand-ins above
LORA: list[dict[str, str]] = [
    dict(part="transformer_engine.pytorch in megatron/bridge/peft/lora_layers.py (Linear, LayerNormLinear, ops.Sequential)",
         by="parity.compat.te_pytorch_standin (types that refuse to be built, bound only while that module imports)",
         reason=_NO_TE + "; used there only by the op-fuser path (TEFusedLoRALinear), off without TE"),
    dict(part="megatron/bridge/peft/utils.get_adapter_attributes_from_linear on the TE stand-ins",
         by="parity.mbridge.substitutes.lora_attributes (its TE branches' reading: column / row, features x TP; "
            "LayerNormLinear returns its normed input, return_layernorm_output)",
         reason=_NO_TE + "; its HAVE_TE reads True here (megatron-core's TE wrapper names exist) and fails on "
                "plain megatron-core linears: set False"),
]

# The dense model (local spec, no TE) when megatron-core's fused softmax extension is absent
DENSE: list[dict[str, str]] = [
    dict(part="decoder.layers.*.self_attention.core_attention.scale_mask_softmax (masked_softmax_fusion)",
         by="megatron-core's torch softmax path (FusedScaleMaskSoftmax.forward_torch_softmax)",
         reason="the scaled_masked_softmax_cuda extension is not installed; note that its fused causal kernel "
                "would apply no sliding window at all"),
]

# On CPU only (appended by parity.mbridge.model.build when the device is the CPU)
CPU_ONLY: list[dict[str, str]] = [
    dict(part="moe_token_dispatcher_type='alltoall' (the provider's choice)",
         by="megatron-core's 'allgather' dispatcher, its gathers into fresh memory (parity.compat: not megatron's "
            "shared 'mpu' buffer)",
         reason="the alltoall dispatcher creates a torch.cuda.Stream at construction; under sequence parallelism the "
                "allgather dispatcher's backward returns the experts' input gradient as a view of the 'mpu' buffer, "
                "which the local shared experts' backward overwrites before it is read (TE's linears and the "
                "alltoall dispatcher do not share that buffer)"),
]


# ---------------------------------------------------------------------------------------------------
# Core attention

def window_of(config: Any, layer_number: int) -> tuple[int, int] | None:
    """The TE ``window_size`` this layer's core attention gets: the bridge's Gemma4TEDotProductAttention
    sets ``config.window_size`` to ``(window - 1, 0)`` on local layers (its own ``_is_local_attn_layer``
    over ``interleaved_attn_pattern``) and ``None`` on global ones; megatron-core's TEDotProductAttention
    then passes it to TE only where ``is_layer_window_attention`` says so."""
    window = (config.window_size - 1, 0) if _is_local_attn_layer(layer_number, config.interleaved_attn_pattern) else None
    return window if is_layer_window_attention(window, config.window_attn_skip_freq, layer_number) else None


def te_window(mask_type: str, window: tuple[int, int] | None) -> tuple[int, int]:
    """TE's window normalisation (``check_set_window_size``): causal types force the right edge to 0,
    ``None`` means no window: ``(-1, 0)`` for causal types, ``(-1, -1)`` otherwise."""
    if "causal" in mask_type:
        return (-1, 0) if window is None else (window[0], 0)
    return (-1, -1) if window is None or window == (-1, 0) else window


def te_full_mask(mask_type: str, attention_mask: torch.Tensor | None, window: tuple[int, int],
                 sq: int, sk: int, device) -> torch.Tensor:
    """The [b or 1, 1, sq, sk] boolean mask TE applies (True = masked out), per TE's documentation:
    ``attention_mask`` is used only for ``padding*`` ([b, 1, 1, s]: a key *or* a query that is padding is
    masked) and ``arbitrary`` (broadcast to [b, h, sq, sk]) types and ignored otherwise; causal types add
    a top-left (``causal``, ``padding_causal``) or bottom-right (``*_bottom_right``) triangle; the window
    ``(left, right)`` lets query i see keys ``[i + sk - sq - left, i + sk - sq + right]`` (top-left
    aligned, i.e. without the ``sk - sq`` shift, for ``causal`` / ``padding_causal``)."""
    mask = torch.zeros(1, 1, sq, sk, dtype=torch.bool, device=device)
    if "padding" in mask_type:
        if attention_mask is None:
            raise ValueError(f"attn_mask_type={mask_type!r} needs an attention_mask")
        pad = attention_mask.to(torch.bool)
        mask = mask | pad.squeeze(1).unsqueeze(3) | pad  # queries [b,1,s,1], keys [b,1,1,s]
    elif mask_type == "arbitrary":
        if attention_mask is None:
            raise ValueError("attn_mask_type='arbitrary' needs an attention_mask")
        mask = mask | attention_mask.to(torch.bool)
    left, right = window
    if "causal" in mask_type:
        right = 0
    left = sk if left == -1 else left
    right = sq if right == -1 else right
    q = torch.arange(sq, device=device).view(sq, 1)
    k = torch.arange(sk, device=device).view(1, sk)
    shift = 0 if mask_type in ("causal", "padding_causal") else sk - sq
    rel = q + shift - k  # > 0: key in the past
    mask = mask | (rel > left) | (rel < -right)
    return mask


class CoreAttentionSubstitute(nn.Module):
    """Stand-in for the bridge's ``Gemma4TEDotProductAttention`` (megatron-core ``TEDotProductAttention``
    over TE ``DotProductAttention``), constructed with the same arguments.

    Inputs ``[s, b, heads, d]`` (``sbhd``), output ``[sq, b, heads * d]``. Softmax in fp32 (as TE's fused
    and flash kernels), grouped-query heads repeated, ``softmax_scale`` None -> ``1/sqrt(d)``. The mask is
    built by ``te_full_mask``: a causal layer ignores a passed ``attention_mask`` as TE does. A query
    whose every key is masked (a padded query under ``padding*``) gets a zero output, as TE's fused
    attention."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 k_channels: int | None = None, v_channels: int | None = None, num_splits=None,
                 cp_comm_type: str | None = "p2p", pg_collection=None):
        super().__init__()
        self.config = copy.deepcopy(config)
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.window_size = window_of(config, layer_number)
        self.config.window_size = self.window_size  # what megatron's TEDotProductAttention.forward reads
        self.softmax_scale = softmax_scale
        self.kv_channels = k_channels or config.kv_channels
        tp = pg_collection.tp.size() if pg_collection is not None else 1
        self.heads = config.num_attention_heads // tp
        self.groups = max(1, config.num_query_groups // tp)

    def forward(self, query, key, value, attention_mask, attn_mask_type: AttnMaskType | None = None,
                attention_bias=None, packed_seq_params=None, num_splits=None):
        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError("CoreAttentionSubstitute: attention_bias / packed sequences")
        mask_type = attn_mask_type or self.attn_mask_type
        sq, b, heads, d = query.shape
        sk = key.size(0)
        if mask_type == AttnMaskType.no_mask and self.window_size is not None and sq == 1:
            mask_type = AttnMaskType.causal_bottom_right  # megatron-core's sliding-window decode rule
        name = mask_type.name
        window = te_window(name, self.window_size)
        mask = te_full_mask(name, attention_mask, window, sq, sk, query.device)
        scale = self.softmax_scale if self.softmax_scale is not None else d**-0.5
        if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
            # recomputed in the backward, as TE's fused and flash kernels do: the same numbers, without the fp32
            # scores and probabilities of every layer held until then (at the 26B-A4B shape, 2,048 tokens, about
            # 1 GiB a layer: its LoRA backward ran out of an 80 GB card)
            out = torch.utils.checkpoint.checkpoint(_attend, query, key, value, mask, scale, use_reentrant=False)
        else:
            out = _attend(query, key, value, mask, scale)
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)


def _attend(query, key, value, mask, scale: float) -> torch.Tensor:
    """Math attention of ``[s, b, heads, d]`` inputs, softmax in fp32: ``[b, heads, sq, d]`` in the input's dtype."""
    q = query.permute(1, 2, 0, 3).float()  # [b, h, sq, d]
    k = key.permute(1, 2, 0, 3).float()
    v = value.permute(1, 2, 0, 3).float()
    rep = q.size(1) // k.size(1)
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # fully masked rows: zero output
    return torch.matmul(probs, v).to(query.dtype)


# ---------------------------------------------------------------------------------------------------
# Norms and linears

def te_rms_norm(x: torch.Tensor, gamma: torch.Tensor, eps: float, zero_centered_gamma: bool) -> torch.Tensor:
    """TE's RMSNorm: ``x / sqrt(mean(x^2) + eps) * gamma`` (``* (1 + gamma)`` when zero-centered), computed
    in fp32, output in the input dtype."""
    xf = x.float()
    g = gamma.float() + 1.0 if zero_centered_gamma else gamma.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * g).to(x.dtype)


def _tp_group(size: int):
    """megatron-core's tensor-parallel group where a caller passes none (``None`` for TP=1)."""
    if size == 1:
        return None
    from megatron.core import parallel_state
    return parallel_state.get_tensor_model_parallel_group()


def _partition(size: int, pg_collection, attr: str) -> int:
    group = getattr(pg_collection, attr, None) if pg_collection is not None else None
    world = group.size() if group is not None else 1
    if size % world:
        raise ValueError(f"{size} is not divisible by the {attr} size {world}")
    return size // world


def _sequence_parallel(config, tp_group) -> bool:
    """TE's ``sequence_parallel`` as megatron-core's TE wrappers pass it (``config.sequence_parallel``), in effect
    only where there is a TP group of several ranks (TE communicates over ``tp_group`` only then)."""
    return bool(config.sequence_parallel) and tp_group is not None and tp_group.size() > 1


def _mark_sequence_parallel(p: nn.Parameter, config) -> None:
    """TE marks a norm's weight ``sequence_parallel`` (its ``sequence_parallel`` argument): megatron-core's
    ``finalize_model_grads`` (``_allreduce_non_tensor_model_parallel_grads``) then sums its gradient over the TP
    ranks, each of which saw only its sequence shard."""
    p.sequence_parallel = bool(config.sequence_parallel)


class TENormSubstitute(nn.Module):
    """Stand-in for megatron-core ``TENorm`` with RMSNorm (TE ``RMSNorm``): ``weight``, the caller's eps
    (``TE_NORM_DEFAULT_EPS`` when none is passed, as TENorm's signature), ``layernorm_zero_centered_gamma``."""

    def __init__(self, config, hidden_size: int, eps: float = TE_NORM_DEFAULT_EPS):
        super().__init__()
        if config.normalization != "RMSNorm":
            raise NotImplementedError(f"TENormSubstitute: normalization={config.normalization!r}")
        self.config = config
        self.eps = eps
        self.zero_centered_gamma = bool(config.layernorm_zero_centered_gamma)
        init = 0.0 if self.zero_centered_gamma else 1.0
        self.weight = nn.Parameter(torch.full((hidden_size,), init, dtype=config.params_dtype))
        _mark_sequence_parallel(self.weight, config)

    def forward(self, x):
        """On whatever rows it is given: under sequence parallelism this rank's sequence shard (no communication)."""
        return te_rms_norm(x, self.weight, self.eps, self.zero_centered_gamma)


class LayerNormColumnParallelLinearSubstitute(nn.Module):
    """Stand-in for megatron-core ``TELayerNormColumnParallelLinear`` (TE ``LayerNormLinear``,
    ``parallel_mode="column"``, ``return_layernorm_output=False``): RMSNorm with ``eps =
    config.layernorm_epsilon`` and ``zero_centered_gamma = config.layernorm_zero_centered_gamma``, then
    ``y = norm(x) @ weight.T``; parameters ``weight`` [out/tp, in] and ``layer_norm_weight`` [in]."""

    def __init__(self, input_size: int, output_size: int, *, config, init_method=None, gather_output: bool = False,
                 bias: bool = False, skip_bias_add: bool = False, is_expert: bool = False,
                 skip_weight_param_allocation: bool = False, tp_comm_buffer_name: str | None = None,
                 tp_group=None, stride: int = 1, **kwargs):
        super().__init__()
        if gather_output:
            raise ValueError("Transformer Engine linear layers do not support gather_output = True")
        if bias:
            raise NotImplementedError("LayerNormColumnParallelLinearSubstitute: bias")
        if config.normalization != "RMSNorm":
            raise NotImplementedError(f"normalization={config.normalization!r}")
        self.config = config  # the bridge's mappings read the layer's config here (per-layer head dims)
        world = tp_group.size() if tp_group is not None else config.tensor_model_parallel_size
        self.tp_group = tp_group if tp_group is not None else _tp_group(config.tensor_model_parallel_size)
        self.eps = config.layernorm_epsilon
        self.zero_centered_gamma = bool(config.layernorm_zero_centered_gamma)
        self.weight = nn.Parameter(torch.empty(output_size // world, input_size, dtype=config.params_dtype))
        init = 0.0 if self.zero_centered_gamma else 1.0
        self.layer_norm_weight = nn.Parameter(torch.full((input_size,), init, dtype=config.params_dtype))
        _mark_sequence_parallel(self.layer_norm_weight, config)
        self.sequence_parallel = _sequence_parallel(config, self.tp_group)
        for p in (self.weight,):
            p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, 0, stride

    return_layernorm_output = False  # TE's flag; Megatron-Bridge's LoRA sets it to read the normed input
    return_layernorm_output_gathered = False  # TE's flag (sequence parallelism): the normed input returned gathered

    def forward(self, x):
        """``(y, None)``; with ``return_layernorm_output`` (TE's flag): ``((y, norm(x)), None)``. At TP > 1 without
        sequence parallelism the normed input is every rank's (no communication forward) and its gradient is summed
        over the TP group in the backward (TE ``LayerNormLinear``, column mode: an all-reduce of the input gradient,
        megatron's ``copy_to_tensor_model_parallel_region``). With sequence parallelism ``x`` is this rank's
        sequence shard ``[s/tp, b, in]``: the norm runs on it, its output is all-gathered along the sequence before
        the GEMM (output ``[s, b, out/tp]``) and the backward reduce-scatters the gathered input's gradient
        (megatron's ``gather_from_sequence_parallel_region``); the normed output returned is the local shard (TE's
        ``return_layernorm_output_gathered`` off, megatron-core's default; on: the gathered one the GEMM reads)."""
        h = te_rms_norm(x, self.layer_norm_weight, self.eps, self.zero_centered_gamma)
        hc = h
        if self.sequence_parallel:
            from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

            hc = gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=True, group=self.tp_group)
        elif self.tp_group is not None and self.tp_group.size() > 1:
            from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

            hc = copy_to_tensor_model_parallel_region(h, group=self.tp_group)
        y = torch.nn.functional.linear(hc, self.weight)
        normed = hc if self.sequence_parallel and self.return_layernorm_output_gathered else h
        return ((y, normed) if self.return_layernorm_output else y), None


class RowParallelLinearPostNormSubstitute(nn.Module):
    """Stand-in for the bridge's ``TERowParallelLinearLayerNorm`` (TE ``Linear``, ``parallel_mode="row"``,
    then ``post_layernorm = TENorm(config, output_size)``): the post-norm gets TENorm's default eps
    (``TE_NORM_DEFAULT_EPS``, not ``config.layernorm_epsilon``) because the bridge passes none."""

    def __init__(self, input_size: int, output_size: int, *, config, init_method=None, bias: bool = False,
                 input_is_parallel: bool = True, skip_bias_add: bool = False, is_expert: bool = False,
                 tp_comm_buffer_name: str | None = None, tp_group=None, **kwargs):
        super().__init__()
        if bias:
            raise NotImplementedError("RowParallelLinearPostNormSubstitute: bias")
        self.config = config
        self.tp_group = tp_group if tp_group is not None else _tp_group(config.tensor_model_parallel_size)
        self.sequence_parallel = _sequence_parallel(config, self.tp_group)
        world = self.tp_group.size() if self.tp_group is not None else 1
        self.weight = nn.Parameter(torch.empty(output_size, input_size // world, dtype=config.params_dtype))
        self.weight.tensor_model_parallel, self.weight.partition_dim, self.weight.partition_stride = True, 1, 1
        self.post_layernorm = TENormSubstitute(config, output_size)

    def forward(self, x):
        """``x`` is this rank's slice of the input features (``input_is_parallel``); the partial products
        are summed over the TP group (TE ``Linear``, row mode, no sequence parallelism: an all-reduce, whose
        backward hands each rank the whole output gradient: megatron's ``reduce_from_tensor_model_parallel_region``),
        then the post-norm sees the whole output. With sequence parallelism the sum is a reduce-scatter along the
        sequence (output ``[s/tp, b, out]``: this rank's shard; the backward all-gathers the output gradient:
        megatron's ``reduce_scatter_to_sequence_parallel_region``) and the post-norm runs on the shard."""
        y = torch.nn.functional.linear(x, self.weight)
        if self.sequence_parallel:
            from megatron.core.tensor_parallel.mappings import reduce_scatter_to_sequence_parallel_region

            y = reduce_scatter_to_sequence_parallel_region(y, group=self.tp_group)
        elif self.tp_group is not None and self.tp_group.size() > 1:
            from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

            y = reduce_from_tensor_model_parallel_region(y, group=self.tp_group)
        return self.post_layernorm(y), None


class _GroupedLinearSubstitute(nn.Module):
    """Stand-in for megatron-core ``TEGroupedLinear`` (TE ``GroupedLinear``): ``num_gemms`` weights
    ``weight0..weight{n-1}`` [out, in]; ``forward(x, m_splits)`` multiplies the i-th block of
    ``m_splits[i]`` rows by ``weight{i}.T`` and returns ``(y, None)``. Sizes are divided by the expert
    tensor-parallel size (the dispatcher handles the communication, as with TE)."""

    parallel_mode = ""

    def __init__(self, num_gemms: int, input_size: int, output_size: int, *, config, init_method=None,
                 bias: bool = False, skip_bias_add: bool = False, is_expert: bool = True,
                 tp_comm_buffer_name: str | None = None, pg_collection=None, name: str | None = None):
        super().__init__()
        if bias:
            raise NotImplementedError("grouped linear substitute: bias")
        self.config = config
        if self.parallel_mode == "column":
            output_size = _partition(output_size, pg_collection, "expt_tp")
        else:
            input_size = _partition(input_size, pg_collection, "expt_tp")
        self.num_gemms = num_gemms
        for i in range(num_gemms):
            w = nn.Parameter(torch.empty(output_size, input_size, dtype=config.params_dtype))
            w.allreduce = False  # expert parameter (megatron marks TE grouped weights the same way)
            setattr(self, f"weight{i}", w)

    def forward(self, x, m_splits):
        splits = [int(m) for m in m_splits]
        outs = [torch.nn.functional.linear(chunk, getattr(self, f"weight{i}"))
                for i, chunk in enumerate(torch.split(x, splits))]
        return torch.cat(outs) if outs else x.new_empty(0, getattr(self, "weight0").size(0)), None


class ColumnParallelGroupedLinearSubstitute(_GroupedLinearSubstitute):
    parallel_mode = "column"


class RowParallelGroupedLinearSubstitute(_GroupedLinearSubstitute):
    parallel_mode = "row"


# ---------------------------------------------------------------------------------------------------
# Megatron-Bridge's LoRA on the stand-ins

def lora_attributes(m: nn.Module, is_expert: bool = False) -> dict | None:
    """What ``megatron.bridge.peft.utils.get_adapter_attributes_from_linear`` reads from a stand-in, as from its TE twin
    (the TE branches of that function): LayerNormLinear and GroupedLinear (column) -- input not parallel, out features
    times the TP size, a LayerNormLinear returning its normed input for LoRA (``return_layernorm_output``; under
    sequence parallelism gathered, ``return_layernorm_output_gathered``, its default path without input regather, the
    adapter then without sequence-parallel communication); Linear + norm and GroupedLinear (row) -- input parallel, in
    features times the TP size (the Linear's adapter reduce-scatters along the sequence under sequence parallelism).
    None: not a stand-in."""
    if isinstance(m, LayerNormColumnParallelLinearSubstitute):
        m.return_layernorm_output = True
        m.return_layernorm_output_gathered = m.sequence_parallel
        tp = m.config.tensor_model_parallel_size
        return dict(input_is_parallel=False, in_features=m.weight.shape[1], out_features=m.weight.shape[0] * tp,
                    disable_tensor_parallel_comm=False, disable_sequence_parallel_comm=True,
                    base_linear_is_parallel=True)
    if isinstance(m, RowParallelLinearPostNormSubstitute):
        tp = m.tp_group.size() if m.tp_group is not None else 1
        return dict(input_is_parallel=True, in_features=m.weight.shape[1] * tp, out_features=m.weight.shape[0],
                    disable_tensor_parallel_comm=False, disable_sequence_parallel_comm=not m.sequence_parallel,
                    base_linear_is_parallel=True)
    if isinstance(m, _GroupedLinearSubstitute):
        tp = m.config.expert_tensor_parallel_size or 1
        w = m.weight0
        column = m.parallel_mode == "column"
        return dict(input_is_parallel=not column, in_features=w.shape[1] * (1 if column else tp),
                    out_features=w.shape[0] * (tp if column else 1), disable_tensor_parallel_comm=False,
                    disable_sequence_parallel_comm=True, base_linear_is_parallel=True)
    return None


compat.LORA_ATTRIBUTE_READERS.append(lora_attributes)  # its LoRA reads the stand-ins by this (parity.compat)

# The bridge's AutoMapping detects TP layouts from module class names: register ours as their TE twins are.
AutoMapping.register_module_type(CoreAttentionSubstitute.__name__, "replicated")
AutoMapping.register_module_type(RowParallelLinearPostNormSubstitute.__name__, "row")
AutoMapping.register_module_type(ColumnParallelGroupedLinearSubstitute.__name__, "column")
AutoMapping.register_module_type(RowParallelGroupedLinearSubstitute.__name__, "row")
