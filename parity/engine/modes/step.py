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

import torch

from parity.engine.alignment import layer_of
from parity.engine.compare import metrics
from parity.engine.modes.backward import labels_of
from parity.engine.record import Record

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


def prepare(ref, prog) -> dict:
    """HF's trajectory on a copy of its model: losses, gradient norms, its first gradients and update."""
    spec, inputs, labels = ref.case.train, ref.inputs, labels_of(ref.inputs)
    model = copy.deepcopy(ref.model)
    params = dict(model.named_parameters())
    before = {k: p.detach().clone().cpu() for k, p in params.items()}
    opt = adamw(params.items(), spec)
    losses, norms, first_grads, after = [], [], None, None
    for i in range(spec.steps):
        opt.zero_grad(set_to_none=True)
        with torch.enable_grad():
            out = ref.kind.forward_train(model, inputs, labels)
            out.loss.backward()
        if first_grads is None:
            first_grads = {k: p.grad.detach().clone().cpu() for k, p in params.items() if p.grad is not None}
        norms.append(float(clip(params.values(), spec.optimizer.clip_grad)))
        losses.append(float(out.loss))
        opt.step()
        if after is None:
            after = {k: p.detach().clone().cpu() for k, p in params.items()}
    with torch.no_grad():
        final = float(ref.kind.forward_train(model, inputs, labels).loss)
    del model, opt
    return {"losses": losses, "norms": norms, "final": final, "labels": labels, "grads": first_grads,
            "update": {k: after[k] - before[k] for k in after}, "after": after}


def clip(params, max_norm: float | None) -> torch.Tensor:
    """The global gradient norm before clipping (and clipped to ``max_norm`` when given)."""
    params = [p for p in params if p.grad is not None]
    if max_norm is None:
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def run(c, prog) -> None:
    hf, sut, ref = c.ref.extra[MODE], c.sut, c.ref
    spec, labels = ref.case.train, hf["labels"].to(ref.device)
    before = {k: v.detach().clone().cpu() for k, v in sut.export()}  # export may hand out the live tensors
    losses, norms = [], []
    for i in range(spec.steps):
        with torch.enable_grad():
            loss, _ = sut.train_loss(ref.inputs, labels)
            loss.backward()
        losses.append(float(loss))
        norms.append(float(sut.optimizer_step(spec)))
        if i == 0:
            _updates(c, hf, before, dict(sut.export()))
    with torch.no_grad():
        final = float(sut.train_loss(ref.inputs, labels)[0])
    _trajectory(c, hf, losses, norms, final)


def _updates(c, hf: dict, before: dict, after: dict) -> None:
    base = max((r.order for r in c.records), default=0) + 1
    eps = c.ref.case.train.optimizer.eps
    for i, (name, upd) in enumerate(hf["update"].items()):
        if name not in after or name not in before:
            m_ = {"cosine": math.nan, "rel_l2": math.inf, "max_abs": math.inf,
                  "detail": f"{c.sut.name} exports no {name} after the step"}
            counted = 0
        else:
            mine = (after[name].float().cpu() - before[name].float().cpu())
            g = hf["grads"].get(name)
            meaningful = None if g is None else g.abs() > max(SIGN_NOISE * eps, RELATIVE * float(g.abs().max()))
            m_ = metrics(upd.float(), mine, meaningful)
            m_["rel_l2"] = _beyond_ulp(upd.float(), mine, hf["after"][name], meaningful)
            counted = int(meaningful.sum()) if meaningful is not None else upd.numel()
            m_["detail"] = (f"first update over the {counted} of {upd.numel()} elements whose HF gradient exceeds "
                            f"{SIGN_NOISE:g} x eps and {RELATIVE:g} x its largest (Adam's first step is ~lr*sign(g))")
        c.records.append(Record(name=name, megatron_name=None, mode=ROW, kind="param", layer=layer_of(name),
                                order=base + i, gate_class="module", cosine=m_.get("cosine"), rel_l2=m_.get("rel_l2"),
                                max_abs=m_.get("max_abs"), p99_abs=m_.get("p99_abs"),
                                nonfinite=(m_.get("nonfinite_ref", 0), m_.get("nonfinite_test", 0)),
                                detail=m_.get("detail")))


def _beyond_ulp(ref: torch.Tensor, test: torch.Tensor, after: torch.Tensor, where) -> float:
    """|| max(0, |test - ref| - ulp(after)) || / ||ref|| over ``where``: update differences beyond what the
    parameters' storage resolves."""
    ulp = torch.nextafter(after.abs(), torch.tensor(math.inf, dtype=after.dtype)) - after.abs()
    excess = ((test - ref).abs() - ulp.float()).clamp_min(0)
    if where is not None:
        excess, ref = excess[where], ref[where]
    return float(excess.norm() / ref.norm().clamp_min(1e-30))


def _trajectory(c, hf: dict, losses: list, norms: list, final: float) -> None:
    gate = c.ref.case.gates.float32.grad_rel_l2 if c.ref.dtype == "float32" else None
    rel = lambda a, b: abs(a - b) / max(abs(a), 1e-30)  # noqa: E731
    worst = max([rel(a, b) for a, b in zip(hf["losses"], losses)] + [rel(a, b) for a, b in zip(hf["norms"], norms)]
                + [rel(hf["final"], final)])
    out = {"steps": len(losses), "hf": {"loss": hf["losses"], "grad_norm": hf["norms"], "final_loss": hf["final"]},
           "system": {"loss": losses, "grad_norm": norms, "final_loss": final}, "worst_rel_diff": worst,
           "gate": gate, "optimizer": dict(c.ref.case.train.optimizer)}
    if gate is not None:
        out["passed"] = worst <= gate
        c.sections.setdefault("checks", {})["trajectory"] = out["passed"]
    else:
        out["why_ungated"] = "bf16 train runs: HF's own bf16 trajectory band is not measured yet"
    c.sections.setdefault("train", {})["trajectory"] = out
