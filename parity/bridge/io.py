"""Local HF checkpoint folders: validate before anything is built, load, and save.

``inspect_folder`` reads only ``config.json``, the safetensors index and the safetensors headers (read by
``parity.hf_checkpoint``): it refuses a folder whose files, keys or shapes do not match our bridge's mapping
table for the config (``CheckpointError``) or whose config uses a feature the Megatron side lacks
(``UnsupportedConfig``), and estimates the bytes the weights need. (The engine's HF reference validates folders
against HF's own model class instead: ``parity.hf_checkpoint.inspect``.)
Keys outside the text model (a VLM's vision tower) are listed in ``FolderInfo.other_keys`` for their bridge.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from parity.bridge.convert import detect_prefix, split_hf_state
from parity.bridge.mapping import NON_TEXT_PREFIXES, TEXT_PREFIX, expand, kv_shared_leftovers, shape, sizes
from parity.config import TextArgs
# reading a folder (config, index, headers) is HF-side knowledge, shared with the engine's HF reference; the
# names are re-exported (callers and tests take ``CheckpointError`` from here)
from parity.hf_checkpoint import CONFIG_NAME, DEFAULT_ARCH, DTYPE_BYTES, INDEX_NAME, SINGLE_NAME  # noqa: F401
from parity.hf_checkpoint import CheckpointError  # noqa: F401
from parity.hf_checkpoint import numel as _numel
from parity.hf_checkpoint import read_config as _read_config  # noqa: F401
from parity.hf_checkpoint import read_folder


@dataclass
class FolderInfo:
    path: Path
    config: Any  # Gemma4TextConfig or Gemma4Config
    args: TextArgs
    architecture: str
    prefix: str  # where the text model sits in the keys
    files: tuple[str, ...]
    tensors: dict[str, tuple[tuple[int, ...], str, str]]  # key -> (shape, safetensors dtype, file)
    other_keys: tuple[str, ...] = field(default=())  # not the text model's (vision/audio): route elsewhere

    @property
    def total_bytes(self) -> int:
        """Bytes of all tensors as stored."""
        return sum(_numel(s) * DTYPE_BYTES.get(d, 4) for s, d, _ in self.tensors.values())

    def bytes_as(self, dtype: torch.dtype | None) -> int:
        """Bytes of all tensors once floating-point ones are cast to ``dtype`` (None: as stored)."""
        if dtype is None:
            return self.total_bytes
        size = torch.empty((), dtype=dtype).element_size()
        return sum(_numel(s) * (size if d.startswith(("F", "BF")) else DTYPE_BYTES.get(d, 4))
                   for s, d, _ in self.tensors.values())


def expected_hf_shapes(args: TextArgs, prefix: str) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the config implies (``prefix`` = text-model prefix), with its shape."""
    out = {}
    for rule, i, hf_names, _ in expand(args):
        s = sizes(args, i)
        for name, template in zip(hf_names, rule.hf_shapes):
            out[name if rule.root else prefix + name] = shape(template, s)
    return out


def inspect_folder(path: str | Path) -> FolderInfo:
    """Validate a local HF Gemma 4 folder from its config and headers only (no tensor data is read)."""
    path, config, arch, weight_map, tensors = read_folder(path)
    args = TextArgs.from_hf(config)

    prefix = TEXT_PREFIX[arch]
    if tensors and detect_prefix(tensors) != prefix:
        raise CheckpointError(f"{path}: keys look like {detect_prefix(tensors)!r}-prefixed but {arch} uses {prefix!r}")
    expected = expected_hf_shapes(args, prefix)
    for key, want in expected.items():
        if key not in tensors:
            raise CheckpointError(f"{path}: missing tensor {key}")
        got = tensors[key][0]
        if got != want:
            raise CheckpointError(f"{path}: shape mismatch for {key}: file has {list(got)}, config implies {list(want)}")
    _, text, other = split_hf_state(tensors, prefix)
    head_shape = (args.vocab_size, args.hidden_size)
    for key in tensors:
        tied_head = key == "lm_head.weight" and args.tie_word_embeddings and tensors[key][0] == head_shape
        leftover = key.startswith(tuple(prefix + n for n in kv_shared_leftovers(args)))  # dropped, as HF does
        if key not in expected and key not in other and not tied_head and not leftover:
            raise CheckpointError(f"{path}: unexpected tensor {key} (not in the Gemma 4 text model of this config)")
    stray = [k for k in other if not k.startswith(NON_TEXT_PREFIXES)]
    if stray:
        raise CheckpointError(f"{path}: unexpected tensor {stray[0]}")
    return FolderInfo(path, config, args, arch, prefix, tuple(sorted(set(weight_map.values()))), tensors, tuple(other))


def load_folder(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """``(hf_config, state_dict)`` of a validated folder; every key, the vision tower's included.
    ``dtype`` casts floating-point tensors (None keeps the stored dtype)."""
    from safetensors import safe_open

    info = inspect_folder(path)
    state: dict[str, Tensor] = {}
    for name in info.files:
        with safe_open(info.path / name, framework="pt", device=str(device)) as f:
            for key in f.keys():
                t = f.get_tensor(key)
                state[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return info.config, state


def save_folder(
    state: Mapping[str, Tensor],
    hf_config: Any,
    path: str | Path,
    *,
    max_shard_bytes: int = 5 * 2**30,
    arch: str | None = None,
) -> Path:
    """Write ``config.json`` + safetensors (sharded with an index above ``max_shard_bytes``) that
    ``from_pretrained(path)`` loads offline. A tied ``lm_head.weight`` is not written (as HF does)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(hf_config)
    arch = arch or (config.architectures or [DEFAULT_ARCH[config.model_type]])[0]
    config.architectures = [arch]
    text_config = getattr(config, "text_config", None) or config
    floats = [t.dtype for t in state.values() if t.is_floating_point()]
    if floats:
        config.dtype = str(floats[0]).removeprefix("torch.")

    tensors: dict[str, Tensor] = {}
    storages: set[int] = set()
    for key, t in state.items():
        if key == "lm_head.weight" and text_config.tie_word_embeddings:
            continue
        t = t.detach().to("cpu").contiguous()
        if t.untyped_storage().data_ptr() in storages:  # safetensors refuses tensors that share storage
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        tensors[key] = t

    shards: list[dict[str, Tensor]] = [{}]
    used = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append({})
            used = 0
        shards[-1][key] = t
        used += nbytes

    for old in list(path.glob("model*.safetensors")) + [path / INDEX_NAME]:
        old.unlink(missing_ok=True)
    config.to_json_file(path / CONFIG_NAME)
    if len(shards) == 1:
        save_file(shards[0], path / SINGLE_NAME, metadata={"format": "pt"})
        return path
    weight_map = {}
    for n, shard in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / name, metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return path
