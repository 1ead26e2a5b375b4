"""The comparison modes: what a run measures of a system against the HF reference, as a list of data.

Each ``Mode`` says its name (as results.json writes it), its label and colour in reports, whether it feeds
both sides the same captured inputs (a *replay*: a module failing there is at fault itself), its rank when
one module fails in several modes (the first divergence names the lowest), which gate section of the case
file judges its rows, whether HF's bf16 noise floors are measured for it, when it runs, what it needs of the
system (methods of the port; a system without them: the mode is skipped and results.json's ``modes`` says
why), and the module that implements it. An implementation module has ``run(comparison, progress)``, with ``floors`` a
``floors(reference, progress) -> {HF name: floor}``, and may have ``prepare(reference, progress)``: what the mode
needs of the HF side beyond the forward capture, computed once per reference (``reference.extra[name]``). Adding a mode is
one module under ``parity.engine.modes`` plus its line here; gates, the report and the pytest plugin read
this list. Pure data: the report imports it without torch.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Mode:
    name: str  # results.json ``mode`` of its rows (a mode without rows of its own: its section's key)
    label: str  # in reports
    module: str  # parity.engine.modes.<module> (or a full module path): its ``run`` (and ``floors``)
    color: str = "#57606a"
    replay: bool = False  # both sides fed HF's captured inputs: a row failing here is at fault itself
    rank: int = 9  # at one module failing in several modes, the first divergence names the lowest rank
    gates: str = "run"  # "run": the case's gates of the run's dtype; "float32": its fp32 gates in any run
    floors: bool = False  # bf16 runs measure HF-bf16 against HF-fp32 in this mode (each row's noise floor)
    every_row: bool = False  # every row the system has a module for yields a record (else a failing one)
    when: str = "always"  # "always" | "bf16_single": bf16 runs of one process (the fp32 replay) | "single": one
    # process | "train": train cases | "lora": LoRA cases
    gate_key: str = "rel_l2"  # the number of its gate section that judges its rows (gradients: grad_rel_l2)
    needs: tuple[str, ...] = ()  # the System methods it calls (a system without one: the mode is skipped, said so)
    records_as: str | None = None  # its rows are written with this mode's name (tables: end_to_end rows)
    rows: tuple[str, ...] = ()  # the ``mode`` values of its rows when it writes several kinds (backward)
    own_rows: tuple[str, ...] = ()  # of those, the rows a failing module is blamed for itself (first divergence)
    check: str | None = None  # a mode with rows of its own: the results check its rows decide (else "modules")
    dtypes: tuple[str, ...] = ("float32", "bfloat16")  # run dtypes it runs in
    train_cases: bool = True  # also in train cases (probing: its forward twin case carries those rows)
    lora_why: str = ""  # why it does not run in LoRA cases (empty: it does)
    steps: bool = False  # it takes optimizer steps: not in a train case of ``steps = 0`` (its ``no_step`` says why)
    dtype_why: str = ""  # why not in the others

    def why_not(self, case, dtype: str, system=None) -> str | None:
        """Why this mode does not run in a run of ``case`` in ``dtype`` (for ``system``, when given)."""
        if self.when == "bf16_single" and dtype == "float32":
            return "a float32 run: nothing to replay in fp32"
        if self.when in ("bf16_single", "single") and case.world_size != 1:
            return f"runs of one process only (this run has {case.world_size})"
        if self.when == "train" and getattr(case, "train", None) is None:
            return "not a train case (no [train] table)"
        if self.when == "lora" and getattr(case, "lora", None) is None:
            return "not a LoRA case (no [lora] table)"
        if self.steps and getattr(case, "train", None) is not None and case.train.steps == 0:
            return f"the case takes no optimizer step: {case.train.no_step}"
        if self.lora_why and getattr(case, "lora", None) is not None:
            return f"a LoRA case: {self.lora_why}"
        if not self.train_cases and getattr(case, "train", None) is not None:
            return "a train case: the same model and inputs without [train] (its forward case) carry these rows"
        if dtype not in self.dtypes:
            return self.dtype_why or f"runs in {', '.join(self.dtypes)} only"
        if system is None:
            return None
        missing = [m for m in self.needs if not callable(getattr(system, m, None))]
        return f"{system.name} has no {', '.join(missing)}" if missing else None

    def implementation(self):
        return importlib.import_module(self.module if "." in self.module else f"parity.engine.modes.{self.module}")


MODES = (  # in the order a run measures them (the optimizer step last: it changes the system's weights)
    Mode("roundtrip", "round trip", "roundtrip", needs=("export",)),
    Mode("end_to_end", "end-to-end", "end_to_end", color="#bc4c00", rank=2, floors=True, every_row=True,
         needs=("forward", "module", "output")),
    Mode("isolated", "isolated", "isolated", color="#0969da", replay=True, rank=0, floors=True, every_row=True,
         needs=("module", "replay")),
    Mode("fp32_replay", "fp32 replay", "fp32_replay", color="#8250df", replay=True, rank=1, gates="float32",
         when="bf16_single", needs=("module", "replay", "fp32"),
         lora_why="it rebuilds HF's layers from the base weights, without peft's adapters"),
    Mode("tables", "masks and RoPE", "tables", records_as="end_to_end", needs=("tables",)),
    Mode("probing", "probing", "probing", color="#1a7f37", replay=True, rank=3, when="single",
         needs=("module", "replay", "prepare", "tables"), train_cases=False,
         lora_why="it rebuilds HF's modules from the base weights, without peft's adapters"),
    Mode("backward", "backward", "backward", color="#1a7f37", rank=4, when="train", gate_key="grad_rel_l2",
         floors=True,
         needs=("train_loss", "grads", "module", "output", "input_key", "input_layout"), rows=("loss", "grad_output", "grad_input", "param_grad"),
         own_rows=("loss", "grad_input", "param_grad"), check="gradients"),
    Mode("isolated_backward", "isolated backward", "isolated_backward", color="#0550ae", replay=True, rank=5,
         when="train", gate_key="grad_rel_l2", needs=("module", "replay", "grads", "zero_grad"),
         rows=("isolated_grad_input", "isolated_param_grad"), own_rows=("isolated_grad_input", "isolated_param_grad"),
         check="gradients",
         lora_why="fused parts' adapters (q/k/v, gate/up) share one A: a part's module alone gives only its share of "
                  "that gradient (the backward mode compares the whole)"),
    Mode("lora", "LoRA export and merge", "lora", color="#cf222e", rank=5, when="lora",
         needs=("save_adapters", "merged"), rows=("adapter_export", "adapter_merged", "adapter_logits"),
         own_rows=("adapter_export", "adapter_merged", "adapter_logits"), check="lora"),
    Mode("step", "optimizer step", "step", color="#9a6700", rank=4, when="train", gate_key="grad_rel_l2", floors=True,
         needs=("train_loss", "optimizer_step", "export"), rows=("param_step",), own_rows=("param_step",),
         check="step", steps=True),
)
PLOTTED = tuple(m.name for m in sorted(MODES, key=lambda m: m.rank) if m.every_row)  # reports draw these per layer


def get(name: str | None) -> Mode | None:
    """The mode named ``name``, or writing rows of that ``mode`` value, in the current list (read at call time: a
    test may extend ``MODES``)."""
    return next((m for m in MODES if m.name == name or name in m.rows), None)


def is_replay(name: str) -> bool:
    mode = get(name)
    return mode is not None and mode.replay


def label(name: str | None) -> str:
    mode = get(name)
    return mode.label if mode else (name or "")


def rank(name: str) -> int:
    mode = get(name)
    return mode.rank if mode else 3
