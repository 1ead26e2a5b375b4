"""The port a system under test plugs into: what the engine asks of a Megatron implementation.

The engine builds the HF reference and hands a ``System`` the HF config, the HF state dict and the raw
inputs; it never touches the system's model except through these methods. A system names its modules in a
table keyed by ``Row.name_key`` of the alignment table (``parity.engine.alignment``): a module path (``{i}``,
``{layer_type}`` are filled in), or ``Elsewhere`` when its model has no hookable module for that row (the row
is then reported, not compared). Concrete systems live in ``parity.systems`` and are registered by name in
``parity.registry``; the engine imports none of them.
"""
from __future__ import annotations

import os
import traceback
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterable, Mapping, Protocol

import torch
from torch import nn

from parity.engine.alignment import Aligned
from parity.engine.compare import Call


@dataclass(frozen=True)
class Elsewhere:
    """This system has no module for the row to hook: its effect is compared at HF row ``at`` (a name key)."""

    at: str
    why: str = "not observable"


@dataclass(frozen=True)
class Replay:
    """How a system replays a row alone when that is not "the row's module on the row's own HF inputs": it runs
    ``module`` (a path, slots filled in) on the captured inputs of HF row ``on`` (a name key of the same stack;
    None: the row's own), e.g. a linear with the input norm fused into it on the HF norm's input. ``why`` is
    the detail the isolated record carries. A row whose name is ``Elsewhere`` may still have a ``Replay``."""

    module: str
    on: str | None = None
    why: str = ""


@dataclass(frozen=True)
class GradTap:
    """Where the backward mode reads a row's gradients when not at its module as ``names`` says (there: the gradient
    of the module's output, and the gradient the module alone passes back to its main input, ``input_key``).

    ``output``: ``"output"`` as said; ``"input"``: the row's value is its module's input (``names`` observes it
    there), so its gradient is read there too, through ``input_layout``; None: not observable. ``input``: the path
    (slots filled in) of the module whose main input is what HF's module of the row receives, so that the gradient
    that module alone passes back to it is the row's input gradient (through ``input_layout``); ``""``: the row's own
    module; None: not observable (e.g. a module fused with the HF module before it, whose input is that one's).
    A row whose name is ``Elsewhere`` may still have a tap. ``why``: said where a gradient is not observable."""

    output: str | None = "output"
    input: str | None = ""
    why: str = ""


def call_arg(call: Call, key: str, pos: int = 0, device=None):
    """Argument ``key`` of a captured HF call, passed by keyword or at position ``pos`` (moved to ``device``)."""
    x = call.kwargs[key] if key in call.kwargs else call.args[pos]
    return x if device is None else x.to(device)


def hf_routing(call: Call, n_experts: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """HF experts' routing (its call's ``top_k_index`` and ``top_k_weights``) as megatron's ``(probs [tokens, E]
    zero off the top-k, routing_map)``: what a system's experts replay under forced identical routing takes."""
    top_i = call_arg(call, "top_k_index", 1, device)
    top_w = call_arg(call, "top_k_weights", 2, device)
    probs = torch.zeros(top_i.shape[0], n_experts, dtype=dtype, device=device).scatter_(1, top_i, top_w.to(dtype))
    return probs, torch.zeros_like(probs, dtype=torch.bool).scatter(1, top_i, True)


class System(Protocol):
    """The Megatron implementation under test. All values handed back are in HF layout (``[b, s, ...]``,
    vocab unpadded, tensor-parallel shards gathered)."""

    name: str  # as results.json writes it: ``system: {name, version, substituted}``
    version: str
    substituted: list[dict]  # [{part, by, reason}]: what runs in place of parts it cannot run here (TE on CPU)
    names: Mapping[str, str | Elsewhere]  # alignment-table key -> module path in the built model
    shared: frozenset[str]  # keys of rows where the system runs HF's own code: reported ``shared``, not parity
    replays: Mapping[str, Replay]  # alignment-table key -> how isolated replay runs it, where not as ``names`` says
    # optional: ``grad_taps: Mapping[str, GradTap]``, alignment-table key -> where the backward mode reads the row's
    # gradients, where not as ``names`` says
    device: str

    def build(self, kind: str, hf_config: Any, *, dtype: torch.dtype, device: str) -> None: ...  # from the HF config

    def load(self, hf_state: Mapping[str, torch.Tensor], folder: str | None = None) -> None: ...
    # HF weights in, tensor by tensor; ``folder``: the HF checkpoint folder they were read from, when the run
    # has one (a system with its own checkpoint import reads the folder itself: that import is under test too)

    def export(self) -> Iterable[tuple[str, torch.Tensor]]: ...  # its weights as (HF key, tensor), streamed

    def prepare(self, inputs: dict[str, torch.Tensor]) -> None: ...  # its own masks and RoPE from raw inputs

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor: ...  # raw inputs -> logits [b, s, V]

    def module(self, name: str) -> nn.Module | None: ...  # a module of the built model by path

    def fp32(self, path: str) -> ContextManager[Callable[[str], nn.Module | None]]: ...
    # module ``path`` (a text decoder layer, the final norm) in fp32 while inside, for the fp32 replay of a bf16
    # run; yields ``name -> module`` resolving the system's names of its modules to the fp32 ones

    def tables(self) -> dict[str, Any]: ...  # name -> its mask (bool, True = attend) or RoPE (cos, sin)

    def output(self, a: Aligned, out: Any, module: nn.Module, grad: bool = False) -> Any: ...
    # a hooked output -> a's HF layout; ``grad``: the gradient with respect to it (where one value lives on several
    # ranks, its gradient is their sum: a KV head replicated over TP ranks)

    def replay(self, a: Aligned, module: nn.Module | None, call: Call) -> Any: ...  # on HF's captured inputs
    # (None: this system's module cannot run alone on that input; the row then has no isolated record)

    # Training (the backward mode; a system without these methods has that mode skipped, with the reason):
    def train_loss(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ...  # its own training path on raw inputs and HF-convention labels -> (loss, logits [b, s, V]) with grad

    def grads(self, want: Callable[[str], bool] | None = None) -> Iterable[tuple[str, torch.Tensor]]: ...
    # its parameters' gradients as (HF key, tensor) by its weight mapping's adjoint (a tensor copied into several
    # places: the sum of their gradients); ``want``: the HF keys the caller reads (the others need not be assembled:
    # the isolated backward reads one layer's at a time, at full size a whole export each)

    # The optimizer step (the step mode; a train case with ``steps`` >= 1):
    def optimizer_step(self, spec: Any) -> float: ...  # one step of its optimizer as its users run it (``spec``:
    # ``parity.cases.TrainSpec``) on the gradients of the last backward, which it clears; -> the gradient norm before
    # clipping

    def train_layers(self, layers: tuple[int, ...], embedding: bool = False) -> None: ...  # before its first step
    # (``train.step_layers``) or right after its set-up (``train.grad_layers``): only those text decoder layers'
    # parameters train from now on, and the word embedding (tied head) when ``embedding`` (``train.grad_embedding``;
    # passed only then), the rest frozen

    def input_key(self, a: Aligned, args: tuple, kwargs: dict) -> int | str | None: ...
    # where, among a hooked module's arguments, is what HF's module of ``a`` receives as its main input

    def input_layout(self, a: Aligned, x: torch.Tensor, module: nn.Module, grad: bool = False) -> torch.Tensor: ...
    # -> HF layout (``grad`` as for ``output``)

    # LoRA (a case with ``[lora]``; a system without ``load_adapters`` fails such a case at set-up, the lora mode
    # is skipped without the other two):
    def load_adapters(self, state: Mapping[str, torch.Tensor], spec: Any) -> None: ...
    # after ``load``: its own LoRA (``spec``: ``parity.cases.LoraSpec``) on its model, with HF's adapter tensors
    # (``state``: as an adapter file names them, ``parity.engine.adapters``) brought in by its weight mapping; every
    # forward and training method then runs the adapted model, ``export`` still yields the base weights and
    # ``grads`` the adapters' gradients (the base is frozen)

    def save_adapters(self, folder: str) -> None: ...  # its adapter export as its users write it (a peft folder)

    def merged(self) -> Iterable[tuple[str, torch.Tensor]]: ...  # its weights with the adapters merged, HF keys

    def parked(self) -> ContextManager[Any]: ...  # optional: its weights on the host for the block (the LoRA mode's HF
    # copies need the card at full size; without it they sit beside the system)

    # The isolated backward (each module's backward alone; optional, the mode is skipped without ``zero_grad``):
    def zero_grad(self) -> None: ...  # its parameters' gradients cleared (a new backward begins)

    def loss_on(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...  # its loss alone on logits

    # ``a`` is one concrete row of the table (``a.hf``, ``a.row.kind``, ``a.row.part``, ``a.layer``, ``a.slots``).
    # Layouts by ``a.row.kind``: tensors ``[b, s, ...]``; ROUTER ``{"dense" [b*s, E], "top_w", "top_i" [b*s, k]}``;
    # EXPERTS / FLAT_NORM ``[b*s, H]``; QKV / FC1 the row's ``Part`` only; vision kinds batch-first as HF's
    # (POOLED: ``(features, valid-slot mask)``). ``replay`` of a row with ``feeds`` (logits, merged embeddings)
    # gets a call whose args are those HF modules' outputs.


# ---------------------------------------------------------------------------------------------------
# A system that raises: a verdict about it, never a harness error

PORT = ("build", "load", "export", "prepare", "forward", "module", "fp32", "tables", "output", "replay",
        "train_loss", "grads", "optimizer_step", "input_key", "input_layout", "zero_grad", "loss_on", "load_adapters",
        "save_adapters", "merged", "parked", "train_layers")


class SystemRaised(Exception):
    """The system under test raised inside ``method`` of its port: the run records it (a failing phase or row,
    with the error and the system's innermost frame) and goes on; it is never a harness error (exit 3)."""

    def __init__(self, method: str, error: BaseException):
        self.method, self.error_type, self.where = method, type(error).__name__, _innermost(error)
        self.message = " ".join(str(error).split())[:300]
        super().__init__(self.text)

    @property
    def text(self) -> str:
        return (f"{self.method} raised {self.error_type}: {self.message}" +
                (f" (at {self.where})" if self.where else ""))

    def to_dict(self) -> dict:
        return {"method": self.method, "error": f"{self.error_type}: {self.message}", "where": self.where}


def _innermost(error: BaseException) -> str | None:
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return None
    f = frames[-1]
    path = f.filename
    for root in (os.getcwd() + os.sep, "site-packages" + os.sep):  # short: the repository's or a package's path
        if root in path:
            path = path.split(root, 1)[1]
            break
    return f"{path}:{f.lineno} in {f.name}"


def _passes(error: BaseException) -> bool:
    """Errors the guard leaves alone: the user's (bad input, exit 2), memory (a resource, exit 2), a harness error
    raised in a hook the system's forward ran (``HarnessError``), one already attributed, and ``NotImplementedError``
    (what an adapter does not model yet: the pipeline reports that mode as not run, with the reason)."""
    from parity.errors import UserError

    return isinstance(error, (UserError, MemoryError, SystemRaised, HarnessError, NotImplementedError)) or \
        type(error).__name__ == "OutOfMemoryError"


class HarnessError(Exception):
    """A bug of the harness raised inside the system's call stack (an engine hook in the system's forward):
    passed through the guard untouched, so that it ends the run as a harness error (exit 3)."""


def _guard(method: str, fn: Callable) -> Callable:
    def guarded(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - anything the system raises is a verdict about it
            if _passes(e):
                raise
            raise SystemRaised(method, e) from e
    return guarded


class _GuardedContext:
    """A system's context manager (``fp32``, ``parked``): entering and leaving it, and the function it yields, guarded; an
    error raised in the body (the engine's) passes through as it is."""

    def __init__(self, method: str, cm):
        self.method, self.cm = method, cm

    def __enter__(self):
        out = _guard(self.method, self.cm.__enter__)()
        return _guard(self.method, out) if callable(out) else out

    def __exit__(self, kind, error, tb):
        try:
            return self.cm.__exit__(kind, error, tb)
        except Exception as e:  # noqa: BLE001
            if e is error or _passes(e):
                raise
            raise SystemRaised(self.method, e) from e


class Guarded:
    """The system as the engine sees it: every method of the port guarded, so that an error raised inside the
    system becomes ``SystemRaised`` (a verdict) instead of ending the run. Attributes pass through."""

    def __init__(self, system):
        object.__setattr__(self, "system", system)

    def __getattr__(self, name: str):
        value = getattr(self.system, name)
        if name not in PORT or not callable(value):
            return value
        if name in ("fp32", "parked"):
            return lambda *a, **kw: _GuardedContext(name, _guard(name, value)(*a, **kw))
        if name in ("export", "merged", "grads"):
            return lambda *a, **kw: _guarded_iter(name, _guard(name, value)(*a, **kw))
        return _guard(name, value)

    def __setattr__(self, name: str, value) -> None:
        setattr(self.system, name, value)


def _guarded_iter(method: str, items):
    it = iter(items)
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001
            if _passes(e):
                raise
            raise SystemRaised(method, e) from e
        yield item
