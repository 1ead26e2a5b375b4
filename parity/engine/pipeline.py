"""One parity run, for every model kind and every system under test.

Phases, in order (``run``): build the HF reference; capture its forward; measure its bf16 noise floors
(HF-bf16 against HF-fp32, end to end and module by module); hand its weights to the host (``sequential``
releases the HF model first); build and load the system under test; round trip its weights back to HF;
run it end to end, compared hook by hook; replay each of its modules on HF's captured inputs (its own
masks and RoPE); compare the masks and RoPE tables; judge against the case's gates; the results.
The HF side comes from the model kind (``parity.engine.kinds``), the Megatron side from the system
(``parity.systems``), what is compared from the alignment table (``parity.engine.alignment``).
"""
from __future__ import annotations

import copy
import gc
import sys
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from parity import megatron_env, systems
from parity.config import TextArgs, config_hash
from parity.engine import gates as G
from parity.engine import metrics as M
from parity.engine.alignment import TABLE_KINDS, Aligned, Kind, expand
from parity.engine.compare import (Call, Capture, Store, Where, capture_hf, compare, compare_mask, compare_rope,
                                   first, input_hooks, metrics, row_record, to_device, upcast, value)
from parity.engine.hoststage import HostStage, stage_bytes, storage_key
from parity.engine.kinds import KINDS
from parity.errors import UserError
from parity.report.summary import Results

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
KL_FLOOR = "logits_kl_max"  # key of the logits KL floor among the end-to-end floors


def _now() -> str:
    """UTC time with milliseconds: two runs within one second must still order (the history's previous run)."""
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Progress:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.phases: dict[str, float] = {}
        self.gpu_peaks: dict[str, float] = {}  # GiB, per phase

    @contextmanager
    def phase(self, name: str):
        self.note(f"{name} ...", indent="")
        t0 = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        try:
            yield
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                self.gpu_peaks[name] = max(self.gpu_peaks.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**30)
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t0
            self.note(f"{name} done in {self.phases[name]:.2f}s", indent="")

    def note(self, msg: str, indent: str = "  "):
        if self.enabled:
            print(f"[parity] {indent}{msg}", file=sys.stderr, flush=True)


def run(case, *, device: str, dtype: str | None = None, checkpoint: str | None = None, seed: int | None = None,
        progress: bool = False, system: str = "parity") -> dict:
    """The whole parity run of ``case`` (device and checkpoint already resolved by the front door)."""
    dtype_name, seed = dtype or case.dtype, case.seed if seed is None else seed
    kind, tdtype, prog = KINDS[case.kind], DTYPES[dtype or case.dtype], Progress(progress)
    if case.needs_checkpoint and not checkpoint:
        raise UserError(f"case {case.name} needs a checkpoint: pass --checkpoint DIR or set {case.model.checkpoint_env}")
    kind.check(case)
    sut = systems.get(system)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    megatron_env.init(tp=case.parallel.tp, ep=case.parallel.ep, seed=seed)
    store, sequential = Store(offload=case.run.offload), case.run.sequential

    with prog.phase("build_hf"):
        hf_model, hf_config = kind.build(case, tdtype, device, checkpoint, seed)
    host_weights = HostStage(reserve=stage_bytes(hf_model.state_dict().values()), background=True) \
        if sequential and device == "cuda" else None  # page locking overlaps the forwards and the floor
    text_args = TextArgs.from_hf(kind.text_config(hf_config))
    rows = expand(kind.prefixes, text_args, kind.vision_layers(hf_config))
    inputs = kind.inputs(hf_config, case, seed, device)
    pos = inputs.get("image_position_ids")
    where = Where(valid=inputs["attention_mask"].bool(), real=None if pos is None else ~(pos == -1).all(dim=-1))
    groups = kind.groups(inputs)

    timings = {"hf_forward_s": _timed(lambda: kind.forward(hf_model, inputs), device)}
    with prog.phase("hf_forward"):
        cap, hf_logits = capture_hf(hf_model, rows, lambda: kind.forward(hf_model, inputs), store)
        hf_logits = store.keep(hf_logits)
        store.sync()
        cap.calls["logits"] = [Call((), {}, hf_logits, 0)]

    floors_e2e: dict[str, float] = {}
    floors_iso: dict[str, float] = {}
    if tdtype != torch.float32:
        with prog.phase("noise_floor"):
            floors_e2e = end_to_end_floors(kind, hf_model, rows, cap, inputs, where, prog)
        with prog.phase("noise_floor_isolated"):
            floors_iso = isolated_floors(hf_model, rows, cap, inputs, where, device, hf_config, kind)

    with prog.phase("hf_state_to_host"):
        hf_state, host_weights = weights_for_conversion(hf_model, sequential, host_weights)
    hf_ref = weakref.ref(hf_model)
    del hf_model  # sequential: the last reference; otherwise ``hf_state`` keeps the weights alive
    hf_released = released(hf_ref, device) if sequential else None

    with prog.phase("build_megatron"):
        sut.build(case.kind, hf_config, dtype=tdtype, device=device)
    with prog.phase("convert"):
        sut.load(hf_state, folder=checkpoint)
    with prog.phase("roundtrip"):
        skip = {"lm_head.weight"} if text_args.tie_word_embeddings else set()
        roundtrip = compare_weights(sut.export(), {k: v for k, v in hf_state.items() if k not in skip})
    sut.prepare(inputs)
    timings["megatron_forward_s"] = _timed(lambda: sut.forward(inputs), device)
    compared = Comparison(sut, rows, cap, where, groups)
    with prog.phase("megatron_forward"):
        mc_logits = compared.end_to_end(inputs)
    with prog.phase("isolated_replay"):
        compared.isolated(prog)
    if tdtype != torch.float32 and case.world_size == 1:
        from parity.engine.replay32 import fp32_replay  # math errors under bf16 rounding

        with prog.phase("fp32_replay"):  # each layer of both sides in fp32 on the same inputs, and the truth gate
            fp32_replay(kind, kind.text_config(hf_config), hf_state, sut, compared, prog)
    del hf_state
    if host_weights is not None:
        host_weights.close()
    with prog.phase("metrics"):
        compared.tables()
        compared.silent()
        records = compared.records
        logits_summary, verdict = judge(records, hf_logits, mc_logits, where.valid, dtype_name,
                                        case.to_dict()["gates"], floors_e2e, floors_iso)
        group_summary = None if groups is None else {
            "positions": {g: int(m.sum()) for g, m in groups.items()},
            "logits": _logits_groups(hf_logits, mc_logits, groups, near_tie_margin(dtype_name)),
            "layers": compared.layer_groups}
    summary = G.summarise(records, verdict, logits_summary)
    summary["modules"] += compared.unobserved()
    summary["checks"]["roundtrip"] = roundtrip["bit_exact"] == roundtrip["tensors"] and roundtrip["tensors"] > 0
    results = Results(
        case=case.name, kind=case.kind, passed=all(summary["checks"].values()), device=device, dtype=dtype_name,
        seed=seed, created=_now(), env=env_info(device),
        system={"name": sut.name, "version": sut.version, "substituted": list(sut.substituted)},
        config_hash=config_hash(hf_config), layer_types=[la.layer_type for la in text_args.layers], **summary,
        roundtrip=roundtrip, phases=prog.phases, timings=timings,
        peak_memory={**_peak_memory(device, prog), "gpu_peak_by_phase_gib": prog.gpu_peaks},
        parallel={"tp": case.parallel.tp, "ep": case.parallel.ep, "world_size": case.world_size},
        sequential=sequential, hf_released_before_megatron=hf_released, gates=case.to_dict()["gates"],
        host_staged_gib={"activations": store.host_bytes / 2**30,
                         "weights": (host_weights.staged_bytes if host_weights is not None else 0) / 2**30},
        inputs=kind.describe(case, hf_config, inputs), groups=group_summary).to_dict()
    # the system's model is freed before the next run builds one (a system's hooks can hold it in a cycle)
    sut_ref = weakref.ref(sut)
    del compared, sut
    released(sut_ref, device)
    return results


# ---------------------------------------------------------------------------------------------------
# Noise floors: the same HF graph in fp32 (bf16 runs only)

def floor_value(kind: Kind, out32, out16, where: Where) -> float:
    """rel-L2 of the bf16 output against the fp32 one (HF vs HF), in the comparison layout of ``kind``."""
    ref, test = value(kind, out32), value(kind, out16)
    if kind is Kind.ROUTER:
        test = {"dense": torch.zeros_like(test["probs"]).scatter(1, test["top_i"], test["top_w"].float()),
                "top_i": test["top_i"], "top_w": test["top_w"]}
        # the routing weights' own error, over the tokens whose top-k sets agree: a flip between HF-bf16 and
        # HF-fp32 moves weight wholesale and would make the floor (and the gate) as large as the flips
        return float(compare(kind, ref, test, where)["router"]["agree_weight_rel_l2"])
    return float(compare(kind, ref, test, where)["rel_l2"])


def end_to_end_floors(kind, hf_model, rows, cap: Capture, inputs, where: Where, prog) -> dict[str, float]:
    """Each module of the model kind's fp32 forward compared at once with the bf16 capture (only the scalar
    rel-L2 is kept); then the logits, and the per-token KL max of HF-bf16 against HF-fp32 (the KL floor)."""
    by_name = {a.hf: a.row.kind for a in rows if a.row.kind not in TABLE_KINDS}
    floors: dict[str, float] = {}

    def measure(name, out):
        if name not in floors and cap.first(name) is not None:
            floors[name] = floor_value(by_name[name], out, cap.first(name).output, where)

    def run_copy(module, name, *args, **kwargs):  # a deep fp32 copy of ``module``, hooked, run once, dropped
        mod32 = copy.deepcopy(module).float()
        handles = input_hooks(mod32, rows, measure)
        for rel, sub in mod32.named_modules():
            full = f"{name}.{rel}" if name and rel else (name or rel)
            if full in by_name:
                handles.append(sub.register_forward_hook(lambda m, a, out, full=full: measure(full, out)))
        try:
            with torch.no_grad():
                return mod32(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()

    logits = kind.forward_fp32(hf_model, inputs, cap, run_copy, prog)
    hf_logits = cap.first("logits").output
    floors["logits"] = floor_value(Kind.LOGITS, logits, hf_logits, where)
    floors[KL_FLOOR] = float(M.logits_metrics(logits, hf_logits.to(logits.device).float(),
                                              where.valid.to(logits.device))["kl_max"])
    return floors


def fp32_isolated(hf_model, hf_name: str, call, device) -> Any:
    """The HF module in fp32 on its own (upcast) captured inputs."""
    mod32 = copy.deepcopy(dict(hf_model.named_modules())[hf_name]).float()
    with torch.no_grad():
        return mod32(*upcast(to_device(call.args, device)), **upcast(to_device(call.kwargs, device)))  # upcast on the device


def isolated_floors(hf_model, rows, cap: Capture, inputs, where: Where, device, hf_config,
                    model_kind) -> dict[str, float]:
    """Each HF module in fp32 on its own (upcast) captured inputs; inline steps (lm_head + softcap, the image
    scatter) as HF computes them, on the upcast outputs of the modules that feed them (the text logits through
    HF's own forward: ``kind.head_fp32``)."""
    out: dict[str, float] = {}
    for a in rows:
        kind, call = a.row.kind, cap.first(a.hf)
        if kind in TABLE_KINDS or a.hf in out or call is None:
            continue
        feeds = [cap.first(n) for n in a.feeds]
        if None in feeds:
            continue
        if kind is Kind.LOGITS:
            lm = cap.first("lm_head")
            if lm is None:
                continue
            head = lambda x: first(fp32_isolated(hf_model, "lm_head", Call((x,), {}, None, 0), device))  # noqa: E731
            out32 = model_kind.head_fp32(hf_model, first(feeds[0].output).to(device).float(), inputs, head)
        elif kind is Kind.MERGED:
            emb, feats = (first(f.output).float() for f in feeds)
            mask = (inputs["input_ids"] == hf_config.image_token_id)[..., None].expand_as(emb)
            out32 = emb.masked_scatter(mask, feats)
        else:
            try:
                out32 = fp32_isolated(hf_model, a.hf, call, device)
            except Exception:  # a module that cannot be re-run alone gets no floor: its gate is floor_abs only
                continue
        out[a.hf] = floor_value(kind, out32, call.output, where)
    return out


# ---------------------------------------------------------------------------------------------------
# Weights

def weights_for_conversion(hf_model, sequential: bool, stage=None) -> tuple[dict, Any]:
    """HF's state dict for the system and the round trip, and the host stage holding it (close it when done).
    Sequential runs release the model next, so its weights go to the host first: page-locked and
    asynchronous on CUDA (``HostStage``, one chunk of the exact size), each storage once (a tied
    ``lm_head`` stays the embedding's tensor)."""
    state = {k: v.detach() for k, v in hf_model.state_dict().items()}
    if not sequential:
        return state, None
    if stage is None:
        stage = HostStage(reserve=stage_bytes(state.values()))
    seen: dict[tuple, torch.Tensor] = {}
    out = {}
    for k, v in state.items():
        key = storage_key(v)
        if key not in seen:
            seen[key] = stage.put(v)
        out[k] = seen[key]
    stage.sync()
    return out, stage


def released(ref: weakref.ref, device: str) -> bool:
    """Collect, free the CUDA cache, and say whether the object behind ``ref`` is gone."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return ref() is None


def compare_weights(pairs, ref: dict) -> dict:
    """The system's export against HF's state dict, tensor by tensor, bit for bit: each exported tensor is
    compared on its device with the reference (brought over from the host when staged there) and dropped."""
    from parity.bridge.convert import same_bits

    rows, seen = [], set()
    for k, b_ in pairs:
        seen.add(k)
        a = ref.get(k)
        if a is None:
            rows.append({"name": k, "shape": list(b_.shape), "dtype": str(b_.dtype).replace("torch.", ""),
                         "bit_exact": False, "max_abs_diff": None, "problem": "unexpected key"})
            continue
        a = a.to(b_.device)
        exact = same_bits(a, b_)
        diff = 0.0 if exact else (float((a.float() - b_.float()).abs().max()) if a.shape == b_.shape else None)
        rows.append({"name": k, "shape": list(a.shape), "dtype": str(a.dtype).replace("torch.", ""),
                     "bit_exact": exact, "max_abs_diff": diff})
        del a, b_
    for k in sorted(set(ref) - seen):
        rows.append({"name": k, "shape": None, "dtype": None, "bit_exact": False, "max_abs_diff": None,
                     "problem": "missing after round trip"})
    rows.sort(key=lambda r: (r["bit_exact"], r["name"]))
    diffs = [r["max_abs_diff"] for r in rows if r["max_abs_diff"] is not None]
    return {"tensors": len(rows), "bit_exact": sum(r["bit_exact"] for r in rows),
            "max_abs_diff": max(diffs) if diffs else None, "rows": rows}


# ---------------------------------------------------------------------------------------------------
# The system under test: end to end, isolated, its tables

@dataclass
class Comparison:
    """The system under test against the HF capture, row by row; ``records`` (and, for a model kind with
    position groups, ``layer_groups``) grow as rows are measured."""

    sut: Any
    rows: list[Aligned]
    cap: Capture
    where: Where
    groups: dict | None
    records: list = field(default_factory=list)
    layer_groups: list = field(default_factory=list)
    reported: list = field(default_factory=list)  # rows shown with the reason they have no metric in a mode

    def name(self, a: Aligned):
        """The system's name of a row: a module path (slots filled in), ``Elsewhere`` or None."""
        name = self.sut.names.get(a.row.name_key)
        return name.format(**a.slots) if isinstance(name, str) else name

    @staticmethod
    def sibling(a: Aligned, key: str) -> str:
        """The full HF path of name key ``key`` (slots of ``a`` filled in) in ``a``'s stack."""
        return a.hf[: len(a.hf) - len(a.row.hf.format(**a.slots))] + key.format(**a.slots)

    def replay_name(self, a: Aligned):
        """The system's name of the module isolated replay runs for ``a`` (its ``Replay``'s, else ``name``)."""
        plan = self.sut.replays.get(a.row.name_key)
        return self.name(a) if plan is None else plan.module.format(**a.slots)

    def replay_input(self, a: Aligned, cap: Capture | None = None, module_of=None) -> tuple[str, Any, Call] | None:
        """(module name, module, the call it replays: HF's captured inputs, the HF row's output) for ``a``; None
        where nothing can be replayed. Inputs: the outputs of the row's ``feeds`` (inline steps), else the
        captured inputs of the HF row its ``Replay`` names, else the row's own; from ``cap`` (default: the run's
        capture) and modules by ``module_of`` (default: the system's ``module``; the fp32 replay's copies)."""
        cap, module_of = cap or self.cap, module_of or self.sut.module
        name, call = self.replay_name(a), cap.first(a.hf)
        if a.row.kind in TABLE_KINDS or not isinstance(name, str) or call is None:
            return None
        module, feeds = module_of(name), [cap.first(n) for n in a.feeds]
        plan = self.sut.replays.get(a.row.name_key)
        source = cap.first(self.sibling(a, plan.on)) if plan is not None and plan.on else call
        if None in feeds or source is None or (module is None and not a.feeds):
            return None
        if feeds:
            return name, module, Call(tuple(first(f.output) for f in feeds), {}, call.output, call.order)
        return name, module, Call(source.args, source.kwargs, call.output, call.order)

    def record(self, a: Aligned, mode: str, ref, test, m_: dict | None = None, name: str | None = None) -> dict:
        m_ = compare(a.row.kind, ref, test, self.where) if m_ is None else m_
        order = (self.cap.order.get("lm_head", max(self.cap.order.values(), default=0)) + 1
                 if a.row.kind is Kind.LOGITS else self.cap.order.get(a.hf, 0))
        rec = row_record(a, self.name(a) if name is None else name, mode, m_, order)
        if a.row.name_key in self.sut.shared:  # the system runs HF's own code here: evidence only of its inputs
            rec["shared"] = True
        if self.groups is not None and a.row.kind is Kind.LAYER:
            self.layer_groups.append({"name": a.hf, "mode": mode, "layer": a.layer,
                                      **_group_metrics(ref, test, self.groups)})
        self.records.append(rec)
        return rec

    def end_to_end(self, inputs) -> torch.Tensor:
        """The system's forward on the raw inputs with a hook on every module a captured row names: the first
        time a module returns, each of its rows is compared at once with HF's output (nothing is kept)."""
        by_module: dict[str, list[Aligned]] = {}
        for a in self.rows:
            name = self.name(a)
            if isinstance(name, str) and a.row.kind not in TABLE_KINDS and self.sut.module(name) is not None:
                by_module.setdefault(name, []).append(a)
        done: set[str] = set()

        def hook(module, args, out, rows):
            for a in rows:
                call = self.cap.first(a.hf)
                if call is not None and a.hf not in done:
                    done.add(a.hf)
                    self.record(a, "end_to_end", value(a.row.kind, call.output), self.sut.output(a, out, module))

        handles = [self.sut.module(name).register_forward_hook(lambda m, i, o, rows=rows: hook(m, i, o, rows))
                   for name, rows in by_module.items()]
        try:
            with torch.no_grad():
                logits = self.sut.forward(inputs)
        finally:
            for h in handles:
                h.remove()
        self.record(next(a for a in self.rows if a.row.kind is Kind.LOGITS), "end_to_end",
                    self.cap.first("logits").output, logits)
        return logits

    def isolated(self, prog: Progress) -> None:
        """Each module of the system on the HF module's captured inputs (activations only; masks and RoPE are
        the system's own); inline steps on the captured outputs of the modules that feed them."""
        last, n_layers = None, sum(a.row.kind is Kind.LAYER and a.group() == "text" for a in self.rows)
        for a in self.rows:
            if a.group() == "text" and a.layer is not None and a.layer != last:
                prog.note(f"isolated replay: layer {a.layer + 1}/{n_layers}")
                last = a.layer
            planned = self.replay_input(a)
            if planned is None:
                continue
            name, module, replayed = planned
            with torch.no_grad():
                test = self.sut.replay(a, module, replayed)
            if test is None:  # the system cannot run this module alone (e.g. a norm fused into the next linear)
                self.reported.append(self.not_compared(a, "isolated", name, f"{self.sut.name} cannot run {name} "
                                                       "alone: compared end to end only"))
                continue
            rec = self.record(a, "isolated", value(a.row.kind, replayed.output), test, name=name)
            plan = self.sut.replays.get(a.row.name_key)
            if plan is not None and plan.why:
                rec["detail"] = plan.why

    def tables(self) -> None:
        """Masks and RoPE tables compared as their own rows (each side built its own from raw inputs)."""
        tables = self.sut.tables()
        for a in self.rows:
            name = self.name(a)
            if a.row.kind not in TABLE_KINDS or name not in tables:
                continue
            if a.row.kind is Kind.ROPE:  # HF's rotary_emb runs once per layer type: its call of this row's type
                lt = a.slots["layer_type"]
                call = next((c for c in self.cap.calls.get(a.hf, [])
                             if lt in c.args[2:3] or c.kwargs.get("layer_type") == lt), None)
                if call is None:
                    continue
                m_ = compare_rope(call, tables[name], self.where)
                rec = self.record(a, "end_to_end", None, None, m_)
            else:  # the mask HF's layer received; ordered as the first thing inside its self_attn to return
                layer = self.cap.first(a.hf.rsplit(".", 1)[0])
                m_ = compare_mask(a, layer.kwargs.get("attention_mask") if layer else None, tables[name], self.where)
                rec = self.record(a, "end_to_end", None, None, m_)
                rec["order"] = self.cap.order.get(f"{a.hf}.q_proj", self.cap.order.get(a.hf, 0))
            rec["detail"] = a.row.note.format(n=m_.get("n"), **a.slots)

    def silent(self, modes=("end_to_end", "isolated")) -> None:
        """No silent rows (issue 11, item 5): every row the system has a module for yields a record in every mode
        it is compared in; a twin never called (either side) is a failing record with that reason."""
        seen = {(r["name"], r["mode"]) for r in self.records + self.reported}
        for a in self.rows:
            if a.row.kind in TABLE_KINDS:
                continue
            for mode in modes:
                name = self.replay_name(a) if mode == "isolated" else self.name(a)
                if (a.hf, mode) in seen or not isinstance(name, str):
                    continue
                hf_missing = self.cap.first(a.hf) is None or any(self.cap.first(n) is None for n in a.feeds)
                why = (f"HF module {a.hf} was never called" if hf_missing else
                       f"{self.sut.name} module {name} was never called" if mode == "end_to_end" else
                       f"{self.sut.name} module {name} could not be replayed")
                rec = row_record(a, name, mode, {}, self.cap.order.get(a.hf, 0))
                rec["missing"] = why
                self.records.append(rec)

    def unobserved(self) -> list[dict]:
        """Rows the system has no module for (``Elsewhere``): reported with where their effect is compared; and
        the rows it cannot replay alone."""
        out = list(self.reported)
        for a in self.rows:
            where = self.name(a)
            if isinstance(where, systems.Elsewhere):
                at = self.sibling(a, where.at)
                modes = ("end_to_end",) if a.row.name_key in self.sut.replays else ("end_to_end", "isolated")
                out += [{**self.not_compared(a, mode, None, f"{where.why}: compared at {at}"), "compared_at": at}
                        for mode in modes]
        return out

    @staticmethod
    def not_compared(a: Aligned, mode: str, megatron_name, why: str) -> dict:
        """A row reported with the reason it has no metric in ``mode`` (never gated, never silent)."""
        return {"name": a.hf, "megatron_name": megatron_name, "mode": mode, "kind": a.row.label, "cosine": None,
                "rel_l2": None, "max_abs": None, "floor": None, "gate": None, "ratio": None, "layer": a.layer,
                "order": 0, "group": a.group(), "passed": True, "detail": why}


# ---------------------------------------------------------------------------------------------------
# Judging

def near_tie_margin(dtype: str) -> float | None:
    """Top-1/top-2 logit gap below which a top-1 flip counts as a near tie: fp32 1e-4; lower precisions use
    metrics' default (one bf16 step at the logit's magnitude)."""
    return 1e-4 if dtype == "float32" else None


def judge(records, hf_logits, mc_logits, valid, dtype: str, gates: dict, floors_e2e: dict,
          floors_iso: dict) -> tuple[dict, dict]:
    """Logits metrics, each record's noise floor (bf16: the same module's HF-bf16 vs HF-fp32 rel-L2 in the same
    mode; masks and RoPE tables have none) and the case's gates: ``(logits_summary, verdict)``."""
    low = dtype != "float32"
    logits_summary = M.logits_metrics(hf_logits.to(mc_logits.device), mc_logits, valid,
                                      near_tie_margin=near_tie_margin(dtype))
    for rec in records:
        floors = floors_e2e if rec["mode"] == "end_to_end" else floors_iso
        rec["floor"] = floors.get(rec["name"]) if low and rec["kind"] not in ("mask", "rope") \
            and rec["mode"] != "fp32_replay" else None
    verdict = G.apply(records, gates, dtype, logits_summary, kl_floor=floors_e2e.get(KL_FLOOR))
    logits_summary["kl_max_floor"], logits_summary["kl_gate"] = verdict["kl_floor"], verdict["kl_gate"]
    return logits_summary, verdict


def _group_metrics(ref: torch.Tensor, test: torch.Tensor, groups: dict[str, torch.Tensor]) -> dict:
    out = {}
    for g, mask in groups.items():
        m_ = metrics(ref, test, mask) if bool(mask.any()) else None
        out[g] = None if m_ is None else {k: m_[k] for k in ("cosine", "rel_l2", "max_abs", "numel")}
    return out


def _logits_groups(ref: torch.Tensor, test: torch.Tensor, groups: dict[str, torch.Tensor], margin) -> dict:
    keys = ("cosine", "rel_l2", "max_abs", "top1_agreement", "kl_mean", "kl_max", "n_decisive", "n_near_tie",
            "top1_flips_decisive")
    out = {}
    for g, mask in groups.items():
        s = M.logits_metrics(ref.to(test.device), test, mask.to(test.device), near_tie_margin=margin) \
            if bool(mask.any()) else None
        out[g] = None if s is None else {k: s[k] for k in keys if k in s}
    return out


# ---------------------------------------------------------------------------------------------------
# Provenance and timing

def env_info(device: str) -> dict:
    from parity.provenance import collect  # packages' own versions, git commit + dirty flag, threads, command
    return collect(device)


def _peak_memory(device: str, prog: Progress) -> dict:
    import resource

    out = {"host_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device == "cuda":
        out["gpu_peak_gib"] = max([torch.cuda.max_memory_allocated() / 2**30, *prog.gpu_peaks.values()])
    return out


def _timed(fn, device, repeats: int = 2) -> float:
    """Plain forward time (no hooks, no capture): one warm-up, then the best of ``repeats``."""
    best = float("inf")
    with torch.no_grad():
        for i in range(repeats + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn()
            if device == "cuda":
                torch.cuda.synchronize()
            if i:
                best = min(best, time.perf_counter() - t0)
            del out
    return best
