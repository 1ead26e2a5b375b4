"""One VLM parity run: HF ``Gemma4ForConditionalGeneration`` against the Megatron ``Gemma4VLModel``.

The flow mirrors ``run_text`` (build HF, capture, noise floors, build Megatron from the HF state dict,
round trip, end-to-end and isolated comparison, gates) and reuses its helpers. What the VLM adds:

- vision rows: every HF vision module (``parity.bridge.vision.MODULES``: patch embedder, encoder, its
  RoPE, each encoder layer and its submodules, pooler, vision tower, ``embed_vision``) against its Megatron
  twin, in the layouts the table names (real patches only, valid pooled slots only, soft tokens);
- ``merged_embeddings``: the text embeddings after the image scatter (HF computes it inline in
  ``Gemma4Model.forward``; it is the ``inputs_embeds`` its language model receives), against
  ``Gemma4VLModel.image_scatter``;
- mask rows of both stacks: the text masks (sliding with the vision-bidirectional rule, full causal) and
  the vision encoder's padding mask, each side built from raw inputs;
- ``groups``: logits and decoder-layer metrics split by position group: ``text`` tokens, ``image``
  tokens and ``text_after_image`` (text tokens after the first image token of their sequence).

Shared between the sides: only raw inputs (ids, position ids, 2-D padding mask, ``mm_token_type_ids``,
pixel values, image positions). Isolated replay feeds HF's captured *activations* only; masks and RoPE
tables are always Megatron's own.
"""
from __future__ import annotations

import copy
import math
import time
import types
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from parity import megatron_env
from parity.config import TextArgs, check_supported_vlm, config_hash
from parity.engine import gates as G
from parity.engine import metrics as M
from parity.engine.alignment import Align, layer_of, text_rows
from parity.engine.compare import Call, Capture, Ctx, Store, capture_hf, compare_values, hf_value, mc_value, replay, row_record
from parity.engine.run import (DTYPES, Progress, RunSpec, _first_tensor, _floor_value, _isolated_floors, _logits_order,
                               _peak_memory, _roundtrip, _table_rows, _timed, env_info, fp32_isolated, hooked_forward,
                               judge, near_tie_margin, released, weights_for_conversion)
from parity.errors import UserError
from parity.vlm_config import VisionArgs

TEXT_HF = "model.language_model."  # where HF's text model lives inside Gemma4ForConditionalGeneration
VISION_HF = "model."  # prefix of vision_tower / embed_vision
TEXT_MC = "language_model."
VISION_MC = "vision."
MERGED = "merged_embeddings"  # not an HF module: the inputs_embeds HF's language model receives
GROUPS = ("text", "image", "text_after_image")
KL_FLOOR = "__logits_kl_max__"  # key of the logits KL floor among the end-to-end floors


# ---------------------------------------------------------------------------------------------------
# Rows

def vision_kind(layout: str) -> str:
    return f"vision_{layout}"


def is_vision_kind(kind: str) -> bool:
    return kind.startswith("vision_")


def vlm_rows(text_args: TextArgs, vision_args: VisionArgs) -> list[tuple[str, str, Align]]:
    """(HF name, Megatron name inside ``Gemma4VLModel``, Align) for every compared module of the VLM."""
    from parity.bridge.vision import module_rows

    rows = [(hf, VISION_MC + mc, Align(hf, VISION_MC + mc, vision_kind(layout)))
            for hf, mc, layout in module_rows(vision_args.num_layers, VISION_HF)]
    rows.append((MERGED, "image_scatter", Align(MERGED, "image_scatter", "merged")))
    rows += text_rows(text_args, hf_prefix=TEXT_HF, mc_prefix=TEXT_MC)
    return rows


def position_groups(mm_token_type_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """``[b, s]`` bool masks of the real positions of each group: ``text`` (mm type 0, BOI/EOI included),
    ``image`` (type 1) and ``text_after_image`` (text positions with an image token earlier in the sequence)."""
    valid = attention_mask.bool()
    image = mm_token_type_ids == 1
    text = mm_token_type_ids == 0
    seen_image = torch.cumsum(image.long(), dim=-1) > 0
    return {"text": text & valid, "image": image & valid, "text_after_image": text & seen_image & valid}


# ---------------------------------------------------------------------------------------------------
# Building the HF side and the inputs

def build_hf_vlm(spec: RunSpec, dtype: torch.dtype, device: str):
    """HF Gemma4ForConditionalGeneration from the ``tiny_vlm`` builder (random weights) or a local checkpoint."""
    from transformers import Gemma4ForConditionalGeneration

    from parity.engine.randomize import randomize_
    from parity.vlm_config import make_vlm_config, vlm_config_kwargs

    if spec.checkpoint:
        from parity.bridge import io as bio

        info = bio.inspect_folder(spec.checkpoint)  # files, keys, shapes: validated before instantiation
        if info.architecture != "Gemma4ForConditionalGeneration":
            raise UserError(f"{spec.checkpoint}: a {info.architecture} checkpoint, but case {spec.name} is a VLM")
        config, state = bio.load_folder(spec.checkpoint, dtype=dtype, device="cpu")
        check_supported_vlm(config)
        VisionArgs.from_hf(config)
        with torch.device(device):
            model = Gemma4ForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]
        if missing or unexpected:
            raise UserError(f"checkpoint does not fit the config: missing {missing[:3]}, unexpected {unexpected[:3]}")
        return model.eval(), config
    if spec.builder != "tiny_vlm":
        raise UserError(f"unknown VLM model builder {spec.builder!r}")
    try:
        config = make_vlm_config(vlm_config_kwargs(**spec.overrides))
    except TypeError as e:
        raise UserError(f"case {spec.name}: model.overrides: {e}") from None
    check_supported_vlm(config)
    VisionArgs.from_hf(config)  # refuses vision features the Megatron tower lacks
    with torch.device(device):
        model = Gemma4ForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    randomize_(model, seed=spec.seed)
    return model.eval(), config


def _text_runs(images) -> tuple:
    """Text tokens before, between and after the images of each sequence."""
    from parity.engine.vlm_inputs import DEFAULT_TEXT_RUNS

    if [len(s) for s in images] == [len(r) - 1 for r in DEFAULT_TEXT_RUNS]:
        return DEFAULT_TEXT_RUNS
    return tuple(tuple([5 + 2 * j] + [4] * (len(s) - 1) + [6]) for j, s in enumerate(images))


def vlm_inputs(config, spec: RunSpec, device: str) -> dict[str, torch.Tensor]:
    """Raw inputs of the case: its images (``[h, w]`` per image, per sequence), text around them, right
    padding. With ``inputs.seq_len`` every sequence is filled with text up to it, the last one leaving
    ``pad_tail`` padded positions."""
    from parity.engine.inputs import repad
    from parity.engine.vlm_inputs import DEFAULT_IMAGE_SIZES, build_vlm_inputs

    images = tuple(tuple(tuple(hw) for hw in seq) for seq in (spec.images or DEFAULT_IMAGE_SIZES))
    if len(images) != spec.batch:
        raise UserError(f"case {spec.name}: {len(images)} sequences of images but inputs.batch is {spec.batch}")
    runs = [list(r) for r in _text_runs(images)]
    try:
        inputs = build_vlm_inputs(config, seed=spec.seed, image_sizes=images, text_runs=runs)
        if spec.seq_len:
            lengths = inputs["attention_mask"].sum(1).tolist()
            for j, n in enumerate(lengths):
                target = spec.seq_len - (spec.pad_tail if j == len(lengths) - 1 else 0)
                if target < n:
                    raise UserError(f"case {spec.name}: inputs.seq_len {spec.seq_len} (pad_tail {spec.pad_tail}) "
                                    f"is too short for sequence {j}: its images and text need {n} tokens")
                runs[j][-1] += target - n
            inputs = build_vlm_inputs(config, seed=spec.seed, image_sizes=images, text_runs=runs)
            short = spec.seq_len - inputs["input_ids"].shape[1]
            if short > 0:  # every sequence ends in padding
                pad = config.text_config.pad_token_id or 0
                for key, value in (("input_ids", pad), ("attention_mask", 0), ("mm_token_type_ids", 0)):
                    inputs[key] = torch.nn.functional.pad(inputs[key], (0, short), value=value)
                inputs["position_ids"] = torch.arange(spec.seq_len).expand(spec.batch, -1).clone()
    except ValueError as e:  # an image too large for the tiny tower's position tables, ...
        raise UserError(f"case {spec.name}: inputs.images: {e}") from None
    inputs = repad(inputs, spec.padding, spec.position_offset)
    return {k: v.to(device) for k, v in inputs.items()}


# ---------------------------------------------------------------------------------------------------
# Vision layouts, comparison and replay

@dataclass
class VisionCtx:
    positions: torch.Tensor  # [I, N, 2] raw (x, y); (-1, -1) = padding
    padding: torch.Tensor  # [I, N] bool
    cos: torch.Tensor  # Megatron's own axial RoPE tables, from the raw positions
    sin: torch.Tensor
    mask: torch.Tensor  # Megatron's own encoder mask [I, 1, 1, N], True = attend
    device: Any = "cpu"

    @property
    def real(self) -> torch.Tensor:
        return ~self.padding


def vision_ctx(mc_vlm, positions: torch.Tensor, dtype: torch.dtype) -> VisionCtx:
    padding = (positions == -1).all(dim=-1)
    probe = torch.empty(0, dtype=dtype, device=positions.device)
    with torch.no_grad():
        cos, sin = mc_vlm.vision.vision_model.encoder.rotary_emb(probe, positions)
    return VisionCtx(positions=positions, padding=padding, cos=cos, sin=sin, mask=(~padding)[:, None, None, :],
                     device=positions.device)


def _vision_value(layout: str, out: Any) -> torch.Tensor:
    if isinstance(out, dict):  # an HF ModelOutput (the capture store keeps it as a plain dict)
        out = out["last_hidden_state"]
    if layout == "rope":
        return torch.cat([out[0], out[1]], dim=-1)
    return _first_tensor(out)


def _failed(why: str) -> dict:
    return {"cosine": math.nan, "rel_l2": math.inf, "max_abs": math.inf, "detail": why}


def vision_compare(layout: str, ref_out: Any, test_out: Any, vctx: VisionCtx) -> dict:
    """Metrics of one vision module's output (``test``) against the reference, at its layout's real rows."""
    ref, test = _vision_value(layout, ref_out), _vision_value(layout, test_out)
    mask = None
    if layout in ("patches", "rope"):
        mask = vctx.real
    elif layout == "pooled":
        mask = ref_out[1]
        if not torch.equal(mask.to(test_out[1].device), test_out[1]):
            return _failed("pooled valid-slot masks differ")
    if tuple(ref.shape) != tuple(test.shape):
        return _failed(f"shape {tuple(test.shape)} vs {tuple(ref.shape)}")
    test = test.to(ref.device)
    return M.tensor_metrics(ref, test, None if mask is None else mask.to(ref.device))


def _main_input(call: Call) -> torch.Tensor:
    if call.args:
        return call.args[0]
    for key in ("hidden_states", "inputs_embeds", "pixel_values", "x", "input"):
        if key in call.kwargs:
            return call.kwargs[key]
    raise ValueError("no tensor input captured")


def vision_replay(module, call: Call, vctx: VisionCtx) -> Any:
    """The Megatron vision module on the HF module's captured input, with Megatron's own positions-derived
    padding, RoPE tables and mask."""
    from parity.models import vision as V

    x = _main_input(call).to(vctx.device)
    pos, pad = vctx.positions, vctx.padding
    if isinstance(module, V.VisionModel):
        return module(x, pos)
    if isinstance(module, (V.VisionPatchEmbedder, V.VisionEncoder, V.VisionPooler)):
        return module(x, pos, pad)
    if isinstance(module, V.VisionRotaryEmbedding):
        return module(x, pos)
    if isinstance(module, (V.VisionEncoderLayer, V.VisionSelfAttention)):
        return module(x, vctx.cos, vctx.sin, vctx.mask)
    return module(x)


def _vision_mask_row(hf_cap: Capture, vctx: VisionCtx) -> dict | None:
    """HF's encoder mask (as its layers receive it) against Megatron's, at real query rows, every key."""
    name = "model.vision_tower.encoder.layers.0"
    call = hf_cap.first(name)
    if call is None:
        return None
    i, n = vctx.padding.shape
    hf_mask = call.kwargs.get("attention_mask")
    if hf_mask is None:
        ref = torch.ones(i, 1, n, n, dtype=torch.bool, device=vctx.device)
    else:
        hf_mask = hf_mask.to(vctx.device)
        ref = (hf_mask if hf_mask.dtype == torch.bool else hf_mask == 0).expand(i, 1, n, n)
    mine = vctx.mask.expand(i, 1, n, n)
    rows = vctx.real[:, None, :, None].expand(i, 1, n, n)
    diff = int(((ref != mine) & rows).sum())
    m_ = {"cosine": 1.0 if diff == 0 else 0.0, "rel_l2": diff / max(1, int(rows.sum())), "max_abs": float(diff > 0)}
    attn = f"{name}.self_attn"
    rec = row_record(attn, "vision.masks[encoder]", Align(attn, "mask", "mask", gate="exact"), "end_to_end", m_,
                     hf_cap.order.get(f"{attn}.q_proj", hf_cap.order.get(attn, 0)))
    rec["detail"] = f"vision encoder attention mask: {diff} mismatching entries"
    rec["group"] = "vision"
    return rec


# ---------------------------------------------------------------------------------------------------
# Position groups

def _group_metrics(ref: torch.Tensor, test: torch.Tensor, groups: dict[str, torch.Tensor]) -> dict:
    out = {}
    for g, mask in groups.items():
        if not bool(mask.any()):
            out[g] = None
            continue
        m_ = M.tensor_metrics(ref, test.to(ref.device), mask.to(ref.device))
        out[g] = {k: m_[k] for k in ("cosine", "rel_l2", "max_abs", "numel")}
    return out


def _logits_groups(ref: torch.Tensor, test: torch.Tensor, groups: dict[str, torch.Tensor], margin) -> dict:
    keys = ("cosine", "rel_l2", "max_abs", "top1_agreement", "kl_mean", "kl_max", "n_decisive", "n_near_tie",
            "top1_flips_decisive")
    out = {}
    for g, mask in groups.items():
        if not bool(mask.any()):
            out[g] = None
            continue
        s = M.logits_metrics(ref.to(test.device), test, mask.to(test.device), near_tie_margin=margin)
        out[g] = {k: s[k] for k in keys if k in s}
    return out


# ---------------------------------------------------------------------------------------------------
# Capture, floors, comparison

def _merged_pre_hook(cap: Capture, store: Store | None, sink=None):
    """Forward pre-hook on HF's ``model.language_model``: its ``inputs_embeds`` are the merged embeddings."""
    def hook(module, args, kwargs):
        emb = kwargs.get("inputs_embeds")
        if emb is None:
            return
        if sink is not None:
            sink(emb)
            return
        order = len(cap.order) + 1
        cap.order.setdefault(MERGED, order)
        cap.calls.setdefault(MERGED, []).append(Call((), {}, store.keep(emb), order))
    return hook


def _row_floor(kind: str, out32: Any, out16: Any, fctx, vctx: VisionCtx) -> float:
    if is_vision_kind(kind):
        return float(vision_compare(kind[len("vision_"):], out32, out16, vctx)["rel_l2"])
    if kind == "merged":
        return float(M.tensor_metrics(out32, out16.to(out32.device), fctx.valid.to(out32.device))["rel_l2"])
    return _floor_value(kind, out32, out16, fctx)


def fp32_end_to_end_vlm(hf_model, rows, hf_cap: Capture, inputs, valid, vctx: VisionCtx, softcap) -> dict[str, float]:
    """End-to-end noise floors: a full fp32 copy of the (small) HF VLM run on the same raw inputs; each
    aligned module's output is compared at once with the bf16 capture and only the scalar is kept."""
    m32 = copy.deepcopy(hf_model).float()
    kinds = {h: r.kind for h, _, r in rows}
    floors: dict[str, float] = {}
    fctx = types.SimpleNamespace(valid=valid)
    handles = []
    for name, module in m32.named_modules():
        if name in kinds and hf_cap.first(name) is not None:
            def hook(m, a, out, name=name):
                if name not in floors:
                    floors[name] = _row_floor(kinds[name], out, hf_cap.first(name).output, fctx, vctx)
            handles.append(module.register_forward_hook(hook))

    def merged(emb):
        floors.setdefault(MERGED, _row_floor("merged", emb, hf_cap.first(MERGED).output, fctx, vctx))
    handles.append(m32.model.language_model.register_forward_pre_hook(_merged_pre_hook(None, None, merged),
                                                                      with_kwargs=True))
    try:
        with torch.no_grad():
            logits = m32(**inputs, use_cache=False).logits.float()
    finally:
        for h in handles:
            h.remove()
    hf_logits = hf_cap.first("__logits__").output
    floors["logits"] = _floor_value("logits", logits, hf_logits, fctx)
    # per-token KL max of HF-bf16 against HF-fp32: the floor of the logits KL gate
    floors[KL_FLOOR] = float(M.logits_metrics(logits, hf_logits.to(logits.device).float(), valid.to(logits.device))["kl_max"])
    del m32
    return floors


def fp32_isolated_vlm(hf_model, rows, hf_cap: Capture, inputs, valid, vctx: VisionCtx, device, softcap,
                      image_token_id: int) -> dict[str, float]:
    """Isolated noise floors: each HF module in fp32 on its own upcast captured inputs."""
    text = [r for r in rows if not is_vision_kind(r[2].kind) and r[2].kind not in ("logits", "merged")]
    out = _isolated_floors(hf_model, text, hf_cap, valid, device, softcap)
    fctx = types.SimpleNamespace(valid=valid)
    for hf_name, _, row in rows:
        if not is_vision_kind(row.kind) or hf_name in out:
            continue
        call = hf_cap.first(hf_name)
        if call is None:
            continue
        try:
            out[hf_name] = _row_floor(row.kind, fp32_isolated(hf_model, hf_name, call, device), call.output, fctx, vctx)
        except Exception:  # a module that cannot be re-run alone gets no floor: its gate is floor_abs only
            continue
    norm, emb, feats = (hf_cap.first(TEXT_HF + "norm"), hf_cap.first(TEXT_HF + "embed_tokens"),
                        hf_cap.first("model.embed_vision"))
    if norm is not None:  # lm_head in fp32 on the captured final-norm output, then softcap
        logits = _first_tensor(fp32_isolated(hf_model, "lm_head", Call((_first_tensor(norm.output),), {}, None, 0),
                                             device)).float()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        out["logits"] = _floor_value("logits", logits, hf_cap.first("__logits__").output, fctx)
    if emb is not None and feats is not None:  # the scatter of the upcast captured inputs
        mask = (inputs["input_ids"] == image_token_id)[..., None].expand_as(emb.output)
        merged32 = emb.output.float().masked_scatter(mask, feats.output.float())
        out[MERGED] = _row_floor("merged", merged32, hf_cap.first(MERGED).output, fctx, vctx)
    return out


def _end_to_end(mc, rows, hf_cap, hf_logits, inputs, ctx: Ctx, vctx: VisionCtx, records, layer_groups, groups):
    """Megatron VLM forward on the raw inputs; each hooked output is compared at once against HF's."""
    def compare(hf_name, mc_name, row, call, module, out):
        m_ = _compare_row(row.kind, hf_name, call, out, module, ctx, vctx)
        if row.kind == "layer":
            layer_groups.append({"name": hf_name, "mode": "end_to_end", "layer": layer_of(hf_name),
                                 **_group_metrics(hf_value("layer", call),
                                                  mc_value("layer", out, ctx, layer_of(hf_name), module), groups)})
        records.append(_record(hf_name, mc_name, row, "end_to_end", m_, hf_cap))

    logits = hooked_forward(mc, rows, hf_cap, lambda: mc(**_mc_inputs(inputs)), compare)
    logits_row = next(r for h, _, r in rows if h == "logits")
    records.append(_record("logits", "logits", logits_row, "end_to_end",
                           compare_values("logits", hf_logits, logits, ctx), hf_cap))
    return logits


def _compare_row(kind, hf_name, call, out, module, ctx, vctx) -> dict:
    if is_vision_kind(kind):
        return vision_compare(kind[len("vision_"):], call.output, out, vctx)
    if kind == "merged":
        return M.tensor_metrics(call.output, out.to(call.output.device), ctx.valid.to(call.output.device))
    test = mc_value(kind, out, ctx, layer_of(hf_name), module)
    return compare_values(kind, hf_value(kind, call), test, ctx)


def _record(hf_name, mc_name, row, mode, m_, hf_cap) -> dict:
    order = _logits_order(hf_cap) if row.kind == "logits" else hf_cap.order.get(hf_name, 0)
    rec = row_record(hf_name, mc_name, row, mode, m_, order)
    rec["group"] = "vision" if is_vision_kind(row.kind) else "text"
    if m_.get("detail"):
        rec["detail"] = m_["detail"]
    return rec


def _isolated(mc, rows, hf_cap, hf_logits, inputs, ctx: Ctx, vctx: VisionCtx, records, layer_groups, groups):
    """Each Megatron module on the HF module's captured inputs (activations only; masks/RoPE are Megatron's)."""
    modules = dict(mc.named_modules())
    norm = TEXT_HF + "norm"
    for hf_name, mc_name, row in rows:
        kind = row.kind
        with torch.no_grad():
            if kind == "merged":
                emb, feats = hf_cap.first(TEXT_HF + "embed_tokens"), hf_cap.first("model.embed_vision")
                call = hf_cap.first(MERGED)
                if emb is None or feats is None or call is None:
                    continue
                test = mc.image_scatter(emb.output.to(ctx.device), feats.output.to(ctx.device),
                                        inputs["input_ids"] == mc.image_token_id)
                m_ = M.tensor_metrics(call.output, test.to(call.output.device), ctx.valid.to(call.output.device))
            elif is_vision_kind(kind):
                call = hf_cap.first(hf_name)
                if call is None or mc_name not in modules:
                    continue
                m_ = vision_compare(kind[len("vision_"):], call.output, vision_replay(modules[mc_name], call, vctx), vctx)
            else:
                call = hf_cap.first(hf_name if kind != "logits" else norm)
                if call is None:
                    continue
                module = modules.get(mc_name) if kind != "logits" else mc.language_model
                test = replay(kind, module, call, ctx, layer_of(hf_name))
                ref = hf_logits if kind == "logits" else hf_value(kind, call)
                m_ = compare_values(kind, ref, test, ctx)
                if kind == "layer":
                    layer_groups.append({"name": hf_name, "mode": "isolated", "layer": layer_of(hf_name),
                                         **_group_metrics(ref, test, groups)})
        records.append(_record(hf_name, mc_name, row, "isolated", m_, hf_cap))


def _mc_inputs(inputs: dict) -> dict:
    keys = ("input_ids", "pixel_values", "image_position_ids", "attention_mask", "position_ids", "mm_token_type_ids")
    return {k: inputs[k] for k in keys}


def _export(mc_sd: dict, text_args: TextArgs) -> dict:
    """Megatron VLM state dict -> HF ``Gemma4ForConditionalGeneration`` keys (text + vision bridges)."""
    from parity.bridge.convert import megatron_to_hf
    from parity.bridge.vision import megatron_to_hf_vision

    text = {k[len(TEXT_MC):]: v for k, v in mc_sd.items() if k.startswith(TEXT_MC)}
    vision = {k[len(VISION_MC):]: v for k, v in mc_sd.items() if k.startswith(VISION_MC)}
    stray = [k for k in mc_sd if not k.startswith((TEXT_MC, VISION_MC))]
    out = megatron_to_hf(text, text_args, arch="Gemma4ForConditionalGeneration")
    out.update(megatron_to_hf_vision(vision, VISION_HF))
    for k in stray:  # nothing else should carry weights; surfaces as "unexpected key" in the round trip
        out[f"<megatron>{k}"] = mc_sd[k]
    return out


def load_hf_state(mc, hf_state: dict, text_args: TextArgs) -> None:
    """HF VLM state dict -> the Megatron VLM (text and vision bridges), every key accounted for."""
    from parity.bridge.convert import hf_to_megatron
    from parity.bridge.vision import hf_to_megatron_vision

    state = {TEXT_MC + k: v for k, v in hf_to_megatron(hf_state, text_args).items()}
    state.update({VISION_MC + k: v for k, v in hf_to_megatron_vision(hf_state, VISION_HF).items()})
    missing, unexpected = mc.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"bridge/model mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")


# ---------------------------------------------------------------------------------------------------

def run_vlm(spec: RunSpec) -> dict:
    """The whole parity run for a VLM case; returns the results dict (DESIGN.md section 8) plus ``groups``."""
    from parity.models.vlm import Gemma4VLModel

    if spec.tp * spec.ep != 1:
        raise UserError(f"case {spec.name}: VLM runs support tp = ep = 1 only (got tp={spec.tp}, ep={spec.ep})")
    device, dtype = spec.device, DTYPES[spec.dtype]
    prog = Progress(spec.progress)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    megatron_env.init(tp=1, ep=1, seed=spec.seed)
    store = Store(offload=spec.offload)

    with prog.phase("build_hf"):
        hf_model, hf_config = build_hf_vlm(spec, dtype, device)
    text_args = TextArgs.from_hf(hf_config.text_config)
    vision_args = VisionArgs.from_hf(hf_config)
    rows = vlm_rows(text_args, vision_args)
    hf_names = {h for h, _, r in rows if r.kind not in ("logits", "merged")} | {TEXT_HF + "rotary_emb"}
    inputs = vlm_inputs(hf_config, spec, device)
    valid = inputs["attention_mask"].bool()
    groups = position_groups(inputs["mm_token_type_ids"], inputs["attention_mask"])
    softcap = text_args.final_logit_softcapping

    def run_hf(model):
        return model(**inputs, use_cache=False).logits

    timings = {"hf_forward_s": _timed(lambda: run_hf(hf_model), device)}
    with prog.phase("hf_forward"):
        hf_cap = Capture()
        pre = hf_model.model.language_model.register_forward_pre_hook(_merged_pre_hook(hf_cap, store), with_kwargs=True)
        try:
            hf_cap, hf_logits = capture_hf(hf_model, hf_names, lambda: run_hf(hf_model), store, cap=hf_cap)
        finally:
            pre.remove()
        hf_logits = store.keep(hf_logits)
        store.sync()
        hf_cap.calls["__logits__"] = [Call((), {}, hf_logits, 0)]

    with prog.phase("build_megatron"):
        mc = Gemma4VLModel.from_hf_config(hf_config, dtype=dtype, device=device).eval()
    vctx = vision_ctx(mc, inputs["image_position_ids"], dtype)

    floors_e2e: dict[str, float] = {}
    floors_iso: dict[str, float] = {}
    if dtype != torch.float32:
        with prog.phase("noise_floor"):
            floors_e2e = fp32_end_to_end_vlm(hf_model, rows, hf_cap, inputs, valid, vctx, softcap)
        with prog.phase("noise_floor_isolated"):
            floors_iso = fp32_isolated_vlm(hf_model, rows, hf_cap, inputs, valid, vctx, device, softcap,
                                           mc.image_token_id)

    with prog.phase("hf_state_to_host"):
        hf_state, host_weights = weights_for_conversion(hf_model, spec.sequential)
    hf_ref = weakref.ref(hf_model)
    del hf_model  # sequential: the last reference; otherwise ``hf_state`` keeps the weights alive
    hf_released = released(hf_ref, device) if spec.sequential else None

    with prog.phase("convert"):
        load_hf_state(mc, hf_state, text_args)
    with prog.phase("roundtrip"):
        roundtrip = _roundtrip(mc, text_args, hf_state, _export)
    del hf_state
    if host_weights is not None:
        host_weights.close()

    lm = mc.language_model
    b, s = inputs["input_ids"].shape
    ctx = Ctx(batch=b, seq=s, valid=valid, mc_model=lm,
              mc_masks=lm.build_masks(b, s, inputs["attention_mask"], inputs["mm_token_type_ids"], device),
              mc_rope=lm.rotary_tables(inputs["position_ids"]),
              layer_types=[la.layer_type for la in text_args.layers], num_heads=text_args.num_heads,
              layer_shapes=[(la.head_dim, la.num_kv_heads) for la in text_args.layers], device=device)

    timings["megatron_forward_s"] = _timed(lambda: mc(**_mc_inputs(inputs)), device)
    records: list[dict] = []
    layer_groups: list[dict] = []
    with prog.phase("megatron_forward"):
        mc_logits = _end_to_end(mc, rows, hf_cap, hf_logits, inputs, ctx, vctx, records, layer_groups, groups)
    with prog.phase("isolated_replay"):
        _isolated(mc, rows, hf_cap, hf_logits, inputs, ctx, vctx, records, layer_groups, groups)
    with prog.phase("metrics"):
        records += _table_rows(text_args, hf_cap, ctx, inputs, dtype, hf_prefix=TEXT_HF)
        vmask = _vision_mask_row(hf_cap, vctx)
        if vmask is not None:
            records.append(vmask)
        logits_summary, verdict = judge(records, hf_logits, mc_logits, valid, spec, floors_e2e, floors_iso,
                                        floors_e2e.get(KL_FLOOR))
        group_summary = {
            "positions": {g: int(m.sum()) for g, m in groups.items()},
            "logits": _logits_groups(hf_logits, mc_logits, groups, near_tie_margin(spec.dtype)),
            "layers": layer_groups,
        }
    result = G.summarise(records, verdict, logits_summary)
    n_images = int(inputs["pixel_values"].shape[0])
    result.update({
        "case": spec.name, "kind": "vlm", "passed": verdict["passed"], "device": device, "dtype": spec.dtype,
        "seed": spec.seed, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "env": env_info(device),
        "config_hash": config_hash(hf_config), "layer_types": ctx.layer_types,
        "roundtrip": roundtrip, "phases": prog.phases, "timings": timings,
        "peak_memory": {**_peak_memory(device, prog), "gpu_peak_by_phase_gib": prog.gpu_peaks},
        "parallel": {"tp": 1, "ep": 1, "world_size": 1}, "sequential": spec.sequential,
        "hf_released_before_megatron": hf_released, "gates": spec.gates,
        "inputs": {"batch": b, "seq_len": s, "pad_tail": spec.pad_tail, "images": [list(map(list, seq)) for seq in
                   (spec.images or [])], "num_images": n_images,
                   "soft_tokens_per_image": mc.vision.soft_tokens_per_image(inputs["image_position_ids"]),
                   "sliding_window": text_args.sliding_window},
        "groups": group_summary,
    })
    result["checks"]["roundtrip"] = roundtrip["bit_exact"] == roundtrip["tensors"] and roundtrip["tensors"] > 0
    result["passed"] = all(result["checks"].values())
    return result
