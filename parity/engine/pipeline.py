"""One parity run: the HF reference built once, then each system under test against it, mode by mode.

``reference``: the model kind's HF model, the case's raw inputs, HF's forward captured module by module
(``parity.engine.reference``), and each mode's bf16 noise floors (HF-bf16 against HF-fp32). ``against``: a
system (``parity.registry``) built from HF's config and loaded with HF's weights, then every mode of
``parity.engine.modes`` that applies (round trip, end to end, isolated replay, fp32 replay, masks and RoPE
tables), the rows no mode could measure, the gates of the case file, and the results. ``run`` does both
for one system; ``run_systems`` for several against one reference.
"""
from __future__ import annotations

import weakref
from datetime import datetime, timezone

import torch

from parity import megatron_env, registry
from parity.config import config_hash
from parity.engine import gates as G
from parity.engine import metrics as M
from parity.engine.comparison import Comparison
from parity.engine import modes
from parity.engine.modes.end_to_end import KL_FLOOR
from parity.engine.progress import Progress, memory, timed
from parity.engine.reference import Reference, freed
from parity.engine.results import Results
from parity.engine.system import Guarded, SystemRaised
from parity.errors import UserError

FLOOR_PHASES = {"end_to_end": "noise_floor", "isolated": "noise_floor_isolated"}
RUN_PHASES = {"end_to_end": "megatron_forward", "isolated": "isolated_replay"}  # else the mode's name


def run(case, *, device: str, dtype: str | None = None, checkpoint: str | None = None, seed: int | None = None,
        progress: bool = False, system: str = "parity") -> dict:
    """The whole parity run of ``case`` against one system (device and checkpoint resolved by the front door)."""
    return run_systems(case, [system], device=device, dtype=dtype, checkpoint=checkpoint, seed=seed,
                       progress=progress)[0]


def run_systems(case, systems: list[str], *, device: str, dtype: str | None = None, checkpoint: str | None = None,
                seed: int | None = None, progress: bool = False) -> list[dict]:
    """Each system against one HF reference, in order; one results dict per system."""
    for name in systems:  # an unknown name, or a case the system refuses, fails before anything is built
        if name not in registry.SYSTEMS:
            registry.get(name)
        why = registry.refuses(name, case)
        if why is not None:
            raise UserError(f"system {name} cannot run case {case.name}: {why}")
    ref = reference(case, device=device, dtype=dtype, checkpoint=checkpoint, seed=seed, progress=progress)
    try:
        out = []
        for i, name in enumerate(systems):
            ref.final = i == len(systems) - 1  # no system after it: its modes may let go of HF's side as they end
            out.append(against(ref, name))
        return out
    finally:
        ref.close()


def reference(case, *, device: str, dtype: str | None = None, checkpoint: str | None = None, seed: int | None = None,
              progress: bool = False) -> Reference:
    """The HF side of ``case``, with the noise floors of every mode that has them (bf16 runs)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    megatron_env.init(tp=case.parallel.tp, ep=case.parallel.ep, seed=case.seed if seed is None else seed,
                      sequence_parallel=case.parallel.sequence_parallel)
    ref = Reference.build(case, device=device, dtype=dtype, checkpoint=checkpoint, seed=seed, progress=progress)
    for mode in modes.MODES:
        if mode.why_not(case, ref.dtype) is not None:
            continue
        impl = mode.implementation()
        if hasattr(impl, "prepare"):  # what the mode needs of HF beyond the capture (its floors may use it)
            with ref.prog.phase(f"hf_{mode.name}"):
                ref.extra[mode.name] = impl.prepare(ref, ref.prog)
        if mode.floors and ref.dtype != "float32":
            with ref.prog.phase(FLOOR_PHASES.get(mode.name, f"noise_floor_{mode.name}")):
                ref.floors[mode.name] = impl.floors(ref, ref.prog)
    return ref


def against(ref: Reference, system: str) -> dict:
    """System ``system`` against ``ref``: built, loaded, every mode that applies, judged; its results dict. The
    system raising while building, loading, preparing or running a mode is a failing phase of its results
    (``failures``, with the error and where), never an error of the run: the report is written, parity fails."""
    raw, prog, case = registry.get(system), Progress(ref.prog.enabled, ref.prog.held), ref.case
    sut, failures = Guarded(raw), []
    ref.release()

    def attempt(phase: str, fn, timer: str | None = None) -> bool:
        try:
            if timer is None:
                fn()
            else:
                with prog.phase(timer):
                    fn()
            return True
        except SystemRaised as e:
            failures.append({"phase": phase, **e.to_dict()})
            return False

    ready = (attempt("build", lambda: sut.build(case.kind, ref.config, dtype=ref.torch_dtype, device=ref.device),
                     "build_megatron")
             and attempt("load", lambda: sut.load(ref.state, folder=ref.checkpoint), "convert")
             and (ref.adapters is None or _adapt(sut, ref, failures, attempt))
             and _freeze(sut, case, failures, attempt)
             and attempt("prepare", lambda: sut.prepare(ref.inputs)))
    timings = dict(ref.timings)
    if ready:
        try:  # a forward that raises is recorded by the end-to-end mode, which runs it again with its hooks
            timings["megatron_forward_s"] = timed(lambda: sut.forward(ref.inputs), ref.device)
        except SystemRaised:
            pass
    c, ran = Comparison(sut, ref), []
    for mode in modes.MODES:
        why = mode.why_not(case, ref.dtype, sut)
        if why is None and not ready:
            why = f"the system raised while it was being set up ({failures[-1]['phase']})"
        ran.append({"name": mode.name, "label": mode.label, "ran": why is None, **({"why": why} if why else {})})
        if why is None:
            with prog.phase(RUN_PHASES.get(mode.name, mode.name)):
                kept = len(c.records)
                try:
                    mode.implementation().run(c, prog)
                except SystemRaised as e:
                    failures.append({"phase": mode.name, **e.to_dict()})
                    ran[-1]["raised"] = e.text
                except NotImplementedError as e:  # the system (its adapter) does not model this yet: not a verdict
                    del c.records[kept:]
                    ran[-1].update(ran=False, why=f"{sut.name} does not model it yet: {e}")
    with prog.phase("metrics"):
        c.failures = failures
        if ready:  # a system that could not be set up has no rows: its failure is the verdict
            c.silent()
        logits_summary, verdict = judge(ref, c)
        group_summary = None if ref.groups is None or c.logits is None else {
            "positions": {g: int(m.sum()) for g, m in ref.groups.items()},
            "logits": _logits_groups(ref.logits, c.logits, ref.groups, near_tie_margin(ref.dtype)),
            "layers": c.layer_groups}
    summary = G.summarise(c.records, verdict, logits_summary)
    summary["modules"] += [r.to_dict() for r in c.unobserved()] if ready else []
    summary["checks"].update(c.sections.pop("checks", {}))
    if failures:
        summary["checks"]["system"] = False
        summary["summary"]["failures"] = [f"the system raised while {_PHASE_TEXT.get(f['phase'], f['phase'])}: "
                                          f"{f['method']} raised {f['error']}" + (f" (at {f['where']})" if f["where"]
                                                                                   else "") for f in failures]
    phases, peaks = {**ref.prog.phases, **prog.phases}, {**ref.prog.gpu_peaks, **prog.gpu_peaks}
    probing = c.sections.get("probing")
    if probing is not None and "probing" in phases:  # its cost, as a share of the whole run so far
        probing.update(seconds=phases["probing"], share_of_run=phases["probing"] / max(sum(phases.values()), 1e-9))
    host = ref.host_weights
    results = Results(
        case=case.name, kind=case.kind, passed=all(summary["checks"].values()), device=ref.device, dtype=ref.dtype,
        seed=ref.seed, created=_now(), env=env_info(ref.device),
        system={"name": raw.name, "version": raw.version, "substituted": list(getattr(raw, "substituted", []))},
        config_hash=config_hash(ref.config), layer_types=[la.layer_type for la in ref.text_args.layers], **summary,
        roundtrip=c.sections.get("roundtrip"), phases=phases, timings=timings,
        peak_memory={**_peak_memory(ref.device, peaks), "gpu_peak_by_phase_gib": peaks},
        parallel={"tp": case.parallel.tp, "ep": case.parallel.ep, "world_size": case.world_size,
                  **({"sequence_parallel": True} if case.parallel.sequence_parallel else {})},
        sequential=ref.sequential, hf_released_before_megatron=ref.released, gates=case.to_dict()["gates"],
        host_staged_gib={"activations": ref.store.host_bytes / 2**30,
                         "weights": (host.staged_bytes if host is not None else 0) / 2**30,
                         "activations_kept_on_device": ref.store.device_bytes / 2**30},
        inputs=ref.kind.describe(case, ref.config, ref.inputs), groups=group_summary, modes=ran,
        failures=failures or None, phase_parts={**ref.prog.parts, **prog.parts} or None,
        **{k: v for k, v in c.sections.items() if k in Results.SECTIONS}).to_dict()
    # the system's model is freed before the next system (or run) builds one: its hooks can hold it in a cycle
    sut_ref = weakref.ref(raw)
    c = sut = raw = None
    if not freed(sut_ref, ref.device):  # the next build would find its memory taken (a 26B plant table ran out so)
        prog.note(f"the system's model outlived its run ({memory()}): something still refers to it")
    return results


def _freeze(sut, case, failures: list, attempt) -> bool:
    """``train.grad_layers``: the system's parameters outside those layers frozen before anything runs, as HF's are
    (``Reference.build``); a system that cannot freeze layers is not set up (said in its failures)."""
    if case.train is None or case.train.grad_layers is None:
        return True
    if not callable(getattr(sut, "train_layers", None)):
        failures.append({"phase": "train_layers", "method": "train_layers", "error": f"{sut.name} has no train_layers: "
                         "it cannot keep gradients to train.grad_layers", "where": None})
        return False
    extra = {"embedding": True} if case.train.grad_embedding else {}  # a port without the option still freezes layers
    return attempt("train_layers", lambda: sut.train_layers(case.train.grad_layers, **extra))


def _adapt(sut, ref, failures: list, attempt) -> bool:
    """A LoRA case: the system's own LoRA with HF's adapters (``System.load_adapters``); a system without LoRA fails
    the case at set-up (comparing HF's adapted model with an unadapted one would say nothing)."""
    if not callable(getattr(sut, "load_adapters", None)):
        failures.append({"phase": "adapters", "method": "load_adapters", "where": None,
                         "error": f"{sut.name} has no LoRA (no load_adapters): a [lora] case cannot run on it"})
        return False
    return attempt("adapters", lambda: sut.load_adapters(ref.adapters.state(), ref.case.lora), "adapters")


_PHASE_TEXT = {"build": "building", "load": "loading the weights", "adapters": "putting its LoRA on", "prepare": "preparing its masks and RoPE",
               "end_to_end": "running its forward (end to end)", "roundtrip": "exporting its weights (round trip)",
               "tables": "building its tables", "isolated": "replaying modules", "fp32_replay": "replaying in fp32",
               "probing": "probing"}


# ---------------------------------------------------------------------------------------------------
# Judging

def near_tie_margin(dtype: str) -> float | None:
    """Top-1/top-2 logit gap below which a top-1 flip counts as a near tie: fp32 1e-4; lower precisions use
    metrics' default (one bf16 step at the logit's magnitude)."""
    return 1e-4 if dtype == "float32" else None


def judge(ref: Reference, c: Comparison) -> tuple[dict, dict]:
    """Logits metrics, each record's noise floor (bf16: the same module's HF-bf16 vs HF-fp32 rel-L2 in the same
    mode, for modes that measure floors; masks and RoPE tables have none) and the case's gates:
    ``(logits_summary, verdict)``."""
    low, gates = ref.dtype != "float32", ref.case.to_dict()["gates"]
    logits, why = system_logits(ref.logits, c.logits)
    logits_summary = {} if logits is None else M.logits_metrics(
        ref.logits.to(logits.device), logits, ref.where.valid, near_tie_margin=near_tie_margin(ref.dtype))
    for rec in c.records:
        mode = modes.get(rec.mode)
        measured = low and mode is not None and mode.floors and rec.kind not in ("mask", "rope")
        key = f"{rec.mode}:{rec.name}" if mode is not None and mode.rows else rec.name  # rows of several kinds
        if measured:  # a mode without measured floors leaves a floor its rows carry (probing's own)
            rec.floor = ref.floors.get(mode.name, {}).get(key)
    kl_floor = ref.floors.get("end_to_end", {}).get(KL_FLOOR)
    verdict = G.apply(c.records, gates, ref.dtype, logits_summary, kl_floor=kl_floor)
    logits_summary["kl_max_floor"], logits_summary["kl_gate"] = verdict["kl_floor"], verdict["kl_gate"]
    if logits is None:
        verdict["logits_ok"], verdict["logits_why"] = False, why
    elif why is not None:
        logits_summary["layout"] = why
    return logits_summary, verdict


def system_logits(ref: torch.Tensor, test) -> tuple[torch.Tensor | None, str | None]:
    """The system's logits in HF's layout, and what to say about them: none (its forward raised or did not
    run), another shape with as many elements (compared after a reshape, said so), or another size (none)."""
    if test is None:
        return None, "no logits from the system: its forward did not return (see the failures)"
    if tuple(test.shape) == tuple(ref.shape):
        return test, None
    if test.numel() == ref.numel():
        return test.reshape(ref.shape), (f"layout differs: the system's logits {tuple(test.shape)} against HF's "
                                         f"{tuple(ref.shape)}; compared after a reshape")
    return None, f"logits shape {tuple(test.shape)} against HF's {tuple(ref.shape)}: the element counts differ"


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
# Provenance

def _now() -> str:
    """UTC time with milliseconds: two runs within one second must still order (the history's previous run)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def env_info(device: str) -> dict:
    from parity.provenance import collect  # packages' own versions, git commit + dirty flag, threads, command
    return collect(device)


def _peak_memory(device: str, peaks: dict) -> dict:
    import resource

    out = {"host_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device == "cuda":
        out["gpu_peak_gib"] = max([torch.cuda.max_memory_allocated() / 2**30, *peaks.values()])
    return out
