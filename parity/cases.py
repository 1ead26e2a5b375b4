"""Cases are data: one TOML file per case in ``cases/``, validated strictly into a frozen ``Case``.

A case names the model (a builder and its overrides, or a checkpoint), the devices and dtype it runs in,
the raw inputs, the parallel layout, how the run is staged, the gates that decide parity, and the pytest
markers that select it. Every problem is reported as one ``CaseError`` line naming the file and the field::

    cases/gemma4-text-tiny.toml: inputs.pad_tail: must be smaller than inputs.seq_len (40), got 40

Schema (fields without a default are required)::

    name = "gemma4-text-tiny"            # must equal the file name without .toml
    description = "..."
    kind = "text"                        # "text" | "vlm"
    devices = ["cpu", "cuda"]            # subset of cpu, cuda; a case without "cpu" is GPU-only
    dtype = "float32"                    # default dtype: "float32" | "bfloat16"
    seed = 0
    markers = ["cpu"]                    # default []; of cpu, gpu, multigpu, slow, checkpoint
    [model]
    builder = "tiny_text"                # "tiny_text" | "full_text" | "e2b_tiny" | "e4b_tiny" | "31b_tiny" | "full_e4b" | "full_31b" | "tiny_vlm" | "tiny_vlm_audio" | "full_vlm" | "31b_vlm_tiny" | "e2b_vlm_tiny" | "e4b_vlm_tiny" | "checkpoint"
    overrides = { enable_moe_block = false }   # default {}: keyword arguments for the builder
    checkpoint_env = "GEMMA4_CHECKPOINT" # builder "checkpoint" only (and required there)
    [inputs]
    batch = 2
    seq_len = 40                         # required for text; optional for vlm (the images set the length)
    pad_tail = 5                         # default 0: right-padded positions of the last sequence
    images = [[[24, 32], [16, 16]], [[32, 24]]]   # vlm only (required): [h, w] per image, per sequence
    audio = [[1000], [600]]              # vlm with an audio tower only: clip durations (ms) per sequence
    max_soft_tokens = 280                # vlm only, default 70: the processor's token budget per image (70, 140,
                                         # 280 = its default, 560, 1120); each image is resized to fit it
    padding = "left"                     # default "right": where each sequence's padding goes
    lengths = [40, 23]                   # text only, optional: real tokens per sequence (not with pad_tail)
    position_offset = 0                  # default 0: position ids of real tokens start here
    [parallel]                           # default tp = ep = 1; world size tp*ep > 1 means torchrun
    tp = 1
    ep = 1
    sequence_parallel = false            # default false; tp > 1 only: megatron's sequence parallelism (activations
                                         # outside the TP regions split along the sequence over the TP ranks)
    [run]
    sequential = false                   # release the HF model before building Megatron
    offload = false                      # keep captured tensors on the host
    device_reserve_gib = 24              # with offload, optional: captured tensors stay on the device while it keeps
                                         # this much free beside the model's weights (the run's working memory);
                                         # the rest go to the host (default: all to the host)
    spill_grads = false                  # train cases: HF's parameter gradients in a file on local disk, memory-
                                         # mapped (PARITY_SPILL_DIR, else the temporary folder), not host memory
    probe_layers = "all"                 # "all" | "first_of_type": the layers the probing rows run (the first layer
                                         # of each layer type: the full-size cases, for the probes' cost)
    [expected_failures]                  # optional: check -> why it fails for the case's own system (a known
                                         # finding); pytest marks that check xfail(strict): it must still fail
    [train]                              # optional: a train case (the backward mode runs)
    labels = "causal"                    # next-token labels from input_ids; padded positions are ignored
    steps = 1                            # default 1: optimizer steps of the trajectory (0: none, with no_step)
    no_step = "..."                      # steps = 0 only: why the case takes no optimizer step
    step_layers = [0, 5]                 # default all: the optimizer step and trajectory train these text decoder
                                         # layers only, every other parameter frozen on both sides (as a user
                                         # freezing layers: the gradient norm and clipping are theirs alone)
    step_layers_why = "..."              # with step_layers: why the step trains a subset
    grad_layers = [5]                    # default all: only these text decoder layers' parameters get gradients, on
                                         # both sides, every other parameter frozen from the start (the activation
                                         # gradients and these layers' are those of a run without it; step_layers, if
                                         # given, among them)
    grad_layers_why = "..."              # with grad_layers: why
    grad_embedding = true                # default false; with grad_layers: the word embedding (and the head tied to
                                         # it) gets its gradient too (every layer then gets its input gradient)
    [train.optimizer]                    # AdamW, as both sides' users run it
    lr = 1e-4
    betas = [0.9, 0.95]
    eps = 1e-8
    weight_decay = 0.0
    clip_grad = 1.0                      # default none: global grad-norm clipping
    [train.overrides]                    # default {}: a system default a case changes -> the stated reason
    [train.no_fp32_truth]                # default {}: parameter glob -> why its fp32 gradient is not kept for the
                                         # truth gate in a bf16 run (its rows are judged by their floor alone)
    [lora]                               # optional: a LoRA case (adapters on both sides; the lora mode runs)
    targets = ["q_proj", "o_proj"]       # HF module names of the text decoder adapted (peft's target_modules);
                                         # "experts": the routed experts' parameters (peft's target_parameters
                                         # experts.gate_up_proj, experts.down_proj; MoE models, dropout 0)
    experts = "shared"                   # with "experts" (default "shared"): how the Megatron side holds them --
                                         # "shared": one adapter per layer for all experts (Megatron-Bridge's
                                         # recipe, share_expert_adapters); "per_expert": one per expert
    r = 8                                # rank
    alpha = 16                           # peft lora_alpha / Megatron-Bridge alpha: scale alpha / r
    dropout = 0.1                        # default 0: LoRA dropout (identity in evaluation)
    seed = 1                             # default 0: the random non-zero A and B
    [gates]
    exact = ["model.embed_tokens"]       # default []: HF module names or kinds gated bit-exactly
    [gates.float32]
    rel_l2 = 1e-5                        # per module
    logits_rel_l2 = 1e-5
    kl_max = 1e-6                        # per-token KL, max over tokens
    grad_rel_l2 = 1e-5                   # train cases (required there): every gradient row, and the loss
    trajectory_band = 4.0                # optional, train cases: each step after the first within the larger of
                                         # grad_rel_l2 and this x HF's own trajectory against itself on weights one
                                         # rounding apart (a model whose training amplifies round-off)
    [gates.bfloat16]
    floor_multiplier = 4.0               # rel_l2 <= floor_multiplier * floor + floor_abs
    floor_abs = 1e-3
    logits_kl_max = 0.05                 # KL max <= floor_multiplier * KL floor + logits_kl_max
    truth_multiplier = 1.5               # optional: rho; err vs HF-fp32 <= rho * floor + truth_abs
    grad_truth_multiplier = 1.5          # optional: rho of gradient rows (train cases; default truth_multiplier)
    truth_abs = 1e-3                     # optional
    ceiling_rel_l2 = 0.1                 # optional: cap of every module gate; a floor above: reference unstable
    ceiling_kl_max = 0.5                 # optional: the same for the logits KL max
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from parity.errors import CaseError, UserError

KINDS = ("text", "vlm")
BUILDERS = {"tiny_text": ("text",), "full_text": ("text",), "e2b_tiny": ("text",), "e4b_tiny": ("text",),
            "31b_tiny": ("text",), "full_e4b": ("text",), "full_31b": ("text",), "tiny_vlm": ("vlm",),
            "full_vlm": ("vlm",), "tiny_vlm_audio": ("vlm",), "31b_vlm_tiny": ("vlm",), "e2b_vlm_tiny": ("vlm",), "e4b_vlm_tiny": ("vlm",), "checkpoint": ("text", "vlm")}
SOFT_TOKENS = (70, 140, 280, 560, 1120)  # the image token budgets HF's Gemma 4 image processor supports
DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "bfloat16")
MARKERS = ("cpu", "gpu", "multigpu", "slow", "checkpoint")
SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16"}
ENV_CASES_DIR = "PARITY_CASES_DIR"


class _Section:
    """Read-only mapping view of a dataclass section, so ``dict(case.inputs)`` and ``section["batch"]`` work."""

    def keys(self):
        return [f.name for f in dataclasses.fields(self)]

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default) if key in self.keys() else default

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())


class FrozenDict(dict):
    """A dict that refuses in-place changes (builder overrides inside a frozen ``Case``)."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("case data is read-only; use Case.replace(...)")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _refuse  # type: ignore

    def __hash__(self):  # type: ignore[override]
        return hash(repr(sorted(self.items(), key=lambda kv: kv[0])))

    def __deepcopy__(self, memo):
        return FrozenDict(copy.deepcopy(dict(self), memo))

    def __reduce__(self):
        return (FrozenDict, (dict(self),))


@dataclass(frozen=True)
class ModelSpec(_Section):
    builder: str
    overrides: FrozenDict = field(default_factory=FrozenDict)
    checkpoint_env: str | None = None


@dataclass(frozen=True)
class Inputs(_Section):
    batch: int
    seq_len: int | None = None
    pad_tail: int = 0
    images: tuple[tuple[tuple[int, int], ...], ...] | None = None  # per sequence, (h, w) per image
    padding: str = "right"  # "right" | "left": where each sequence's padding goes
    lengths: tuple[int, ...] | None = None  # text only: real tokens per sequence (mixed lengths in one batch)
    position_offset: int = 0  # position ids of real tokens start here (a continuation after a prefix)
    max_soft_tokens: int = 70  # vlm: the image processor's token budget per image
    audio: tuple[tuple[int, ...], ...] | None = None  # vlm with audio: clip durations in ms, per sequence


@dataclass(frozen=True)
class Parallel(_Section):
    tp: int = 1
    ep: int = 1
    sequence_parallel: bool = False  # megatron's sequence parallelism (tp > 1)

    @property
    def world_size(self) -> int:
        return self.tp * self.ep


@dataclass(frozen=True)
class RunOptions(_Section):
    sequential: bool = False
    offload: bool = False
    device_reserve_gib: int | None = None  # with offload: captures stay on the device above this reserve
    spill_grads: bool = False
    probe_layers: str = "all"


@dataclass(frozen=True)
class Float32Gates(_Section):
    rel_l2: float
    logits_rel_l2: float
    kl_max: float
    grad_rel_l2: float | None = None  # train cases: gradients (of parameters, module outputs and inputs), the loss
    trajectory_band: float | None = None  # train cases: the trajectory within this x HF's own round-off band


@dataclass(frozen=True)
class Optimizer(_Section):
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float = 0.0
    clip_grad: float | None = None
    name: str = "adamw"


@dataclass(frozen=True)
class TrainSpec(_Section):
    optimizer: Optimizer
    labels: str = "causal"
    steps: int = 1
    overrides: FrozenDict = field(default_factory=FrozenDict)  # a system default changed -> the stated reason
    no_step: str | None = None  # steps = 0: why the case takes no optimizer step
    step_layers: tuple[int, ...] | None = None  # the step trains these text decoder layers only (the rest frozen)
    step_layers_why: str | None = None  # why the step trains a subset
    grad_layers: tuple[int, ...] | None = None  # only these text decoder layers' parameters get gradients, both sides
    grad_layers_why: str | None = None  # why (a memory option: freezing the rest changes no gradient computed)
    grad_embedding: bool = False  # with grad_layers: the word embedding (and the head tied to it) gets its gradient too
    no_fp32_truth: FrozenDict = field(default_factory=FrozenDict)  # parameter glob -> why its fp32 gradient is not kept


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "experts")
LORA_EXPERTS = ("shared", "per_expert")  # one adapter per layer for all routed experts, or one per expert


@dataclass(frozen=True)
class LoraSpec(_Section):
    targets: tuple[str, ...]
    r: int
    alpha: float
    dropout: float = 0.0
    seed: int = 0
    experts: str | None = None  # with "experts" in targets: "shared" | "per_expert" (LORA_EXPERTS)

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    @property
    def modules(self) -> tuple[str, ...]:
        """The targets that are modules (peft's ``target_modules``): all but ``"experts"``."""
        return tuple(t for t in self.targets if t != "experts")


@dataclass(frozen=True)
class BFloat16Gates(_Section):
    floor_multiplier: float
    floor_abs: float
    logits_kl_max: float
    truth_multiplier: float | None = None  # rho: err(Megatron-bf16 vs HF-fp32) <= rho * floor + truth_abs
    grad_truth_multiplier: float | None = None  # rho for gradient rows (train cases); default truth_multiplier
    truth_abs: float | None = None
    ceiling_rel_l2: float | None = None  # no module gate above it; a floor above it: "reference unstable"
    ceiling_kl_max: float | None = None  # the same for the logits KL max


@dataclass(frozen=True)
class Gates(_Section):
    float32: Float32Gates
    bfloat16: BFloat16Gates
    exact: tuple[str, ...] = ()


@dataclass(frozen=True)
class SystemSpec:
    name: str = "parity"  # the system under test (parity.registry.SYSTEMS); --system / --parity-system override it


@dataclass(frozen=True)
class Case:
    """One validated case file. Sections are frozen dataclasses that also read like mappings."""

    name: str
    description: str
    kind: str
    model: ModelSpec
    devices: tuple[str, ...]
    dtype: str
    seed: int
    inputs: Inputs
    parallel: Parallel = Parallel()
    run: RunOptions = RunOptions()
    gates: Gates = None  # type: ignore[assignment]  # always set by the loader
    markers: tuple[str, ...] = ()
    system: SystemSpec = SystemSpec()
    train: TrainSpec | None = None
    lora: LoraSpec | None = None
    expected_failures: FrozenDict = field(default_factory=FrozenDict)  # check -> the finding that fails it
    path: Path | None = field(default=None, compare=False)

    @property
    def world_size(self) -> int:
        return self.parallel.world_size

    @property
    def gpu_only(self) -> bool:
        return "cpu" not in self.devices

    @property
    def needs_checkpoint(self) -> bool:
        return self.model.builder == "checkpoint"

    @property
    def dense(self) -> bool:
        """True when the case's model is known to have no MoE block (no router to test)."""
        return self.model.overrides.get("enable_moe_block", True) is False

    def to_dict(self) -> dict:
        """Plain data (lists and dicts), as the TOML file would hold it."""
        out = _plain(dataclasses.asdict(self))
        out.pop("path")
        if self.kind != "vlm":
            out["inputs"].pop("max_soft_tokens")  # a VLM setting: a text case's file cannot hold it
        return out

    def replace(self, **sections: Any) -> "Case":
        """A new validated case with fields (or fields of a section) replaced, e.g.
        ``case.replace(inputs={"seq_len": 2048}, dtype="bfloat16")``."""
        data = self.to_dict()
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = _merge(data[key], value)
            else:
                data[key] = value
        source = _display(self.path) if self.path else self.name
        return parse_case(data, source=source, stem=self.name, path=self.path)


def check_step_layers(case: "Case", n_layers: int) -> None:
    """``train.step_layers`` and ``train.grad_layers`` against the model's text decoder layers (known once its config
    is): one line, exit 2."""
    for key in ("step_layers", "grad_layers"):
        layers = getattr(case.train, key) if case.train is not None else None
        if layers is not None and max(layers) >= n_layers:
            raise UserError(f"case {case.name}: train.{key} names layer {max(layers)}, but the model has "
                            f"{n_layers} text decoder layers (0-{n_layers - 1})")


def _merge(base: dict, new: dict) -> dict:
    out = dict(base)
    for k, v in new.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _plain(x: Any) -> Any:
    if isinstance(x, dict):  # TOML has no null: an unset optional field is left out
        return {k: _plain(v) for k, v in x.items() if v is not None}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


# ---------------------------------------------------------------------------------------------------
# Validation: one reader per section; every error names file and field.

class _Reader:
    def __init__(self, source: str, table: Any, prefix: str = ""):
        self.source, self.prefix = source, prefix
        if not isinstance(table, dict):
            self.fail("", f"must be a table, got {_show(table)}")
        self.table, self.used = table, set()

    def field(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def fail(self, key: str, message: str):
        where = self.field(key).rstrip(".") or "case"
        raise CaseError(f"{self.source}: {where}: {message}")

    def has(self, key: str) -> bool:
        return key in self.table

    def raw(self, key: str, default: Any = ...) -> Any:
        """The value at ``key``; a missing key fails unless a ``default`` is given."""
        self.used.add(key)
        if key in self.table:
            return self.table[key]
        if default is ...:
            self.fail(key, "missing (required)")
        return default

    def str_(self, key: str, choices=None, default: Any = ...) -> Any:
        v = self.raw(key, default)
        if v is None and default is None:
            return None
        if not isinstance(v, str) or not v.strip():
            self.fail(key, f"expected a non-empty string, got {_show(v)}")
        if choices and v not in choices:
            self.fail(key, f"expected one of {', '.join(choices)}, got {v!r}")
        return v

    def int_(self, key: str, default: Any = ..., minimum: int = 0) -> Any:
        v = self.raw(key, default)
        if v is None and default is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(key, f"expected an integer, got {_show(v)}")
        if v < minimum:
            self.fail(key, f"must be >= {minimum}, got {v}")
        return v

    def float_(self, key: str, positive: bool = False) -> float:
        v = self.raw(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            self.fail(key, f"expected a finite number, got {_show(v)}")
        if v < 0 or (positive and v == 0):
            self.fail(key, f"must be {'> 0' if positive else '>= 0'}, got {v}")
        return float(v)

    def bool_(self, key: str, default: bool = False) -> bool:
        v = self.raw(key, default)
        if not isinstance(v, bool):
            self.fail(key, f"expected true or false, got {_show(v)}")
        return v

    def str_list(self, key: str, choices=None, default: Any = ..., nonempty: bool = False) -> tuple[str, ...]:
        v = self.raw(key, default)
        if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) and s.strip() for s in v):
            self.fail(key, f"expected a list of strings, got {_show(v)}")
        if nonempty and not v:
            self.fail(key, "must not be empty")
        for s in v:
            if choices and s not in choices:
                self.fail(key, f"unknown value {s!r} (expected some of {', '.join(choices)})")
        if len(set(v)) != len(v):
            self.fail(key, f"has duplicates: {list(v)}")
        return tuple(v)

    def sub(self, key: str, required: bool = False) -> "_Reader":
        v = self.raw(key, {} if not required else ...)
        return _Reader(self.source, v, f"{self.field(key)}.")

    def done(self) -> None:
        extra = sorted(set(self.table) - self.used)
        if extra:
            self.fail(extra[0], "unknown field" + (f" (known here: {', '.join(sorted(self.used))})"
                                                   if self.used else ""))


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_case(data: dict, *, source: str, stem: str | None = None, path: Path | None = None) -> Case:
    """Validate one case's data (a parsed TOML document) into a ``Case``; ``source`` names it in errors."""
    top = _Reader(source, data)
    name = top.str_("name")
    if stem is not None and name != stem:
        top.fail("name", f"must equal the file name {stem!r}, got {name!r}")
    if any(c.isspace() or c in "/\\[]" for c in name):
        top.fail("name", f"must not contain spaces, slashes or brackets, got {name!r}")
    description = top.str_("description")
    kind = top.str_("kind", KINDS)
    devices = top.str_list("devices", DEVICES, nonempty=True)
    devices = tuple(d for d in DEVICES if d in devices)
    dtype = top.str_("dtype", DTYPES)
    seed = top.int_("seed")
    markers = top.str_list("markers", MARKERS, default=[])

    m = top.sub("model", required=True)
    builder = m.str_("builder", tuple(BUILDERS))
    if kind not in BUILDERS[builder]:
        m.fail("builder", f"{builder!r} builds a {BUILDERS[builder][0]} model, but kind is {kind!r}")
    overrides = m.raw("overrides", {})
    if not isinstance(overrides, dict):
        m.fail("overrides", f"must be a table, got {_show(overrides)}")
    for k in overrides:
        if not k.isidentifier():
            m.fail("overrides", f"{k!r} is not a keyword argument name")
    if builder == "checkpoint" and overrides:
        m.fail("overrides", "a checkpoint's config comes from its folder; overrides are not applied to it")
    checkpoint_env = m.str_("checkpoint_env", default=None)
    if builder == "checkpoint" and checkpoint_env is None:
        m.fail("checkpoint_env", "missing (required for builder 'checkpoint')")
    if builder != "checkpoint" and checkpoint_env is not None:
        m.fail("checkpoint_env", f"only for builder 'checkpoint' (builder is {builder!r})")
    m.done()
    model = ModelSpec(builder=builder, overrides=FrozenDict(copy.deepcopy(overrides)), checkpoint_env=checkpoint_env)

    i = top.sub("inputs", required=True)
    batch = i.int_("batch", minimum=1)
    seq_len = i.int_("seq_len", default=None if kind == "vlm" else ..., minimum=1)
    pad_tail = i.int_("pad_tail", default=0)
    if seq_len is not None and pad_tail >= seq_len:
        i.fail("pad_tail", f"must be smaller than inputs.seq_len ({seq_len}), got {pad_tail}")
    if kind == "vlm" and pad_tail and seq_len is None:
        i.fail("pad_tail", "needs inputs.seq_len (vlm sequences are right-padded to the longest one already)")
    images = None
    if kind == "vlm":
        raw = i.raw("images")
        images = _images(i, raw)
        if len(images) != batch:
            i.fail("images", f"has {len(images)} sequences of images but inputs.batch is {batch}")
    elif i.has("images"):
        i.raw("images")
        i.fail("images", "only for kind 'vlm'")
    padding = i.str_("padding", ("right", "left"), default="right")
    position_offset = i.int_("position_offset", default=0)
    max_soft_tokens = i.int_("max_soft_tokens", default=70)
    if max_soft_tokens not in SOFT_TOKENS:
        i.fail("max_soft_tokens", f"must be one of {', '.join(map(str, SOFT_TOKENS))} (HF's image processor), "
                                  f"got {max_soft_tokens}")
    if kind != "vlm" and i.has("max_soft_tokens"):
        i.fail("max_soft_tokens", "only for kind 'vlm'")
    audio = None
    if i.has("audio"):
        raw = i.raw("audio")
        if kind != "vlm":
            i.fail("audio", "only for kind 'vlm'")
        if (not isinstance(raw, list) or len(raw) != batch or not all(
                isinstance(seq, list) and all(isinstance(ms, int) and not isinstance(ms, bool) and 100 <= ms <= 30_000
                                              for ms in seq) for seq in raw)):
            i.fail("audio", f"expected {batch} lists (one per sequence) of clip durations in ms (100..30000), "
                            f"got {_show(raw)}")
        audio = tuple(tuple(seq) for seq in raw)
    lengths = None
    if i.has("lengths"):
        raw = i.raw("lengths")
        if kind != "text":
            i.fail("lengths", "only for kind 'text' (vlm lengths follow from the images and text)")
        if (not isinstance(raw, list) or len(raw) != batch
                or not all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= seq_len for n in raw)):
            i.fail("lengths", f"expected {batch} integers in 1..inputs.seq_len ({seq_len}), got {_show(raw)}")
        if pad_tail:
            i.fail("lengths", "give either inputs.lengths or inputs.pad_tail, not both")
        lengths = tuple(raw)
    i.done()
    inputs = Inputs(batch=batch, seq_len=seq_len, pad_tail=pad_tail, images=images, padding=padding,
                    lengths=lengths, position_offset=position_offset, max_soft_tokens=max_soft_tokens, audio=audio)

    p = top.sub("parallel")
    parallel = Parallel(tp=p.int_("tp", default=1, minimum=1), ep=p.int_("ep", default=1, minimum=1),
                        sequence_parallel=p.bool_("sequence_parallel", default=False))
    if parallel.sequence_parallel and parallel.tp == 1:
        p.fail("sequence_parallel", "needs parallel.tp > 1 (it splits the sequence over the TP ranks)")
    p.done()
    if parallel.world_size > 1:
        if devices != ("cuda",):
            top.fail("devices", f"must be [\"cuda\"] when parallel.tp * parallel.ep > 1 (torchrun), got {list(devices)}")
        if "multigpu" not in markers:
            top.fail("markers", "must include \"multigpu\" when parallel.tp * parallel.ep > 1")
    if "cpu" not in devices and not {"gpu", "multigpu"} & set(markers):
        top.fail("markers", "must include \"gpu\" (or \"multigpu\") for a case whose devices lack \"cpu\"")
    if "cpu" in markers and "cpu" not in devices:
        top.fail("markers", "has \"cpu\" but devices lack \"cpu\"")

    from parity.registry import DEFAULT_SYSTEM, SYSTEMS, unknown

    y = top.sub("system")
    system = SystemSpec(name=y.str_("name", default=DEFAULT_SYSTEM))
    if system.name not in SYSTEMS:
        y.fail("name", unknown(system.name))
    y.done()

    r = top.sub("run")
    run = RunOptions(sequential=r.bool_("sequential"), offload=r.bool_("offload"), spill_grads=r.bool_("spill_grads"),
                     device_reserve_gib=r.int_("device_reserve_gib", default=None, minimum=1),
                     probe_layers=r.str_("probe_layers", choices=("all", "first_of_type"), default="all"))
    if run.device_reserve_gib is not None and not run.offload:
        r.fail("device_reserve_gib", "only with offload = true (without it every capture stays on the device)")
    r.done()

    train = _train(top) if top.has("train") else None
    lora = _lora(top) if top.has("lora") else None
    if lora is not None and lora.experts == "shared" and train is not None and train.steps:
        top.sub("train").fail("steps", "must be 0 with lora.experts = \"shared\" (a shared expert adapter steps by the "
                                       "experts' summed gradient, peft's per-expert copies each by their own: after "
                                       "a step they are other models), with no_step saying so")
    if lora is not None and train is not None and train.step_layers is not None:
        top.sub("train").fail("step_layers", "not with [lora]: a LoRA case trains its adapters, the base is frozen")
    if lora is not None and train is not None and train.grad_layers is not None:
        top.sub("train").fail("grad_layers", "not with [lora]: a LoRA case trains its adapters, the base is frozen")
    x = top.sub("expected_failures")
    known = ("logits", "modules", "router", "roundtrip", "gradients", "step", "lora")
    expected = {}
    for check in list(x.table):
        if check not in known:
            x.fail(check, f"unknown check (known: {', '.join(known)})")
        expected[check] = x.str_(check)
    x.done()

    g = top.sub("gates", required=True)
    g32 = g.sub("float32", required=True)
    if train is not None and not g32.has("grad_rel_l2"):
        g32.fail("grad_rel_l2", "missing (required in a case with [train])")
    f32 = Float32Gates(rel_l2=g32.float_("rel_l2"), logits_rel_l2=g32.float_("logits_rel_l2"),
                       kl_max=g32.float_("kl_max"),
                       grad_rel_l2=g32.float_("grad_rel_l2", positive=True) if g32.has("grad_rel_l2") else None,
                       trajectory_band=g32.float_("trajectory_band", positive=True) if g32.has("trajectory_band")
                       else None)
    g32.done()
    g16 = g.sub("bfloat16", required=True)
    optional = {k: g16.float_(k, positive=True) for k in ("truth_multiplier", "truth_abs", "ceiling_rel_l2",
                                                          "ceiling_kl_max", "grad_truth_multiplier") if g16.has(k)}
    bf16 = BFloat16Gates(floor_multiplier=g16.float_("floor_multiplier", positive=True),
                         floor_abs=g16.float_("floor_abs"), logits_kl_max=g16.float_("logits_kl_max"), **optional)
    g16.done()
    gates = Gates(float32=f32, bfloat16=bf16, exact=g.str_list("exact", default=[]))
    g.done()
    top.done()
    return Case(name=name, description=description, kind=kind, model=model, devices=devices, dtype=dtype, seed=seed,
                inputs=inputs, parallel=parallel, run=run, gates=gates, markers=markers, system=system, train=train, lora=lora,
                expected_failures=FrozenDict(expected), path=path)


def _layers(t: _Reader, key: str) -> tuple[tuple[int, ...] | None, str | None]:
    """A list of text decoder layer indices at ``key`` (distinct, >= 0; sorted) and its reason at ``key_why``, given
    together or not at all."""
    if not t.has(key):
        if t.has(f"{key}_why"):
            t.fail(f"{key}_why", f"give it only with {key}")
        return None, None
    v = t.raw(key)
    if not (isinstance(v, list) and v and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v)
            and len(set(v)) == len(v)):
        t.fail(key, f"expected a non-empty list of distinct layer indices (>= 0), got {_show(v)}")
    return tuple(sorted(v)), t.str_(f"{key}_why")


def _train(top: _Reader) -> TrainSpec:
    t = top.sub("train")
    labels = t.str_("labels", choices=("causal",), default="causal")
    steps = t.int_("steps", default=1, minimum=0)
    no_step = t.str_("no_step") if t.has("no_step") else None
    if (steps == 0) != (no_step is not None):
        t.fail("no_step", "give it exactly when steps = 0: why the case takes no optimizer step")
    step_layers, step_layers_why = _layers(t, "step_layers")
    if step_layers is not None and steps == 0:
        t.fail("step_layers", "needs steps >= 1 (it says what the optimizer step trains)")
    grad_layers, grad_layers_why = _layers(t, "grad_layers")
    grad_embedding = t.bool_("grad_embedding", default=False)
    if grad_embedding and grad_layers is None:
        t.fail("grad_embedding", "only with grad_layers (without it every parameter gets its gradient)")
    if step_layers is not None and grad_layers is not None and not set(step_layers) <= set(grad_layers):
        t.fail("step_layers", f"layers {sorted(set(step_layers) - set(grad_layers))} get no gradient (grad_layers = "
                              f"{list(grad_layers)}): the step can train only layers among grad_layers")
    o = t.sub("optimizer", required=True)
    betas = o.raw("betas")
    if not (isinstance(betas, list) and len(betas) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool)
                                                                 and 0 <= b < 1 for b in betas)):
        o.fail("betas", f"expected two numbers in [0, 1), got {_show(betas)}")
    opt = Optimizer(name=o.str_("name", choices=("adamw",), default="adamw"), lr=o.float_("lr", positive=True),
                    betas=(float(betas[0]), float(betas[1])), eps=o.float_("eps", positive=True),
                    weight_decay=o.float_("weight_decay") if o.has("weight_decay") else 0.0,
                    clip_grad=o.float_("clip_grad", positive=True) if o.has("clip_grad") else None)
    o.done()
    ov = t.sub("overrides")
    overrides = {k: ov.str_(k) for k in list(ov.table)}
    ov.done()
    nt = t.sub("no_fp32_truth")
    no_truth = {k: nt.str_(k) for k in list(nt.table)}
    nt.done()
    t.done()
    return TrainSpec(optimizer=opt, labels=labels, steps=steps, overrides=FrozenDict(overrides), no_step=no_step,
                     step_layers=step_layers, step_layers_why=step_layers_why, grad_layers=grad_layers,
                     grad_layers_why=grad_layers_why, grad_embedding=grad_embedding, no_fp32_truth=FrozenDict(no_truth))


def _lora(top: _Reader) -> LoraSpec:
    t = top.sub("lora")
    targets = t.str_list("targets", choices=LORA_TARGETS, nonempty=True)
    dropout = t.float_("dropout") if t.has("dropout") else 0.0
    if not 0 <= dropout < 1:
        t.fail("dropout", f"must be in [0, 1), got {dropout}")
    experts = None
    if "experts" in targets:
        experts = t.str_("experts", choices=LORA_EXPERTS, default="shared")
        if dropout != 0:
            t.fail("dropout", f"must be 0 with \"experts\" in targets (peft's LoRA on parameters refuses dropout), "
                              f"got {dropout}")
    elif t.has("experts"):
        t.fail("experts", "only with \"experts\" in targets")
    spec = LoraSpec(targets=tuple(targets), r=t.int_("r", minimum=1), alpha=t.float_("alpha", positive=True),
                    dropout=dropout, seed=t.int_("seed", default=0), experts=experts)
    t.done()
    return spec


def _images(reader: _Reader, raw: Any) -> tuple:
    shape = "a list per sequence of [height, width] pairs, e.g. [[[24, 32], [16, 16]], [[32, 24]]]"
    if not isinstance(raw, list) or not raw:
        reader.fail("images", f"expected {shape}, got {_show(raw)}")
    out = []
    for s, seq in enumerate(raw):
        if not isinstance(seq, list) or not seq:
            reader.fail("images", f"sequence {s}: expected a non-empty list of [height, width], got {_show(seq)}")
        sizes = []
        for size in seq:
            if (not isinstance(size, list) or len(size) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
                reader.fail("images", f"sequence {s}: expected [height, width] of positive integers, got {_show(size)}")
            sizes.append((size[0], size[1]))
        out.append(tuple(sizes))
    return tuple(out)


# ---------------------------------------------------------------------------------------------------
# Finding and loading case files

def cases_dir() -> Path:
    """The case folder: ``$PARITY_CASES_DIR`` if set, else the repository's ``cases/``."""
    env = os.environ.get(ENV_CASES_DIR)
    return Path(env) if env else Path(__file__).resolve().parent.parent / "cases"


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def load_case_file(path: str | os.PathLike) -> Case:
    path = Path(path)
    source = _display(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CaseError(f"{source}: no such case file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CaseError(f"{source}: unreadable ({e})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise CaseError(f"{source}: invalid TOML: {e}") from None
    return parse_case(data, source=source, stem=path.stem, path=path)


def case_names(directory: Path | None = None) -> list[str]:
    """Names of the case files (without parsing them)."""
    d = directory or cases_dir()
    return sorted(p.stem for p in d.glob("*.toml")) if d.is_dir() else []


def load_case(name_or_path: str | os.PathLike) -> Case:
    """A case by name (``cases_dir()/NAME.toml``) or by path to a ``.toml`` file."""
    text = os.fspath(name_or_path)
    if text.endswith(".toml") or os.sep in text or "/" in text:
        return load_case_file(text)
    path = cases_dir() / f"{text}.toml"
    if not path.is_file():
        known = case_names()
        hint = f" (known: {', '.join(known)})" if known else f" (no case files in {_display(cases_dir())})"
        raise CaseError(f"unknown case {text!r}{hint}")
    return load_case_file(path)


def list_cases(directory: Path | None = None) -> list[Case]:
    """Every case in the folder, validated, sorted by name (the first bad file raises ``CaseError``)."""
    d = directory or cases_dir()
    return [load_case_file(d / f"{n}.toml") for n in case_names(d)]


# ---------------------------------------------------------------------------------------------------
# What a case needs from the machine (shared by the CLI and the pytest plugin)

def default_device(case: Case, cuda_available: bool) -> str:
    """CUDA when the case allows it and a GPU is there (or the case is GPU-only), else CPU."""
    if "cuda" in case.devices and (cuda_available or case.gpu_only):
        return "cuda"
    return "cpu"


def checkpoint_for(case: Case, explicit: str | None) -> str | None:
    """The checkpoint folder a run uses: the explicit one, else (checkpoint cases) the case's env variable."""
    if explicit:
        return explicit
    if case.needs_checkpoint:
        return os.environ.get(case.model.checkpoint_env or "") or None
    return None


def model_record(case: Case, checkpoint: str | None) -> dict:
    """What a run compares, as results.json's ``model`` records it: ``weights`` ("checkpoint" or "random", from
    the case's builder), the ``builder`` and the ``checkpoint`` folder (absolute) when there is one."""
    return {"weights": "checkpoint" if checkpoint else "random", "builder": case.model.builder,
            "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None}


def unmet_requirement(case: Case, *, device: str, checkpoint: str | None, cuda_available: bool,
                      device_count: int, checkpoint_hint: str = "--checkpoint DIR") -> str | None:
    """Why ``case`` cannot run here as asked (one line), or None when it can."""
    if device not in case.devices:
        if device == "cpu":
            return f"needs CUDA (case {case.name})"
        return f"runs on {', '.join(case.devices)} only, not {device} (case {case.name})"
    if device == "cuda" and not cuda_available:
        return f"needs CUDA (case {case.name})"
    if case.world_size > 1 and device_count < case.world_size:
        return f"needs {case.world_size} CUDA GPUs (case {case.name}; found {device_count})"
    if case.needs_checkpoint and not checkpoint:
        return (f"needs a checkpoint (case {case.name}): pass {checkpoint_hint} or set "
                f"{case.model.checkpoint_env}")
    return None


def system_for(case: Case, explicit: str | None) -> str:
    """The effective system under test: an explicit --system / --parity-system, else the case's [system] name."""
    from parity.registry import SYSTEMS, unknown

    if explicit is not None and explicit not in SYSTEMS:
        raise UserError(unknown(explicit))
    return explicit if explicit is not None else case.system.name


def run_id(case: Case, dtype: str | None = None) -> str:
    """Display id of a case run: the case name, plus the dtype when it overrides the case's own."""
    if dtype is None or dtype == case.dtype:
        return case.name
    short = SHORT_DTYPE[dtype]
    return case.name if case.name.endswith(f"-{short}") else f"{case.name}-as-{short}"
