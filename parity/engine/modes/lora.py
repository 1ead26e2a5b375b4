"""LoRA: the system's adapter export and its merged export against peft's, tensor by tensor (LoRA cases).

The forward modes compare the adapted models module by module and the backward mode the adapters' gradients; this
mode checks what a user takes away from a fine-tune:

- ``adapter_export`` rows: the system's adapter export as its users write it (``System.save_adapters``: a peft
  adapter folder) against HF's adapters (``parity.engine.adapters``), every tensor accounted for: one row per tensor
  of either side -- missing from the export, exported for a module HF has no adapter on (e.g. a ``v_proj`` of a K=V
  layer, which does not exist), another shape, or other values (bit for bit: an export is a copy). The folder's
  ``adapter_config.json`` (rank, alpha, targets) goes to the section.
- ``adapter_merged`` rows: the system's merged export (``System.merged``) against peft's ``merge_and_unload``, every
  HF weight (those without an adapter bit for bit), gated as modules are.
- ``adapter_logits`` rows: ``export``: peft loading the system's adapter folder onto HF's base model, as a user serves
  it, against the reference (HF with its own adapters); ``merged``: HF's model loaded with the system's merged
  weights against the same. What the loaded export computes against the system's own logits (what the adapters did
  in the system) is in the section.

Rows come after every other row, adapters in HF's module order.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile

import torch

from parity.engine import adapters as A
from parity.engine.alignment import layer_of
from parity.engine.compare import metrics
from parity.engine.record import Record

MODE = "lora"
EXPORT, MERGED, LOGITS = "adapter_export", "adapter_merged", "adapter_logits"
ORDER = 1_000_000  # after every forward and backward row
WORKING = 12 * 2**30  # beside an HF copy on the device, what its forwards add (the 26B LoRA case on an H100, the
# system parked: the mode's peak 60.7 GiB over a 47.1 GiB copy, the run's logits and tables included)


def run(c, prog) -> None:
    ref, sut = c.ref, c.sut
    hf = {k[len(A.FILE_PREFIX):]: v for k, v in ref.adapters.state().items()}
    section = {"targets": list(ref.case.lora.targets), "r": ref.case.lora.r, "alpha": ref.case.lora.alpha,
               "dropout": ref.case.lora.dropout, "scale": ref.case.lora.scale, "hf_modules": ref.adapters.modules(),
               "hf_tensors": len(hf)}
    c.sections["lora"] = section  # filled as it goes (the system may raise in its merged export)
    with tempfile.TemporaryDirectory() as folder:
        sut.save_adapters(folder)
        with _aside(c, section):
            _compare(c, folder, hf, section)


def _compare(c, folder: str, hf: dict, section: dict) -> None:
    """The export's and the merge's rows. The HF copies they need (47 GiB each at full size) are held in ``held``
    alone and let go however this ends: an error the system raises keeps these frames alive in its traceback, and a
    copy kept with them filled the card that the parked system was coming back to (Megatron-Bridge at 26B on an H100,
    whose merged export raises: finding 14)."""
    held: dict = {}
    try:
        _rows_with_copies(c, folder, hf, section, held)
    finally:
        for v in held.values():
            if isinstance(v, dict):
                v.clear()  # a state dict views its model's tensors, and a raising frame may still name the dict
        held.clear()


def _rows_with_copies(c, folder: str, hf: dict, section: dict, held: dict) -> None:
    ref, sut = c.ref, c.sut
    exported = read_folder(folder)
    section["config"] = _config(folder)
    rows = _tensor_rows(c, EXPORT, hf, exported.items(), ORDER, exact=True)
    section["export"] = _counts(rows, hf, exported)
    try:  # an export peft cannot load is a verdict about the export
        held["loaded"] = ref.adapters.load_export(folder, ref.device)
    except Exception as e:  # noqa: BLE001
        section["export_loads"] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        _logits(c, "export", None, ORDER + len(rows), section, why=f"peft cannot load the export: "
                                                                  f"{section['export_loads']}")
    else:
        section["export_loads"] = True
        _logits(c, "export", _forward(ref, held["loaded"]), ORDER + len(rows), section)
    held.clear()  # one HF model beside the system's at a time (at full size each is 47 GiB)
    # peft's merge on a device copy; the system's merged export compared with it one tensor at a time
    held["peft_merged"] = ref.adapters.merged(ref.device)
    held["merged_hf"] = {k: v.detach() for k, v in held["peft_merged"].state_dict().items()}
    if ref.text_args.tie_word_embeddings:
        held["merged_hf"].pop("lm_head.weight", None)
    adapted = set(A.adapted_weight(k) for k in hf)
    merged_sys: dict[str, torch.dtype] = {}
    mrows = _tensor_rows(c, MERGED, held["merged_hf"], _noting(sut.merged(), merged_sys), ORDER + len(rows) + 1,
                         exact=False, changed=adapted)
    section["merged"] = {**_counts(mrows, held["merged_hf"], merged_sys), "adapted_weights": sorted(adapted)}
    against = _forward(ref, held["peft_merged"])
    held["merged_hf"].clear()
    held.clear()
    held["base"] = ref.adapters.base_copy(ref.device)  # HF's model, with the system's merged weights where it has them
    held["own"] = held["base"].state_dict()
    with torch.no_grad():
        for k, v in sut.merged():
            if k in held["own"] and k in merged_sys and tuple(held["own"][k].shape) == tuple(v.shape):
                held["own"][k].copy_(v)
    _logits(c, "merged", _forward(ref, held["base"].eval()), ORDER + len(rows) + 1 + len(mrows), section,
            against=against)


def _aside(c, section: dict):
    """The system's weights parked on the host (its ``parked``) while the mode's HF copies need the card: on a CUDA
    device without room for a copy of HF's model beside the system (at the 26B-A4B shape each is 47 GiB, an 80 GB card
    holds one). Its merged export is then computed where its weights are, on the host; the section says so."""
    parked = getattr(c.sut, "parked", None)
    section["system_parked"] = why = park_reason(c.sut.name, hf_bytes(c.ref.adapters.peft), device_room(c.ref.device),
                                                 parked is not None)
    return parked() if why is not None and parked is not None else contextlib.nullcontext()


def hf_bytes(model) -> int:
    """The bytes of a copy of ``model`` (each tensor once: ties, a fused part's shared A)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def device_room(device) -> int | None:
    """Bytes a new copy can take on ``device``: free, and held by torch's allocator without being in use (None: not
    a CUDA device)."""
    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return None
    return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def park_reason(system: str, need: int, room: int | None, can_park: bool) -> str | None:
    """Why the system's weights leave the device for the mode (None: an HF copy and ``WORKING`` fit beside them)."""
    if room is None or room >= need + WORKING:
        return None
    fit = (f"an HF copy ({need / 2**30:.1f} GiB) and {WORKING / 2**30:.0f} GiB of working memory do not fit the "
           f"device's {room / 2**30:.1f} GiB beside {system}")
    if not can_park:
        return f"{fit}, and {system} has no parked(): its weights stayed"
    return (f"{fit}: its weights went to the host for the HF copies of the adapter export and the merges, and its "
            "merged export was computed there")


def _noting(items, seen: dict):
    """``items`` passed through, each tensor's name and dtype noted in ``seen``."""
    for k, v in items:
        seen[k] = v.dtype
        yield k, v


def _forward(ref, model) -> torch.Tensor:
    with torch.no_grad():
        return ref.kind.forward(model, ref.inputs).float()


def read_folder(folder: str) -> dict[str, torch.Tensor]:
    """A peft adapter folder's tensors, keyed ``<HF module>.lora_A.weight`` (the file's prefix off)."""
    from safetensors.torch import load_file

    path = os.path.join(folder, "adapter_model.safetensors")
    if not os.path.exists(path):
        return {}
    return {k[len(A.FILE_PREFIX):] if k.startswith(A.FILE_PREFIX) else k: v for k, v in load_file(path).items()}


def _config(folder: str) -> dict | None:
    path = os.path.join(folder, "adapter_config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        cfg = json.load(f)
    return {k: cfg.get(k) for k in ("r", "lora_alpha", "lora_dropout", "target_modules", "target_parameters",
                                    "rank_pattern", "alpha_pattern", "use_rslora")}


def _tensor_rows(c, mode: str, ref: dict, test, base: int, exact: bool, changed: set | None = None) -> list[Record]:
    """One row per tensor of either side (``test``: (name, tensor) pairs, each compared as it comes: a merged export
    at full size is the whole model), HF's order first, then the system's extra tensors."""
    rows, extra = {}, []
    for name, b in test:
        if name in rows:
            continue
        rows[name] = rec = Record(name=name, megatron_name=None, mode=mode,
                                  kind="adapter" if ".lora_" in name else "weight", layer=layer_of(name), order=0,
                                  gate_class="exact" if exact or (changed is not None and name not in changed)
                                  else "module")
        a = ref.get(name)
        if a is None:
            rec.missing = (f"exported by {c.sut.name} for a module HF has no adapter on" if mode == EXPORT
                           else f"{c.sut.name}'s merged export has a tensor HF does not")
            extra.append(name)
        elif tuple(a.shape) != tuple(b.shape):
            rec.missing = f"shape {list(b.shape)} in the export, {list(a.shape)} in HF's"
        else:
            m = metrics(a.float(), b.to(a.device).float(), None)
            rec.cosine, rec.rel_l2, rec.max_abs, rec.p99_abs = m["cosine"], m["rel_l2"], m["max_abs"], m.get("p99_abs")
            rec.nonfinite = (m.get("nonfinite_ref", 0), m.get("nonfinite_test", 0))
            if a.dtype != b.dtype:
                rec.detail = f"{str(b.dtype)[6:]} in the export, {str(a.dtype)[6:]} in HF's (values compared as fp32)"
    for name in ref:
        if name not in rows:
            rows[name] = Record(name=name, megatron_name=None, mode=mode,
                                kind="adapter" if ".lora_" in name else "weight", layer=layer_of(name), order=0,
                                gate_class="exact" if exact or (changed is not None and name not in changed)
                                else "module",
                                missing=f"missing from {c.sut.name}'s {'adapter' if mode == EXPORT else 'merged'} "
                                        "export")
    out = [rows[n] for n in ref] + [rows[n] for n in sorted(extra)]
    for i, rec in enumerate(out):
        rec.order = base + i
        if rec.missing:
            rec.cosine, rec.rel_l2, rec.max_abs = math.nan, math.inf, math.inf
    c.records.extend(out)
    return out


def _counts(rows: list[Record], ref: dict, test: dict) -> dict:
    """count, names, shapes, dtypes: what the export holds against HF's (``test``: name -> tensor or dtype)."""
    matched = [r for r in rows if r.name in ref and r.name in test and not r.missing]
    dtype = lambda v: v if isinstance(v, torch.dtype) else v.dtype  # noqa: E731
    return {"hf": len(ref), "exported": len(test), "matched": len(matched),
            "bit_exact": sum(1 for r in matched if r.max_abs == 0.0),
            "missing": sorted(set(ref) - set(test)), "extra": sorted(set(test) - set(ref)),
            "shape_mismatch": [r.name for r in rows if r.missing and r.missing.startswith("shape")],
            "dtypes": {"hf": sorted({str(v.dtype)[6:] for v in ref.values()}),
                       "exported": sorted({str(dtype(v))[6:] for v in test.values()})}}


def _logits(c, what: str, test: torch.Tensor | None, order: int, section: dict, why: str | None = None,
            against: torch.Tensor | None = None) -> None:
    """``what`` (the loaded export, the merged weights): its logits against the reference's (``against``: peft's
    own counterpart's, e.g. its merged model: a merge rounds the weights in bf16), and (in the section) against the
    reference's and the system's own logits; ``why``: there are none (a failing row)."""
    if test is None:
        c.records.append(Record(name=f"logits[{what}]", megatron_name=None, mode=LOGITS, kind="logits", layer=None,
                                order=order, gate_class="module", cosine=math.nan, rel_l2=math.inf,
                                max_abs=math.inf, missing=why))
        section[f"{what}_logits"] = None
        return
    dev = test.device  # the reference's logits may be staged on the host (an offloading run): compared where test is
    ref = (c.ref.logits if against is None else against).to(dev).float()
    valid = c.ref.where.valid.to(dev)
    m = metrics(ref[valid], test[valid], None)
    rec = Record(name=f"logits[{what}]", megatron_name=None, mode=LOGITS, kind="logits", layer=None, order=order,
                 gate_class="module", cosine=m["cosine"], rel_l2=m["rel_l2"], max_abs=m["max_abs"],
                 p99_abs=m.get("p99_abs"), nonfinite=(m.get("nonfinite_ref", 0), m.get("nonfinite_test", 0)),
                 detail=("peft with the system's adapter export on HF's base model, against HF with its adapters"
                         if what == "export" else "HF's model with the system's merged weights, against peft's "
                         "merge_and_unload"))
    c.records.append(rec)
    own = {"vs_peft_rel_l2": m["rel_l2"],
           "vs_reference_rel_l2": metrics(c.ref.logits.to(dev).float()[valid], test[valid], None)["rel_l2"]}
    if c.logits is not None:
        own["vs_system_rel_l2"] = metrics(c.logits.to(dev).float()[valid], test[valid], None)["rel_l2"]
    section[f"{what}_logits"] = own
