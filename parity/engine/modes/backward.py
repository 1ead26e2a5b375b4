"""Backward: one training step's loss and gradients, HF against the system, module by module (train cases).

Both sides get the same raw inputs and the same next-token labels (``labels``: input ids, -100 at padded
positions; each side shifts them as its users do). HF's loss is its model's own ``loss``; the system's is its
own training path (``System.train_loss``: loss function and defaults as its users run it). One backward each,
and every gradient is compared where it is observed:

- ``grad_output`` / ``grad_input`` rows: the gradient with respect to each aligned module's output (all its
  consumers) and the gradient the module alone passes back to its main input (its input is replaced by an alias
  only it consumes), read by tensor hooks during the backward; the system's brought to HF layout by the same
  ``System.output`` as its forward values (``System.input_key`` / ``input_layout`` for inputs). Where a system
  observes a row elsewhere (``System.grad_taps``: a value read at a module's input, a module fused with the HF
  module before it), the row's gradients are read there, or reported with the reason when there is no place.
- ``param_grad`` rows: every HF parameter's gradient against the system's gradient in HF layout
  (``System.grads``: its weight mapping's adjoint -- e.g. on K=V layers HF's ``k_proj`` gradient is the sum of the
  gradients of every place the system copied K into).
- ``loss``: HF's loss against the system's (relative difference), the per-token losses at the positions that
  carry a label (each side's logits through the same cross entropy: a metric, not HF's loss code), and the global
  gradient norms. Gated by ``gates.float32.grad_rel_l2``.

Rows are ordered after every forward row, in HF's backward order (the order its gradients arrived): the first
divergence of a backward-only error is the module whose backward is wrong -- its input or parameter gradient is
the first to fail, while its output gradient still agrees.
"""
from __future__ import annotations

import copy
import fnmatch
import math
from collections.abc import MutableMapping

import torch

from parity.engine.alignment import TABLE_KINDS, Aligned, Kind, layer_of
from parity.engine.compare import compare, first, metrics, to_device, value
from parity.engine.hoststage import HostStage, host_bytes, spill_dir, stage_bytes, trim
from parity.engine.record import Record
from parity.engine.system import Elsewhere, GradTap

MODE = "backward"
LOSS, OUTPUT, INPUT, PARAM = "loss", "grad_output", "grad_input", "param_grad"
ROUTING = "routing"  # a router's routing weights (HF's ``top_k_weights``): read for the isolated backward only
# rows whose gradients are not read here: tables, routers (a discrete top-k; their parameters' gradients are),
# the merged embeddings and the pooler (not plain tensors), the vision RoPE (no gradient), the logits (read apart)
SKIP = set(TABLE_KINDS) | {Kind.ROUTER, Kind.MERGED, Kind.LOGITS, Kind.VISION_ROPE, Kind.POOLED}


def labels_of(inputs: dict) -> torch.Tensor:
    """Causal-LM labels in HF's convention: the input ids, -100 where there is nothing to learn: padding, in a VLM
    the image's soft tokens (as SFT collators mask them), and a token whose predictor is padding (left padding: the
    first real token). The last is the harness's choice, the same on both sides: HF's loss would otherwise count the
    logits of the last padded position, a query with no key to attend to, whose output each implementation defines
    its own way (HF's attention returns zeros there, a system may attend to the position itself) and which no row
    compares; measured on the tiny bf16 train case left-padded, it moved parameter gradients by up to 0.12 while every
    compared row was bit-identical."""
    pad = inputs["attention_mask"] == 0
    ignore = pad.clone()
    ignore[:, 1:] |= pad[:, :-1]
    if "mm_token_type_ids" in inputs:
        ignore = ignore | (inputs["mm_token_type_ids"] != 0)
    return inputs["input_ids"].masked_fill(ignore, -100)


def per_token(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position cross entropy of the next token ``[b, s]`` and where a label exists (``[b, s]`` bool)."""
    target = torch.roll(labels, -1, dims=1)
    target[:, -1] = -100
    where = target != -100
    ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), target.clamp_min(0).flatten(),
                                           reduction="none").view_as(target)
    return ce * where, where


class _Grads:
    """Gradients read during one backward: ``out[(kind, name)]`` in arrival order (``order``)."""

    def __init__(self):
        self.out: dict[tuple[str, str], torch.Tensor] = {}
        self.order: dict[tuple[str, str], int] = {}

    def hook(self, kind: str, name: str, convert=lambda g: g):
        def keep(g):
            if (kind, name) not in self.out:
                self.order[(kind, name)] = len(self.order)
                self.out[(kind, name)] = convert(g.detach())
        return keep


def hf_input_key(args: tuple, kwargs: dict) -> int | str | None:
    """Where an HF module's main input is: its first positional argument, else ``hidden_states`` / ``input``."""
    if args and isinstance(args[0], torch.Tensor):
        return 0
    return next((k for k in ("hidden_states", "input", "x") if isinstance(kwargs.get(k), torch.Tensor)), None)


def _alias_input(key, args: tuple, kwargs: dict, hook, handles: list | None = None):
    """The module's input at ``key`` replaced by an alias only this module consumes, with ``hook`` on its
    gradient: the gradient this module alone passes back to its input (another consumer of the same tensor, a
    residual say, adds nothing to it); the hook's handle appended to ``handles``, where given."""
    x = None if key is None else (args[key] if isinstance(key, int) and key < len(args) else kwargs.get(key))
    if not isinstance(x, torch.Tensor) or not x.requires_grad:
        return None
    y = x.view_as(x)
    h = y.register_hook(hook)
    if handles is not None:
        handles.append(h)
    if isinstance(key, int):
        return args[:key] + (y,) + args[key + 1:], kwargs
    return args, {**kwargs, key: y}


def _rows(rows: list[Aligned]) -> list[Aligned]:
    return [a for a in rows if a.row.kind not in SKIP]


class _Taps:
    """Where HF's gradients are read in a model (or a part of one): every row's output and main input (hooks on its
    module), the routers' routing weights, and the parameters (``param``: what to do with each one's gradient, by
    its HF name; default: kept on ``grads``)."""

    def __init__(self, ref, grads: _Grads, param=None):
        self.grads, self.by_name = grads, {a.hf: a for a in _rows(ref.rows)}
        self.routers = {a.hf for a in ref.rows if a.row.kind is Kind.ROUTER}
        self.param = param or (lambda name, g: grads.hook(PARAM, name)(g))
        # LoRA: the gradient a parameter's row compares (a shared expert adapter's: summed over the experts)
        self.gradient = ref.adapters.gradient if getattr(ref, "adapters", None) is not None else (lambda n, g: g)

    def install(self, model, prefix: str = "", root: bool = True) -> list:
        """Hooks on ``model`` (standing at HF path ``prefix``; ``root``: also on ``model`` itself)."""
        grads, handles = self.grads, []
        for rel, module in model.named_modules():
            if not rel and not root:
                continue
            name = f"{prefix}.{rel}" if prefix and rel else prefix or rel
            if name in self.routers:  # the gradient of its routing weights (``ROUTING``: the isolated backward's)
                def routing(m, args, out, name=name):
                    if isinstance(out[1], torch.Tensor) and out[1].requires_grad:
                        out[1].register_hook(grads.hook(ROUTING, name, lambda g: g.cpu()))
                handles.append(module.register_forward_hook(routing))
            a = self.by_name.get(name)
            if a is None:
                continue

            def pre(m, args, kwargs, a=a):
                return _alias_input(hf_input_key(args, kwargs), args, kwargs,
                                    grads.hook(INPUT, a.hf, lambda g: g.cpu()))

            def fwd(m, args, kwargs, out, a=a):
                y = first(value(a.row.kind, out))
                if isinstance(y, torch.Tensor) and y.requires_grad:
                    y.register_hook(grads.hook(OUTPUT, a.hf, lambda g: g.cpu()))
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(module.register_forward_hook(fwd, with_kwargs=True))
        for rel, p in model.named_parameters():  # LoRA: the adapters (the base frozen)
            if p.requires_grad:
                name = f"{prefix}.{rel}" if prefix else rel
                handles.append(p.register_post_accumulate_grad_hook(
                    lambda p, n=name: self.param(n, self.gradient(n, p.grad))))
        return handles


def hf_backward(ref, model) -> dict:
    """HF's loss, per-token losses, gradients of every row's output and input, parameter gradients of ``model``
    (the reference's model), all on the host; the model's gradients cleared after. On CUDA the parameter gradients
    go to page-locked memory of their exact size (``HostStage``, pinned while the backward runs; its ``stage`` is
    kept with them, for ``release``): through pageable memory 47 GiB at the 26B-A4B shape took most of the phase."""
    labels, grads = labels_of(ref.inputs), _Grads()
    handles = _Taps(ref, grads).install(model)
    params = [p for p in model.parameters() if p.requires_grad]
    spill = spill_dir() if ref.case.run.spill_grads else None  # a file's pages, not host memory (the case says why)
    stage = HostStage(reserve=stage_bytes(params), background=True, spill_dir=spill) \
        if spill is not None or any(p.is_cuda for p in params) else None
    model.zero_grad(set_to_none=True)
    try:
        with torch.enable_grad():
            out = ref.kind.forward_train(model, ref.inputs, labels)
            out.logits.register_hook(grads.hook(OUTPUT, "logits", lambda g: g.cpu()))
            out.loss.backward()
    finally:
        for h in handles:
            h.remove()
    norm = math.sqrt(sum(float(p.grad.float().pow(2).sum()) for p in params if p.grad is not None))
    model.zero_grad(set_to_none=True)
    res = _result(out, labels, grads, norm, stage)
    if spill is not None:
        ref.prog.note(f"backward: HF's parameter gradients {stage.spilled_bytes / 2**30:.1f} GiB in a file in {spill}, "
                      f"{stage.spill_short / 2**30:.1f} GiB in host memory (no room on that disk)")
    return res


def _result(out, labels, grads: _Grads, norm: float, stage: HostStage | None = None) -> dict:
    ce, where = per_token(out.logits.detach(), labels)
    grads.out = {k: stage.put(v) if stage is not None and k[0] == PARAM else v.cpu() for k, v in grads.out.items()}
    if stage is not None:
        stage.sync()
    return {"loss": float(out.loss.detach()), "per_token": ce.cpu(), "where": where.cpu(), "grads": grads, "labels": labels,
            "grad_norm": norm, "stage": stage}


class _Recomputed(torch.autograd.Function):
    """A module's call that keeps no graph: its backward calls it again with grad (``run(args, kwargs, hooked=True)``:
    the module made afresh, its gradient hooks on) and backpropagates through that call -- activation checkpointing
    with the module itself resident only while it runs. ``keys``: where the differentiable ``tensors`` sit among the
    call's arguments (an int: positional; a str: keyword; ``(kwarg, entry, j)``: the j-th tensor of an entry of a
    K/V sharing map, which a KV-shared layer reads). ``stores``: the map's entries the call writes (a layer whose K/V
    later layers reuse), returned after its output so that the layers reading them are in the graph."""

    @staticmethod
    def forward(ctx, run, args, kwargs, keys, stores, *tensors):
        ctx.run, ctx.call, ctx.stores = run, (args, kwargs, keys), stores
        ctx.save_for_backward(*tensors)
        args, kwargs = _placed(args, kwargs, keys, tensors)
        shared = _sharing(kwargs)
        before = dict(shared[1]) if shared else {}
        y, done = run(args, kwargs, hooked=False)
        done()
        if shared:  # the entries it wrote (HF assigns a new tuple): ``stores`` is the caller's list, filled here
            stores += [(entry, j) for entry, held in shared[1].items() if before.get(entry) is not held
                       for j in range(len(held))]
        return (y, *_stored(kwargs, stores))

    @staticmethod
    def backward(ctx, grad, *stored_grads):
        leaves = [t.detach().requires_grad_(True) for t in ctx.saved_tensors]
        with torch.enable_grad():
            args, kwargs = _placed(*ctx.call, leaves)
            y, done = ctx.run(args, kwargs, hooked=True)
            try:
                pairs = [(o, g) for o, g in zip([y, *_stored(kwargs, ctx.stores)], [grad, *stored_grads])
                         if o.requires_grad]
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            finally:
                done()
        return (None, None, None, None, None, *(leaf.grad for leaf in leaves))


def _sharing(kwargs: dict) -> tuple[str, MutableMapping] | None:
    """The K/V sharing map among a layer's keyword arguments (HF's ``shared_kv_states``), if any."""
    return next(((k, v) for k, v in kwargs.items() if isinstance(v, MutableMapping)), None)


def _stored(kwargs: dict, stores: tuple) -> list[torch.Tensor]:
    shared = _sharing(kwargs)
    return [shared[1][entry][j] for entry, j in stores] if shared else []


def _placed(args: tuple, kwargs: dict, keys: tuple, tensors) -> tuple[tuple, dict]:
    args, kwargs = list(args), dict(kwargs)
    for key, t in zip(keys, tensors):
        if key is None:  # the empty stand-in input (``_recomputed``)
            continue
        if isinstance(key, int):
            args[key] = t
        elif isinstance(key, tuple):  # a shared K/V tensor: put in the map the layer reads it from
            kw, entry, j = key
            held = list(kwargs[kw][entry])
            held[j] = t
            kwargs[kw][entry] = tuple(held)
        else:
            kwargs[key] = t
    return tuple(args), kwargs


def _recomputed(run, args: tuple, kwargs: dict, trains: bool):
    """``run``'s call through ``_Recomputed``, the floating tensors that require grad among its arguments its inputs
    (and those of a K/V sharing map's entries, which a KV-shared layer may read); ``trains``: the module has
    parameters that train (a LoRA layer's adapters behind a frozen embedding: its output must still require grad, so
    an empty leaf that does stands in as an input). The map's entries the call writes (its K/V for later layers) are
    put back as outputs of the recomputed call: the gradients of the layers reading them reach it."""
    keys = [k for k, v in [*enumerate(args), *kwargs.items()]
            if isinstance(v, torch.Tensor) and v.is_floating_point() and v.requires_grad]
    shared = _sharing(kwargs)
    if shared is not None:
        kw, kv = shared
        keys += [(kw, entry, j) for entry, held in kv.items() for j, t in enumerate(held)
                 if isinstance(t, torch.Tensor) and t.requires_grad]
    tensors = [args[k] if isinstance(k, int) else kwargs[k] if isinstance(k, str) else kwargs[k[0]][k[1]][k[2]]
               for k in keys]
    if trains and not tensors:
        keys, tensors = [None], [torch.empty(0, requires_grad=True)]
    stores: list = []  # filled by its forward: the map's entries the layer writes
    outs = _Recomputed.apply(run, args, kwargs, tuple(keys), stores, *tensors)
    if stores:
        kv = shared[1]
        for (entry, j), t in zip(stores, outs[1:]):
            held = list(kv[entry])
            held[j] = t
            kv[entry] = tuple(held)
    return outs[0]


def hf_backward_fp32(ref, prog, param) -> dict:
    """HF's backward in fp32, as ``hf_backward`` (loss, per-token losses, every row's output and input gradient on the
    host), one text decoder layer resident at a time (the model kind's ``streamed``: at the 26B-A4B shape an fp32
    copy of the model is 100 GB, its gradients as much again): the forward runs each layer's fp32 copy without
    keeping its graph, the backward makes the copy again and runs it with grad (``_Recomputed``). Each parameter's
    fp32 gradient is handed to ``param(name, grad)`` as it is complete (``grads`` keeps no parameter gradient)."""
    labels, grads, norm2, held = labels_of(ref.inputs), _Grads(), [0.0], []

    def counted(name, g):
        norm2[0] += float(g.float().pow(2).sum())
        param(name, g)
    taps = _Taps(ref, grads, param=counted)

    def run_copy(module, name, *args, **kwargs):
        if name:  # a text decoder layer
            def run(args, kwargs, hooked):
                mod32 = copy.deepcopy(module).float()
                handles = taps.install(mod32, name, root=False) if hooked else []
                return mod32(*args, **kwargs), lambda: [h.remove() for h in handles]
            return _recomputed(run, args, kwargs, any(p.requires_grad for p in module.parameters()))
        shell = copy.deepcopy(module).float()  # everything but the layers, which are stand-ins here
        held.append((shell, taps.install(shell)))
        return shell(*args, **kwargs)

    try:
        with torch.enable_grad():
            out = ref.kind.streamed(ref.model, run_copy, prog,
                                    lambda m: ref.kind.forward_train(m, ref.inputs, labels))
            out.logits.register_hook(grads.hook(OUTPUT, "logits", lambda g: g.cpu()))
            out.loss.backward()
    finally:
        for shell, handles in held:
            for h in handles:
                h.remove()
    held.clear()
    return _result(out, labels, grads, math.sqrt(norm2[0]))


def prepare(ref, prog) -> dict:
    """HF's side in the run's dtype (and, for a bf16 run, ``floors`` adds its fp32 side)."""
    return hf_backward(ref, ref.model)


def floors(ref, prog) -> dict[str, float]:
    """bf16 runs: HF's backward again in fp32 (``hf_backward_fp32``, one layer resident); each gradient row's floor is
    HF-bf16's rel-L2 from it (keyed ``"<row mode>:<name>"``), and the fp32 gradients stay for the truth
    (``extra["backward32"]``) -- a parameter's unless the case's ``train.no_fp32_truth`` names it (host memory at
    full size: its row is then judged by its floor alone, and says why)."""
    hf16, out, kept = ref.extra[MODE], {}, {}
    skip = ref.case.train.no_fp32_truth
    truth = [p for n, p in ref.model.named_parameters() if p.requires_grad and truth_skipped(skip, n) is None]
    # the kept ones page-locked on CUDA, as HF's bf16 ones (fp32: twice the bf16 parameters' bytes)
    stage = HostStage(reserve=2 * stage_bytes(truth), background=True) if any(p.is_cuda for p in truth) else None

    def param(name, g32):
        g16 = hf16["grads"].out.get((PARAM, name))
        if g16 is not None:  # HF's bf16 gradient to fp32 where the fp32 one is (not 2 bytes more a value on the host)
            out[f"{PARAM}:{name}"] = float(metrics(g32.float(), g16.to(g32.device).float(), None)["rel_l2"])
        if truth_skipped(skip, name) is None:
            kept[name] = g32.detach().cpu() if stage is None else stage.put(g32)

    hf32 = ref.extra["backward32"] = hf_backward_fp32(ref, prog, param)
    if stage is not None:
        stage.sync()
    hf32["stage"] = stage
    for name, g in kept.items():
        hf32["grads"].out[(PARAM, name)] = g
    for key, g32 in hf32["grads"].out.items():
        g16 = hf16["grads"].out.get(key)
        if g16 is not None and key[0] in (OUTPUT, INPUT):  # on the device: host metrics of ~3,000 rows took a minute
            out[f"{key[0]}:{key[1]}"] = _rel(ref, key, g32.to(ref.device), g16)
    out[f"{LOSS}:loss"] = loss_error(hf32, hf16["per_token"], hf16["loss"])
    return out


def loss_error(ref: dict, per_token: torch.Tensor, loss: float) -> float:
    """The loss row's number for a side's ``per_token`` losses and mean ``loss`` against ``ref``'s (a
    ``hf_backward`` result): the larger of the per-token losses' rel-L2 at the labelled positions and the means'
    relative difference -- the same statistic for the row, its floor (HF-bf16 against HF-fp32) and its truth."""
    return loss_metrics(ref, per_token, loss)["value"]


def loss_metrics(ref: dict, per_token: torch.Tensor, loss: float) -> dict:
    """``metrics`` of the per-token losses at ``ref``'s labelled positions, with ``rel_diff`` (the means' relative
    difference) and ``value`` (the loss row's number, ``loss_error``)."""
    where = ref["where"].to(per_token.device)
    per = dict(metrics(ref["per_token"].to(per_token.device), per_token, where))
    per["rel_diff"] = abs(loss - ref["loss"]) / max(abs(ref["loss"]), 1e-30)
    per["value"] = max(_num(per["rel_l2"]), per["rel_diff"])
    return per


def truth_skipped(skip: dict, name: str) -> str | None:
    """Why parameter ``name``'s fp32 gradient is not kept for the truth (the pattern of ``train.no_fp32_truth`` it
    matches), or None."""
    return next((why for pattern, why in skip.items() if fnmatch.fnmatchcase(name, pattern)), None)


def _rel(ref, key, g32: torch.Tensor, test: torch.Tensor) -> float:
    """rel-L2 of a gradient against HF-fp32's, at the row's real positions (parameters: every element)."""
    if key[0] == PARAM:
        return float(metrics(g32.float(), test.float(), None)["rel_l2"])
    kind = Kind.LOGITS if key[1] == "logits" else ref.row_kinds[key[1]]
    return float(compare(kind, g32.float(), test.float(), ref.where)["rel_l2"])



class _Site:
    """One system module's gradient hooks: the rows read at its main input (one alias, ``input_key`` of the row
    that first named the module; each converted by ``input_layout``) and at its output (``output``)."""

    def __init__(self, module, path: str, key_row: Aligned):
        self.module, self.path, self.key_row = module, path, key_row
        self.at_input: list[tuple[str, Aligned]] = []  # (OUTPUT or INPUT, row): that gradient of the row
        self.at_output: list[Aligned] = []

    def install(self, sut, grads: _Grads, on_tensors: list) -> list:
        """Its module hooks (their handles returned); the tensor hooks they put on each forward's tensors append their
        handles to ``on_tensors``: those hooks hold the system, and a tensor a module keeps after the mode (a router's
        last output) would keep it alive with them."""
        handles = []
        if self.at_input:
            def pre(m, args, kwargs):
                hooks = [grads.hook(kind, a.hf, lambda g, a=a: sut.input_layout(a, g, m, grad=True)) for kind, a in self.at_input]

                def keep(g):
                    for h in hooks:
                        h(g)
                return _alias_input(sut.input_key(self.key_row, args, kwargs), args, kwargs, keep, on_tensors)
            handles.append(self.module.register_forward_pre_hook(pre, with_kwargs=True))
        if self.at_output:
            def fwd(m, args, kwargs, out):
                y = first(out["last_hidden_state"] if isinstance(out, dict) and "last_hidden_state" in out else out)
                if isinstance(y, torch.Tensor) and y.requires_grad:
                    for a in self.at_output:
                        on_tensors.append(y.register_hook(grads.hook(OUTPUT, a.hf,
                                                                     lambda g, a=a: sut.output(a, g, m, grad=True))))
            handles.append(self.module.register_forward_hook(fwd, with_kwargs=True))
        return handles


def _plan(c) -> tuple[dict[int, _Site], dict[tuple[str, str], tuple[str | None, str]], dict[str, str]]:
    """Where each row's gradients are read in the system's model: ``{id(module): _Site}``; the gradients it has no
    place for, ``{(kind, HF name): (system name or None, why)}``; the module each row's input gradient is read at.
    By ``names`` (output gradient at the module's output, input gradient at its main input), or by the row's
    ``GradTap`` where the system has one (``System.grad_taps``)."""
    sut = c.sut
    taps = getattr(sut, "grad_taps", None) or {}
    sites: dict[int, _Site] = {}
    unseen: dict[tuple[str, str], tuple[str | None, str]] = {}
    input_at: dict[str, str] = {}

    def site(path: str, a: Aligned) -> _Site | None:
        module = sut.module(path)
        return None if module is None else sites.setdefault(id(module), _Site(module, path, a))

    for a in _rows(c.rows):
        name = c.name(a)
        tap = taps.get(a.row.name_key)
        if tap is None:
            if not isinstance(name, str):
                if isinstance(name, Elsewhere):
                    for kind in (OUTPUT, INPUT):
                        unseen[(kind, a.hf)] = (None, f"{name.why}: compared at {c.sibling(a, name.at)}")
                continue
            tap = GradTap()
        own = site(name, a) if isinstance(name, str) else None
        if tap.output is not None and own is not None:
            (own.at_output.append(a) if tap.output == "output" else own.at_input.append((OUTPUT, a)))
        else:
            unseen[(OUTPUT, a.hf)] = (name if isinstance(name, str) else None, tap.why or "not observable")
        where = own if tap.input == "" else None if tap.input is None else site(tap.input.format(**a.slots), a)
        if where is not None:
            where.at_input.append((INPUT, a))
            input_at[a.hf] = name if tap.input == "" else tap.input.format(**a.slots)
        else:
            unseen[(INPUT, a.hf)] = (name if isinstance(name, str) else None, tap.why or "not observable")
    return sites, unseen, input_at


def run(c, prog) -> None:
    """The system's training forward and backward on the same inputs and labels, compared with HF's; the last system's
    run (``Reference.final``) then lets go of what only this mode reads of HF's side, also when the system raised (and
    of the output gradients too where no isolated backward follows: a LoRA case's, or a system without one)."""
    try:
        _run(c)
    finally:
        if c.ref.final:
            from parity.engine import modes as M

            iso = M.get("isolated_backward")
            why = None if iso is None else iso.why_not(c.ref.case, c.ref.dtype, c.sut)
            freed = release(c.ref, outputs=why is not None)
            prog.note(f"backward: HF's parameter and input gradients and its fp32 side released"
                      f"{'' if why is None else f', and its output gradients ({why})'} ({freed / 2**30:.2f} GiB)")


def _run(c) -> None:
    grads = _Grads()
    try:
        _measure(c, grads)
    finally:  # the hooks that filled it may outlive the mode: a Megatron router or MoE dispatcher keeps its last
        # output with its graph, the graph its tensors' hooks, and they this (at 26B-A4B 10 GiB of the system's
        # gradients stayed on the device, and the optimizer step's forward then ran out of an 80 GB card)
        grads.out.clear()


def _measure(c, grads: _Grads) -> None:
    hf, sut, ref = c.ref.extra[MODE], c.sut, c.ref
    handles, on_tensors = [], []
    sites, unseen, input_at = _plan(c)
    for s in sites.values():
        handles += s.install(sut, grads, on_tensors)
    try:
        with torch.enable_grad():
            loss, logits = sut.train_loss(ref.inputs, hf["labels"].to(ref.device))
            logits.register_hook(grads.hook(OUTPUT, "logits"))
            loss.backward()
    finally:  # the tensor hooks too: they hold the system, and a tensor its model keeps (a router's last output)
        # would hold it past the run (a 26B plant run whose next mode raised kept ~30 GiB on the device so)
        for h in handles + on_tensors:
            h.remove()
    base = max(c.cap.order.values(), default=0) + 2  # after every forward row (the logits: the last + 1)
    fused: dict[str, list[Aligned]] = {}  # system module -> the HF rows it computes at once (q/k/v, gate/up)
    for a in _rows(c.rows):
        for kind in (OUTPUT, INPUT):
            if (kind, a.hf) in unseen:
                if (kind, a.hf) in hf["grads"].out:
                    c.not_run(a, kind, *unseen[(kind, a.hf)])
            elif kind == INPUT and a.row.part is not None and input_at.get(a.hf) == c.name(a):
                fused.setdefault(input_at[a.hf], []).append(a)
            else:
                _record(c, a, kind, hf["grads"], grads, base, input_at.get(a.hf) if kind == INPUT else None)
    for name, parts in fused.items():  # one input for all parts: HF's input gradients of its modules summed
        _record_fused(c, name, parts, hf["grads"], grads, base)
    logits_row = next(a for a in c.rows if a.row.kind is Kind.LOGITS)
    _record(c, logits_row, OUTPUT, hf["grads"], grads, base)
    n_sys = _param_rows(c, hf["grads"], base)
    ce, where = per_token(logits.detach(), hf["labels"].to(logits.device))
    value = float(loss.detach())  # the system's mean loss
    per = loss_metrics(hf, ce, value)
    rel = per["rel_diff"]
    gate = c.ref.case.gates.float32.grad_rel_l2 if c.ref.dtype == "float32" else None  # bf16: no floor yet
    section = {"hf": hf["loss"], "system": value, "rel_diff": rel, "tokens": int(where.sum()),
               "per_token": {k: per[k] for k in ("cosine", "rel_l2", "max_abs")},
               "grad_norm": {"hf": hf["grad_norm"], "system": n_sys,
                             "rel_diff": abs(n_sys - hf["grad_norm"]) / max(hf["grad_norm"], 1e-30)},
               "gate": gate}
    # the loss as the first backward row: the per-token losses at the positions with a label, and the scalar
    c.records.append(Record(name="loss", megatron_name=sut.name, mode=LOSS, kind="loss", layer=None, order=base,
                            gate_class="module", cosine=per["cosine"], rel_l2=per["value"],
                            max_abs=per["max_abs"], p99_abs=per.get("p99_abs"),
                            nonfinite=(per.get("nonfinite_ref", 0), per.get("nonfinite_test", 0)),
                            detail=f"HF {hf['loss']:.7g}, {sut.name} {value:.7g} (relative difference {rel:.3g}); "
                                   f"rel-L2 of the per-token losses at the {int(where.sum())} labelled positions "
                                   f"{_num(per['rel_l2']):.3g}"))
    hf32 = c.ref.extra.get("backward32")
    if hf32 is not None:  # bf16: the system's per-token losses and mean against HF's in fp32 (the truth gate)
        c.records[-1].truth_rel_l2 = loss_error(hf32, ce, value)
    if gate is not None:
        section["passed"] = rel <= gate and _num(per["rel_l2"]) <= gate
        c.sections.setdefault("checks", {})["loss"] = section["passed"]
    else:
        section["why_ungated"] = ("a bf16 run: the loss row is gated against HF's own bf16-vs-fp32 loss difference "
                                  "(its floor) with the gradient rows")
    spec = c.ref.case.train
    c.sections["train"] = {"loss": section, "labels": "causal: input ids, -100 at padding; each side shifts them",
                           "system_loss": getattr(sut, "loss_description", None),
                           "overrides": dict(spec.overrides),
                           **({"grad_layers": {"layers": list(spec.grad_layers), "why": spec.grad_layers_why,
                                               **({"embedding": True} if spec.grad_embedding else {})}}
                              if spec.grad_layers is not None else {})}


def release(ref, outputs: bool = False) -> int:
    """What of HF's side only the backward mode reads, dropped (``Reference.final``: no other system's backward
    follows): HF's parameter gradients (their page-locked stage unpinned) and its rows' input gradients, and the
    whole fp32 side (``backward32``: its gradients, kept for the truth). The isolated backward runs HF's modules alone
    itself and reads only the output gradients (and the routing weights'); ``outputs``: none follows, those go too
    (the 26B LoRA case: 8.4 GiB of host memory, where parking the system took the host to 123.5 GiB of 125). At the
    26B-A4B shape 47 GiB of bf16 and 6 GiB of fp32 parameter gradients: the host's headroom for the isolated backward.
    Returns the bytes let go."""
    hf = ref.extra[MODE]
    dropped = [k for k in hf["grads"].out if outputs or k[0] in (PARAM, INPUT)]
    freed = host_bytes([hf["grads"].out[k] for k in dropped])
    for k in dropped:
        del hf["grads"].out[k]
    hf32 = ref.extra.pop("backward32", None)
    if hf32 is not None:
        freed += host_bytes(list(hf32["grads"].out.values()))
        hf32["grads"].out.clear()
    for stage in (hf.pop("stage", None), None if hf32 is None else hf32.pop("stage", None)):
        if stage is not None:
            stage.close()
    trim()
    return freed


def _param_rows(c, hf_grads: _Grads, base: int) -> float:
    """A ``param_grad`` row per HF parameter: the system's gradients (``System.grads``, HF layout) taken one at a
    time, each compared where it is (at full size the system's gradients brought to HF layout all at once would be
    another copy of the model's). Returns the system's global gradient norm over the parameters HF has, each once, as
    HF's is: a LoRA adapter's A shared by a fused linear's parts is one parameter in HF and comes from the system as
    each part's ``lora_A`` (counting every copy put the 26B LoRA case's norm 52 % above HF's, where its first
    optimizer step's norm, over what the system trains, is 4e-4 from it)."""
    ref = {pname: g for (kind, pname), g in hf_grads.out.items() if kind == PARAM}
    done, norm2 = {}, 0.0
    for pname, mine in c.sut.grads():
        if pname in ref and pname not in done:
            norm2 += float(mine.float().pow(2).sum())
            done[pname] = _param_record(c, pname, ref[pname], mine, base + 1 + hf_grads.order[(PARAM, pname)])
    for pname, g in ref.items():  # in HF's order
        c.records.append(done.get(pname) or _param_record(c, pname, g, None, base + 1 + hf_grads.order[(PARAM, pname)]))
    return math.sqrt(norm2)


def _param_record(c, pname: str, g: torch.Tensor, mine, order: int) -> Record:
    rec = param_record(c, pname, g, mine, order)
    if mine is not None:
        _truth(c, rec, (PARAM, pname), mine)
    return rec


def param_record(c, pname: str, g: torch.Tensor, mine, order: int, mode: str = PARAM,
                 megatron_name: str | None = None) -> Record:
    """A parameter's gradient row: the system's gradient ``mine`` (None: it has none) against HF's ``g``, compared on
    the system's device (``metrics`` moves HF's there); floors and truth are the caller's."""
    m_ = {"detail": f"{c.sut.name} has no gradient for {pname}"} if mine is None else \
        metrics(g.to(mine.device).float(), mine.float(), None)  # HF's bf16 to fp32 on the system's device
    if mine is None:
        m_.update(cosine=math.nan, rel_l2=math.inf, max_abs=math.inf)
    return Record(name=pname, megatron_name=megatron_name, mode=mode, kind="param", layer=layer_of(pname),
                  order=order, gate_class="module", cosine=m_.get("cosine"), rel_l2=m_.get("rel_l2"),
                  max_abs=m_.get("max_abs"), p99_abs=m_.get("p99_abs"),
                  nonfinite=(m_.get("nonfinite_ref", 0), m_.get("nonfinite_test", 0)), detail=m_.get("detail"))


def _num(x) -> float:
    return math.inf if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _record_fused(c, name: str, parts: list[Aligned], hf_grads: _Grads, mine: _Grads, base: int) -> None:
    """The input gradient of a system module that computes several HF modules at once (``linear_qkv``:
    q/k/v_proj; ``linear_fc1``: gate/up_proj) against the sum of their HF input gradients, under the first."""
    keys = [(INPUT, a.hf) for a in parts if (INPUT, a.hf) in hf_grads.out]
    if not keys:
        return
    summed, truth = _Grads(), _Grads()
    summed.out[(INPUT, parts[0].hf)] = sum(hf_grads.out[k] for k in keys)
    summed.order[(INPUT, parts[0].hf)] = min(hf_grads.order[k] for k in keys)
    hf32 = c.ref.extra.get("backward32")
    if hf32 is not None and all(k in hf32["grads"].out for k in keys):
        truth.out[(INPUT, parts[0].hf)] = sum(hf32["grads"].out[k] for k in keys)
    rec = _record(c, parts[0], INPUT, summed, mine, base, truth=truth)
    if rec is not None:
        rec.detail = (f"input gradient of {name}, which computes {', '.join(a.hf.rsplit('.', 1)[1] for a in parts)} "
                      "at once: HF's input gradients of those modules summed")


def _record(c, a: Aligned, kind: str, hf_grads: _Grads, mine: _Grads, base: int, at: str | None = None,
            truth: _Grads | None = None) -> Record | None:
    """Row ``a``'s gradient ``kind`` against HF's; ``at``: the system module it was read at, where not ``a``'s;
    ``truth``: HF-fp32's gradients where not the backward32 ones as they are (a fused input's sum)."""
    key = (kind, a.hf if a.row.kind is not Kind.LOGITS else "logits")
    ref = hf_grads.out.get(key)
    if ref is None:
        return None
    test = mine.out.get(key)
    name = at or c.name(a)
    if test is None:
        rec = Record.measured(a, name if isinstance(name, str) else None, kind, {}, base + 1 + hf_grads.order[key])
        rec.missing = f"{c.sut.name} computed no {kind.replace('_', ' ')} for {a.hf}"
        c.records.append(rec)
        return rec
    rec = c.record(a, kind, ref, to_device(test, ref.device) if ref.device.type != "cpu" else test,
                   name=name if isinstance(name, str) else None)
    rec.order = base + 1 + hf_grads.order[key]
    _truth(c, rec, key, test, truth)
    return rec


def _truth(c, rec: Record, key, test, truth: _Grads | None = None) -> None:
    """bf16 runs: the system's gradient against HF's in fp32 (``truth_rel_l2``, for the truth gate); ``truth``:
    HF-fp32's gradients where they are not the backward32 ones as they are (a fused input's sum)."""
    hf32 = c.ref.extra.get("backward32")
    g32 = truth.out.get(key) if truth is not None else None if hf32 is None else hf32["grads"].out.get(key)
    if g32 is not None:
        rec.truth_rel_l2 = _rel(c.ref, key, g32, test)  # on the system's device (metrics moves HF's fp32 there)
    elif hf32 is not None and key[0] == PARAM:
        why = truth_skipped(c.ref.case.train.no_fp32_truth, key[1])
        if why is not None:
            rec.detail = "; ".join(filter(None, [rec.detail, f"judged by its floor alone: HF's fp32 gradient is "
                                                               f"not kept for the truth ({why})"]))
