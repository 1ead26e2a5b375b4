"""Megatron-Bridge's Gemma 4 training step as its SFT users run it, for the backward mode.

Its GPT step (``megatron.bridge.training.gpt_step.forward_step``; the module itself imports NVIDIA ModelOpt, not
installed here, so its three lines are restated in ``_step``): the batch of its data path
(``build_shifted_labels_and_loss_mask``: labels are the next token, ``-100`` where there is none, and a loss mask
that is 0 there), the model called *with* those labels (megatron-core's ``GPTModel`` then computes the per-token
loss itself, through the cross entropy its provider picks: ``cross_entropy_loss_fusion=True``,
``cross_entropy_fusion_impl="native"`` by default), its loss function (``masked_next_token_loss``: the sum over
the loss mask, and the token count) and megatron-core's schedule (``forward_step``: the sum divided by the token
count and the number of micro-batches; the MoE auxiliary-loss scale set). The model runs in training mode, so the
router attaches the load-balancing loss its provider turns on (``moe_router_load_balancing_type="aux_loss"``,
``moe_aux_loss_coeff=1e-3``): its gradient joins in the backward (``MoEAuxLossAutoScaler``), its value is not part
of the returned loss (as in Megatron's logs: ``lm loss`` and ``load_balancing_loss`` apart).

Its VLM (``Gemma4VLModel``: HF's own vision tower and ``embed_vision`` around megatron-core's GPT model) trains through
its VLM step (``megatron.bridge.training.vlm_step.forward_step``; that module imports its training config, which needs
the ``datasets`` package, not installed here, so its lines are restated in ``_vlm_step``): the same batch (its Gemma 4
collate builds labels and loss mask as ``build_shifted_labels_and_loss_mask`` does: the images' soft tokens and padding
carry no loss), the model called with ``labels``, ``loss_mask`` and the visual inputs (``pixel_values``,
``image_position_ids``) and returning ``(loss, loss_mask)``, the same loss function and schedule step. Its language
model computes the loss (the same ``compute_language_model_loss``), so the logits tap and ``loss_on`` sit on it.

Gradients come back through its own export (``export_hf_weights``) applied to the gradients (the vision tower's too:
its mapping copies HF's tower tensor for tensor), plus the adjoint of what its import copies: on K=V layers the import
writes HF ``k_proj`` into both the k and the v slot of ``linear_qkv`` (``Gemma4Bridge.maybe_modify_loaded_hf_weight``),
and its export drops the v slot, so HF's ``k_proj`` gradient is the k slot's plus the v slot's.
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch

from parity.megatron_layout import sb, several_ranks, tp_size

LOSS_DESCRIPTION = (
    "Megatron-Bridge's GPT step as its SFT recipes run it (gpt_step.forward_step restated: that module imports NVIDIA "
    "ModelOpt, not installed here): labels and loss mask from its data path (build_shifted_labels_and_loss_mask; "
    "attention_mask None, its dataset default), the model called with the labels (megatron-core's GPTModel loss: "
    "cross_entropy_loss_fusion=True, impl 'native' = fused_vocab_parallel_cross_entropy, the provider's defaults), "
    "masked_next_token_loss (sum over the loss mask) divided by the token count by megatron-core's forward_step "
    "(one micro-batch); the model in training mode, so the router's load-balancing loss the provider turns on "
    "(aux_loss, moe_aux_loss_coeff 1e-3) adds its gradient in the backward (not part of the loss value). Its VLM: "
    "its VLM step (vlm_step.forward_step restated: that module imports its training config, which needs the "
    "datasets package, not installed here): the model called with labels, loss_mask and pixel_values / "
    "image_position_ids, returning (per-token loss, loss mask); the same loss function and schedule step")

VISUAL = ("pixel_values", "image_position_ids", "input_features")  # what its VLM's forward takes of a batch


def batch(input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor) -> dict:
    """Its data path's batch for HF-convention ``labels`` (input ids, -100 where no token): ``tokens``, shifted
    ``labels`` (-100 where none), ``loss_mask`` (float), ``position_ids``, and ``attention_mask`` None (its dataset
    default ``skip_getting_attention_mask_from_dataset=True``: the model's causal mask)."""
    from megatron.bridge.data.conversation_processing import build_shifted_labels_and_loss_mask

    shifted, loss_mask = build_shifted_labels_and_loss_mask(input_ids, labels != -100)
    return {"tokens": input_ids, "labels": shifted, "loss_mask": loss_mask, "position_ids": position_ids,
            "attention_mask": None}


def language_model(model: torch.nn.Module) -> torch.nn.Module:
    """Its GPT model: the VLM's ``language_model``, else the model itself."""
    return getattr(model, "language_model", model)


@contextmanager
def logits_tap(model: torch.nn.Module, box: dict):
    """While inside, ``box["logits"]`` is set to the output layer's (softcapped) logits as a ``[b, s, V]`` view in the
    graph, so that a hook on it sees their gradient; the model goes on with a copy of the same values (its cross
    entropy subtracts and exponentiates its input in place, which would overwrite the view's values)."""

    def keep(mod, args, out):
        logits, bias = out
        if tp_size() > 1:  # vocab-parallel logits: the whole vocabulary gathered for the row, the model going on with
            # this rank's slice of it (an exact split whose backward gathers the slices' gradients: the row's is whole)
            from megatron.core.tensor_parallel.mappings import (gather_from_tensor_model_parallel_region,
                                                                scatter_to_tensor_model_parallel_region)

            view = gather_from_tensor_model_parallel_region(logits).transpose(0, 1)
            box["logits"] = view
            return scatter_to_tensor_model_parallel_region(view.transpose(0, 1)).contiguous().clone(), bias
        view = logits.transpose(0, 1)
        box["logits"] = view
        return view.transpose(0, 1).clone(), bias
    handle = language_model(model).output_layer.register_forward_hook(keep)
    try:
        yield box
    finally:
        handle.remove()


def _step(b: dict, data_iterator, model):
    """``gpt_step.forward_step``: the model called with the labels, and ``masked_next_token_loss`` on its mask."""
    from megatron.bridge.training.losses import masked_next_token_loss

    out = model(input_ids=b["tokens"], position_ids=b["position_ids"], attention_mask=b["attention_mask"],
                labels=b["labels"])
    return out, partial(masked_next_token_loss, b["loss_mask"], check_for_nan_in_loss=True, check_for_spiky_loss=False)


def _vlm_step(b: dict, visual: dict, data_iterator, model):
    """``vlm_step.forward_step``: the model called with the labels, the loss mask and the visual inputs (as
    ``_filter_visual_kwargs_for_model`` keeps them: what its forward takes); its VLM returns ``(loss, loss_mask)``
    and ``masked_next_token_loss`` takes that mask (the one its context-parallel slicing would cut)."""
    from megatron.bridge.training.losses import masked_next_token_loss

    out = model(input_ids=b["tokens"], position_ids=b["position_ids"], attention_mask=b["attention_mask"],
                labels=b["labels"], loss_mask=b["loss_mask"].contiguous(), **visual)
    loss_mask = b["loss_mask"]
    if isinstance(out, tuple):
        out, loss_mask = out
    return out, partial(masked_next_token_loss, loss_mask, check_for_nan_in_loss=True, check_for_spiky_loss=False)


def train_loss(bm, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor, **visual
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One training forward: (loss, logits ``[b, s, V]``), both in the autograd graph; gradients cleared first.
    ``visual``: a VLM's pixel values and image position ids (its VLM step). Training mode for the forward only (the
    model is left as it was)."""
    from megatron.core.pipeline_parallel.schedules import forward_step

    if tp_size() > 1 and not bm.dense and not bm.provider.sequence_parallel:
        raise NotImplementedError(
            "its MoE trains at TP > 1 with sequence parallelism only (megatron-core's MoELayer raises without it in "
            "training; its Gemma 4 recipes set sequence_parallel=True): set the case's parallel.sequence_parallel")
    model = bm.model
    device = next(model.parameters()).device
    b = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
         for k, v in batch(input_ids, labels, position_ids).items()}
    visual = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in visual.items() if k in VISUAL}
    step = partial(_vlm_step, b, visual) if bm.kind == "vlm" else partial(_step, b)
    box: dict = {}
    model.zero_grad(set_to_none=True)
    was_training = model.training
    model.train()
    try:
        with logits_tap(model, box):
            loss, _ = forward_step(step, None, model, num_microbatches=1, input_tensor=None,
                                   forward_data_store=[], config=model.config, cp_group_size=1, is_last_stage=True)
    finally:
        model.train(was_training)
    logits = box["logits"]
    if logits.shape[-1] != bm.vocab_size:
        raise NotImplementedError(f"padded vocabulary ({logits.shape[-1]} for {bm.vocab_size})")
    return loss, logits


def _kv_tied_layers(bm) -> list[int]:
    return [i for i, layer in enumerate(language_model(bm.model).decoder.layers)
            if getattr(layer.self_attention, "_tied_kv", False)]


def _swap_k_v(w: torch.Tensor, attention) -> torch.Tensor:
    """``linear_qkv.weight`` (this rank's rows ``[ng x (q.. | k | v)]``, megatron's interleaved layout) with each
    group's k and v rows exchanged: the export of it yields as ``k_proj`` what the v slot holds."""
    hn = attention.hidden_size_per_attention_head
    groups = attention.num_query_groups_per_partition
    blocks = w.reshape(groups, -1, hn, w.shape[-1])  # per group: q heads, then k, then v
    return torch.cat([blocks[:, :-2], blocks[:, -1:], blocks[:, -2:-1]], dim=1).reshape_as(w)


def _zeros(p: torch.Tensor) -> torch.Tensor:
    """Zeros in ``p``'s shape for a parameter without a gradient: in one process one element expanded (frozen layers at
    the 26B-A4B shape, ``train.grad_layers``: 47 GiB of real zeros otherwise); over several ranks real ones (the
    export's collectives gather contiguous tensors)."""
    return torch.zeros_like(p) if several_ranks() else p.new_zeros(()).expand_as(p)


@contextmanager
def _values(model: torch.nn.Module, values: dict[str, torch.Tensor], only: bool = False):
    """Every parameter's data replaced by ``values[name]`` (zeros where absent) and every floating buffer by
    zeros while inside; restored after. ``only``: the parameters in ``values`` alone, the rest (and the buffers) left
    as they are (an adapter export reads only the adapters: zeros for the frozen base were another 47 GiB on the
    device at the 26B-A4B shape, more than an 80 GB card had left)."""
    saved = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if only and name not in values:
                continue
            saved[name] = p.data
            p.data = values[name].to(p.dtype) if name in values else _zeros(p)
        for name, buf in model.named_buffers() if not only else ():
            if buf.is_floating_point():
                saved[name] = buf.data
                buf.data = torch.zeros_like(buf)
    try:
        yield
    finally:
        params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
        for name, data in saved.items():
            (params.get(name) if name in params else buffers[name]).data = data


def grads(bm, want=None):
    """Its parameters' gradients as HF ``(key, tensor)`` pairs, one at a time (at full size the whole set in HF layout
    would be another copy of the model's gradients): its export applied to the gradients (TP shards and EP experts
    gathered by it), K=V layers' ``k_proj`` the sum of the k and v slots' gradients (the adjoint of its import's
    copy). Buffers (``layer_scalar``) come back as zeros: nothing trains them. Consume it whole: the model's
    parameters hold their gradients until it ends. ``want``: only the tensors with an HF key it accepts are
    exported (``model.export_hf``)."""
    from parity.mbridge.model import export_hf

    model = bm.model
    g = {n: p.grad.detach() for n, p in model.named_parameters() if p.grad is not None}
    tied = _kv_tied_layers(bm)
    hf_layers, mc_layers = ("model.language_model.layers", "language_model.decoder.layers") if bm.kind == "vlm" else \
        ("model.layers", "decoder.layers")
    k_slot = {f"{hf_layers}.{i}.self_attn.k_proj.weight" for i in tied}
    held = {}
    with _values(model, g):
        for k, v in export_hf(bm, want=want):
            if k in k_slot:
                held[k] = v.detach().clone()
            else:
                yield k, v.detach()
    if tied:
        swapped = dict(g)
        for i in tied:
            name = f"{mc_layers}.{i}.self_attention.linear_qkv.weight"
            if name in g:
                swapped[name] = _swap_k_v(g[name], language_model(model).decoder.layers[i].self_attention)
        with _values(model, swapped):
            for k, v in export_hf(bm, want=want):
                if k in held:
                    yield k, held.pop(k) + v.detach()


def loss_on(bm, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Its loss alone on logits ``[b, s, V]`` (whole: at TP > 1 this rank's vocabulary slice of them) as its training
    step computes it from its (language model's) output layer's, the same for its VLM (its language model computes
    the loss its VLM step returns): its data path's shifted labels and loss mask, megatron-core's ``GPTModel.compute_language_model_loss`` (the provider's
    cross-entropy fusion), ``masked_next_token_loss`` and the schedule's division by the token count."""
    from megatron.bridge.training.losses import masked_next_token_loss

    b = batch(labels.masked_fill(labels == -100, 0), labels, None)
    logits = sb(logits, contiguous=True)
    if tp_size() > 1:  # its output layer's logits are vocab-parallel: this rank's slice (the backward gathers them)
        from megatron.core.tensor_parallel.mappings import scatter_to_tensor_model_parallel_region

        logits = scatter_to_tensor_model_parallel_region(logits).contiguous()
    per = language_model(bm.model).compute_language_model_loss(b["labels"].to(logits.device), logits)
    loss_sum, tokens, _ = masked_next_token_loss(b["loss_mask"].to(logits.device), per, check_for_nan_in_loss=False,
                                                 check_for_spiky_loss=False)
    return loss_sum / tokens
