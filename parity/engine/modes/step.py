"""Optimizer step and a short trajectory (train cases): what training does with the gradients.

Both sides start from the same weights and take ``train.steps`` optimizer steps on the case's fixed batch with
the case's AdamW (lr, betas, eps, weight decay on matrices only -- 1-D parameters, norms and scales, take none,
as megatron-core's optimizer and HF's Trainer both leave norms undecayed; gradient-norm clipping): HF with
``torch.optim.AdamW`` on a copy of its model (the reference model stays as it was), the system with its own
optimizer (``System.optimizer_step``).

- ``param_step`` rows: each HF parameter's update of the first step (after minus before) against the system's,
  through its weight export. Adam's first update is ``lr * g / (|g| + eps)``, about ``lr * sign(g)`` whatever
  ``|g|``: an element whose gradient is small against its tensor's largest carries that gradient's round-off
  (about 1e-7 of the largest in fp32) at full weight. So the update is compared where the HF gradient exceeds
  both ``1e3 * eps`` and ``1e-3`` of its tensor's largest (the rest is counted in the row's detail, not gated):
  there a gradient round-off moves the update by less than 1e-6 of itself. An update is read as (after - before)
  of parameters stored in the run's dtype: each side's is known only to one unit in the last place of the
  parameter (an fp32 parameter near 1 holds an update of lr 1e-4 to about 6e-4 of itself), so each element's
  difference beyond that unit (of HF's updated parameter) is what counts: ``rel_l2`` is the norm of those excesses
  over the norm of HF's update. Gated by ``grad_rel_l2``.
- ``trajectory``: the loss and the (pre-clipping) gradient norm of both sides at every step; each step's relative
  difference gated by ``grad_rel_l2`` in an fp32 run, and the loss after the last step. Drawn in the report.
"""
from __future__ import annotations

import copy
import math
import tempfile
from contextlib import contextmanager

import torch

from parity.cases import check_step_layers
from parity.engine.alignment import layer_of, text_layer_of
from parity.engine.compare import metrics
from parity.engine.modes.backward import labels_of
from parity.engine.record import Record
from parity.engine.reference import freeze_outside

MODE = "step"
ROW = "param_step"
SIGN_NOISE = 1e3  # x Adam's eps: below it a gradient element's first update is eps-dominated noise
RELATIVE = 1e-3  # x the tensor's largest gradient: below it round-off weighs on the (sign-like) first update


def param_groups(named, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices decay, 1-D parameters (norms, scales) and biases do not."""
    named = list(named)
    return [{"params": [p for n, p in named if p.ndim >= 2 and not n.endswith(".bias")], "weight_decay": weight_decay},
            {"params": [p for n, p in named if p.ndim < 2 or n.endswith(".bias")], "weight_decay": 0.0}]


def adamw(named, spec) -> torch.optim.Optimizer:
    o = spec.optimizer
    return torch.optim.AdamW(param_groups(named, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps)


class AdamWStep:
    """One optimizer step as both sides' users run it on parameters in the run's dtype: fp32, AdamW on the
    parameters themselves; bf16, megatron-core's mixed precision (``Float16OptimizerWithFloat16Params``): an fp32
    main copy of each parameter in the optimizer, the gradients copied to it in fp32, their global norm clipped there,
    AdamW stepped on it and the result copied (rounded) back into the model's parameter. ``norm``: how a model sharded
    over several ranks gets its global gradient norm (each rank steps its own shards)."""

    def __init__(self, named, spec, norm=None):
        named = list(named)
        self.norm = norm  # (param, main) pairs -> the global gradient norm (a sharded model's: over its ranks)
        self.mixed = any(p.dtype != torch.float32 for _, p in named)
        self.pairs = [(p, p.detach().float().clone().requires_grad_(True) if self.mixed else p) for _, p in named]
        self.optimizer = adamw([(n, m) for (n, _), (_, m) in zip(named, self.pairs)], spec)
        self.clip_grad = spec.optimizer.clip_grad
        self._main = {id(p): m for p, m in self.pairs}

    def main(self, p: torch.Tensor) -> torch.Tensor:
        """The tensor the optimizer steps for parameter ``p`` (itself in fp32, its main copy in bf16)."""
        return self._main[id(p)]

    def step(self) -> float:
        """One step; the model's gradients cleared after. Returns the gradient norm before clipping."""
        if self.mixed:
            for p, main in self.pairs:
                main.grad = None if p.grad is None else p.grad.detach().float()
        if self.norm is None:
            norm = clip([m for _, m in self.pairs], self.clip_grad)
        else:  # the norm over every rank's shards; the clip as torch's and megatron's: max_norm / (norm + 1e-6)
            norm = self.norm(self.pairs)
            if self.clip_grad is not None:
                coeff = torch.clamp(self.clip_grad / (norm + 1e-6), max=1.0)
                for _, m in self.pairs:
                    if m.grad is not None:
                        m.grad.mul_(coeff.to(m.grad.device))
        self.optimizer.step()
        with torch.no_grad():
            for p, main in self.pairs:
                if self.mixed:
                    p.copy_(main)
                    main.grad = None
                p.grad = None
        return float(norm)


def trajectory(ref, model, spec, before: dict) -> dict:
    """``spec.steps`` steps of HF's ``model`` (changed in place) on the case's batch: losses, gradient norms, the
    loss after the last step, where its first gradients are meaningful (``_meaningful``), the parameters before
    (``before``: ``trains_in_place``'s copy) and after it (on the host) -- of the parameters that train (a LoRA case:
    the adapters; the base is frozen, and an optimizer holds only what trains)."""
    labels = labels_of(ref.inputs)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    return _steps(spec, params, lambda: ref.kind.forward_train(model, ref.inputs, labels), labels, before)


def trajectory_fp32(ref, prog, spec, before: dict) -> dict:
    """HF-fp32's trajectory without an fp32 model: the parameters that train held as fp32 masters (what an fp32
    model's would be: each one's bf16 value upcast), AdamW on them, and HF's own forward and backward in fp32 one text
    decoder layer resident at a time (the kind's ``streamed``, as the gradient floors: each layer copied to fp32 when
    the forward reaches it, again when the backward does, ``_recomputed``), each copy made with the masters in place of
    its trained parameters (their gradients land on them). The numbers of the model cast to fp32 in place, at the
    memory of one fp32 layer: at the 26B-A4B shape the cast model was 94 GiB, so a LoRA case needed an H200."""
    from parity.engine.modes.backward import _recomputed

    labels = labels_of(ref.inputs)
    trained = [(k, p) for k, p in ref.model.named_parameters() if p.requires_grad]
    masters = {k: torch.nn.Parameter(p.detach().float().clone()) for k, p in trained}
    memo = {id(p): masters[k] for k, p in trained}  # a tied parameter is one object: each of its places gets the master

    def fp32_copy(module):
        return copy.deepcopy(module, dict(memo)).float()  # the masters are fp32 already: ``float`` keeps them

    def run_copy(module, name, *args, **kwargs):
        if name:  # a text decoder layer: made again in the backward
            def run(args, kwargs, hooked):
                return fp32_copy(module)(*args, **kwargs), lambda: None
            return _recomputed(run, args, kwargs, any(p.requires_grad for p in module.parameters()))
        return fp32_copy(module)(*args, **kwargs)  # everything but the layers (stand-ins here)

    def forward():
        return ref.kind.streamed(ref.model, run_copy, prog, lambda m: ref.kind.forward_train(m, ref.inputs, labels),
                                 label="fp32 trajectory")
    return _steps(spec, masters, forward, labels, before)


def _steps(spec, params: dict, forward, labels, before: dict) -> dict:
    """``spec.steps`` AdamW steps of ``params`` (name -> the tensor stepped); ``forward()``: HF's output and loss."""
    step = AdamWStep(params.items(), spec).step
    losses, norms, meaningful, after = [], [], None, None
    for i in range(spec.steps):
        for p in params.values():
            p.grad = None
        with torch.enable_grad():
            out = forward()
            out.loss.backward()
        if meaningful is None:  # a mask, not the gradient: at 26B half the host memory of the bf16 gradients
            meaningful = {k: _meaningful(p.grad.detach(), spec.optimizer.eps).cpu() for k, p in params.items()
                          if p.grad is not None}
        losses.append(float(out.loss.detach()))
        norms.append(step())
        if after is None:
            after = {k: p.detach().clone().cpu() for k, p in params.items()}
        del out
    with torch.no_grad():
        final = float(forward().loss)
    for p in params.values():
        p.grad = None
    return {"losses": losses, "norms": norms, "final": final, "labels": labels, "meaningful": meaningful,
            "after": after, "before": before}


def in_step_layers(name: str, layers) -> bool:
    """Whether HF parameter ``name`` trains in a step over the text decoder ``layers`` (None: every parameter)."""
    return layers is None or text_layer_of(name) in layers


@contextmanager
def trains_in_place(model, layers):
    """``model`` itself trained, then given back as it was: with ``layers`` only those text decoder layers' parameters
    require gradients (the rest frozen, as a user freezing layers); after, every parameter that trained is restored
    from its copy on the host, gradients cleared, ``requires_grad`` as before. In place rather than a copy: at the
    26B-A4B shape a copy is another 47 GiB of bf16 weights (94 GiB in fp32)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    if layers is not None:
        freeze_outside(model, layers)
    saved = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
    try:
        yield saved  # the trained parameters as they were (a trajectory's ``before``: not read twice)
    finally:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, t in saved.items():
                # a copy (on the host ``to`` would alias the trajectory's ``before``), in the saved dtype (a run in
                # fp32 casts back first)
                params[n].data = t.to(params[n].device, copy=True)
        for p, flag in flags:
            p.grad = None
            p.requires_grad_(flag)


def prepare(ref, prog) -> dict:
    """HF's trajectory on its model in the run's dtype (bf16: fp32 main weights in the optimizer, as megatron's
    mixed-precision optimizer), and the band that gates the system's, step by step: in a bf16 run HF's own
    bf16-vs-fp32 trajectory (``trajectory_fp32``: HF in fp32, plain AdamW); in an fp32 run whose case gives
    ``gates.float32.trajectory_band``, HF against itself on weights one rounding apart (``one_rounding_apart``): a
    model whose training amplifies round-off (Adam's sign-like steps on near-zero gradients) parts from any other
    correct fp32 arithmetic as far. Each trajectory trains HF's model in place (``trains_in_place``: restored after);
    ``train.step_layers``: those text decoder layers only."""
    spec = ref.case.train
    layers = spec.step_layers
    check_step_layers(ref.case, len(ref.text_args.layers))  # a checkpoint's model: known once built
    with trains_in_place(ref.model, layers) as saved:
        out = trajectory(ref, ref.model, spec, before=saved)
    if ref.dtype != "float32":
        with trains_in_place(ref.model, layers) as saved:  # nothing trains in place here: the flags and ``before``
            hf32 = trajectory_fp32(ref, prog, spec, before=saved)
        out["fp32"] = {k: hf32[k] for k in ("losses", "norms", "final", "after")}
        out["band"] = band(out, hf32)
    elif ref.case.gates.float32.trajectory_band is not None and spec.steps > 1:
        twin_model = one_rounding_apart(copy.deepcopy(ref.model), ref.seed)
        with trains_in_place(twin_model, layers) as saved:
            twin = trajectory(ref, twin_model, spec, before=saved)
        out["perturbed"] = {k: twin[k] for k in ("losses", "norms", "final")}
        out["band"] = band(out, twin, first=False)
    return out


def band(a: dict, b: dict, first: bool = True) -> dict:
    """Trajectory ``a``'s relative deviation from ``b``, as an envelope: the largest up to each step (the curves can
    cross, and a deviation near 0 at one step, by chance, is no tighter band). ``first=False``: none at the first
    step (both trajectories start from the same weights there: its loss and gradients are gated by the rows)."""
    rel = lambda x, y: abs(x - y) / max(abs(y), 1e-30)  # noqa: E731
    envelope = lambda xs: [max(xs[: i + 1]) for i in range(len(xs))]  # noqa: E731
    skip = lambda xs: xs if first else [0.0] + xs[1:]  # noqa: E731
    loss = envelope(skip([rel(x, y) for x, y in zip(a["losses"], b["losses"])]))
    return {"loss": loss, "grad_norm": envelope(skip([rel(x, y) for x, y in zip(a["norms"], b["norms"])])),
            "final": max(loss + [rel(a["final"], b["final"])])}


def one_rounding_apart(model, seed: int):
    """``model`` (changed in place) with every floating-point parameter and buffer moved by one unit in its last
    place, up or down at random (seeded): HF's own weights as another correct rounding could have left them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point() and t.numel():
                up = torch.randint(0, 2, t.shape, generator=g).bool().to(t.device)
                inf = torch.tensor(math.inf, dtype=t.dtype, device=t.device)
                t.copy_(torch.where(up, torch.nextafter(t, inf), torch.nextafter(t, -inf)))
    return model


def floors(ref, prog) -> dict[str, float]:
    """bf16 runs: each parameter's first update of HF-fp32 against HF-bf16's, measured as the rows are: both as bf16
    parameters (HF-fp32's parameter after the step rounded to bf16, as the system's and HF-bf16's are stored), beyond
    one unit in the last place, where HF-bf16's gradient is meaningful -- mostly the elements whose gradient's sign
    bf16 flips, which Adam's sign-like first step turns into a full ``2 lr``."""
    hf, dev = ref.extra[MODE], ref.device
    out = {}
    for name in hf["after"]:  # HF-fp32's parameters are read here alone: given back as read (26B: 6.5 GB of host)
        after32 = hf["fp32"]["after"].pop(name, None)
        if after32 is not None:
            before, after, where = _hf_param(hf, name, dev)
            upd32 = after32.to(dev).to(after.dtype).float() - before.float()
            out[f"{ROW}:{name}"] = _beyond_ulp((after - before).float(), upd32, after, where)
    return out


def _hf_param(hf: dict, name: str, dev) -> tuple:
    """HF's parameter ``name`` before and after its first step and where its first gradient is meaningful, on ``dev``
    (the run's device: at the 26B-A4B shape the step's 1.6B parameters took 45 s of host arithmetic)."""
    where = hf["meaningful"].get(name)
    return hf["before"][name].to(dev), hf["after"][name].to(dev), None if where is None else where.to(dev)


def _meaningful(g, eps: float):
    return None if g is None else g.abs() > max(SIGN_NOISE * eps, RELATIVE * float(g.abs().max()))


def clip(params, max_norm: float | None) -> torch.Tensor:
    """The global gradient norm before clipping (and clipped to ``max_norm`` when given)."""
    params = [p for p in params if p.grad is not None]
    if max_norm is None:
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def run(c, prog) -> None:
    hf, sut, ref = c.ref.extra[MODE], c.sut, c.ref
    spec, labels = ref.case.train, hf["labels"].to(ref.device)
    if spec.step_layers is not None:  # the rest frozen before its first backward (only these hold gradients)
        if not callable(getattr(sut, "train_layers", None)):
            raise NotImplementedError(f"{sut.name} has no train_layers: it cannot train a subset of its layers")
        sut.train_layers(spec.step_layers)
    before = _trained(c)
    losses, norms = [], []
    for i in range(spec.steps):
        with torch.enable_grad():
            loss, _ = sut.train_loss(ref.inputs, labels)
            loss.backward()
        losses.append(float(loss.detach()))
        norms.append(float(sut.optimizer_step(spec)))
        if i == 0:
            _updates(c, hf, before, _trained(c))
    with torch.no_grad():
        final = float(sut.train_loss(ref.inputs, labels)[0])
    _trajectory(c, hf, losses, norms, final)


def _trained(c) -> dict[str, torch.Tensor]:
    """The system's trained parameters in HF layout, on the host: its weight export; in a LoRA case its adapter
    export as its users write it (``System.save_adapters``: a peft folder), named as HF's adapted model names them.
    With ``train.step_layers``, those layers' parameters alone (at the 26B-A4B shape the whole export is 47 GiB)."""
    if c.ref.case.lora is None:
        layers = c.ref.case.train.step_layers
        return {k: v.detach().clone().cpu() for k, v in c.sut.export()  # export may hand out the live tensors
                if in_step_layers(k, layers)}
    from parity.engine import adapters as A
    from parity.engine.modes.lora import read_folder

    with tempfile.TemporaryDirectory() as folder:
        c.sut.save_adapters(folder)
        return {A.param_key(k): v.cpu() for k, v in read_folder(folder).items()}


def _updates(c, hf: dict, before: dict, after: dict) -> None:
    base = max((r.order for r in c.records), default=0) + 1
    if c.ref.dtype != "float32":
        return _updates_bf16(c, hf, before, after)
    dev = c.ref.device
    for i, name in enumerate(hf["after"]):
        missing = _not_comparable(c, name, hf["after"][name].shape, before, after)
        if missing:
            m_ = {"cosine": math.nan, "rel_l2": math.inf, "max_abs": math.inf, "detail": missing}
        else:
            hf_before, hf_after, meaningful = _hf_param(hf, name, dev)
            upd = (hf_after - hf_before).float()
            mine = after[name].to(dev).float() - before[name].to(dev).float()
            m_ = metrics(upd, mine, meaningful)
            m_["rel_l2"] = _beyond_ulp(upd, mine, hf_after, meaningful)
            counted = int(meaningful.sum()) if meaningful is not None else upd.numel()
            m_["detail"] = (f"first update over the {counted} of {upd.numel()} elements whose HF gradient exceeds "
                            f"{SIGN_NOISE:g} x eps and {RELATIVE:g} x its largest (Adam's first step is ~lr*sign(g))")
        c.records.append(Record(name=name, megatron_name=None, mode=ROW, kind="param", layer=layer_of(name),
                                order=base + i, gate_class="module", cosine=m_.get("cosine"), rel_l2=m_.get("rel_l2"),
                                max_abs=m_.get("max_abs"), p99_abs=m_.get("p99_abs"),
                                nonfinite=(m_.get("nonfinite_ref", 0), m_.get("nonfinite_test", 0)),
                                detail=m_.get("detail")))


def _not_comparable(c, name: str, shape, before: dict, after: dict) -> str | None:
    """Why the system's update of ``name`` cannot be compared with HF's, of ``shape`` (None: it can)."""
    if name not in after or name not in before:
        return f"{c.sut.name} exports no {name} after the step"
    if tuple(after[name].shape) != tuple(shape) or tuple(before[name].shape) != tuple(shape):
        return f"{c.sut.name} exports {name} as {list(after[name].shape)}, HF's is {list(shape)}"
    return None


def _updates_bf16(c, hf: dict, before: dict, after: dict) -> None:
    """bf16: each parameter's first update, measured as fp32 rows are, against its floor (``floors``) -- reported in
    ``train.first_update``, not gated: a bf16 parameter's first update is 0 or one unit in its last place for most
    elements, and what differs is a handful of sign flips of tiny gradients (Adam's first step is ~lr*sign(g)), too
    few to gate (clean seeds 0-4: floors 0 to 0.14, the system's figures up to 6 x a floor). Training in bf16 is
    judged by its trajectory; its ``step`` verdict is the trajectory's."""
    floors, out, dev = c.ref.floors.get(MODE, {}), {}, c.ref.device
    for name in hf["after"]:
        if not _not_comparable(c, name, hf["after"][name].shape, before, after):
            hf_before, hf_after, where = _hf_param(hf, name, dev)
            mine = after[name].to(dev).float() - before[name].to(dev).float()
            out[name] = {"rel_l2": _beyond_ulp((hf_after - hf_before).float(), mine, hf_after, where),
                         "floor": floors.get(f"{ROW}:{name}")}
    c.sections.setdefault("train", {})["first_update"] = {
        "parameters": out, "gated": False,
        "why": "bf16: the first update of a bf16 parameter differs by a few sign flips of tiny gradients, too few to "
               "gate; the trajectory (loss and gradient norm per step, against HF's own bf16-vs-fp32 band) is"}


def _beyond_ulp(ref: torch.Tensor, test: torch.Tensor, after: torch.Tensor, where) -> float:
    """|| max(0, |test - ref| - ulp(after)) || / ||ref|| over ``where``: update differences beyond what the
    parameters' storage resolves."""
    ulp = torch.nextafter(after.abs(), torch.tensor(math.inf, dtype=after.dtype, device=after.device)) - after.abs()
    excess = ((test.to(ref.device) - ref).abs() - ulp.to(ref.device).float()).clamp_min(0)
    if where is not None:
        where = where.to(ref.device)
        excess, ref = excess[where], ref[where]
    return float(excess.norm() / ref.norm().clamp_min(1e-30))


def _trajectory(c, hf: dict, losses: list, norms: list, final: float) -> None:
    """Each step's loss and gradient norm against HF's (relative difference): fp32, within ``grad_rel_l2`` -- or,
    where the case gives ``trajectory_band``, within that many times HF's own round-off band at that step (``band``),
    never under ``grad_rel_l2``; bf16, within ``floor_multiplier`` x HF's own bf16-vs-fp32 difference at that step +
    ``floor_abs``."""
    gates, dtype = c.ref.case.gates, c.ref.dtype
    rel = lambda a, b: abs(a - b) / max(abs(a), 1e-30)  # noqa: E731
    diffs = {"loss": [rel(a, b) for a, b in zip(hf["losses"], losses)],
             "grad_norm": [rel(a, b) for a, b in zip(hf["norms"], norms)], "final": rel(hf["final"], final)}
    worst = max(diffs["loss"] + diffs["grad_norm"] + [diffs["final"]])
    out = {"steps": len(losses), "hf": {"loss": hf["losses"], "grad_norm": hf["norms"], "final_loss": hf["final"]},
           "system": {"loss": losses, "grad_norm": norms, "final_loss": final}, "rel_diff": diffs,
           "worst_rel_diff": worst, "optimizer": dict(c.ref.case.train.optimizer)}
    spec = c.ref.case.train
    if spec.step_layers is not None:
        out["trains"] = {"layers": list(spec.step_layers), "why": spec.step_layers_why}
    if dtype == "float32" and "band" not in hf:
        out["gate"] = gates.float32.grad_rel_l2
        out["passed"] = worst <= out["gate"]
    else:
        if dtype == "float32":  # HF's own round-off band: HF against itself on weights one rounding apart
            g32 = gates.float32
            limit = lambda b: max(g32.grad_rel_l2, g32.trajectory_band * b)  # noqa: E731
            out["hf_perturbed"] = {"loss": hf["perturbed"]["losses"], "grad_norm": hf["perturbed"]["norms"],
                                   "final_loss": hf["perturbed"]["final"]}
            out["gate_rule"] = (f"each step: relative difference from HF <= the larger of {g32.grad_rel_l2:g} and "
                                f"{g32.trajectory_band:g} x HF's own relative difference from HF on weights one "
                                "rounding apart, up to that step (none at the first step: both start from the same "
                                "weights)")
        else:  # the band of HF's own bf16 trajectory around its fp32 one, step by step
            g = gates.bfloat16
            limit = lambda b: g.floor_multiplier * b + g.floor_abs  # noqa: E731
            out["hf_fp32"] = {"loss": hf["fp32"]["losses"], "grad_norm": hf["fp32"]["norms"],
                              "final_loss": hf["fp32"]["final"]}
            out["gate_rule"] = (f"each step: relative difference from HF-bf16 <= {g.floor_multiplier:g} x HF-bf16's "
                                f"own relative difference from HF-fp32 at that step + {g.floor_abs:g}")
        band = out["band"] = hf["band"]
        out["gate"] = {k: [limit(b) for b in band[k]] for k in ("loss", "grad_norm")} | {"final": limit(band["final"])}
        ratios = [d / limit(b) for k in ("loss", "grad_norm") for d, b in zip(diffs[k], band[k])]
        out["worst_ratio"] = max(ratios + [diffs["final"] / limit(band["final"])])
        out["passed"] = out["worst_ratio"] <= 1.0
        if dtype != "float32":
            c.sections.setdefault("checks", {})["step"] = out["passed"]  # its first updates are reported, not gated
    c.sections.setdefault("checks", {})["trajectory"] = out["passed"]
    c.sections.setdefault("train", {})["trajectory"] = out
