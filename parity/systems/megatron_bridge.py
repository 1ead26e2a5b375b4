"""System ``megatron-bridge``: NVIDIA Megatron-Bridge's own Gemma 4 (its provider, mapping, export).

The model, weights and forward come from ``parity.mbridge.model``; where each alignment row is observed in
its module tree comes from ``parity.mbridge.alignment`` (a twin is a module's output, or its input: names
ending in `` (input)``). Rows the bridge computes inside another module are ``Elsewhere``. HF's own vision
tower and ``embed_vision`` run inside its VLM, and HF's own audio tower: those rows are ``shared`` (its
``embed_audio`` is its own fallback, compared; its forward takes no audio frame mask: finding 17). Isolated replay runs the bridge's
module on HF's captured inputs where the module can run alone; ``replay`` returns None where it cannot
(the input norm fused into ``linear_qkv``, the routed experts behind the dispatcher).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from parity import megatron_env
from parity.config import TextArgs
from parity.engine.alignment import AUDIO, VISION, Aligned, Kind, Stack
from parity.engine.compare import to_device, value
from parity.engine.system import Elsewhere, GradTap, Replay, call_arg, hf_routing
from parity.errors import UserError
from parity.mbridge import training as T
from parity.megatron_layout import (FLAT, finalize_grads, first, gather_heads, grad_norm, hf_token_order, input_to_hf,
                                    sb, several_ranks, sp_gather, sp_sharded, sp_split, split_heads, to_hf, tp_gather,
                                    tp_size, tp_split, train_layers)

INPUT = " (input)"
LM_VLM = "language_model."


def _sb(x: torch.Tensor) -> torch.Tensor:
    """``[b, s, ...]`` <-> ``[s, b, ...]``, contiguous: the bridge's modules view their inputs."""
    return sb(x, contiguous=True)


def _key(hf: str) -> str:
    """The bridge table's HF path -> the engine table's name key (text stack rows drop ``model.``)."""
    return hf[len("model."):] if hf.startswith("model.") else hf


def _replays(moe: bool, vlm: bool) -> dict[str, Replay]:
    """Alignment-table key -> how isolated replay runs the row, for the rows the bridge's table says."""
    from parity.mbridge import alignment as A

    prefix = LM_VLM if vlm else ""
    out = {}
    for row in (*A.TEXT_MODEL, *A.TEXT_LAYER):
        twin = row.moe if moe else row.dense
        if twin is not None and (twin.replay or twin.replay_on):
            out[_key(row.hf)] = Replay(prefix + (twin.replay or twin.module), twin.replay_on and _key(twin.replay_on),
                                       twin.replay_note)
    return out


def _grad_taps(moe: bool, vlm: bool) -> dict[str, GradTap]:
    """Alignment-table key -> where the backward mode reads the row's gradients, for the rows the bridge's table
    observes elsewhere than a module's output and input: a value read at a module's input (its gradient is read
    there too), a module whose input is another HF module's (the input norm fused into linear_qkv), a row without
    a module whose input is still HF's (lm_head: output_layer's input)."""
    from parity.mbridge import alignment as A

    prefix = LM_VLM if vlm else ""
    out = {}
    for row in (*A.TEXT_MODEL, *A.TEXT_LAYER):
        twin = row.moe if moe else row.dense
        key = _key(row.hf)
        if twin is None or key in ("logits", "rotary_emb"):
            continue
        output = None if not twin.observable else "input" if twin.io == "input" else "output"
        grad_input = twin.grad_input if twin.observable or twin.grad_input else None
        if output == "output" and grad_input == "":
            continue  # as ``names`` says
        out[key] = GradTap(output=output, input=prefix + grad_input if grad_input else grad_input,
                           why=twin.grad_note or twin.note)
    return out


def _dead_on_kv_shared(name: str, bm) -> bool:
    """``name`` is the k-norm weight of one of its KV-shared layers (HF has no k_norm there; its forward discards
    the K that norm produces for the source layer's K/V)."""
    import re

    m = re.fullmatch(r"(?:language_model\.)?decoder\.layers\.(\d+)\.self_attention\.k_layernorm\.weight", name)
    if m is None:
        return False
    att = bm.model.get_submodule(name.rsplit(".", 2)[0])
    return bool(getattr(att, "is_kv_shared_layer", False))


def _names(moe: bool, vlm: bool) -> dict[str, str | Elsewhere]:
    """Alignment-table key -> module path (`` (input)``: the module's first input), from the bridge's table."""
    from parity.mbridge import alignment as A

    prefix = LM_VLM if vlm else ""
    out: dict[str, str | Elsewhere] = {}
    for row in (*A.TEXT_MODEL, *A.TEXT_LAYER):
        twin = row.moe if moe else row.dense
        key = _key(row.hf)
        if twin is None or key in ("logits", "rotary_emb"):
            continue
        if not twin.observable:
            at = {"embed_tokens": "layers.0", "lm_head": "logits", "layers.{i}.input_layernorm": "layers.{i}.self_attn.q_proj",
                  "layers.{i}.self_attn.v_norm": "layers.{i}.self_attn",
                  "layers.{i}.pre_feedforward_layernorm_2": "layers.{i}.experts",
                  "embed_tokens_per_layer": "layers.0", "per_layer_model_projection": "layers.0",
                  "per_layer_projection_norm": "layers.0",
                  "layers.{i}.self_attn.q_proj (kv shared)": "layers.{i}.self_attn"}[key]
            out[key] = Elsewhere(at, twin.note)
            continue
        out[key] = prefix + twin.module + (INPUT if twin.io == "input" else "")
    out["logits"] = "logits"
    out["masks"] = "masks[{layer_type}]"
    if vlm:
        # its VLM calls ``language_model.forward`` directly (no hooks fire there): its decoder's input it is
        out["merged_embeddings"] = LM_VLM + "decoder" + INPUT
        out.update({r.hf: r.hf for r in VISION})  # HF's own modules, same paths inside the bridge's model
        out.update({r.hf: r.hf for r in AUDIO})  # HF's own audio tower; embed_audio is the bridge's own fallback
        out["embed_audio.embedding_pre_projection_norm"] = Elsewhere("embed_audio", AUDIO_EMBEDDER_NOTE)
    return out


# Megatron-Bridge 0.6.2 imports ``Gemma4AudioEmbedder``, which transformers 5.24 does not have (its embedder is
# ``Gemma4MultimodalEmbedder``), and falls back to its own ``_SimpleAudioEmbedder`` (the norm inline, no submodule)
AUDIO_EMBEDDER_NOTE = ("the bridge's fallback _SimpleAudioEmbedder (transformers 5.24 has no Gemma4AudioEmbedder) "
                       "normalises inline")
SHARED_AUDIO = frozenset(r.hf for r in AUDIO if r.hf.startswith("audio_tower"))  # HF's own modules


class MegatronBridgeSystem:
    name = "megatron-bridge"
    loss_description = T.LOSS_DESCRIPTION

    def __init__(self):
        from parity import mbridge

        ok, why = mbridge.available()
        if not ok:
            raise UserError(f"--system megatron-bridge: {why}")
        self.version = mbridge.version()
        self.substituted: list[dict] = []
        self.shared = frozenset(r.hf for r in VISION) | SHARED_AUDIO
        self.replays: dict[str, Replay] = {}
        self.lora = None  # its LoRA config once ``load_adapters`` has put adapters on

    # -- building and weights ----------------------------------------------------------------------

    def build(self, kind: str, hf_config: Any, *, dtype: torch.dtype, device: str) -> None:
        from parity.mbridge import model as MB

        self.vlm, self.dtype, self.device = kind == "vlm", dtype, device
        # megatron-core's fused activations (its ``jit_fuser``: torch.compile) compile up to dynamo's recompile limit,
        # then run eager, and the two round a bf16 gelu differently: fresh compile caches for every build, so that a
        # run's rows do not depend on what ran before it in the process (a pytest worker; a run of its own starts so)
        torch._dynamo.reset()
        self.args = TextArgs.from_hf(getattr(hf_config, "text_config", None) or hf_config)
        rk = megatron_env.ranks()  # the world the pipeline set up (TP x EP): the bridge builds this rank's shard
        self.bm = MB.build(hf_config, dtype=dtype, device=device, tp=rk["tp_size"], ep=rk["ep_size"],
                           sequence_parallel=rk["sequence_parallel"])
        self.model = self.bm.model
        self.lm = self.model.language_model if self.vlm else self.model
        # its sequence parallelism (the case's, as its recipes set it at TP > 1): which values are sequence shards is
        # megatron_layout's (``sp_sharded``), by the row's kind
        self.sp = bool(self.bm.provider.sequence_parallel) and rk["tp_size"] > 1
        self.substituted = list(self.bm.substituted)
        self.names = _names(moe=not self.bm.dense, vlm=self.vlm)
        self.replays = _replays(moe=not self.bm.dense, vlm=self.vlm)
        self.grad_taps = _grad_taps(moe=not self.bm.dense, vlm=self.vlm)
        self._modules = dict(self.model.named_modules())
        self._inputs: dict[int, torch.Tensor] = {}
        self._handles = []  # pre-hooks on the input-side modules, installed by ``prepare``

    def load(self, hf_state, folder=None) -> None:
        """Its own HF -> Megatron mapping; from a checkpoint folder, its own import reads the safetensors (the
        folder's state source, as ``AutoBridge.load_hf_weights(model, hf_path)`` does)."""
        from parity.mbridge import model as MB

        unloaded = MB.load_hf(self.bm, folder if folder is not None else hf_state)
        # Finding 16: on KV-shared layers its attention keeps a k-norm that HF has not and its mapping never writes;
        # the K it normalises is dropped for the source layer's. Left NaN here: were it ever used, the run fails.
        self.unloaded_dead = [k for k in unloaded if _dead_on_kv_shared(k, self.bm)]
        unloaded = [k for k in unloaded if k not in self.unloaded_dead]
        if unloaded:
            raise RuntimeError(f"Megatron-Bridge's mapping left {len(unloaded)} tensors unloaded: {unloaded[:3]}")

    def export(self):
        """Its base weights (with LoRA on: unmerged; it names an adapted linear's weight as peft's wrapped module
        holds it, ``<module>.base_layer.weight``: given back under HF's own name)."""
        from parity.mbridge import model as MB

        for name, tensor in MB.export_hf(self.bm):
            yield (name.replace(".base_layer.", ".") if self.lora is not None else name), tensor

    # -- LoRA --------------------------------------------------------------------------------------

    def load_adapters(self, state, spec) -> None:
        """Its own LoRA (``parity.mbridge.lora``: its recipe's transform) with HF's adapters through its mapping."""
        from parity.mbridge import lora as L
        from parity.mbridge import substitutes as S

        self.lora = L.apply(self.bm, spec)
        taken = set(L.import_(self.bm, state))
        left = sorted(set(state) - taken)
        if left:
            raise RuntimeError(f"{len(left)} HF adapter tensors have no place in its LoRA: {left[:3]}")
        # its LoRA wraps each adapted module (``linear_proj`` -> ``linear_proj.to_wrap``): the wrapper keeps the path,
        # the wrapped module's own submodules (linear_proj's post-norm) are found under their former paths too
        self._modules = dict(self.model.named_modules())
        self._modules.update({n.replace(".to_wrap.", "."): m for n, m in list(self._modules.items())
                              if ".to_wrap." in n and n.replace(".to_wrap.", ".") not in self._modules})
        self.substituted += [dict(row) for row in S.LORA]

    def save_adapters(self, folder: str) -> None:
        from parity.mbridge import lora as L

        L.save(self.bm, self.lora, folder)

    def parked(self):
        """Its weights on the host for the block (``parity.tensors.parked``)."""
        from parity.tensors import parked

        return parked(self.model)

    def merged(self):
        """Its merged export (``export_hf_weights``' default: adapters merged)."""
        from parity.mbridge import model as MB

        yield from MB.export_hf(self.bm, merge=True)

    # -- running -----------------------------------------------------------------------------------

    def prepare(self, inputs: dict) -> None:
        """Its own masks: the attention each layer type really applies (TE's causal core attention with its
        window on the MoE model; megatron-core's local softmax on the dense one: its window on sliding layers, the
        mask its forward passes on full ones), and the input hooks."""
        from parity.mbridge import model as MB
        from parity.mbridge import substitutes as S

        self.inputs = inputs
        b, s = inputs["input_ids"].shape
        self.b, self.s = b, s
        self.layer_types = [la.layer_type for la in self.args.layers]
        # the mask its forward passes its layers: its VLM's own (image blocks bidirectional, the 2-D padding mask
        # ignored: finding 6), else its GPT mask from the padding mask
        self.megatron_mask = (self.model._compute_attention_mask(inputs["input_ids"]) if self.vlm else
                              MB.megatron_attention_mask(inputs["attention_mask"]))
        self.masks = {}
        for i, t in enumerate(self.layer_types):
            if t in self.masks:
                continue
            attn = self._modules[f"{LM_VLM if self.vlm else ''}decoder.layers.{i}.self_attention.core_attention"]
            if isinstance(attn, S.CoreAttentionSubstitute):
                masked = S.te_full_mask(attn.attn_mask_type.name, None, S.te_window(attn.attn_mask_type.name,
                                                                                     attn.window_size), s, s, "cpu")
            else:  # megatron-core local DotProductAttention: a window replaces the passed mask
                window = attn.scale_mask_softmax.window_size
                masked = (S.te_full_mask("causal", None, (window[0], 0), s, s, "cpu") if window is not None
                          else self.megatron_mask.cpu())
            self.masks[t] = (~masked).expand(b, 1, s, s).to(inputs["input_ids"].device)
        for h in self._handles:
            h.remove()
        self._handles = []
        for key, path in self.names.items():
            if isinstance(path, str) and path.endswith(INPUT):
                for i in (range(self.args.num_layers) if "{i}" in path else [None]):
                    self._hook_input(path[: -len(INPUT)].format(i=i))

    def _hook_input(self, path: str) -> None:
        module = self._modules[path]

        def pre(mod, args, kwargs):
            x = next((kwargs[k] for k in ("decoder_input", "hidden_states") if k in kwargs), args[0] if args else None)
            if x is not None:
                self._inputs[id(mod)] = x.detach()
        self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))

    def forward(self, inputs: dict) -> torch.Tensor:
        from parity.mbridge import model as MB

        return MB.forward(self.bm, inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"],
                          **self._visual(inputs))

    def _visual(self, inputs: dict) -> dict:
        """What its VLM's forward takes of the raw inputs: ``input_features`` but no ``input_features_mask``
        (finding 17)."""
        return {k: inputs[k] for k in T.VISUAL if k in inputs} if self.vlm else {}

    def module(self, name: str) -> nn.Module | None:
        return self._modules.get(name[: -len(INPUT)] if name.endswith(INPUT) else name)

    # -- training ----------------------------------------------------------------------------------

    def train_loss(self, inputs: dict, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Its GPT (or VLM) training step with its provider's defaults (``parity.mbridge.training``): (loss, logits
        ``[b, s, V]``), both in the graph. ``labels``: HF's convention; its data path shifts them."""
        args = (self.bm, inputs["input_ids"], labels, inputs["position_ids"])
        self._finalized = False  # a new backward follows: megatron's finalize_model_grads pending again
        if getattr(self, "lora", None) is None:
            return T.train_loss(*args, **self._visual(inputs))
        from parity.mbridge import lora as L

        with L.dropout_off(self.bm):  # a dropout mask is random on each side
            return T.train_loss(*args, **self._visual(inputs))

    def grads(self, want=None):
        """Its parameters' gradients in HF layout, by its own export applied to them (K=V: the adjoint of its
        import's copy of k_proj into the v slot), after megatron's ``finalize_model_grads`` (``finalize_grads``); in a
        world of several ranks its export gathers the shards (TP slices, EP experts); with LoRA on, the adapters' (the
        base is frozen). ``want``: only its conversion tasks with an HF key it accepts run (not the adapters')."""
        self.finalize_grads()
        if getattr(self, "lora", None) is not None:
            from parity.mbridge import lora as L

            yield from L.grads(self.bm).items()
            return
        yield from T.grads(self.bm, want)

    def zero_grad(self) -> None:
        """Its parameters' gradients cleared (the isolated backward runs its modules' backwards into them)."""
        self.bm.model.zero_grad(set_to_none=True)
        self._finalized = False

    def _experts(self) -> set[int]:
        """Its expert parameters (ids): megatron-core marks them ``allreduce=False`` (reduced over expert DP)."""
        return {id(p) for p in self.model.parameters() if not getattr(p, "allreduce", True)}

    def finalize_grads(self) -> None:
        """What megatron-core's training loop does between the backward and the optimizer (``finalize_model_grads``,
        ``megatron_layout.finalize_grads``: its DDP's data-parallel average, the q/k norms' gradients summed over TP),
        once per backward."""
        if getattr(self, "_finalized", True):
            return
        self._finalized = True
        finalize_grads(self.model, self.lm.config, self._experts())  # its VLM: the vision tower too

    def optimizer_step(self, spec) -> float:
        """One step of megatron-core's optimizer as its recipes configure it, at data-parallel size 1 (where its
        distributed optimizer's arithmetic is AdamW's: ``step.AdamWStep``, fp32 main weights for bf16 parameters,
        global-norm clipping, no decay on 1-D parameters) over the parameters that train, after its
        ``finalize_model_grads``; in a world of several ranks each rank steps its own shards, clipped by megatron's
        global norm over the ranks (``_grad_norm``); the gradients cleared.
        Nothing re-ties its K=V layers' v slot: its forward never reads it and its export drops it. Returns the
        gradient norm before clipping."""
        from parity.engine.modes.step import AdamWStep

        if getattr(self, "_optimizer", None) is None:
            norm = self._grad_norm if several_ranks() else None  # each rank steps its shards, clipped by the global norm
            self._optimizer = AdamWStep([(n, p) for n, p in self.bm.model.named_parameters() if p.requires_grad], spec,
                                        norm=norm)
        self.finalize_grads()
        return self._optimizer.step()

    def train_layers(self, layers, embedding: bool = False) -> None:
        """Only the text decoder ``layers`` train, and the word embedding when ``embedding``
        (``megatron_layout.train_layers``: the rest frozen, as its users' freezing sets ``requires_grad``)."""
        train_layers(self.bm.model, layers, embedding)

    def _grad_norm(self, pairs) -> torch.Tensor:
        """megatron-core's global gradient norm over the ranks (``megatron_layout.grad_norm``: TP duplicates counted
        once, the experts' over the expert tensor-model-pipeline group)."""
        return grad_norm(pairs, self._experts(), next(self.model.parameters()).device)

    def loss_on(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Its loss function alone on logits ``[b, s, V]`` (``parity.mbridge.training.loss_on``)."""
        return T.loss_on(self.bm, logits, labels)

    def input_key(self, a: Aligned, args: tuple, kwargs: dict) -> int | str | None:
        """Its modules' main input: ``hidden_states`` where passed by keyword (its decoder calls layers so), else the
        first positional argument."""
        if isinstance(kwargs.get("hidden_states"), torch.Tensor):
            return "hidden_states"
        return 0 if args and isinstance(args[0], torch.Tensor) else None

    def input_layout(self, a: Aligned, x: torch.Tensor, module: nn.Module, grad: bool = False) -> torch.Tensor:
        """A module's input (or its gradient: ``grad``) ``[s, b, ...]`` -> HF layout: of the row's value where the row
        is observed at this module's input (``names`` ending in `` (input)``), else of HF's module's input; HF's own
        vision and audio modules inside it take HF's layout."""
        if a.row.stack in (Stack.VISION, Stack.AUDIO):
            return x
        if self._is_input(a) and module is self.module(self.names[a.row.name_key].format(**a.slots)):
            return self._layout(a, x, grad)
        return input_to_hf(a, x, self.b, self.s, module, args=self.args, sequence_parallel=self.sp, grad=grad)

    @contextmanager
    def fp32(self, path: str):
        """``path`` (a decoder layer or the final norm) upcast to fp32 in place for the fp32 replay, cast back
        after (bf16 -> fp32 -> bf16 is exact; every floating tensor of the built model is in the run's dtype).
        Its own modules, hooks included, then run in fp32: yields ``module``."""
        module = self._modules[path]
        module.float()
        try:
            yield self.module
        finally:
            module.to(self.dtype)

    def tables(self) -> dict[str, Any]:
        return {f"masks[{t}]": m for t, m in self.masks.items()}

    # -- layouts -----------------------------------------------------------------------------------

    def _is_input(self, a: Aligned) -> bool:
        name = self.names.get(a.row.name_key)
        return isinstance(name, str) and name.endswith(INPUT)

    def output(self, a: Aligned, out: Any, module: nn.Module, grad: bool = False) -> Any:
        """A hooked output (or the hooked module's input; or its gradient: ``grad``) in ``[s, b, ...]`` -> HF
        layout."""
        if a.row.stack in (Stack.VISION, Stack.AUDIO):
            return value(a.row.kind, out)
        x = self._inputs[id(module)] if self._is_input(a) else out
        return self._router(x) if a.row.kind is Kind.ROUTER else self._layout(a, first(x), grad)

    def _layout(self, a: Aligned, x: torch.Tensor, grad: bool = False) -> torch.Tensor:
        """``[s, b, ...]`` -> HF layout; column-parallel outputs (this rank's heads or features) gathered, sequence
        shards (under its sequence parallelism) gathered along the sequence -- its VLM's text embedding is whole (its
        VLM scatters the merged embeddings instead: ``scatter_embedding_sequence_parallel`` off); ``grad``:
        ``megatron_layout.to_hf``."""
        sp = self.sp and (a.row.kind is not Kind.EMBEDDING or self.lm.embedding.scatter_to_sequence_parallel)
        return to_hf(a, x, self.b, self.s, self.args, contiguous=True, sequence_parallel=sp, grad=grad)

    def _in(self, a: Aligned, x: torch.Tensor) -> torch.Tensor:
        """HF's input of row ``a``'s module (``[b, s, ...]``; ``[b*s, ...]`` for ``FLAT`` rows) -> its module's
        ``[s, b, ...]``; under its sequence parallelism this rank's sequence shard where the module reads one
        (``sp_sharded``: through autograd, the input gradient gathers every rank's shard), as in its forward -- a
        replicated weight's gradient is then this rank's tokens' part, which ``finalize_model_grads`` sums over TP."""
        if a.row.kind in FLAT:
            x = x.reshape(self.b, -1, x.shape[-1])
        x = _sb(x)
        return sp_split(x) if self.sp and sp_sharded(a, "input") else x

    def _router(self, out) -> dict:
        """megatron router output ``(probs [s*b, E] zero off the top-k, routing_map)`` -> HF token order; under its
        sequence parallelism this rank's tokens ``[s/tp*b, E]``, gathered first."""
        probs, routing_map = out
        if self.sp:
            whole = probs.shape[0] * tp_size()
            probs, routing_map = sp_gather(probs, whole), sp_gather(routing_map.to(probs.dtype), whole).bool()
        b = self.b
        s = probs.shape[0] // b  # the run's length, or a probe's (parity.engine.modes.probing.TOKENS)
        dense = hf_token_order(probs, b, s)
        top_w, top_i = dense.masked_fill(~hf_token_order(routing_map, b, s).bool(), float("-inf")).topk(
            self.args.top_k, dim=-1)
        return {"dense": dense, "top_w": top_w, "top_i": top_i}

    # -- isolated replay ---------------------------------------------------------------------------

    def replay(self, a: Aligned, module: nn.Module | None, call) -> Any:
        """The bridge's module on HF's captured inputs, in HF layout; None where the module cannot run alone.
        Rows with a ``Replay`` run the module it names (on the HF row's inputs it names): an enclosing module
        whose run yields the row's value as the observed module's input, or a norm the layer applies as a
        function of its weight (``_planned``); every other row its kind's handler (``_REPLAY``)."""
        kind = a.row.kind
        if a.row.stack is Stack.VISION or a.row.name_key in SHARED_AUDIO:  # HF's own module on HF's own inputs
            # (captured on the host in an offloading run: moved to the device)
            return value(kind, module(*to_device(call.args, self.device), **to_device(call.kwargs, self.device)))
        if a.row.stack is Stack.AUDIO:  # its own embed_audio (and its projection) on HF's input
            x = call.args[0] if call.args else call.kwargs["inputs_embeds"]
            return value(kind, module(x.to(self.device)))
        planned = None if kind in (Kind.LOGITS, Kind.MERGED) else self._planned(a)
        handler = planned or self._REPLAY.get(kind)
        return None if handler is None else handler(self, a, module, call)

    def _planned(self, a: Aligned):
        """The handler of a row whose value the bridge's table reads elsewhere than its module's output: a norm
        the layer applies as a function, or a module's input (run the enclosing module its ``Replay`` names;
        without one there is nothing to run alone: an input that is another module's output)."""
        planned = a.row.name_key in self.replays
        if planned and a.row.kind in (Kind.NORM, Kind.FLAT_NORM):
            return MegatronBridgeSystem._replay_fn_norm
        if self._is_input(a):
            return MegatronBridgeSystem._via_input if planned else MegatronBridgeSystem._replay_nothing
        return None

    def _arg(self, call, key: str = "hidden_states") -> torch.Tensor:
        return call_arg(call, key, device=self.device)

    def _replay_nothing(self, a: Aligned, module, call) -> None:
        return None

    def _replay_logits(self, a: Aligned, module, call) -> torch.Tensor:
        """output_layer (tied weight) + its softcap on HF's final-norm output."""
        weight = self.lm.shared_embedding_or_output_weight()
        logits = tp_gather(self.lm.output_layer(self._in(a, call.args[0].to(self.device)), weight=weight)[0])
        return _sb(logits)[..., : self.bm.vocab_size]

    def _replay_embedding(self, a: Aligned, module, call) -> torch.Tensor:
        return self._layout(a, module(input_ids=self._arg(call, "input_ids"), position_ids=None))

    def _replay_norm(self, a: Aligned, module, call) -> torch.Tensor:
        """A norm on HF's input; a per-head norm at TP > 1 on this rank's heads (its weight's gradient is that part,
        summed over TP by ``finalize_grads`` as megatron does), the heads gathered after (``split_heads``: a KV head
        on several ranks where TP exceeds the KV heads)."""
        x = self._in(a, self._arg(call))
        if a.row.kind is not Kind.HEAD_NORM or tp_size() == 1:
            return self._layout(a, first(module(x)))
        return _sb(gather_heads(first(module(split_heads(x))), x.shape[2]))

    def _replay_linear(self, a: Aligned, module, call) -> torch.Tensor:
        """A row-parallel linear gets this rank's slice of HF's input features."""
        return self._layout(a, first(module(self._linear_input(module, self._arg(call, "input")))))

    def _replay_projection(self, a: Aligned, module, call) -> torch.Tensor:
        """The fused QKV (planned: on the HF input norm's input, that norm fused into it), FC1 or the MLP."""
        key = "hidden_states" if a.row.kind is Kind.QKV and a.row.name_key in self.replays else "input"
        return self._layout(a, first(module(self._in(a, self._arg(call, key)))))

    def _replay_router(self, a: Aligned, module, call) -> dict:  # HF's router input is [b*s, H] in HF token order
        x = self._arg(call)
        return self._router(module(self._in(a, x.reshape(self.b, -1, x.shape[-1]))))

    def _replay_layer(self, a: Aligned, module, call) -> torch.Tensor:  # with its own mask and RoPE tables
        """A decoder layer: with PLE, on HF's per-layer input too (its layer's ``per_layer_input``). A KV-shared
        layer reads the K/V its source layer kept at its last run: the source's own replay on HF's inputs."""
        kw = self._attention_kwargs()
        if getattr(module, "per_layer_input_gate", None) is not None:
            kw["per_layer_input"] = _sb(call_arg(call, "per_layer_input", 1, device=self.device))
        return self._layout(a, first(module(self._in(a, self._arg(call)), **kw)))

    _REPLAY = {
        Kind.LOGITS: _replay_logits, Kind.MERGED: _replay_nothing,  # MERGED: an inline step of its VLM forward
        Kind.EMBEDDING: _replay_embedding, Kind.NORM: _replay_norm, Kind.HEAD_NORM: _replay_norm,
        Kind.LINEAR: _replay_linear, **dict.fromkeys((Kind.QKV, Kind.FC1, Kind.MLP), _replay_projection),
        Kind.ROUTER: _replay_router, Kind.LAYER: _replay_layer,
    }  # any other kind (not planned): None

    def _attention_kwargs(self) -> dict:
        """What its decoder passes a layer, and a layer its self-attention: its own mask and RoPE tables."""
        return {"attention_mask": self.megatron_mask.to(self.device), "rotary_pos_emb": self.lm.rotary_pos_emb(self.s)}

    def _linear_input(self, linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``[b, s, F]`` HF input -> ``[s, b, F]``; for a row-parallel linear (its weight split along its input
        features, ``partition_dim`` 1, as megatron marks it) this rank's slice ``[s, b, F/tp]`` (through autograd: the
        input's gradient gathers every rank's slice)."""
        linear = getattr(linear, "to_wrap", linear)  # its LoRA's wrapper: the linear it adapts
        if tp_size() > 1 and getattr(linear.weight, "partition_dim", None) == 1:
            x = tp_split(x)
        return _sb(x)

    def _replay_fn_norm(self, a: Aligned, norm: nn.Module, call) -> torch.Tensor:
        """``_gemma4_rms_norm(x, norm.weight, eps)`` as ``Gemma4TransformerLayer._forward_mlp`` applies it."""
        from parity.mbridge import model as MB

        layer = self._modules[f"{LM_VLM if self.vlm else ''}decoder.layers.{a.layer}"]
        y = MB.modeling_gemma4._gemma4_rms_norm(self._in(a, self._arg(call)), norm.weight, layer.config.layernorm_epsilon)
        whole = y.shape[0] * (tp_size() if self.sp and sp_sharded(a) else 1)  # the replayed length (a probe's too)
        return to_hf(a, y, self.b, whole, self.args, contiguous=True, sequence_parallel=self.sp)

    def _via_input(self, a: Aligned, module: nn.Module, call) -> Any:
        """Run ``module`` (self_attention, linear_proj, the MoE layer) on ``call``'s first HF input; the row's
        value is the input its observed module (hooked in ``prepare``) receives during that run."""
        x = self._arg(call)
        observed = self._modules[self.names[a.row.name_key].format(**a.slots)[: -len(INPUT)]]
        self._inputs.pop(id(observed), None)
        if a.row.kind is Kind.ATTENTION:
            module(self._in(a, x), **self._attention_kwargs())
        elif a.row.kind is Kind.LINEAR:
            module(self._linear_input(module, x))
        elif a.row.kind is Kind.EXPERTS:
            self._experts_under_hf_routing(a, module, x, call)
        else:
            return None
        seen = self._inputs.pop(id(observed), None)
        return None if seen is None else self._layout(a, first(seen))

    def _experts_under_hf_routing(self, a: Aligned, moe: nn.Module, x: torch.Tensor, call) -> None:
        """Its MoE layer's routed path (preprocess, dispatch, experts, combine, postprocess) for HF's routing:
        HF's top-k indices and weights as its ``(probs, routing_map)``, in the dtype its router emits, on HF's
        ``[b*s, H]`` tokens laid out as its layer has them (``[s, b, H]``; under its sequence parallelism this rank's
        shard of the sequence, with its tokens' routing)."""
        dtype = torch.float32 if moe.config.moe_router_dtype == "fp32" else x.dtype
        probs, routing_map = (_sb(t.reshape(self.b, -1, t.shape[-1])).reshape(-1, t.shape[-1])
                              for t in hf_routing(call, moe.config.num_moe_experts, dtype, self.device))
        hidden = self._in(a, x)
        if self.sp:  # this rank's sequence shard: its tokens' rows of the (sequence-major) routing
            n = hidden.shape[0] * hidden.shape[1]
            start = n * megatron_env.ranks()["tp_rank"]
            probs, routing_map = probs[start: start + n], routing_map[start: start + n]
        hidden, probs = moe.preprocess(hidden, probs, routing_map)
        hidden, probs = moe.dispatch(hidden, probs)
        out, _ = moe.routed_experts_compute(hidden, probs)
        moe.postprocess(moe.combine(out), None)
