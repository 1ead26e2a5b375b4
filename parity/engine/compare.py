"""Capture of the HF side, and the metrics of one aligned pair, by the row's kind.

HF side: forward hooks record what each aligned module *received* and *returned* (offloaded to host when
asked, deduplicated when several modules share one tensor) and the order in which modules returned.
``value`` brings an output to the row's comparison layout (the same on both sides once a system has put
its output in HF layout); ``compare`` measures it where the positions are real.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from parity.engine import metrics as M
from parity.engine.alignment import Aligned, Kind, Stack
from parity.engine.hoststage import HostStage, storage_key


# ---------------------------------------------------------------------------------------------------
# Capture

class Store:
    """Host (or device) copies of captured tensors, deduplicated by storage identity. Offloaded copies go to
    page-locked host memory asynchronously (``parity.engine.hoststage``): ``sync()`` before reading them. With
    ``device_budget`` (bytes) an offloading store keeps device copies while they fit in it: what stays on the
    device costs no page locking, no copy out and none back when compared. Placement is all or nothing: from the
    first capture over the budget on, captures go to the host, and ``settle`` then moves those kept on the device
    there too (a capture is never split between host and device)."""

    def __init__(self, offload: bool, device_budget: int = 0):
        self.offload = offload
        self.device_budget = device_budget
        self.device_bytes = 0  # kept on the device under ``device_budget``
        self.overflowed = False  # a capture did not fit: everything goes to the host (``settle``)
        self._on_device: dict[int, torch.Tensor] = {}  # id -> device copy kept under the budget
        self._seen: dict[tuple, tuple[weakref.ref, torch.Tensor]] = {}
        self._host = None

    def _to_host(self, y: torch.Tensor) -> bool:
        """Whether an offloading store sends ``y`` to the host (else it keeps a device copy within its budget)."""
        n = y.numel() * y.element_size()
        if self.device_budget > 0 and not self.overflowed and self.device_bytes + n <= self.device_budget:
            self.device_bytes += n
            return False
        self.overflowed = self.overflowed or self.device_budget > 0
        return True

    @staticmethod
    def _offloadable(y: torch.Tensor) -> bool:
        return y.is_cuda

    def _put(self, y: torch.Tensor) -> torch.Tensor:
        if self._host is None:
            self._host = HostStage()
        return self._host.put(y)

    def keep(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            key = storage_key(x)
            hit = self._seen.get(key)
            # a freed tensor's address may be reused: check identity; a tensor changed in place since it was kept
            # (HF's audio feed-forward returns its norm's output after ``*=`` and ``+=``) is a new value
            if hit is None or hit[0]() is not x or hit[2] != _version(x):
                y = x.detach()
                if self.offload and self._offloadable(y) and self._to_host(y):
                    y = self._put(y)
                else:
                    y = y.clone()
                    if self.offload and self._offloadable(y):
                        self._on_device[id(y)] = y
                self._seen[key] = (weakref.ref(x), y, _version(x))
            return self._seen[key][1]
        # HF's KV-sharing states are a mapping but not a dict (``KVSharingDict``)
        return tree_map(x, self.keep, Mapping)

    def settle(self, cap: "Capture") -> None:
        """After a capture over the budget: its captures kept on the device go to the host (in place in ``cap``),
        so that every capture is on the host; within the budget nothing moves."""
        if not (self.overflowed and self._on_device):
            self._on_device.clear()  # (only the capture needs them: the store holds no device memory of its own)
            return
        moved: dict[int, torch.Tensor] = {}

        def one(t: torch.Tensor) -> torch.Tensor:
            if id(t) not in self._on_device:
                return t
            if id(t) not in moved:
                moved[id(t)] = self._put(t)
            return moved[id(t)]

        to_host = lambda x: tree_map(x, one, Mapping)  # noqa: E731
        for calls in cap.calls.values():
            for c in calls:
                c.args, c.kwargs, c.output = to_host(c.args), to_host(c.kwargs), to_host(c.output)
        self._seen = {k: (r, to_host(y), v) for k, (r, y, v) in self._seen.items()}
        self._on_device.clear()
        self.device_bytes = 0
        self.sync()

    def sync(self) -> None:
        if self._host is not None:
            self._host.sync()

    @property
    def host_bytes(self) -> int:
        return self._host.staged_bytes if self._host is not None else 0

    def clear(self) -> None:
        self._seen.clear()


def _version(x: torch.Tensor) -> int | None:
    """The tensor's in-place version counter (None for inference tensors, which keep none)."""
    try:
        return x._version
    except RuntimeError:
        return None


@dataclass
class Call:
    args: tuple
    kwargs: dict
    output: Any
    order: int


@dataclass
class Capture:
    calls: dict[str, list[Call]] = field(default_factory=dict)
    order: dict[str, int] = field(default_factory=dict)  # first return order of each module

    def first(self, name: str) -> Call | None:
        calls = self.calls.get(name)
        return calls[0] if calls else None


def input_hooks(model: nn.Module, rows: list[Aligned], sink: Callable[[str, torch.Tensor], None]) -> list:
    """Pre-hooks for rows captured as the ``inputs_embeds`` an HF module receives: ``sink(hf_name, value)``."""
    modules = dict(model.named_modules())
    handles = []
    for a in rows:
        if a.row.input_of in modules:
            def pre(m, args, kwargs, name=a.hf):
                if kwargs.get("inputs_embeds") is not None:
                    sink(name, kwargs["inputs_embeds"])
            handles.append(modules[a.row.input_of].register_forward_pre_hook(pre, with_kwargs=True))
    return handles


def capture_hf(model: nn.Module, rows: list[Aligned], run: Callable[[], Any], store: Store) -> tuple[Capture, Any]:
    """Run ``run()`` with hooks on the HF modules of ``rows`` (and the layers whose masks they compare);
    returns the capture and run()'s result."""
    cap = Capture()
    names = {a.hf for a in rows if a.row.kind not in (Kind.LOGITS, Kind.MERGED)}
    names |= {a.hf.rsplit(".", 1)[0] for a in rows if a.row.kind is Kind.MASK}

    def keep(name, args, kwargs, output):
        order = len(cap.order) + 1
        cap.order.setdefault(name, order)
        cap.calls.setdefault(name, []).append(Call(store.keep(args), store.keep(kwargs), store.keep(output), order))

    handles = input_hooks(model, rows, lambda name, x: keep(name, (), {}, x))
    for name, mod in model.named_modules():
        if name in names:
            handles.append(mod.register_forward_hook(lambda m, a, kw, out, name=name: keep(name, a, kw, out),
                                                     with_kwargs=True))
    try:
        with torch.no_grad():
            result = run()
    finally:
        for h in handles:
            h.remove()
        store.sync()
    return cap, result


# ---------------------------------------------------------------------------------------------------
# One aligned pair: both outputs in the row's layout, measured where positions are real

@dataclass
class Where:
    """Which positions are real, from the raw inputs: tokens ``[b, s]``, vision patches ``[I, N]``."""

    valid: torch.Tensor
    real: torch.Tensor | None = None
    audio: torch.Tensor | None = None  # [clips, frames] real audio frames at the audio tower's output rate
    audio_input: torch.Tensor | None = None  # [clips, mel frames] real frames of the tower's input features


def first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def tree_map(x, fn: Callable[[torch.Tensor], Any], mapping: type = dict):
    """``fn`` on every tensor in ``x`` (nested in tuples, lists and ``mapping``s, a mapping given back as a dict);
    everything else as it is."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, (tuple, list)):
        return type(x)(tree_map(v, fn, mapping) for v in x)
    if isinstance(x, mapping):
        return {k: tree_map(v, fn, mapping) for k, v in x.items()}
    return x


def upcast(x):
    """Floating tensors (in tuples, lists, dicts) in fp32; everything else as it is."""
    return tree_map(x, lambda t: t.float() if t.is_floating_point() else t)


def to_device(x, device):
    return tree_map(x, lambda t: t.to(device))


def value(kind: Kind, out: Any) -> Any:
    """An output (HF's, or a system's already in HF layout) in the comparison layout of ``kind``."""
    if isinstance(out, dict) and "last_hidden_state" in out:  # an HF ModelOutput (the store keeps a plain dict)
        out = out["last_hidden_state"]
    if kind is Kind.ROUTER:
        probs, top_w, top_i = out
        return {"probs": probs, "top_w": top_w, "top_i": top_i}
    if kind is Kind.VISION_ROPE:
        return torch.cat([out[0], out[1]], dim=-1)
    if kind is Kind.POOLED:
        return out
    return first(out)


def failed(why: str) -> dict:
    return {"cosine": math.nan, "rel_l2": math.inf, "max_abs": math.inf, "detail": why}


def device_of(*tensors: torch.Tensor) -> torch.device:
    """Where the metrics of a pair run: on the accelerator when either side is there (a host-staged capture
    goes to it, never the other way round), else on the host."""
    return next((t.device for t in tensors if t.device.type != "cpu"), tensors[0].device)


def metrics(ref: torch.Tensor, test: torch.Tensor, mask: torch.Tensor | None) -> dict:
    """``tensor_metrics`` with both sides (and the mask) on ``device_of(ref, test)``. Shapes that differ are a
    verdict, never an error: with as many elements on both sides the two are compared after a reshape to the
    layout the mask fits (HF's first) and the result says so (``layout``); otherwise the row fails with both
    shapes."""
    dev = device_of(ref, test)
    # host to device only (``device_of``): asynchronous from page-locked captures, the metrics' one read waits for it
    ref, test = ref.to(dev, non_blocking=True), test.to(dev, non_blocking=True)
    mask = None if mask is None else mask.to(dev, non_blocking=True)
    if tuple(ref.shape) == tuple(test.shape):
        if mask is not None and tuple(mask.shape) != tuple(ref.shape[:mask.dim()]):
            mask = _mask_for(ref.shape, mask) if _mask_for(ref.shape, mask) is not None else mask  # flat tokens
        return M.tensor_metrics(ref, test, mask)
    shapes = {"reference": list(ref.shape), "test": list(test.shape)}
    if ref.numel() != test.numel():
        out = failed(f"shape {tuple(test.shape)} against HF's {tuple(ref.shape)}: the element counts differ "
                     f"({test.numel()} vs {ref.numel()})")
        out["layout"] = {**shapes, "compared": None}
        return out
    shape, mask = _reshaped_layout(ref.shape, test.shape, mask)
    out = M.tensor_metrics(ref.reshape(shape), test.reshape(shape), mask)
    out["layout"] = {**shapes, "compared": list(shape)}
    out["detail"] = (f"layout differs: the system's {tuple(test.shape)} against HF's {tuple(ref.shape)}; compared "
                     f"after a reshape to {tuple(shape)}")
    return out


def _mask_for(shape: torch.Size, mask: torch.Tensor) -> torch.Tensor | None:
    """``mask`` over the leading dims of ``shape``, reshaped if its element count is theirs; None if none is."""
    n = 1
    for k, d in enumerate((1, *shape)):
        n *= d
        if n == mask.numel() and k > 0:
            return mask.reshape(tuple(shape[:k]))
    return None


def _reshaped_layout(ref_shape, test_shape, mask):
    """The shape two equal-sized tensors are compared in, and the mask in it: HF's shape when the mask (its
    element count) fits its leading dims, else the system's, else HF's without a mask."""
    if mask is None:
        return tuple(ref_shape), None
    for shape in (ref_shape, test_shape):
        fitted = _mask_for(shape, mask)
        if fitted is not None:
            return tuple(shape), fitted
    return tuple(ref_shape), None


def _router(ref, test, where: Where) -> dict:
    mask = where.valid.reshape(-1)
    dev = device_of(ref["probs"], test["dense"])
    reshaped, test_shape = [], list(test["dense"].shape)
    for key, ref_key in (("top_i", "top_i"), ("top_w", "top_w"), ("dense", "probs")):  # a layout is a verdict
        a, b = ref[ref_key], test[key]
        if tuple(a.shape) != tuple(b.shape):
            if a.numel() != b.numel():
                out = failed(f"router {key}: shape {tuple(b.shape)} against HF's {tuple(a.shape)}: the element "
                             f"counts differ")
                out["layout"] = {"reference": list(a.shape), "test": list(b.shape), "compared": None}
                return out
            reshaped.append(f"{key} {tuple(b.shape)} against HF's {tuple(a.shape)}")
            test = {**test, key: b.reshape(a.shape)}
    ref_dense = torch.zeros_like(ref["probs"], device=dev).scatter(1, ref["top_i"].long().to(dev),
                                                                    ref["top_w"].float().to(dev))
    out = metrics(ref_dense, test["dense"].to(dev, ref_dense.dtype), mask)
    out["router"] = M.router_metrics(ref["top_i"].cpu(), test["top_i"].cpu(), ref["top_w"].cpu(), test["top_w"].cpu(),
                                     mask=mask.cpu(), ref_probs=ref["probs"].cpu())
    out["router"]["num_experts"] = ref["probs"].shape[-1]
    if reshaped:
        out["detail"] = "layout differs: the system's router " + "; ".join(reshaped) + "; compared after a reshape"
        out["layout"] = {"reference": list(ref["probs"].shape), "test": test_shape,
                         "compared": list(ref["probs"].shape)}
    return out


def _vision(mask_of: Callable) -> Callable:
    def measure(ref, test, where: Where) -> dict:
        mask = mask_of(ref, where)
        if isinstance(ref, tuple):  # pooled: (features, valid-slot mask); the masks must agree first
            if not torch.equal(ref[1].to(test[1].device), test[1]):
                return failed("pooled valid-slot masks differ")
            ref, test = ref[0], test[0]
        return metrics(ref, test, mask)  # a shape that differs: compared after a reshape, or failed, said so
    return measure


def _tokens(flat: bool) -> Callable:
    def measure(ref, test, where: Where) -> dict:
        return metrics(ref, test, where.valid.reshape(-1) if flat else where.valid)
    return measure


_BY_TOKEN = _tokens(flat=False)


def _audio_rate(ref, w: Where):
    """The real-frame mask at ``ref``'s frame rate: the tower's output rate, or its input features' (the gradient a
    backward sends to the mel features)."""
    for mask in (w.audio, w.audio_input):
        if mask is not None and ref.dim() >= 2 and tuple(mask.shape) == tuple(ref.shape[:2]):
            return mask
    return w.audio
_MEASURE = {
    Kind.ROUTER: _router,
    Kind.EXPERTS: _tokens(flat=True), Kind.FLAT_NORM: _tokens(flat=True),
    Kind.MERGED: lambda ref, test, w: metrics(ref, test, w.valid),
    Kind.PATCHES: _vision(lambda ref, w: w.real), Kind.VISION_ROPE: _vision(lambda ref, w: w.real),
    Kind.POOLED: _vision(lambda ref, w: ref[1]), Kind.TOKENS: _vision(lambda ref, w: None),
    Kind.AUDIO_FRAMES: lambda ref, test, w: metrics(ref, test, _audio_rate(ref, w)),
    Kind.AUDIO_CONV: lambda ref, test, w: metrics(ref, test, None),
}


def compare(kind: Kind, ref: Any, test: Any, where: Where) -> dict:
    """Metrics of ``test`` against ``ref`` (both in ``kind``'s layout) at the real positions."""
    return _MEASURE.get(kind, _BY_TOKEN)(ref, test, where)


def compare_mask(a: Aligned, hf_mask, mine: torch.Tensor, where: Where) -> dict:
    """A mask row: HF's mask (as its layer receives it; None = plain causal for text, all-visible for vision)
    against the system's, at real query rows over *every* key: a padded key one side lets through must show
    (padded query rows attend to nothing real and are never compared)."""
    if a.row.stack is Stack.AUDIO:
        return _compare_audio_mask(hf_mask, mine, where)
    text = a.row.stack is not Stack.VISION
    rows = where.valid if text else where.real
    n = rows.shape[-1]
    if hf_mask is None:
        ref = torch.ones(n, n, dtype=torch.bool, device=rows.device)
        ref = (ref.tril() if text else ref)[None, None]
    else:
        ref = hf_mask.to(rows.device)
        ref = ref if ref.dtype == torch.bool else ref == 0
    region = rows[:, None, :, None].expand(rows.shape[0], 1, n, n)
    mine = mine.to(rows.device)
    try:
        torch.broadcast_shapes(ref.shape, mine.shape, region.shape)
    except RuntimeError:
        out = failed(f"mask shape {tuple(mine.shape)} against HF's {tuple(ref.shape)} (real rows {tuple(region.shape)})")
        out["layout"] = {"reference": list(ref.shape), "test": list(mine.shape), "compared": None}
        return out
    diff = int(((ref != mine) & region).sum())
    return {"cosine": 1.0 if diff == 0 else 0.0, "rel_l2": diff / max(1, int(region.sum())), "max_abs": float(diff > 0),
            "n": diff}


def _compare_audio_mask(hf_mask, mine: torch.Tensor, where: Where) -> dict:
    """The audio tower's blocked mask ``[clips, 1, blocks, chunk, context]`` (HF's: additive, 0 = attend; the
    system's: True = attend) at the query rows of real frames, over every key of their context."""
    frames = where.audio
    if hf_mask is None or frames is None:
        return failed("no audio attention mask captured" if hf_mask is None else "no audio frames in the inputs")
    ref = hf_mask.to(frames.device)
    ref = ref if ref.dtype == torch.bool else ref == 0
    mine = mine.to(frames.device)
    if tuple(ref.shape) != tuple(mine.shape) or ref.dim() != 5:
        out = failed(f"audio mask shape {tuple(mine.shape)} against HF's {tuple(ref.shape)}")
        out["layout"] = {"reference": list(ref.shape), "test": list(mine.shape), "compared": None}
        return out
    a, _, nb, chunk, _ = ref.shape
    rows = torch.nn.functional.pad(frames, (0, nb * chunk - frames.shape[1])).reshape(a, 1, nb, chunk, 1)
    region = rows.expand_as(ref)
    diff = int(((ref != mine) & region).sum())
    return {"cosine": 1.0 if diff == 0 else 0.0, "rel_l2": diff / max(1, int(region.sum())), "max_abs": float(diff > 0),
            "n": diff}


def compare_rope(hf_call: Call, mine: tuple, where: Where) -> dict:
    cos, sin = hf_call.output
    return metrics(torch.cat([cos, sin], -1), torch.cat(list(mine), -1), where.valid)


def row_record(a: Aligned, mc_name: str, mode: str, m: dict, order: int) -> dict:
    rec = {
        "name": a.hf, "megatron_name": mc_name, "mode": mode, "kind": a.row.label,
        "cosine": m.get("cosine"), "rel_l2": m.get("rel_l2"), "max_abs": m.get("max_abs"),
        "p99_abs": m.get("p99_abs"), "nonfinite": (m.get("nonfinite_ref", 0), m.get("nonfinite_test", 0)),
        "layer": a.layer, "order": order, "gate_class": a.row.gate, "group": a.group(),
    }
    if "router" in m:
        rec["router"] = m["router"]
    if m.get("detail"):
        rec["detail"] = m["detail"]
    return rec


def floor_value(kind: Kind, out32, out16, where: Where) -> float:
    """A noise floor: rel-L2 of the bf16 output against the fp32 one (HF vs HF), in the comparison layout of
    ``kind``."""
    ref, test = value(kind, out32), value(kind, out16)
    if kind is Kind.ROUTER:
        test = {"dense": torch.zeros_like(test["probs"]).scatter(1, test["top_i"], test["top_w"].float()),
                "top_i": test["top_i"], "top_w": test["top_w"]}
        # the routing weights' own error, over the tokens whose top-k sets agree: a flip between HF-bf16 and
        # HF-fp32 moves weight wholesale and would make the floor (and the gate) as large as the flips
        return float(compare(kind, ref, test, where)["router"]["agree_weight_rel_l2"])
    return float(compare(kind, ref, test, where)["rel_l2"])
