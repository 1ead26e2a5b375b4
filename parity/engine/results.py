"""The layout of ``results.json``, as the engine writes it (the report reads it as a plain dict through
``parity.report.summary``)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar


@dataclass
class Results:
    """One run of one system against the reference, as results.json holds it."""

    case: str
    kind: str  # "text" | "vlm"
    passed: bool
    device: str
    dtype: str
    seed: int
    created: str  # ISO time, UTC
    env: dict  # versions, git commit, host, device name, torch threads
    system: dict  # the system under test: {name, version, substituted: [{part, by, reason}]}
    config_hash: str
    layer_types: list
    summary: dict  # first_divergence (+ _detail), worst_layer, logits {cosine, rel_l2, ..., kl_max}, n_modules, n_failed
    modules: list  # rows {name (HF path), megatron_name, mode, kind, cosine, rel_l2, max_abs, floor, gate, passed, ...}
    routers: list  # per MoE layer: expert-set agreement, flips (end to end, and decisive flips in isolation)
    checks: dict  # logits, modules, router, roundtrip -> bool
    roundtrip: dict  # tensors, bit_exact (a count), max_abs_diff, rows
    phases: dict  # seconds per phase
    timings: dict  # plain forward seconds of both sides
    peak_memory: dict
    parallel: dict  # tp, ep, world_size
    sequential: bool
    hf_released_before_megatron: bool | None
    gates: dict  # the case's gates
    host_staged_gib: dict  # activations, weights
    inputs: dict  # batch, seq_len, pad_tail (+ images, soft tokens, sliding window for a VLM)
    groups: dict | None = None  # VLM: metrics per position group (text, image, text_after_image)
    modes: list | None = None  # [{name, label, ran, why, raised}]: each comparison mode, why it did not run, and
    # what the system raised in it
    failures: list | None = None  # [{phase, method, error, where}]: the system raised while building, loading,
    # preparing or running a mode (parity then fails; ``checks.system`` is false)
    probing: dict | None = None  # the probing mode's section: its families, points, searches and their cost
    train: dict | None = None  # train cases: loss (HF's, the system's, per token), grad norms, trajectory, labels
    lora: dict | None = None  # LoRA cases: targets, rank, alpha, adapters, export and merge counts (the lora mode)
    phase_parts: dict | None = None  # seconds of phases' named parts ("fp32_replay.hf_layer": s; ``Progress.part``)

    SECTIONS: ClassVar[tuple[str, ...]] = ("probing", "train", "lora")  # sections a mode adds (``Comparison.sections``)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in ("groups", "modes", "failures", "probing", "train", "lora", "phase_parts"):
            if out[key] is None:
                del out[key]
        return out
