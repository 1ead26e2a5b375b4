"""Probing: isolated replay on transformed inputs, both sides fed the same, where real bugs hide.

A run's own inputs exercise what they happen to contain: norms at their natural scale (an eps of 1e-5 instead of
1e-6 then moves a norm by ~1e-6, under any gate), positions up to the sequence length (RoPE precision at
256K positions never runs), one sequence length (a window off by one shows only at the window's edge). This mode
replays modules on inputs moved to those places, each row gated like an isolated row (fp32: the case's fp32 gate;
bf16: against HF's own bf16 error on the same probe input, ``floor``, and against HF in fp32, ``truth_rel_l2``):

- ``magnitude``: each norm's (and router's) captured input rescaled to an RMS of 1e-3 (eps classes: at
  mean(x^2) ~ 1e-6 an eps off by 10x moves the output by tens of percent) and 1e4 (overflow, precision); these
  modules work token by token, so the module probes (magnitude, near-tie) take the first ``TOKENS`` positions of
  every row (all of them in the tiny cases; at 26B 512 of 4,096: a probe costs a module call, not a data move);
- ``positions``: the run's position ids shifted to the end of the model's context (``max_position_embeddings``):
  every attention module with each side's own RoPE there, and the RoPE tables -- long-context RoPE without a long
  sequence;
- ``window``: sequence lengths at the sliding window's edges (W-1, W, W+1, 2W+1): the masks, and the attention of
  the first layer of each type (what the edges test is the window of a layer type; which layers are sliding is
  the run's own business: its sequence is longer than W in every case that has a window to test, and a sliding
  layer taken for a full one fails there);
- ``padding``: a batch with one row all padding beside a real one; ``single token``: a sequence of one token;
- ``near-tie``: router inputs moved so that the k-th and (k+1)-th experts are within a relative 1e-2 / 1e-4 of
  each other: a decisive flip or a weight error there fails (a flip below the gates' tie margin is a near tie).

Where a law holds for every value of a parameter (any magnitude, any offset, any length, any tie margin), a seeded
search (hypothesis, ``find``) draws more values on the first layer of each type and, when the law breaks, shrinks
to the smallest failing input; that example is added as a row with ``example`` (its parameters, the seed), and
the run's seed reproduces it. Input probes (positions, window, padding, single token) build text-only raw inputs:
they run for the text model kind. A VLM run has its own input family:

- ``image spans``: one sequence with an image span of W-1, W, W+1 and 2W+1 soft tokens (then a search over the
  span): each side's masks per layer type (HF's from ``create_masks_for_vision_model`` as its ``Gemma4Model``
  calls it; the system's from ``System.prepare`` on the probe's raw inputs). A span longer than the window is where
  a vision-bidirectional sliding mask and the window disagree, and a run's own images need not be that long (the
  26B-A4B VLM's 256 soft tokens under a 1,024-token window).

The HF side of every probe is HF's own code: its decoder layer rebuilt from its class and the run's weights (the
experts and the dense MLP left unbuilt: no probe runs them), its rotary module from the config, its mask functions
called as ``Gemma4TextModel.forward`` calls them. The system: its own masks and RoPE from the probe's raw inputs
(``System.prepare``; the run's are prepared again afterwards), its modules as isolated replay runs them (its
``Replay`` plans included). Cost: a few hundred module calls, no full forward; the phase ``probing`` of the run.
"""
from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from parity.engine import gates as G
from parity.engine.alignment import TABLE_KINDS, Aligned, Kind, Stack
from parity.engine.compare import (Call, Capture, Store, Where, capture_hf, compare, compare_mask, compare_rope,
                                   floor_value, upcast, value)
from parity.engine.record import Record
from parity.engine.system import SystemRaised

MODE = "probing"
MODULE_KINDS = (Kind.NORM, Kind.HEAD_NORM, Kind.FLAT_NORM, Kind.ROUTER)  # magnitude probes
RMS = (1e-3, 1e4)  # magnitude probes: the RMS each input is rescaled to
TIES = (1e-2, 1e-4)  # near-tie probes: relative gap of the k-th and (k+1)-th routing probability
SEARCH = {"examples": 8, "calls": 40}  # per family: drawn examples, and law checks in all (shrinking included)
SKIP = ("experts", "mlp")  # parts of HF's decoder layer no probe runs: never built
TOKENS = 512  # module probes: the first positions of every row (norms and routers are per token)


@dataclass(frozen=True)
class Probe:
    family: str
    label: str  # as the row's ``probe`` says it
    params: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# The HF side: HF's own classes, the run's weights

class HFSide:
    """HF's modules of the text stack for the probes: decoder layers rebuilt from their class with the run's
    weights (``SKIP`` parts on the meta device), the final norm, the rotary module, the mask functions."""

    def __init__(self, ref, device):
        from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRotaryEmbedding

        self.ref, self.device, self.config = ref, device, ref.text_config
        self.prefix = ref.kind.prefixes[Stack.TEXT]
        self.dtype = ref.torch_dtype
        self._layers: dict[int, torch.nn.Module] = {}
        self._fp32: dict[Any, torch.nn.Module] = {}
        with torch.device(device):
            self.rotary = Gemma4TextRotaryEmbedding(self.config)

    def _weights(self, prefix: str, skip=()) -> dict:
        return {k[len(prefix):]: v.to(self.device) for k, v in self.ref.state.items()
                if k.startswith(prefix) and k[len(prefix):].split(".")[0] not in skip}

    def _built(self, module: torch.nn.Module, weights: dict, what: str, skip=()) -> torch.nn.Module:
        """``module`` (on the meta device) given ``weights`` (assigned: dtype and device as the run's); every
        tensor of its built part must come from them (a computed buffer left on the meta device is refused)."""
        missing, unexpected = module.load_state_dict(weights, strict=False, assign=True)
        missing = [k for k in missing if k.split(".")[0] not in skip]
        left = [k for k, t in (*module.named_parameters(), *module.named_buffers())
                if t.is_meta and k.split(".")[0] not in skip]
        if missing or unexpected or left:
            raise RuntimeError(f"probing: HF {what} does not fit the run's weights: missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}, unset {left[:3]}")
        return module.eval()

    def layer(self, i: int) -> torch.nn.Module:
        if i not in self._layers:
            from transformers.models.gemma4.modeling_gemma4 import Gemma4TextDecoderLayer

            with torch.device("meta"):
                layer = Gemma4TextDecoderLayer(self.config, i)
            self._layers[i] = self._built(layer, self._weights(f"{self.prefix}layers.{i}.", SKIP), f"layer {i}",
                                          SKIP)
        return self._layers[i]

    def module(self, a: Aligned) -> torch.nn.Module:
        """HF's module of row ``a``: a submodule of its rebuilt layer, or a norm of the text model (the final norm,
        PLE's projection norm), as wide as its weight."""
        if a.layer is not None:
            rel = a.hf[len(f"{self.prefix}layers.{a.layer}."):]
            return self.layer(a.layer).get_submodule(rel)
        if a.hf not in self._layers:
            from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm

            weights = self._weights(f"{a.hf}.")
            with torch.device("meta"):
                norm = Gemma4RMSNorm(weights["weight"].shape[0], eps=self.config.rms_norm_eps)
            self._layers[a.hf] = self._built(norm, weights, a.hf)
        return self._layers[a.hf]

    def fp32(self, module: torch.nn.Module, keep: bool = True) -> torch.nn.Module:
        """An fp32 copy of one of these modules: kept (a norm, a router: the floors of several probes use it), or
        not (a decoder layer: copied when needed, so that at most one fp32 layer is resident)."""
        key = id(module)
        if key in self._fp32:
            return self._fp32[key]
        out = copy.deepcopy(module).float()
        if keep:
            self._fp32[key] = out
        return out

    def tables(self, inputs: dict, dtype: torch.dtype) -> tuple[dict, dict]:
        """HF's masks and RoPE tables per layer type for raw ``inputs``, as ``Gemma4TextModel.forward`` makes them
        (its mask functions; its rotary module, cos/sin in ``dtype``)."""
        from transformers.models.gemma4 import modeling_gemma4 as hf

        ids = inputs["input_ids"]
        embeds = torch.zeros(*ids.shape, 1, dtype=dtype, device=ids.device)  # the mask functions read its shape
        kw = _mask_kwargs(hf.create_causal_mask, config=self.config, embeds=embeds,
                          attention_mask=inputs["attention_mask"], position_ids=inputs["position_ids"])
        masks = {"full_attention": hf.create_causal_mask(**kw),
                 "sliding_attention": hf.create_sliding_window_causal_mask(**kw)}
        with torch.no_grad():
            rope = {t: self.rotary(embeds, inputs["position_ids"], t) for t in set(self.config.layer_types)}
        return masks, rope


    def kv_shared(self, i: int) -> bool:
        """Whether HF's layer ``i`` reuses an earlier layer's K/V (KV sharing): an input probe runs each layer alone,
        so it probes the layer that computes those K/V, not the ones that reuse them."""
        first = self.config.num_hidden_layers - (getattr(self.config, "num_kv_shared_layers", 0) or 0)
        return i >= first

    def vlm_masks(self, inputs: dict, dtype: torch.dtype) -> dict:
        """HF's masks per layer type for raw VLM ``inputs``, as ``Gemma4Model.forward`` makes them: with
        ``use_bidirectional_attention == "vision"`` its ``create_masks_for_vision_model`` on the blocks of
        ``mm_token_type_ids`` (sliding layers see a whole image span; full layers stay causal), else the text
        model's causal masks."""
        from transformers.models.gemma4 import modeling_gemma4 as hf

        if getattr(self.config, "use_bidirectional_attention", None) != "vision":
            return self.tables(inputs, dtype)[0]
        make = getattr(hf, "create_masks_for_vision_model", None)
        blocks = getattr(hf, "get_block_sequence_ids_for_mask", None)
        if make is None or blocks is None:
            import transformers

            raise _Unavailable(f"transformers {transformers.__version__} has no create_masks_for_vision_model / "
                               "get_block_sequence_ids_for_mask (HF's VLM mask functions these probes call)")
        ids = inputs["input_ids"]
        embeds = torch.zeros(*ids.shape, 1, dtype=dtype, device=ids.device)  # the mask functions read its shape
        # the keywords of HF's causal-mask functions, which its vision-mask function passes its own on to
        kw = _mask_kwargs(hf.create_causal_mask, config=self.config, embeds=embeds,
                          attention_mask=inputs["attention_mask"], position_ids=inputs["position_ids"])
        return make(**kw, block_sequence_ids=blocks(inputs["mm_token_type_ids"], ids.device))


class _Unavailable(Exception):
    """A probe family the installed transformers cannot run (one line: the family says why)."""


# ---------------------------------------------------------------------------------------------------
# The mode

class _Stop(Exception):
    """Ends an HF layer's forward once the last module a probe needs has returned."""


class Prober:
    """One system against the reference on probe inputs: rows, their gates, the searches."""

    def __init__(self, c, prog):
        self.c, self.prog, self.ref, self.sut = c, prog, c.ref, c.sut
        self.hf = HFSide(c.ref, c.sut.device)
        self.low = c.ref.dtype != "float32"
        self.judge = G.record_judge(c.ref.case.to_dict()["gates"], c.ref.dtype)
        cfg, every = self.hf.config, c.ref.case.run.probe_layers == "all"
        # the layers probed: every one, or (the case's ``probe_layers``) the first of each layer type
        self.layers = None if every else _first_layers(cfg)
        self.text = [a for a in c.rows if a.row.stack is Stack.TEXT
                     and (self.layers is None or a.layer is None or a.layer in self.layers)]
        self.section: dict = {"families": {}, "seed": c.ref.seed}
        if self.layers is not None:
            self.section["layers"] = {"probed": self.layers, "of": cfg.num_hidden_layers,
                                      "why": "the case's run.probe_layers: the first layer of each type (every module "
                                             "of every layer is replayed on the run's own inputs by the isolated mode)"}

    # -- rows ----------------------------------------------------------------------------------------

    def _row(self, a: Aligned, probe: Probe, hf_out, test, name, where: Where, out32=None) -> Record:
        """A probing record: ``test`` against HF's ``hf_out``; in bf16 its floor (HF-bf16 against HF-fp32 on the
        same probe input) and its distance from the fp32 truth."""
        kind = a.row.kind
        rec = Record.measured(a, name, MODE, compare(kind, value(kind, hf_out), test, where), self.c.order(a))
        rec.probe = probe.label
        plan = self.sut.replays.get(a.row.name_key)
        if plan is not None and plan.why and not rec.detail:
            rec.detail = plan.why
        if self.low and out32 is not None:
            rec.floor = floor_value(kind, out32, hf_out, where)
            m_ = compare(kind, value(kind, out32), test, where)
            rec.truth_rel_l2 = m_["router"]["agree_weight_rel_l2"] if kind is Kind.ROUTER else m_["rel_l2"]
        return rec

    def _raised(self, a: Aligned, probe: Probe, name, e: SystemRaised) -> Record:
        rec = Record.measured(a, name, MODE, {}, self.c.order(a))
        rec.probe, rec.raised = probe.label, f"the system raised: {e.text}"
        return rec

    def _replayed(self, a: Aligned, probe: Probe, cap: Capture, where: Where, cap32: Capture | None) -> Record | None:
        """Row ``a`` replayed by the system on the probe capture ``cap`` (HF's calls on the probe input)."""
        planned = self.c.replay_input(a, cap=cap)
        if planned is None:
            return None
        name, module, call = planned
        try:
            with torch.no_grad():
                test = self.sut.replay(a, module, call)
        except SystemRaised as e:
            return self._raised(a, probe, name, e)
        if test is None:
            return None
        out32 = cap32.first(a.hf).output if cap32 is not None and cap32.first(a.hf) is not None else None
        return self._row(a, probe, call.output, test, name, where, out32)

    def keep(self, recs: list[Record]) -> None:
        for rec in recs:
            self.judge(rec)  # the pipeline gates them again with every row (its verdict is the same)
        self.c.records.extend(recs)

    # -- module probes: magnitude, near-tie ----------------------------------------------------------

    def module_rows(self, kinds) -> list[Aligned]:
        """Rows of ``kinds`` the system replays on the row's own captured input (no plan from another row)."""
        out = []
        for a in self.text:
            plan = self.sut.replays.get(a.row.name_key)
            if a.row.kind in kinds and not (plan is not None and plan.on) and isinstance(self.c.replay_name(a), str) \
                    and self.c.cap.first(a.hf) is not None:
                out.append(a)
        return out

    def module_probe(self, a: Aligned, probe: Probe, transform: Callable) -> Record | None:
        """HF's module and the system's on ``transform`` of the row's captured main input (the same tensor)."""
        call = self.c.cap.first(a.hf)
        x, where = self._tokens(_main(call))
        x2 = transform(a, x.to(self.sut.device))
        if x2 is None:
            return None
        hf_call = _with_main(call, x2, self.sut.device)
        module = self.hf.module(a)
        with torch.no_grad():
            out = module(*hf_call.args, **hf_call.kwargs)
            out32 = self.hf.fp32(module)(*upcast(hf_call.args), **upcast(hf_call.kwargs)) if self.low else None
        cap = Capture(calls={a.hf: [Call(hf_call.args, hf_call.kwargs, out, call.order)]})
        cap32 = Capture(calls={a.hf: [Call((), {}, out32, call.order)]}) if out32 is not None else None
        return self._replayed(a, probe, cap, where, cap32)

    def _tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, Where]:
        """``x`` (``[b, s, ...]`` or flattened ``[b*s, ...]``) cut to the first ``TOKENS`` positions of every row,
        and where they are real; sliced before it moves to the device."""
        valid = self.ref.where.valid
        b, s = valid.shape
        n = min(s, TOKENS)
        if n == s:
            return x, self.ref.where
        if tuple(x.shape[:2]) == (b, s):
            return x[:, :n], Where(valid=valid[:, :n])
        if x.shape[0] == b * s:
            return x.unflatten(0, (b, s))[:, :n].flatten(0, 1), Where(valid=valid[:, :n])
        return x, self.ref.where

    def magnitude(self, rms: float) -> Callable:
        def transform(a, x):
            x32 = x.float()
            now = x32.pow(2).mean().sqrt()
            return None if float(now) == 0.0 else (x32 * (rms / now)).to(x.dtype)
        return transform

    def near_tie(self, gap: float) -> Callable:
        """Router inputs moved so that, per token, HF's k-th and (k+1)-th expert probabilities differ by a relative
        ``gap`` (in fp32; the run's dtype then rounds the input)."""
        def transform(a, x):
            return _near_ties(self.hf.fp32(self.hf.module(a)), x, self.ref.text_args.top_k, gap)
        return transform

    # -- input probes: positions, window, padding, single token ------------------------------------

    def inputs_probe(self, probe: Probe, layers: list[int] | None = None) -> list[Record]:
        """New raw inputs (``probe.params``): each side's own masks and RoPE for them, compared; every attention
        module (of ``layers``, default all) on HF's layer input moved to them, HF's layer run to its
        ``self_attn``."""
        inputs, take = _probe_inputs(self.ref, probe.params)
        where = Where(valid=inputs["attention_mask"].bool())
        recs: list[Record] = []
        try:
            self.sut.prepare(inputs)
        except SystemRaised as e:
            return [self._raised(a, probe, self.c.name(a), e) for a in self.text if a.row.kind is Kind.ATTENTION
                    and (layers is None or a.layer in layers)][:1]
        try:
            recs += self._tables(probe, inputs, where)
            for i in sorted({a.layer for a in self.text if a.row.kind is Kind.ATTENTION}):
                if (layers is None or i in layers) and not self.hf.kv_shared(i):
                    recs += self._attention(i, probe, inputs, take, where)
        finally:
            self.sut.prepare(self.ref.inputs)
        return recs

    def span_probe(self, probe: Probe) -> list[Record]:
        """A VLM's masks for one sequence with an image span of ``probe.params["span"]`` soft tokens, each side's
        own (the system's from ``System.prepare`` on the probe's raw inputs), compared per layer type."""
        inputs = _span_inputs(self.ref, probe.params["span"])
        where = Where(valid=inputs["attention_mask"].bool())
        masks = self.hf.vlm_masks(inputs, self.ref.torch_dtype)
        try:
            self.sut.prepare(inputs)
        except SystemRaised as e:
            return [self._raised(a, probe, self.c.name(a), e) for a in self.text if a.row.kind is Kind.MASK][:1]
        try:
            return self._tables(probe, inputs, where, masks)
        finally:
            self.sut.prepare(self.ref.inputs)

    def _tables(self, probe: Probe, inputs: dict, where: Where, masks: dict | None = None) -> list[Record]:
        """Each side's masks (and RoPE tables) for ``inputs``; ``masks``: HF's, given (then the masks alone)."""
        rope = None
        if masks is None:
            masks, rope = self.hf.tables(inputs, self.ref.torch_dtype)
        try:
            mine = self.sut.tables()
        except SystemRaised as e:
            return [self._raised(a, probe, self.c.name(a), e) for a in self.text if a.row.kind in TABLE_KINDS][:1]
        recs = []
        for a in self.text:
            name = self.c.name(a)
            if a.row.kind not in TABLE_KINDS or name not in mine or (rope is None and a.row.kind is Kind.ROPE):
                continue
            lt = a.slots["layer_type"]
            if a.row.kind is Kind.ROPE:
                m_ = compare_rope(Call((), {}, rope[lt], 0), mine[name], where)
            else:
                m_ = compare_mask(a, masks[lt], mine[name], where)
            rec = Record.measured(a, name, MODE, m_, self.c.order(a))
            if a.row.kind is Kind.MASK:
                rec.order = self.c.cap.order.get(f"{a.hf}.q_proj", self.c.cap.order.get(a.hf, 0))
            rec.probe, rec.detail = probe.label, a.row.note.format(n=m_.get("n"), **a.slots)
            recs.append(rec)
        return recs

    def _attention(self, i: int, probe: Probe, inputs: dict, take, where: Where) -> list[Record]:
        layer_name = f"{self.hf.prefix}layers.{i}"
        call = self.c.cap.first(layer_name)
        rows = [a for a in self.text if a.layer == i and a.row.kind not in TABLE_KINDS
                and a.row.kind is not Kind.LAYER]
        targets = [a for a in rows if a.row.kind is Kind.ATTENTION]
        if call is None or not targets:
            return []
        lt = self.hf.config.layer_types[i]
        h = take(call.args[0].to(self.sut.device))
        cap = self._hf_layer(self.hf.layer(i), layer_name, rows, h, inputs, lt, self.ref.torch_dtype)
        cap32 = self._hf_layer(self.hf.fp32(self.hf.layer(i), keep=False), layer_name, rows, h.float(), inputs, lt,
                               torch.float32) if self.low else None
        return [r for r in (self._replayed(a, probe, cap, where, cap32) for a in targets) if r is not None]

    def _hf_layer(self, layer, layer_name: str, rows, h, inputs: dict, lt: str, dtype) -> Capture:
        """HF's layer on ``h`` with its own mask and RoPE for ``inputs``, every row's module captured, stopped once
        ``self_attn`` has returned."""
        from parity.engine.modes.fp32_replay import _mounted

        masks, rope = self.hf.tables(inputs, dtype)
        call = self.c.cap.first(layer_name)
        shared = call.kwargs.get("shared_kv_states")
        kwargs = {**{k: v for k, v in call.kwargs.items() if not isinstance(v, torch.Tensor)},
                  "shared_kv_states": type(shared)() if shared is not None else None,
                  "position_embeddings": rope[lt], "attention_mask": masks[lt], "position_ids": inputs["position_ids"]}

        def stop(*_):
            raise _Stop

        def run():
            handle = layer.self_attn.register_forward_hook(stop)
            try:
                layer(h, None, **kwargs)
            except _Stop:
                pass
            finally:
                handle.remove()
        cap, _ = capture_hf(_mounted(layer, layer_name), rows, run, Store(offload=False))
        return cap

    # -- searches ------------------------------------------------------------------------------------

    def search(self, family: str, strategy, make: Callable[[Any], tuple[Probe, Callable[[], list[Record]]]],
               seed: int) -> dict:
        """Draw examples of ``strategy``; the law (every row of ``make(example)`` passes its gate) is checked on
        each; a failure shrinks to the smallest failing example, whose rows are kept (with ``example``)."""
        try:
            from hypothesis import HealthCheck, Phase, find, settings
            from hypothesis.errors import NoSuchExample
        except ImportError:
            return {"skipped": "hypothesis is not installed here: the fixed points only"}

        calls, seen = {"n": 0}, {}

        def fails(example) -> bool:
            key = repr(example)
            if key not in seen:  # each example is checked once (hypothesis replays the one it returns)
                if calls["n"] >= SEARCH["calls"]:
                    return False  # the budget is spent: the smallest failing example so far stands
                calls["n"] += 1
                _, rows = make(example)
                seen[key] = not all(self.judge(r) for r in rows())
            return seen[key]

        cfg = settings(max_examples=SEARCH["examples"], database=None, deadline=None, derandomize=False,
                       phases=(Phase.generate, Phase.shrink), suppress_health_check=list(HealthCheck))
        out = {"examples": SEARCH["examples"], "seed": seed}
        t = time.perf_counter()
        try:
            found = find(strategy, fails, settings=cfg, random=random.Random(seed))
        except NoSuchExample:
            out.update(found=None, checks=calls["n"])
        else:
            probe, rows = make(found)
            recs = rows()
            for r in recs:
                r.example = {"family": family, **probe.params, "seed": seed, "search": "hypothesis find, shrunk"}
            self.keep(recs)
            out.update(found={"probe": probe.label, **probe.params}, checks=calls["n"])
        out["seconds"] = time.perf_counter() - t
        return out


def run(c, prog) -> None:
    """Every family in turn (module probes, then input probes where the model kind has them); rows into
    ``c.records``, the families and their searches into ``c.sections["probing"]``."""
    p = Prober(c, prog)
    cfg, seed = p.hf.config, c.ref.seed
    families = p.section["families"]

    def family(name: str, fn: Callable[[], dict]) -> None:
        prog.note(f"probing: {name}")
        t, before = time.perf_counter(), len(c.records)
        info = fn() or {}
        new = c.records[before:]
        families[name] = {**info, "rows": len(new), "failing": sum(not r.passed for r in new),
                          "seconds": time.perf_counter() - t}

    def module_family(name: str, rows: list[Aligned], key: str, points, transform: Callable, label: Callable,
                      found: Callable, exponents: Callable[[], tuple[float, float]]) -> dict:
        """A module family: every row at each fixed point (``{key: v}``), then a search over (row, ``10**e``) with
        ``e`` in ``exponents()`` (read once the fixed points are in) on the rows the search pool gives."""
        for v in points:
            probe = Probe(name, label(v), {key: v})
            p.keep([r for r in (p.module_probe(a, probe, transform(v)) for a in rows) if r is not None])
        firsts = _search_pool(c, rows, cfg)

        def make(ex):
            i, exponent = ex
            v = 10.0 ** exponent
            probe = Probe(name, found(v), {key: v, "row": firsts[i].hf})
            return probe, lambda: [r for r in [p.module_probe(firsts[i], probe, transform(v))] if r is not None]
        st = _strategies()
        lo, hi = exponents()
        return {"modules": len(rows), "search": p.search(name, st.tuples(
            st.integers(0, len(firsts) - 1), st.floats(lo, hi, allow_nan=False)), make, seed)}

    # magnitude: every norm and router
    norms = p.module_rows(MODULE_KINDS)

    def magnitude_range() -> tuple[float, float]:
        """The exponents on the side of a fixed point that failed (shrinking toward 0 finds the mildest), else all."""
        failed = {r.probe for r in c.records if r.mode == MODE and not r.passed and r.probe.startswith("magnitude")}
        low = any(f"RMS {RMS[0]:g}" in f for f in failed)
        high = any(f"RMS {RMS[1]:g}" in f for f in failed)
        return (-4.0 if low or not high else 0.0), (5.0 if high or not low else 0.0)

    def magnitude() -> dict:
        out = module_family("magnitude", norms, "rms", RMS, p.magnitude, lambda v: f"magnitude: input RMS {v:g}",
                            lambda v: f"magnitude: input RMS {v:.3g} (found)", magnitude_range)
        lo, hi = magnitude_range()
        return {"points": [f"RMS {r:g}" for r in RMS], **out, "range": [10.0 ** lo, 10.0 ** hi]}
    family("magnitude", magnitude)

    routers = p.module_rows((Kind.ROUTER,))
    if routers:
        family("near-tie", lambda: {"points": [f"gap {g:g}" for g in TIES], **module_family(
            "near-tie", routers, "gap", TIES, p.near_tie, lambda v: f"near-tie: k-th/(k+1)-th expert gap {v:g}",
            lambda v: f"near-tie: gap {v:.3g} (found)", lambda: (-5.0, -1.0))})

    if c.ref.kind.name == "vlm":
        family("image spans", lambda: _image_spans(p, cfg, seed))

    why = _no_input_probes(c)
    if why:
        for name in ("positions", "window", "padding", "single token"):
            families[name] = {"skipped": why, "rows": 0, "failing": 0, "seconds": 0.0}
        c.sections[MODE] = p.section
        return
    st = _strategies()
    shared = [i for i in range(cfg.num_hidden_layers) if p.hf.kv_shared(i)]
    if shared:  # said once: the input probes' attention rows leave these layers out
        p.section["kv_shared_layers"] = {"layers": shared, "why": "they reuse an earlier layer's K/V; each probe runs "
                                         "a layer alone, so the layers computing those K/V are probed"}

    firsts = _first_layers(cfg)
    positions = c.ref.inputs["position_ids"][c.ref.where.valid]
    top = int(positions.max()) if positions.numel() else 0
    far = max(0, int(cfg.max_position_embeddings) - 1 - top)  # the offset that puts the last position at the end

    def offsets() -> dict:
        probe = Probe("positions", f"positions: +{far:,} (last at {top + far:,})", {"offset": far})
        p.keep(p.inputs_probe(probe))

        def make(offset):
            probe = Probe("positions", f"positions: +{offset:,} (found)", {"offset": offset})
            return probe, lambda: p.inputs_probe(probe, firsts)
        return {"points": [f"+{far:,}"], "max_position_embeddings": int(cfg.max_position_embeddings),
                "search": p.search("positions", st.integers(0, far), make, seed) if far else None}
    family("positions", offsets)

    w = int(cfg.sliding_window)
    edges = {"W-1": w - 1, "W": w, "W+1": w + 1, "2W+1": 2 * w + 1}

    def window() -> dict:
        for what, n in edges.items():
            if n >= 1:
                p.keep(p.inputs_probe(Probe("window", f"window: length {n} ({what})", {"length": n}), firsts))

        def make(n):
            probe = Probe("window", f"window: length {n} (found)", {"length": n})
            return probe, lambda: p.inputs_probe(probe, firsts)
        return {"points": [f"{k} = {v}" for k, v in edges.items()], "sliding_window": w,
                "search": p.search("window", st.integers(1, 2 * w + 2), make, seed)}
    family("window", window)

    n_pad = min(2 * w + 1, _longest(c.ref))
    family("padding", lambda: (p.keep(p.inputs_probe(Probe(
        "padding", f"padding: a row all padding beside a real row of {n_pad}", {"length": n_pad, "padded_row": True})))
        or {"points": [f"real row of {n_pad} + a row all padding"]}))
    family("single token", lambda: (p.keep(p.inputs_probe(Probe("single token", "single token: a sequence of one",
                                                                   {"length": 1}))) or {"points": ["length 1"]}))
    c.sections[MODE] = p.section


class _NoStrategies:
    """Stands in for ``hypothesis.strategies`` where hypothesis is not installed: the searches then say so."""

    def __getattr__(self, name):
        return lambda *a, **kw: None


def _strategies():
    try:
        from hypothesis import strategies
    except ImportError:
        return _NoStrategies()
    return strategies


# ---------------------------------------------------------------------------------------------------
# Inputs

def _no_input_probes(c) -> str | None:
    """Why the input probes cannot run for this run, or None."""
    if c.ref.kind.name != "text":
        return (f"a {c.ref.kind.name} run: these probes build text-only raw inputs (its image spans are the "
                "'image spans' family)")
    return None  # per-layer inputs (PLE) join a layer after its attention, where a probe's layer run stops


def _first_layers(cfg) -> list[int]:
    """The first layer of each layer type, in order."""
    types = list(cfg.layer_types)
    return sorted({types.index(t) for t in set(types)})


def _first_of_each_type(rows: list[Aligned], cfg) -> list[Aligned]:
    """The rows of the first layer of each layer type (and rows outside the layers): what a search draws from."""
    firsts = _first_layers(cfg)
    return [a for a in rows if a.layer is None or a.layer in firsts] or rows


def _search_pool(c, rows: list[Aligned], cfg) -> list[Aligned]:
    """What a module family's search draws rows from: the rows its fixed points failed (the search then finds the
    mildest input that still fails them), else the first layer of each type."""
    failed = {r.name for r in c.records if r.mode == MODE and not r.passed}
    return [a for a in rows if a.hf in failed][:8] or _first_of_each_type(rows, cfg)


def _longest(ref) -> int:
    return int(ref.where.valid.sum(-1).max())


def _probe_inputs(ref, params: dict) -> tuple[dict, Callable]:
    """Raw inputs of a probe and ``take``: the run's activations ``[b, s, ...]`` moved to the probe's positions.
    ``offset``: the run's inputs with position ids shifted; ``length``: one sequence of that many tokens, the
    run's longest row's real tokens cycled (``padded_row``: and a second row all padding)."""
    inputs, valid = ref.inputs, ref.where.valid
    if "offset" in params:
        out = dict(inputs)
        out["position_ids"] = inputs["position_ids"] + params["offset"] * valid.to(inputs["position_ids"].dtype)
        return out, lambda h: h
    n = params["length"]
    row = int(valid.sum(-1).argmax())
    real = valid[row].nonzero().squeeze(-1)
    idx = real[torch.arange(n, device=real.device) % real.numel()]
    ids = inputs["input_ids"][row, idx][None]
    mask = torch.ones_like(ids, dtype=inputs["attention_mask"].dtype)
    pos = torch.arange(n, device=ids.device, dtype=inputs["position_ids"].dtype)[None]
    rows = 1
    if params.get("padded_row"):
        pad = ref.config.pad_token_id if getattr(ref.config, "pad_token_id", None) is not None else 0
        ids = torch.cat([ids, torch.full_like(ids, pad)])
        mask, pos, rows = torch.cat([mask, torch.zeros_like(mask)]), torch.cat([pos, pos]), 2
    out = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    return out, lambda h: h[row, idx][None].expand(rows, *h[row, idx].shape).contiguous()


def _image_spans(p: "Prober", cfg, seed: int) -> dict:
    """Image spans at the sliding window's edges (W-1, W, W+1, 2W+1 soft tokens: a span longer than the window is
    where a vision-bidirectional sliding mask and a window disagree), then a seeded search over the span."""
    w = int(cfg.sliding_window)
    edges = {"W-1": w - 1, "W": w, "W+1": w + 1, "2W+1": 2 * w + 1}
    try:
        for what, n in edges.items():
            if n >= 1:
                p.keep(p.span_probe(Probe("image spans", f"image span: {n} soft tokens ({what})", {"span": n})))
    except _Unavailable as e:
        return {"skipped": str(e)}

    def make(n):
        probe = Probe("image spans", f"image span: {n} soft tokens (found)", {"span": n})
        return probe, lambda: p.span_probe(probe)
    return {"points": [f"{k} = {v}" for k, v in edges.items()], "sliding_window": w,
            "search": p.search("image spans", _strategies().integers(1, 2 * w + 2), make, seed)}


def _span_inputs(ref, n: int) -> dict:
    """One sequence: four text tokens, BOI, ``n`` image soft tokens, EOI, four text tokens (text ids from the run's
    text positions); ``mm_token_type_ids`` 1 on the soft tokens, as the processor marks them. The run's other inputs
    (image positions, audio frames) stay: no probe runs a tower."""
    cfg, inputs = ref.config, ref.inputs
    text = inputs["input_ids"][ref.where.valid & (inputs["mm_token_type_ids"] == 0)]
    text = text[~torch.isin(text, torch.tensor([cfg.boi_token_id, cfg.eoi_token_id], device=text.device))]
    pick = text[torch.arange(8, device=text.device) % text.numel()]
    ids = torch.cat([pick[:4], torch.tensor([cfg.boi_token_id], device=text.device),
                     torch.full((n,), cfg.image_token_id, device=text.device),
                     torch.tensor([cfg.eoi_token_id], device=text.device), pick[4:]])[None].to(inputs["input_ids"].dtype)
    mm = torch.zeros_like(ids, dtype=inputs["mm_token_type_ids"].dtype)
    mm[0, 5:5 + n] = 1
    s = ids.shape[1]
    return {**inputs, "input_ids": ids, "mm_token_type_ids": mm,
            "attention_mask": torch.ones_like(ids, dtype=inputs["attention_mask"].dtype),
            "position_ids": torch.arange(s, device=ids.device, dtype=inputs["position_ids"].dtype)[None]}


def _main(call: Call) -> torch.Tensor:
    return call.args[0] if call.args else call.kwargs["hidden_states"]


def _with_main(call: Call, x: torch.Tensor, device) -> Call:
    """``call`` with its main input replaced by ``x`` (everything on ``device``)."""
    from parity.engine.compare import to_device

    args, kwargs = to_device(tuple(call.args), device), to_device(dict(call.kwargs), device)
    if args:
        args = (x, *args[1:])
    else:
        kwargs["hidden_states"] = x
    return Call(args, kwargs, None, call.order)


def _near_ties(router32, x: torch.Tensor, k: int, gap: float) -> torch.Tensor:
    """``x`` [T, H] moved, token by token, along the direction that closes the logit gap of HF's k-th and
    (k+1)-th expert, until their probabilities differ by a relative ``gap`` (bisection on HF's own fp32 router;
    a token already closer stays)."""
    x32 = x.float()
    w = router32.proj.weight.float()
    scale = router32.scale.float() * router32.scalar_root_size

    def logits(v):
        return router32.proj(router32.norm(v) * router32.scale * router32.scalar_root_size).float()

    with torch.no_grad():
        z = logits(x32)
        top = z.topk(k + 1, dim=-1).indices
        a, b = top[:, k - 1], top[:, k]
        d = (w[a] - w[b]) * scale  # moves z_a - z_b
        d = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        rms = x32.pow(2).mean(-1, keepdim=True).sqrt()
        target = -math.log1p(-gap)  # z_a - z_b at which (p_a - p_b) / p_a = gap

        def gap_at(t):
            zt = logits(x32 - t[:, None] * rms * d)
            return zt.gather(1, a[:, None])[:, 0] - zt.gather(1, b[:, None])[:, 0]

        lo = torch.zeros(x32.shape[0], device=x32.device)
        hi = torch.full_like(lo, 0.05)
        for _ in range(20):  # widen until the gap is closed past the target
            short = gap_at(hi) > target
            if not bool(short.any()):
                break
            hi = torch.where(short, hi * 2, hi)
        for _ in range(40):
            mid = (lo + hi) / 2
            above = gap_at(mid) > target
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        t = torch.where(gap_at(torch.zeros_like(lo)) > target, hi, torch.zeros_like(lo))
        return (x32 - t[:, None] * rms * d).to(x.dtype)


def _mask_kwargs(fn, *, config, embeds, attention_mask, position_ids) -> dict:
    """The keyword arguments of HF's mask functions in the installed transformers: 5.24 takes ``inputs_embeds`` and
    ``cache``; 5.17 (the lent GPUs') ``input_embeds``, ``past_key_values`` and ``cache_position``."""
    import inspect

    params = inspect.signature(fn).parameters
    kw = {"config": config, "attention_mask": attention_mask, "position_ids": position_ids,
          ("inputs_embeds" if "inputs_embeds" in params else "input_embeds"): embeds}
    for name in ("cache", "past_key_values"):
        if name in params:
            kw[name] = None
    if "cache_position" in params:
        kw["cache_position"] = torch.arange(embeds.shape[1], device=embeds.device)
    return kw
