"""Local HF checkpoint folders: validate before anything is built, load, and save.

``inspect_folder`` reads only ``config.json``, the safetensors index and the safetensors headers: it
refuses a folder whose files, keys or shapes do not match the config (``CheckpointError``) or whose config
uses a feature the Megatron side lacks (``UnsupportedConfig``), and estimates the bytes the weights need.
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
from parity.bridge.mapping import NON_TEXT_PREFIXES, TEXT_PREFIX, expand, shape, sizes
from parity.config import TextArgs, check_supported, check_supported_vlm

CONFIG_NAME = "config.json"
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
DEFAULT_ARCH = {"gemma4_text": "Gemma4ForCausalLM", "gemma4": "Gemma4ForConditionalGeneration"}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be used; the message is one line naming the file or tensor."""


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


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _read_config(path: Path):
    from transformers import Gemma4Config, Gemma4TextConfig

    file = path / CONFIG_NAME
    if not file.is_file():
        raise CheckpointError(f"{file}: missing (not an HF checkpoint folder)")
    try:
        raw = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: does not parse as JSON ({e})") from None
    model_type = raw.get("model_type")
    if model_type == "gemma4" and not raw.get("text_config"):
        raise CheckpointError(f"{file}: model_type 'gemma4' without a text_config")
    if model_type not in DEFAULT_ARCH:
        raise CheckpointError(f"{file}: model_type {model_type!r} is not Gemma 4 (expected 'gemma4_text' or 'gemma4')")
    archs = raw.get("architectures") or [DEFAULT_ARCH[model_type]]
    if len(archs) != 1 or archs[0] not in TEXT_PREFIX:
        raise CheckpointError(f"{file}: architectures {archs} not supported (expected one of {sorted(TEXT_PREFIX)})")
    cls = Gemma4TextConfig if model_type == "gemma4_text" else Gemma4Config
    try:
        config = cls.from_dict(raw)
    except Exception as e:  # HF's strict dataclass validation
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{file}: not a valid {cls.__name__} ({msg})") from None
    return config, archs[0]


def _weight_files(path: Path) -> dict[str, str]:
    """key -> file name, from the index (sharded) or the single file's header."""
    from safetensors import safe_open

    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e})") from None
        for name in sorted(set(weight_map.values())):
            if not (path / name).is_file():
                raise CheckpointError(f"{path / name}: missing shard referenced by {INDEX_NAME}")
        return dict(weight_map)
    if not (path / SINGLE_NAME).is_file():
        raise CheckpointError(f"{path}: no {SINGLE_NAME} and no {INDEX_NAME}")
    with safe_open(path / SINGLE_NAME, framework="pt") as f:
        return {k: SINGLE_NAME for k in f.keys()}


def _headers(path: Path, weight_map: dict[str, str]) -> dict[str, tuple[tuple[int, ...], str, str]]:
    from safetensors import safe_open

    tensors = {}
    for name in sorted(set(weight_map.values())):
        try:
            with safe_open(path / name, framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    tensors[key] = (tuple(sl.get_shape()), sl.get_dtype(), name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{path / name}: unreadable safetensors header ({e})") from None
    for key, name in weight_map.items():
        if key not in tensors:
            raise CheckpointError(f"{path / name}: lacks {key}, which {INDEX_NAME} places there")
    return tensors


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
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    config, arch = _read_config(path)
    if getattr(config, "text_config", None) is not None:
        check_supported_vlm(config)
        if getattr(config, "vision_config", None) is not None:
            from parity.vlm_config import check_supported_vision

            check_supported_vision(config.vision_config)
    else:
        check_supported(config)
    args = TextArgs.from_hf(config)
    weight_map = _weight_files(path)
    tensors = _headers(path, weight_map)

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
        if key not in expected and key not in other and not tied_head:
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
