"""Isolated backward (train cases): each module's backward alone, on HF's captured input and output gradient.

The backward mode follows one backward end to end: an error there flows into everything before it, and only the
backward order says where it began. Here every module is run alone, as the isolated replay runs it forward: the
system's module (``System.replay``) on HF's captured input, its output given HF's captured output gradient (from
HF's backward, ``backward.hf_backward``); the gradient it sends back to its input(s) and its own parameters'
gradients are compared with HF's module run the same way -- HF's own module on the same input, given the same
output gradient (its own code, in every run). A backward-only error then fails at the module that has it, whatever
follows it.

- ``isolated_grad_input`` rows (named by the HF module path): the gradient with respect to the module's main input;
  a fused system module (``linear_qkv``: q/k/v_proj; ``linear_fc1``: gate/up_proj) runs once with every part's
  output gradient, against the sum of HF's parts' input gradients (under the first part's name). The experts also
  send a gradient back to their routing weights (``<experts>[top_k_weights]``), the router's to its input. The
  logits row (lm_head + the final softcap, inline in HF's model) is given the logits' gradient; HF's side is its
  ``lm_head`` given its own output gradient (the softcap's derivative is HF's backward's). ``loss``: the system's
  loss alone (``System.loss_on``) on HF's logits, its gradient against HF's logits gradient.
- ``isolated_param_grad`` rows: each HF parameter under the smallest aligned module that holds it (named by that
  module's path: ``lm_head.weight`` is the tied head's share of ``model.embed_tokens.weight``), the system's
  gradients brought to HF layout by its weight mapping's adjoint (``System.grads``).

Modules whose parameters all belong to smaller rows (decoder layers, attention, MLP) have input-gradient rows only;
``lm_head`` is the logits row; tables, merged embeddings, the vision RoPE and pooler are not run. A row is ordered
with the module's input gradient in HF's backward (the backward mode's order), after the backward mode's row of the
same module on a tie. fp32 runs: HF's bf16-vs-fp32 floors per isolated module are not measured yet.
"""
from __future__ import annotations

import re

import torch

from parity.engine.alignment import TABLE_KINDS, Aligned, Kind, layer_of
from parity.engine.compare import Call, compare, first, metrics, to_device, upcast, value
from parity.engine.modes.backward import (INPUT, MODE as BACKWARD, OUTPUT, ROUTING as ROUTED, hf_input_key,
                                         param_record)
from parity.engine.progress import memory
from parity.engine.record import Record

MODE = "isolated_backward"
IN, PARAM = "isolated_grad_input", "isolated_param_grad"
SKIP = set(TABLE_KINDS) | {Kind.MERGED, Kind.VISION_ROPE, Kind.POOLED, Kind.LM_HEAD}
ROUTING = "top_k_weights"  # the experts' second differentiable input: the routing weights
LOSS32 = "loss:fp32"  # bf16 runs: the logits' gradient of HF's loss function alone in fp32 (the loss row's truth)


def _rows(rows: list[Aligned]) -> list[Aligned]:
    return [a for a in rows if a.row.kind not in SKIP]


def _hf_module(a: Aligned) -> str:
    return "lm_head" if a.row.kind is Kind.LOGITS else a.hf


def _leaves(call: Call, kind: Kind, device=None) -> tuple[Call, dict[str, torch.Tensor]]:
    """``call`` with its main input (and the experts' routing weights) replaced by fresh leaves requiring grad:
    ``(call, {"": main, "top_k_weights": ...})``; every tensor of it on ``device`` when given (a capture kept on the
    host: a sequential run's token ids, masks and position embeddings as well as its activations)."""
    if device is not None:
        call = Call(to_device(tuple(call.args), device), to_device(dict(call.kwargs), device), call.output, call.order)
    args, kwargs, out = list(call.args), dict(call.kwargs), {}
    keys = [("", hf_input_key(call.args, call.kwargs))] + ([(ROUTING, ROUTING if ROUTING in kwargs else 2)]
                                                           if kind is Kind.EXPERTS else [])
    for label, key in keys:
        x = args[key] if isinstance(key, int) and key < len(args) else kwargs.get(key) if key is not None else None
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            continue
        leaf = x.detach().clone().requires_grad_(True)
        if isinstance(key, int):
            args[key] = leaf
        else:
            kwargs[key] = leaf
        out[label] = leaf
    return Call(tuple(args), kwargs, call.output, call.order), out


def _owned(model, rows: list[Aligned]) -> dict[str, dict[str, str]]:
    """HF module -> {its own parameters' names (under the module's path): canonical HF name}: the parameters of the
    smallest aligned module that holds each (a parameter of a row inside a bigger row is the inner row's)."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    modules = dict(model.named_modules())
    names = {_hf_module(a) for a in _rows(rows) if _hf_module(a) in modules}
    out = {}
    for name in names:
        inner = [n for n in names if n.startswith(name + ".")]
        out[name] = {f"{name}.{k}": canonical[id(p)] for k, p in modules[name].named_parameters()
                     if p.requires_grad and not any(f"{name}.{k}".startswith(n + ".") for n in inner)}  # LoRA: adapters
    return out


def _output_grad(a: Aligned, hf: dict, system: bool = False) -> torch.Tensor | None:
    """HF's captured gradient of row ``a``'s output: of its HF module's output, or (``system``) of what the system's
    replay returns -- the logits row returns the softcapped logits, HF's ``lm_head`` the logits before the cap."""
    grads = hf["grads"].out
    if a.row.kind is Kind.ROUTER:
        return grads.get((ROUTED, a.hf))
    return grads.get((OUTPUT, "logits" if system and a.row.kind is Kind.LOGITS else _hf_module(a)))


def _alone(module, name: str, a: Aligned, call: Call, g: torch.Tensor, own: dict, device, fp32: bool = False
           ) -> dict | None:
    """HF's ``module`` (at HF path ``name``) alone on ``call``'s inputs, given output gradient ``g``: its input gradients
    and its own parameters' gradients (``own``), on ``device``; None where nothing differentiable meets ``g``. It runs
    with its weights on ``device`` (HF's own forward, ``functional_call``: a sequential run's model waits on the
    host, parked on the weights staged for the systems, and only this module's come to the device); ``fp32``: its
    weights, inputs and output gradient upcast (the bf16 floor's and truth's reference)."""
    weights = {}
    for n, t in [*module.named_parameters(), *module.named_buffers()]:
        x = t.detach().to(device)
        x = x.float() if fp32 and x.is_floating_point() else x
        weights[n] = x.requires_grad_(True) if f"{name}.{n}" in own else x
    if fp32:
        call, g = _upcast(call), g.float()
    replayed, leaves = _leaves(call, a.row.kind, device)
    with torch.enable_grad():
        y = torch.func.functional_call(module, weights, tuple(replayed.args), dict(replayed.kwargs))
        y = value(a.row.kind, y)
        y = y["top_w"] if a.row.kind is Kind.ROUTER else first(y)
        if not isinstance(y, torch.Tensor) or not y.requires_grad or y.shape != g.shape:
            return None  # nothing differentiable to give its gradient to (the row is not run)
        wrt = list(leaves.values()) + [weights[n[len(name) + 1:]] for n in own]
        if not wrt:
            return None
        got = torch.autograd.grad(y, wrt, g.to(y.device, y.dtype), allow_unused=True)
    grads = dict(zip(list(leaves) + list(own), got))
    # the parameters' gradients stay where they were computed: compared there with the system's (one layer's at a
    # time), their floor and truth too (on the host, the 26B-A4B experts' were minutes of float64 metrics)
    # (the input gradients too: compared on the device, where each was a host copy and float64 host metrics)
    return {"inputs": {k: None if v is None else v.detach() for k, v in grads.items() if k in leaves},
            "params": {n: None if grads[n] is None else grads[n].detach() for n in own}}


def prepare(ref, prog) -> dict:
    """Where each HF module's rows sit in HF's backward order, its own parameters and what its backward reaches; in a
    bf16 run, HF's loss function alone on its logits in fp32 (``LOSS32``). HF's modules themselves run alone in the
    system's run (``_hf_alone``), a layer's at a time: at the 26B-A4B shape their parameter gradients together are
    another 47 GiB."""
    hf, model, out = ref.extra[BACKWARD], ref.model, {}
    modules, owned = dict(model.named_modules()), _owned(ref.model, ref.rows)
    canonical = {id(p): n for n, p in model.named_parameters()}
    order = hf["grads"].order
    frozen_below = ref.case.train.grad_layers is not None and not ref.case.train.grad_embedding
    for a in _rows(ref.rows):
        name = _hf_module(a)
        if name not in modules or ref.cap.first(name) is None or _output_grad(a, hf) is None or name in out:
            continue
        own = owned.get(name, {})
        key = next((k for k in ((INPUT, name), (OUTPUT, name), (ROUTED, a.hf)) if k in order), None)
        at = order[key] if key else 0
        if frozen_below and key is not None and key[0] != INPUT:  # the first layer with gradients (train.grad_layers):
            # nothing below needs its input's gradient, so HF computed none; its backward ends after its inner rows'
            at = max((order[k] for k in order if k[0] in (INPUT, OUTPUT) and k[1].startswith(name + ".")), default=at)
        params = dict(modules[name].named_parameters(prefix=name))
        out[name] = {"canonical": own, "order": at,
                     # what its backward reaches when it has parameters of its own (smaller rows' too)
                     "claims": {canonical[id(p)] for p in params.values()} if own else set()}
    if ref.dtype != "float32":
        logits = ref.logits.detach().float().clone().requires_grad_(True)
        with torch.enable_grad():
            loss = model.loss_function(logits, hf["labels"].to(logits.device), ref.text_config.vocab_size)
            (g32,) = torch.autograd.grad(loss, [logits])
        out[LOSS32] = g32.detach()
    return out


def _hf_alone(c, a: Aligned) -> dict | None:
    """HF's module of row ``a`` alone (``_alone``) on its captured input and output gradient, in the run's dtype and,
    for a bf16 run, in fp32 (``fp32``); None where it has nothing to run."""
    ref, name = c.ref, _hf_module(a)
    meta = ref.extra[MODE].get(name)
    if meta is None:
        return None
    module = dict(ref.model.named_modules())[name]
    call, g = ref.cap.first(name), _output_grad(a, ref.extra[BACKWARD])
    res = _alone(module, name, a, call, g, meta["canonical"], ref.device)
    if res is not None and ref.dtype != "float32":
        res["fp32"] = _alone(module, name, a, call, g, meta["canonical"], ref.device, fp32=True)
    return None if res is None else {**meta, **res}


def _upcast(call: Call) -> Call:
    return Call(upcast(tuple(call.args)), upcast(dict(call.kwargs)), call.output, call.order)


def _floor_truth(rec: Record, ref32, ref16, test, measure) -> None:
    """A bf16 run: the row's floor (HF-bf16's distance from HF's module in fp32) and truth (the system's)."""
    if ref32 is not None:
        rec.floor = float(measure(ref32.float(), ref16.float())["rel_l2"])
        rec.truth_rel_l2 = float(measure(ref32.float(), test.float())["rel_l2"])


def _groups(c) -> list[list[Aligned]]:
    """Rows run together: a fused system module's parts (one run with every part's output gradient), else one."""
    groups: dict = {}
    for a in _rows(c.rows):
        name = c.replay_name(a)
        key = (name, a.hf.rsplit(".", 1)[0]) if a.row.part is not None else a.hf
        groups.setdefault(key, []).append(a)
    return list(groups.values())


def _batches(groups: list[list[Aligned]], hf: dict) -> list[list[list[Aligned]]]:
    """Groups split so that no HF parameter is reached by two backwards into the parameters in one batch (the tied
    embedding and head; a module with parameters of its own around smaller rows, e.g. the vision patch embedder
    around its input projection), and by layer: a batch runs every group's backward into the system's gradients,
    then reads them once."""
    batches: list[tuple[str | None, set, list]] = []
    for group in groups:
        claims = {n for a in group for n in hf.get(_hf_module(a), {}).get("claims", ())}
        layer = _layer(group[0].hf)
        batch = next((b for b in batches if b[0] == layer and not b[1] & claims), None)
        if batch is None:
            batch = (layer, set(), [])
            batches.append(batch)
        batch[1].update(claims)
        batch[2].append(group)
    return [b[2] for b in batches]


def _layer(name: str) -> str | None:
    """The layer a module belongs to (``model.layers.3``, ``model.vision_tower.encoder.layers.0``), None outside one:
    a batch stays within one, so that HF's and the system's parameter gradients of one layer at a time are held."""
    m = re.match(r"(.*\.layers\.\d+)(\.|$)", name)
    return m.group(1) if m else None


def run(c, prog) -> None:
    hf, sut = c.ref.extra[MODE], c.sut
    base = max(c.cap.order.values(), default=0) + 2  # as the backward mode's rows: after every forward row
    _loss(c, base)
    batches, last = _batches(_groups(c), hf), ""
    for i, batch in enumerate(batches):
        where = _layer(batch[0][0].hf) or "outside the layers"
        if where != last:  # a run killed for memory leaves where it was, and how the host grew, in its log
            prog.note(f"isolated backward: batch {i + 1}/{len(batches)}, {where} ({memory()})")
            last = where
        sut.zero_grad()
        pending = []  # (row, HF's module result, the system's leaves) whose parameters are read after the batch
        for group in batch:
            done = _group(c, group, base)
            if done is not None:
                pending.append(done)
        if not any(ref["params"] for _, ref, _ in pending):
            continue
        need = {ref["canonical"][n] for _, ref, _ in pending for n in ref["params"]}
        try:
            # this batch's gradients in HF layout only (the system's whole export each batch: minutes at full size)
            mine = {k: v for k, v in sut.grads(want=need.__contains__) if k in need}
        except NotImplementedError as e:  # its gradients in HF layout are not modelled here: the inputs' rows stand
            for a, ref, _ in pending:
                for pname in ref["params"]:
                    rec = Record.reported(a, PARAM, c.name(a) if isinstance(c.name(a), str) else None,
                                          f"{sut.name} does not model its gradients in HF layout here yet: {e}")
                    rec.name, rec.layer = pname, layer_of(pname)
                    c.reported.append(rec)
            continue
        for a, ref, _ in pending:
            for pname, g in ref["params"].items():
                _param_row(c, a, pname, g, mine.get(ref["canonical"][pname]), base + 1 + ref["order"],
                           ref["params32"].get(pname))


def _group(c, group: list[Aligned], base: int):
    """HF's modules of ``group`` alone, then the system's module alone on the same captured input, given HF's output
    gradient(s); its input gradient rows recorded. Returns (row, HF's parameter gradients and names, leaves) for the
    parameter rows."""
    a, sut, hf_bwd = group[0], c.sut, c.ref.extra[BACKWARD]
    if not any(_hf_module(p) in c.ref.extra[MODE] for p in group):
        return None
    planned, plan = c.replay_input(a), sut.replays.get(a.row.name_key)
    runs = planned is not None and not (plan is not None and plan.on)  # else: reported below, with the reason
    hf = {}
    for p in group if runs else ():
        res = hf.get(_hf_module(p)) or _hf_alone(c, p)
        if res is not None:
            hf[_hf_module(p)] = res
    parts = [p for p in group if _hf_module(p) in hf] if runs else group
    if not parts:
        return None
    if planned is None:
        c.not_run(a, IN, c.name(a) if isinstance(c.name(a), str) else None,
                  f"{sut.name} has no module to run alone for {a.hf}")
        return None
    name, module, call = planned
    if plan is not None and plan.on:  # run on another row's input: its input gradient is not this row's
        c.not_run(a, IN, name, f"{sut.name} replays {name} on another module's input ({plan.why})")
        return None
    call, leaves = _leaves(call, a.row.kind, c.ref.device)
    outs, grads = [], []
    with torch.enable_grad():
        for part in parts:
            y, g = sut.replay(part, module, call), _output_grad(part, hf_bwd, system=True)
            if a.row.kind is Kind.ROUTER:  # its dense probabilities, what the experts' combine reads; HF's top-k
                top_i = value(Kind.ROUTER, c.cap.first(a.hf).output)["top_i"].to(y["dense"].device)
                y, g = y["dense"], torch.zeros_like(y["dense"]).scatter(1, top_i, g.to(y["dense"]))
            else:
                y = first(value(a.row.kind, y))
            if g is not None and isinstance(y, torch.Tensor) and y.requires_grad:
                outs.append(y)
                grads.append(g.to(y.device, y.dtype))
        if not outs or not (leaves or any(hf[_hf_module(p)]["params"] for p in parts)):
            return None
        for leaf in leaves.values():
            leaf.grad = None
        if any(hf[_hf_module(p)]["params"] for p in parts):  # into the leaves and its parameters (read after the batch)
            torch.autograd.backward(outs, grads)
        elif leaves:  # its parameters are smaller rows' (a decoder layer's): into the leaves only
            for leaf, g in zip(leaves.values(), torch.autograd.grad(outs, list(leaves.values()), grads,
                                                                    allow_unused=True)):
                leaf.grad = g
    order = base + 1 + min(hf[_hf_module(p)]["order"] for p in parts)
    for label, leaf in leaves.items():
        refs = [hf[_hf_module(p)]["inputs"].get(label) for p in parts]
        if any(r is None for r in refs):
            continue
        test = (leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)).detach().to(refs[0].device)
        kind = Kind.EXPERTS if a.row.kind is Kind.ROUTER or label else a.row.kind  # flat tokens
        rec = c.record(a, IN, sum(refs), test, name=name, m_=compare(kind, sum(refs), test, c.where))
        rec.name, rec.order = a.hf if not label else f"{a.hf}[{label}]", order
        refs32 = [(hf[_hf_module(p)].get("fp32") or {}).get("inputs", {}).get(label) for p in parts]
        if refs32 and all(r is not None for r in refs32):
            _floor_truth(rec, sum(refs32), sum(refs), test, lambda x, y: compare(kind, x, y, c.where))
        if len(parts) > 1:
            rec.detail = (f"input gradient of {name}, which computes {', '.join(p.hf.rsplit('.', 1)[1] for p in parts)}"
                          " at once, given each part's output gradient: HF's input gradients of those modules summed")
    return (a, {"params": {n: g for p in parts for n, g in hf[_hf_module(p)]["params"].items()},
                "params32": {n: g for p in parts for n, g in ((hf[_hf_module(p)].get("fp32") or {}).get("params")
                                                                or {}).items()},
                "canonical": {n: cn for p in parts for n, cn in hf[_hf_module(p)]["canonical"].items()},
                "order": order - base - 1}, leaves)


def _param_row(c, a: Aligned, pname: str, ref, mine, order: int, ref32=None) -> None:
    if ref is None:
        return
    rec = param_record(c, pname, ref, mine, order, PARAM, c.name(a) if isinstance(c.name(a), str) else None)
    if mine is not None:
        _floor_truth(rec, ref32, ref, mine.to(ref.device), lambda x, y: metrics(x, y, None))
    c.records.append(rec)


def _loss(c, base: int) -> None:
    """The system's loss alone (``System.loss_on``) on HF's logits: its gradient against HF's logits gradient."""
    hf, sut = c.ref.extra[BACKWARD], c.sut
    g = hf["grads"].out.get((OUTPUT, "logits"))
    if g is None or not callable(getattr(sut, "loss_on", None)):
        return
    logits = c.ref.logits.detach().clone().requires_grad_(True)
    a = next(a for a in c.rows if a.row.kind is Kind.LOGITS)
    try:
        with torch.enable_grad():
            loss = sut.loss_on(logits, hf["labels"].to(logits.device))
            (test,) = torch.autograd.grad(loss, [logits])
    except NotImplementedError as e:  # its loss alone is not modelled for this model: the modules still run alone
        rec = Record.reported(a, IN, getattr(sut, "name", None), f"{getattr(sut, 'name', 'the system')} does not "
                                                                  f"model its loss alone here yet: {e}")
        rec.name, rec.layer, rec.order = "loss", None, base
        c.reported.append(rec)
        return
    rec = c.record(a, IN, g, test.detach().to(g.device), name=getattr(sut, "name", None))
    rec.name, rec.layer, rec.order = "loss", None, base
    if LOSS32 in c.ref.extra[MODE]:  # bf16: against HF's loss function alone on its logits in fp32
        _floor_truth(rec, c.ref.extra[MODE][LOSS32], g, test.detach(), lambda x, y: compare(Kind.LOGITS, x, y, c.where))
    rec.detail = "the system's loss alone on HF's logits: its gradient against HF's loss's (the logits' gradient)"
