"""One parity run: build HF, capture, measure the bf16 noise floor, build Megatron, compare, gate.

The flow is the same for the tiny CPU cases and the 26B-A4B GPU case; ``sequential`` releases the HF
model (its weights kept on the host for conversion) before the Megatron model is built, and ``offload``
keeps captured activations on the host.
"""
from __future__ import annotations

import copy
import gc
import os
import platform
import subprocess
import sys
import time
import types
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from parity import megatron_env
from parity.config import TextArgs, config_hash
from parity.engine import gates as G
from parity.engine import metrics as M
from parity.engine.alignment import Align, text_rows
from parity.engine.hoststage import HostStage, stage_bytes, storage_key
from parity.engine.compare import (Call, Capture, Ctx, Store, capture_hf, compare_values, hf_value, mc_value, replay,
                                   row_record)
from parity.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class RunSpec:
    """Everything a run needs, read from a case (cases are data; see ``cases/``)."""

    name: str
    kind: str = "text"
    builder: str = "tiny_text"
    overrides: dict = field(default_factory=dict)
    checkpoint: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    batch: int = 2
    seq_len: int = 40
    pad_tail: int = 0
    padding: str = "right"
    lengths: list | None = None
    position_offset: int = 0
    images: list | None = None
    tp: int = 1
    ep: int = 1
    sequential: bool = False
    offload: bool = False
    gates: dict = field(default_factory=dict)
    progress: bool = False


class Progress:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.phases: dict[str, float] = {}
        self.gpu_peaks: dict[str, float] = {}  # GiB, per phase

    @contextmanager
    def phase(self, name: str):
        if self.enabled:
            print(f"[parity] {name} ...", file=sys.stderr, flush=True)
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
            if self.enabled:
                print(f"[parity] {name} done in {self.phases[name]:.2f}s", file=sys.stderr, flush=True)

    def note(self, msg: str):
        if self.enabled:
            print(f"[parity]   {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------
# Building the HF side

def build_hf_text(spec: RunSpec, dtype: torch.dtype, device: str):
    """HF Gemma4ForCausalLM from the case's builder (random weights) or from a local checkpoint."""
    from transformers import Gemma4ForCausalLM

    from parity import config as C
    from parity.engine.randomize import randomize_

    if spec.checkpoint:
        from parity.bridge import io as bio

        info = bio.inspect_folder(spec.checkpoint)  # files, keys, shapes: validated before instantiation
        _check_memory(info.bytes_as(dtype), device, spec.checkpoint)
        hf_config, state = bio.load_folder(spec.checkpoint, dtype=dtype, device="cpu")
        text_config = getattr(hf_config, "text_config", None) or hf_config
        with torch.device(device):
            model = Gemma4ForCausalLM._from_config(text_config, torch_dtype=dtype)
        _load_text_weights(model, state)
        return model.eval(), text_config
    builders = {"tiny_text": C.text_config_kwargs, "full_text": C.full_text_config_kwargs}
    if spec.builder not in builders:
        raise UserError(f"unknown text model builder {spec.builder!r}")
    config = C.make_text_config(builders[spec.builder](**spec.overrides))
    C.check_supported(config)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = Gemma4ForCausalLM._from_config(config, torch_dtype=dtype)
    randomize_(model, seed=spec.seed)
    return model.eval(), config


def _check_memory(need: int, device: str, what: str) -> None:
    """Refuse (one line, exit 2) a checkpoint whose weights cannot fit where the HF model will live."""
    if device == "cuda":
        free = torch.cuda.mem_get_info()[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need * 1.05 > free:
        raise UserError(f"out of memory: {what} needs {need / 2**30:.1f} GiB of weights on {device}, "
                        f"only {free / 2**30:.1f} GiB free")


def _load_text_weights(model, state: dict) -> None:
    """Load a checkpoint's text weights into a Gemma4ForCausalLM (VLM checkpoints: their text part)."""
    from parity.bridge.convert import split_hf_state

    prefix, text, _rest = split_hf_state(state)
    renamed = {}
    for k, v in text.items():
        key = k[len(prefix):] if prefix and k.startswith(prefix) else k
        renamed["model." + key if not key.startswith(("model.", "lm_head")) else key] = v
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise UserError(f"checkpoint does not fit the config: missing {missing[:3]}, unexpected {unexpected[:3]}")


# ---------------------------------------------------------------------------------------------------
# Noise floor: the same HF graph in fp32

def _upcast(x):
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() else x
    if isinstance(x, (tuple, list)):
        return type(x)(_upcast(v) for v in x)
    if isinstance(x, dict):
        return {k: _upcast(v) for k, v in x.items()}
    return x


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def fp32_end_to_end(hf_model, rows, hf_cap: Capture, valid, device, softcap, prog=None) -> dict[str, float]:
    """End-to-end noise floors: the HF text graph in fp32, one decoder layer resident at a time (so it fits
    beside the bf16 model): embed -> layers (HF's own layer kwargs, RoPE recomputed in fp32) -> norm ->
    lm_head -> softcap. Each module's output is compared with the bf16 capture at once; only the
    scalar rel-L2 is kept."""
    base = hf_model.model
    kinds = {h: r.kind for h, _, r in rows}
    floors: dict[str, float] = {}
    fctx = types.SimpleNamespace(valid=valid)

    def run_copy(module, name, *args, **kwargs):
        mod32 = copy.deepcopy(module).float()
        handles = []
        for rel, sub in mod32.named_modules():
            full = f"{name}.{rel}" if rel else name
            if full in kinds and hf_cap.first(full) is not None:
                def hook(m, a, out, full=full):
                    floors[full] = _floor_value(kinds[full], out, hf_cap.first(full).output, fctx)
                handles.append(sub.register_forward_hook(hook))
        with torch.no_grad():
            out = mod32(*args, **kwargs)
        for h in handles:
            h.remove()
        del mod32
        return out

    ids = hf_cap.first("model.embed_tokens").args[0].to(device)
    h = run_copy(base.embed_tokens, "model.embed_tokens", ids)
    for i, layer in enumerate(base.layers):
        if prog is not None:
            prog.note(f"fp32 floor: layer {i + 1}/{len(base.layers)}")
        call = hf_cap.first(f"model.layers.{i}")
        kwargs = _to(dict(call.kwargs), device)
        with torch.no_grad():
            kwargs["position_embeddings"] = base.rotary_emb(h, kwargs["position_ids"], hf_model.config.layer_types[i])
        h = run_copy(layer, f"model.layers.{i}", h, **kwargs)
    h = run_copy(base.norm, "model.norm", h)
    logits = run_copy(hf_model.lm_head, "lm_head", h).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    hf_logits = hf_cap.first("__logits__").output
    floors["logits"] = _floor_value("logits", logits, hf_logits, fctx)
    floors["__kl_max__"] = M.logits_metrics(logits, hf_logits.to(logits.device), valid.to(logits.device))["kl_max"]
    return floors


def _floor_value(kind: str, out32, out_bf16, fctx) -> float:
    """rel-L2 of the bf16 output against the fp32 one (HF vs HF), in the comparison layout of ``kind``."""
    call32, call16 = Call((), {}, out32, 0), Call((), {}, out_bf16, 0)
    ref, test = hf_value(kind, call32), hf_value(kind, call16)
    if kind == "router":
        test = {"dense": torch.zeros_like(test["probs"]).scatter(1, test["top_i"], test["top_w"].float()),
                "top_i": test["top_i"], "top_w": test["top_w"]}
        ref = _to(ref, test["dense"].device)
        # the routing weights' own error, over the tokens whose top-k sets agree: a flip between HF-bf16 and
        # HF-fp32 moves weight wholesale and would make the floor (and the gate) as large as the flips
        return float(compare_values("router", ref, test, fctx)["router"]["agree_weight_rel_l2"])
    return float(compare_values(kind, ref, test.to(ref.device), fctx)["rel_l2"])


def fp32_isolated(hf_model, hf_name: str, call, device) -> Any:
    """The HF module in fp32 on its own (upcast) captured inputs."""
    mod = dict(hf_model.named_modules())[hf_name]
    mod32 = copy.deepcopy(mod).float()
    with torch.no_grad():
        out = mod32(*_upcast(_to(call.args, device)), **_upcast(_to(call.kwargs, device)))  # upcast on the device
    del mod32
    return out


# ---------------------------------------------------------------------------------------------------

def env_info(device: str) -> dict:
    import transformers

    try:
        import megatron.core as mc
        mc_version = getattr(mc, "__version__", None)
    except Exception:  # pragma: no cover
        mc_version = None
    if mc_version is None:
        from importlib.metadata import version
        mc_version = version("megatron-core")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except Exception:
        commit = None
    return {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "megatron_core": mc_version, "git_commit": commit, "host": platform.node(),
        "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
    }


def _peak_memory(device: str, prog: "Progress") -> dict:
    import resource

    out = {"host_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device == "cuda":
        out["gpu_peak_gib"] = max([torch.cuda.max_memory_allocated() / 2**30, *prog.gpu_peaks.values()])
    return out


def run_text(spec: RunSpec) -> dict:
    """The whole parity run for a text case; returns the results dict (DESIGN.md section 8)."""
    device, dtype = spec.device, DTYPES[spec.dtype]
    prog = Progress(spec.progress)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    megatron_env.init(tp=spec.tp, ep=spec.ep, seed=spec.seed)
    store = Store(offload=spec.offload)

    with prog.phase("build_hf"):
        hf_model, hf_config = build_hf_text(spec, dtype, device)
    host_weights = host_stage_for_weights(hf_model, spec.sequential, device)
    args = TextArgs.from_hf(hf_config)
    rows = text_rows(args)
    hf_names = {h for h, _, r in rows if h != "logits"} | {"model.rotary_emb"}
    hf_names |= {f"model.layers.{i}" for i in range(args.num_layers)}

    from parity.engine.inputs import text_inputs
    inputs = text_inputs(args.vocab_size, spec.batch, spec.seq_len, spec.pad_tail, spec.seed,
                         args.pad_token_id or 0, device, padding=spec.padding, lengths=spec.lengths,
                         position_offset=spec.position_offset)
    valid = inputs["attention_mask"].bool()

    def run_hf(model):
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                     position_ids=inputs["position_ids"], use_cache=False).logits

    timings = {"hf_forward_s": _timed(lambda: run_hf(hf_model), device)}
    with prog.phase("hf_forward"):
        hf_cap, hf_logits = capture_hf(hf_model, hf_names, lambda: run_hf(hf_model), store)
        hf_logits = store.keep(hf_logits)
        store.sync()
        hf_cap.calls["__logits__"] = [Call((), {}, hf_logits, 0)]

    floors_e2e: dict[str, float] = {}
    floors_iso: dict[str, float] = {}
    if dtype != torch.float32:
        with prog.phase("noise_floor"):
            floors_e2e = fp32_end_to_end(hf_model, rows, hf_cap, valid, device, args.final_logit_softcapping, prog)
        with prog.phase("noise_floor_isolated"):
            floors_iso = _isolated_floors(hf_model, rows, hf_cap, valid, device, args.final_logit_softcapping)

    with prog.phase("hf_state_to_host"):
        hf_state, host_weights = weights_for_conversion(hf_model, spec.sequential, host_weights)
    hf_ref = weakref.ref(hf_model)
    del hf_model  # sequential: the last reference; otherwise the caller's ``hf_state`` keeps the weights alive
    hf_released = released(hf_ref, device) if spec.sequential else None

    from parity.bridge.convert import iter_hf_to_megatron
    from parity.models.text import Gemma4Model

    with prog.phase("build_megatron"):
        mc_model = Gemma4Model(args, dtype=dtype, device=device).eval()
    rk = megatron_env.ranks()
    with prog.phase("convert"):
        load_streamed(mc_model, iter_hf_to_megatron(
            hf_state, args, tp_rank=rk["tp_rank"], tp_size=rk["tp_size"], ep_rank=rk["ep_rank"],
            ep_size=rk["ep_size"], etp_rank=rk["etp_rank"], etp_size=rk["etp_size"],
            device=device if device == "cuda" else None))
    with prog.phase("roundtrip"):
        roundtrip = _roundtrip(mc_model, args, hf_state)
    # Megatron's own masks and RoPE tables, from raw inputs
    b, s = inputs["input_ids"].shape
    mc_masks = mc_model.build_masks(b, s, inputs["attention_mask"], device=device)
    mc_rope = mc_model.rotary_tables(inputs["position_ids"])
    ctx = Ctx(batch=b, seq=s, valid=valid, mc_model=mc_model, mc_masks=mc_masks, mc_rope=mc_rope,
              layer_types=[la.layer_type for la in args.layers], num_heads=args.num_heads,
              layer_shapes=[(la.head_dim, la.num_kv_heads) for la in args.layers], device=device)

    timings["megatron_forward_s"] = _timed(lambda: mc_model(
        input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], padding_mask=inputs["attention_mask"]),
        device)
    records: list[dict] = []
    with prog.phase("megatron_forward"):
        mc_logits = _megatron_end_to_end(mc_model, rows, hf_cap, hf_logits, inputs, ctx, records)
    with prog.phase("isolated_replay"):
        _isolated(mc_model, rows, hf_cap, hf_logits, ctx, records, prog)
    if dtype != torch.float32 and spec.tp * spec.ep == 1:  # math errors under bf16 rounding (issue 11, item 1)
        from parity.engine.replay32 import fp32_replay
        with prog.phase("fp32_replay"):
            fp32_replay(hf_config, hf_state, mc_model, rows, hf_cap, ctx, records, prog)
    del hf_state
    if host_weights is not None:
        host_weights.close()
    with prog.phase("metrics"):
        records += _table_rows(args, hf_cap, ctx, inputs, dtype)
        logits_summary, verdict = judge(records, hf_logits, mc_logits, valid, spec, floors_e2e, floors_iso,
                                        floors_e2e.get("__kl_max__"))
    env = env_info(device)
    result = G.summarise(records, verdict, logits_summary)
    result.update({
        "case": spec.name, "passed": verdict["passed"], "device": device, "dtype": spec.dtype, "seed": spec.seed,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "env": env,
        "config_hash": config_hash(hf_config), "layer_types": ctx.layer_types,
        "roundtrip": roundtrip, "phases": prog.phases, "timings": timings, "peak_memory": {**_peak_memory(device, prog), "gpu_peak_by_phase_gib": prog.gpu_peaks},
        "parallel": {"tp": spec.tp, "ep": spec.ep, "world_size": spec.tp * spec.ep}, "sequential": spec.sequential,
        "hf_released_before_megatron": hf_released, "gates": spec.gates,
        "host_staged_gib": {"activations": store.host_bytes / 2**30,
                            "weights": (host_weights.staged_bytes if host_weights is not None else 0) / 2**30},
        "inputs": {"batch": b, "seq_len": s, "pad_tail": spec.pad_tail, "padding": spec.padding,
                   "lengths": valid.sum(1).tolist(), "position_offset": spec.position_offset},
    })
    result["checks"]["roundtrip"] = roundtrip["bit_exact"] == roundtrip["tensors"] and roundtrip["tensors"] > 0
    result["passed"] = all(result["checks"].values())
    return result


def near_tie_margin(dtype: str) -> float | None:
    """Top-1/top-2 logit gap below which a top-1 flip counts as a near tie: fp32 1e-4; lower precisions use
    metrics' default (one bf16 step at the logit's magnitude)."""
    return 1e-4 if dtype == "float32" else None


def judge(records, hf_logits, mc_logits, valid, spec: RunSpec, floors_e2e: dict, floors_iso: dict,
          kl_floor: float | None) -> tuple[dict, dict]:
    """Logits metrics, each record's noise floor (bf16: the same module's HF-bf16 vs HF-fp32 rel-L2 in the same
    mode; masks and RoPE tables have none) and the case's gates: ``(logits_summary, verdict)``."""
    low = spec.dtype != "float32"
    logits_summary = M.logits_metrics(hf_logits.to(mc_logits.device), mc_logits, valid,
                                      near_tie_margin=near_tie_margin(spec.dtype))
    for rec in records:
        floors = floors_e2e if rec["mode"] == "end_to_end" else floors_iso
        rec["floor"] = floors.get(rec["name"]) if low and rec["kind"] not in ("mask", "rope") \
            and rec["mode"] != "fp32_replay" else None
    verdict = G.apply(records, spec.gates, spec.dtype, logits_summary, kl_floor=kl_floor)
    logits_summary["kl_max_floor"], logits_summary["kl_gate"] = verdict["kl_floor"], verdict["kl_gate"]
    return logits_summary, verdict


def load_streamed(model, pairs) -> None:
    """Copy converted tensors into ``model`` as they come (no second full state dict in memory); every
    state-dict entry but ``_extra_state`` must be covered exactly once, with its shape."""
    targets = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    loaded: set[str] = set()
    with torch.no_grad():
        for name, t in pairs:
            dst = targets.get(name)
            if dst is None:
                raise RuntimeError(f"bridge/model mismatch: {name} (unexpected)")
            if name in loaded:
                raise RuntimeError(f"bridge/model mismatch: {name} (twice)")
            if tuple(dst.shape) != tuple(t.shape):
                raise RuntimeError(f"bridge/model mismatch: {name} (shape {tuple(t.shape)} vs {tuple(dst.shape)})")
            dst.copy_(t)
            loaded.add(name)
    missing = sorted(set(targets) - loaded)
    if missing:
        raise RuntimeError(f"bridge/model mismatch: missing {missing[:3]}")


def host_stage_for_weights(hf_model, sequential: bool, device: str):
    """Start pinning host memory for the HF weights (sequential CUDA runs) in the background, right after the
    HF model is built: the page locking overlaps the forwards and the noise floor instead of the hand-over."""
    if not (sequential and device == "cuda"):
        return None
    return HostStage(reserve=stage_bytes(hf_model.state_dict().values()), background=True)


def weights_for_conversion(hf_model, sequential: bool, stage=None) -> tuple[dict, Any]:
    """HF's state dict for the bridge and the round trip, and the host stage holding it (close it when done).
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


def _first_tensor(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def _isolated_floors(hf_model, rows, hf_cap: Capture, valid, device, softcap) -> dict[str, float]:
    """Isolated noise floors: each HF module in fp32 on its own (upcast) captured inputs (bf16 runs only)."""
    fctx = types.SimpleNamespace(valid=valid)
    out: dict[str, float] = {}
    for hf_name, _, row in rows:
        if hf_name in out:
            continue
        if row.kind == "logits":  # lm_head in fp32 on the captured final-norm output, then softcap
            norm, lm = hf_cap.first("model.norm"), hf_cap.first("lm_head")
            if norm is None or lm is None:
                continue
            logits = _first_tensor(fp32_isolated(hf_model, "lm_head", Call(norm.output if isinstance(
                norm.output, tuple) else (norm.output,), {}, None, 0), device)).float()
            if softcap is not None:
                logits = torch.tanh(logits / softcap) * softcap
            out[hf_name] = _floor_value("logits", logits, hf_cap.first("__logits__").output, fctx)
            continue
        call = hf_cap.first(hf_name)
        if call is None:
            continue
        try:
            out[hf_name] = _floor_value(row.kind, fp32_isolated(hf_model, hf_name, call, device), call.output, fctx)
        except Exception:  # a module that cannot be re-run alone gets no floor: its gate is floor_abs only
            continue
    return out


def _roundtrip(mc_model, args, hf_state, export=None) -> dict:
    """Export the (possibly sharded) Megatron weights back to HF and compare every tensor bit for bit.

    One HF tensor at a time: the export is a stream (``iter_gather_from_world`` in a world of several ranks:
    each Megatron tensor's shards are all-gathered on their device), each exported tensor is compared on its
    device with the reference (brought over from the host when staged there) and dropped. ``export`` (a
    dict-returning ``export(mc_state, args)``) replaces the text bridge (the VLM passes its own)."""
    from parity.bridge.convert import iter_gather_from_world, iter_megatron_to_hf, same_bits

    mc_sd = {k: v for k, v in mc_model.state_dict().items() if v is not None and not k.endswith("_extra_state")}
    if export is not None:
        pairs = export(mc_sd, args).items()
    elif torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        pairs = iter_gather_from_world(mc_sd, args)
    else:
        pairs = iter_megatron_to_hf(mc_sd, args)
    ref = {k: v for k, v in hf_state.items() if k != "lm_head.weight" or not args.tie_word_embeddings}
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


def hooked_forward(mc_model, rows, hf_cap: Capture, forward, on_output) -> Any:
    """Run ``forward()`` with a hook on every Megatron module of ``rows`` that HF captured: the first time a
    module returns, ``on_output(hf_name, mc_name, row, call, module, out)`` runs for each of its rows (so
    nothing of the Megatron side is kept). Returns what ``forward()`` returned."""
    modules = dict(mc_model.named_modules())
    by_mc: dict[str, list[tuple[str, Align]]] = {}
    for hf_name, mc_name, row in rows:
        if mc_name in modules:
            by_mc.setdefault(mc_name, []).append((hf_name, row))
    done: set[str] = set()
    handles = []
    for mc_name, pairs in by_mc.items():
        def hook(m, a, out, pairs=pairs, mc_name=mc_name):
            for hf_name, row in pairs:
                call = hf_cap.first(hf_name)
                if call is None or hf_name in done:
                    continue
                done.add(hf_name)
                on_output(hf_name, mc_name, row, call, m, out)
        handles.append(modules[mc_name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            return forward()
    finally:
        for h in handles:
            h.remove()


def _megatron_end_to_end(mc_model, rows, hf_cap, hf_logits, inputs, ctx, records) -> torch.Tensor:
    """Megatron forward on the raw inputs; each hooked output is compared at once against HF's."""
    def compare(hf_name, mc_name, row, call, module, out):
        m_ = compare_values(row.kind, hf_value(row.kind, call), mc_value(row.kind, out, ctx, _layer(hf_name), module),
                            ctx)
        records.append(row_record(hf_name, mc_name, row, "end_to_end", m_, hf_cap.order.get(hf_name, 0)))

    logits = hooked_forward(mc_model, rows, hf_cap, lambda: mc_model(
        input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], padding_mask=inputs["attention_mask"]),
        compare)
    logits_row = next(r for h, _, r in rows if h == "logits")
    m_ = compare_values("logits", hf_logits, logits, ctx)
    records.append(row_record("logits", "logits", logits_row, "end_to_end", m_, _logits_order(hf_cap)))
    return logits


def _logits_order(hf_cap) -> int:
    return hf_cap.order.get("lm_head", max(hf_cap.order.values(), default=0)) + 1


def _isolated(mc_model, rows, hf_cap, hf_logits, ctx, records, prog=None) -> None:
    modules = dict(mc_model.named_modules())
    last_layer = None
    for hf_name, mc_name, row in rows:
        layer = _layer(hf_name)
        if prog is not None and layer is not None and layer != last_layer:
            prog.note(f"isolated replay: layer {layer + 1}/{len(ctx.layer_types)}")
            last_layer = layer
        call = hf_cap.first(hf_name if row.kind != "logits" else "model.norm")
        if call is None:
            continue
        module = modules.get(mc_name) if row.kind != "logits" else mc_model
        with torch.no_grad():
            test = replay(row.kind, module, call, ctx, _layer(hf_name))
        ref = hf_logits if row.kind == "logits" else hf_value(row.kind, call)
        m_ = compare_values(row.kind, ref, test, ctx)
        order = _logits_order(hf_cap) if row.kind == "logits" else hf_cap.order.get(hf_name, 0)
        records.append(row_record(hf_name, mc_name, row, "isolated", m_, order))


def _layer(name):
    from parity.engine.alignment import layer_of
    return layer_of(name)


def _table_rows(args, hf_cap, ctx, inputs, dtype, hf_prefix: str = "model.") -> list[dict]:
    """Masks and RoPE tables compared as their own rows (each side built its own from raw inputs).
    ``hf_prefix`` is where HF's text model lives (``model.language_model.`` inside the VLM)."""
    out = []
    rope_name = f"{hf_prefix}rotary_emb"
    rope_calls = hf_cap.calls.get(rope_name, [])
    for call in rope_calls:
        layer_type = call.args[2] if len(call.args) > 2 else call.kwargs.get("layer_type")
        cos, sin = call.output
        freqs = ctx.mc_rope[layer_type]  # [s, b, 1, d]
        mc_cos = torch.cos(freqs).to(dtype)[:, :, 0].transpose(0, 1)
        mc_sin = torch.sin(freqs).to(dtype)[:, :, 0].transpose(0, 1)
        m_ = M.tensor_metrics(torch.cat([cos, sin], -1).to(mc_cos.device), torch.cat([mc_cos, mc_sin], -1),
                              ctx.valid)
        rec = row_record(rope_name, f"rotary_tables[{layer_type}]",
                         Align(rope_name, "rotary", "rope"), "end_to_end", m_,
                         hf_cap.order.get(rope_name, 0))
        rec["detail"] = layer_type
        out.append(rec)
    for layer_type in dict.fromkeys(ctx.layer_types):
        i = ctx.layer_types.index(layer_type)
        call = hf_cap.first(f"{hf_prefix}layers.{i}")
        hf_mask = call.kwargs.get("attention_mask") if call else None
        ref = _bool_mask(hf_mask, ctx.batch, ctx.seq, ctx.valid.device)
        mine = ctx.mc_masks[layer_type].to(ref.device)
        # every key of every real query row: a padded key a side lets through must show (padded query rows
        # attend to nothing real and are never compared)
        rows_valid = ctx.valid[:, None, :, None].to(ref.device).expand_as(ref)
        diff = (ref != mine) & rows_valid
        n = int(diff.sum())
        m_ = {"cosine": 1.0 if n == 0 else 0.0, "rel_l2": float(n) / max(1, int(rows_valid.sum())),
              "max_abs": float(n > 0), "mismatches": n}
        name = f"{hf_prefix}layers.{i}.self_attn"
        rec = row_record(name, f"masks[{layer_type}]", Align(name, "mask", "mask", gate="exact"), "end_to_end", m_,
                         hf_cap.order.get(f"{name}.q_proj", hf_cap.order.get(name, 0)))
        rec["detail"] = f"attention mask ({layer_type}): {n} mismatching entries"
        out.append(rec)
    return out


def _bool_mask(mask, b, s, device) -> torch.Tensor:
    if mask is None:
        return torch.ones(s, s, dtype=torch.bool, device=device).tril()[None, None].expand(b, 1, s, s)
    mask = mask.to(device)
    if mask.dtype != torch.bool:
        mask = mask == 0
    return mask.expand(b, 1, s, s)


def run_case(case, *, device: str | None = None, dtype: str | None = None, checkpoint: str | None = None,
             seed: int | None = None, progress: bool = False) -> dict:
    """Python API: run one case (a ``parity.cases.Case``) and return the results dict."""
    spec = spec_from_case(case, device=device, dtype=dtype, checkpoint=checkpoint, seed=seed, progress=progress)
    if spec.kind == "vlm":
        from parity.engine.vlm import run_vlm
        return run_vlm(spec)
    return run_text(spec)


def spec_from_case(case, *, device=None, dtype=None, checkpoint=None, seed=None, progress=False) -> RunSpec:
    g = lambda obj, key, default=None: (obj.get(key, default) if isinstance(obj, dict)  # noqa: E731
                                        else getattr(obj, key, default))
    model = g(case, "model", {}) or {}
    inputs = g(case, "inputs", {}) or {}
    parallel = g(case, "parallel", {}) or {}
    run = g(case, "run", {}) or {}
    devices = list(g(case, "devices", ["cpu", "cuda"]) or ["cpu", "cuda"])
    if device is None:
        device = "cuda" if torch.cuda.is_available() and "cuda" in devices else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError(f"case {g(case, 'name')} asks for CUDA but no GPU is available")
    if device not in devices:
        raise UserError(f"case {g(case, 'name')} runs on {', '.join(devices)} only, not {device}")
    builder = g(model, "builder", "tiny_text")
    env_name = g(model, "checkpoint_env")
    if checkpoint is None and builder == "checkpoint":
        checkpoint = os.environ.get(env_name or "GEMMA4_CHECKPOINT")
        if not checkpoint:
            raise UserError(f"case {g(case, 'name')} needs a checkpoint: pass --checkpoint DIR or set "
                            f"{env_name or 'GEMMA4_CHECKPOINT'}")
    return RunSpec(
        name=g(case, "name"), kind=g(case, "kind", "text"), builder=builder,
        overrides=dict(g(model, "overrides", {}) or {}), checkpoint=checkpoint, device=device,
        dtype=dtype or g(case, "dtype", "float32"), seed=seed if seed is not None else g(case, "seed", 0),
        batch=g(inputs, "batch", 2), seq_len=g(inputs, "seq_len", 40), pad_tail=g(inputs, "pad_tail", 0),
        padding=g(inputs, "padding", "right"), lengths=list(g(inputs, "lengths") or []) or None,
        position_offset=g(inputs, "position_offset", 0),
        images=g(inputs, "images"), tp=g(parallel, "tp", 1), ep=g(parallel, "ep", 1),
        sequential=g(run, "sequential", False), offload=g(run, "offload", False),
        gates=_plain(g(case, "gates", {}) or {}), progress=progress,
    )


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if hasattr(x, "__dataclass_fields__"):
        import dataclasses
        return _plain(dataclasses.asdict(x))
    return x
