"""The HF side of a case, built once: model, config, rows, raw inputs, capture, weights and noise floors.

A ``Reference`` is what every system under test is compared against, and what plant scripts and later modes
reuse: ``Reference.build`` makes the model kind's HF model and raw inputs and captures its forward (every
aligned module's inputs and output); the pipeline then adds each mode's bf16 noise floors
(``floors[mode]``) and calls ``release`` before the first system is built (its weights for conversion, on
the host for a ``sequential`` case, whose HF model then moves off the device onto them). Nothing here is cached across runs:
every run builds and reruns HF from the installed transformers classes.
"""
from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from parity.cases import check_step_layers
from parity.config import TextArgs
from parity.engine import adapters as A
from parity.engine.alignment import TABLE_KINDS, Aligned, Stack, expand, text_layer_of
from parity.engine.compare import Call, Capture, Store, Where, capture_hf
from parity.engine.hoststage import HostStage, host_bytes, stage_bytes, storage_key
from parity.engine.kinds import KINDS
from parity.engine.progress import Progress, timed
from parity.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def device_budget(case, device: str, weight_bytes: int) -> int:
    """Bytes of captures an offloading run keeps on the device (``[run] device_reserve_gib``): the device's memory
    less the model's weights (a sequential run's system holds as many as HF did) and the case's reserve for the run's
    working memory; 0 (everything to the host) without the setting, off CUDA, or in a run that is not sequential (HF
    and the system resident together, as ``scripts/gpu_plants.py`` runs forward plants on an H200: no room)."""
    reserve = case.run.device_reserve_gib
    if reserve is None or not case.run.sequential or device != "cuda" or not torch.cuda.is_available():
        return 0
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return max(0, total - weight_bytes - reserve * 2**30)


@dataclass
class Reference:
    case: Any
    kind: Any  # the model kind (parity.engine.kinds): text or VLM
    device: str
    dtype: str  # "float32" | "bfloat16"
    seed: int
    checkpoint: str | None
    model: Any  # the HF model (a sequential run's on the host once released, on its staged weights)
    config: Any
    text_args: TextArgs
    rows: list[Aligned]
    inputs: dict[str, torch.Tensor]
    where: Where
    groups: dict | None
    cap: Capture
    logits: torch.Tensor
    store: Store
    prog: Progress
    timings: dict
    floors: dict[str, dict[str, float]] = field(default_factory=dict)  # mode name -> HF name -> floor
    extra: dict[str, Any] = field(default_factory=dict)  # mode name -> what its ``prepare`` computed of HF
    state: dict | None = None  # HF's state dict for conversion and the round trip (``release``)
    host_weights: HostStage | None = None
    released: bool | None = None  # a sequential case: was the HF model off the device before the systems were built
    adapters: A.Adapters | None = None  # a LoRA case: peft's LoRA on HF's model (``parity.engine.adapters``)
    final: bool = False  # the run against the last system (``pipeline.run_systems``): modes let go of what only they
    # read of HF's side once done (``backward.release``); a caller reusing the reference (plant scripts) leaves it False

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @cached_property
    def row_kinds(self) -> dict:
        """HF name -> the row's ``Kind``, for every aligned row but the masks and RoPE tables (a mask row carries its
        attention module's name: a vision attention's gradient was measured as a mask's, an internal error)."""
        return {a.hf: a.row.kind for a in self.rows if a.row.kind not in TABLE_KINDS}

    @property
    def sequential(self) -> bool:
        return self.case.run.sequential

    @property
    def text_config(self):
        return self.kind.text_config(self.config)

    @classmethod
    def build(cls, case, *, device: str, dtype: str | None = None, checkpoint: str | None = None,
              seed: int | None = None, progress: bool | Progress = False) -> "Reference":
        """The model kind's HF model, the case's raw inputs, and HF's forward captured module by module."""
        dtype, seed = dtype or case.dtype, case.seed if seed is None else seed
        prog = progress if isinstance(progress, Progress) else Progress(progress)
        kind = KINDS[case.kind]
        if case.needs_checkpoint and not checkpoint:
            raise UserError(f"case {case.name} needs a checkpoint: pass --checkpoint DIR or set "
                            f"{case.model.checkpoint_env}")
        kind.check(case, checkpoint)
        with prog.phase("build_hf"):
            model, config = kind.build(case, DTYPES[dtype], device, checkpoint, seed)
            adapters = None if case.lora is None else \
                A.attach(model, case.lora, kind.prefixes[Stack.TEXT], DTYPES[dtype])  # in place: HF's paths stay
        weight_bytes = stage_bytes(model.state_dict().values())
        host_weights = HostStage(reserve=weight_bytes, background=True) \
            if case.run.sequential and device == "cuda" else None  # page locking overlaps the forwards and floors
        text_args = TextArgs.from_hf(kind.text_config(config))
        if case.train is not None and case.train.grad_layers is not None:  # before any backward: HF's side
            check_step_layers(case, len(text_args.layers))  # a checkpoint's model: known once built
            freeze_outside(model, case.train.grad_layers, embedding=case.train.grad_embedding)
        rows = expand(kind.prefixes, text_args, kind.vision_layers(config), kind.audio_layers(config))
        inputs = kind.inputs(config, case, seed, device)
        pos = inputs.get("image_position_ids")
        feats = inputs.get("input_features_mask")
        where = Where(valid=inputs["attention_mask"].bool(), real=None if pos is None else ~(pos == -1).all(dim=-1),
                      audio=kind.audio_frames(inputs), audio_input=None if feats is None else feats.bool())
        store = Store(offload=case.run.offload, device_budget=device_budget(case, device, weight_bytes))
        timings = {"hf_forward_s": timed(lambda: kind.forward(model, inputs), device)}
        with prog.phase("hf_forward"):
            cap, logits = capture_hf(model, rows, lambda: kind.forward(model, inputs), store)
            cap.calls["logits"] = [Call((), {}, store.keep(logits), 0)]
            store.settle(cap)  # over the device budget: every capture on the host
            store.sync()
            logits = cap.calls["logits"][0].output
        ref = cls(case=case, kind=kind, device=device, dtype=dtype, seed=seed, checkpoint=checkpoint, model=model,
                  config=config, text_args=text_args, rows=rows, inputs=inputs, where=where,
                  groups=kind.groups(inputs), cap=cap, logits=logits, store=store, prog=prog, timings=timings,
                  host_weights=host_weights, adapters=adapters)
        prog.held = ref.held_text  # each phase's progress line says what the reference holds on the host
        return ref

    def release(self) -> None:
        """HF's weights for the systems (on the host, page-locked, for a sequential case) and, for a sequential
        case, the HF model moved off the device onto them (``park``: no copy). Idempotent: the first system's run
        calls it, the others find it done."""
        if self.state is not None:
            return
        with self.prog.phase("hf_state_to_host"):
            self.state, self.host_weights = weights_for_conversion(self.model, self.sequential, self.host_weights)
            if self.sequential:  # its weights are those staged for the systems: nothing of it stays on the device
                self.released = park(self.model, self.state, self.device)
            if self.adapters is not None:  # HF's base weights for the system (its adapters come apart)
                self.state = A.base_state(self.state)

    def held(self) -> dict[str, int]:
        """Host bytes the reference holds, by what they are (each storage once, in this order): HF's weights staged
        for the systems (a sequential run's parked model is on them), the rest of HF's model on the host (a CPU run's
        whole model), the captured activations, HF's gradients from its backward (``param``: its parameters',
        ``rows``: its modules' output and input gradients) and those of its fp32 backward kept for the truth
        (``fp32 param``, ``fp32 rows``), and the rest of what modes prepared. What a run killed for memory leaves in
        its log (``--progress``), and the 26B plan's numbers (docs/training.md)."""
        seen: set = set()
        stage = [] if self.host_weights is None else self.host_weights.chunks  # pinned from the start (CUDA)
        out = {"weights staged": host_bytes([stage, self.state or {}], seen),
               "HF model": 0 if self.model is None else host_bytes([*self.model.parameters(), *self.model.buffers()],
                                                                   seen),
               "activations": host_bytes([(c.args, c.kwargs, c.output) for calls in self.cap.calls.values()
                                          for c in calls], seen)}
        for label, name in (("", "backward"), ("fp32 ", "backward32")):
            side = self.extra.get(name)
            grads = {} if side is None else side["grads"].out
            out[f"{label}param grads"] = host_bytes([g for k, g in grads.items() if k[0] == "param_grad"], seen)
            out[f"{label}row grads"] = host_bytes([g for k, g in grads.items() if k[0] != "param_grad"], seen)
        out["other"] = host_bytes([v for k, v in self.extra.items() if k not in ("backward", "backward32")], seen)
        return out

    def held_text(self) -> str:
        return "held: " + ", ".join(f"{k} {v / 2**30:.2f}" for k, v in self.held().items() if v) + " GiB"

    def close(self) -> None:
        """Drop the model, the weights and the host stage (the capture stays readable)."""
        self.state = self.model = None
        if self.host_weights is not None:
            self.host_weights.close()
            self.host_weights = None


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


def park(model, staged: dict, device: str) -> bool:
    """A sequential run's HF model off the device, without a copy: its parameters and persistent buffers re-pointed at
    the host tensors staged for the systems (``staged``, its state dict's keys), its other buffers moved to the host.
    Modes that run HF's modules later take one module's weights to the device at a time. Returns whether the
    device holds none of its tensors."""
    with torch.no_grad():
        for name, p in model.named_parameters(remove_duplicate=False):
            p.data = staged[name]
        for name, b in model.named_buffers(remove_duplicate=False):
            b.data = staged[name] if name in staged else b.data.cpu()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])


def freed(ref: weakref.ref, device: str) -> bool:
    """Collect, free the CUDA cache, and say whether the object behind ``ref`` is gone."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return ref() is None


def freeze_outside(model, layers, embedding: bool = False) -> int:
    """Every parameter of HF's ``model`` outside the text decoder ``layers`` frozen (``train.grad_layers``: only those
    get gradients; the activation gradients, and those layers' own, are what they are without it), but the word
    embedding and the head (one tensor where tied) when ``embedding`` (``train.grad_embedding``); returns how many
    still train."""
    keep = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings())
            if embedding and m is not None}
    n = 0
    for name, p in model.named_parameters():
        if text_layer_of(name) not in layers and id(p) not in keep:
            p.requires_grad_(False)
        n += p.requires_grad
    return n
