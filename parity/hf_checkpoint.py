"""Local HF Gemma 4 checkpoint folders, read with HF's own knowledge only (no system under test is consulted).

``inspect`` validates a folder before anything is instantiated, from ``config.json``, the safetensors index and
the safetensors headers (no tensor data): the config must parse as HF's config class, use no feature the parity
run refuses (``parity.config.check_supported*``), and every tensor must be one HF's own model class of that config
has, with its shape (that model is built on the meta device: no memory), and none may be missing. A bad folder is
one ``CheckpointError`` line naming the file and the tensor. ``CheckpointInfo.bytes_as`` is the memory the weights
need; ``load`` then reads them in a dtype, and ``text_keys`` takes a text model (``Gemma4ForCausalLM``) out of any
Gemma 4 folder (a VLM's language model and ``lm_head``) by HF's own module layout.
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from parity.config import check_supported
from parity.vlm_config import check_supported_vlm
from parity.errors import UserError

CONFIG_NAME = "config.json"
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
DEFAULT_ARCH = {"gemma4_text": "Gemma4ForCausalLM", "gemma4": "Gemma4ForConditionalGeneration"}
# the HF model classes a folder may declare (``architectures``), each a class of ``transformers``
ARCHITECTURES = ("Gemma4ForCausalLM", "Gemma4ForConditionalGeneration", "Gemma4TextModel")
TEXT_MODEL = "Gemma4TextModel"  # HF's text model class: where it sits inside an architecture is its key prefix
TEXT_ARCH = "Gemma4ForCausalLM"  # what a text case builds


class CheckpointError(UserError, ValueError):
    """A checkpoint folder that cannot be used; the message is one line naming the file or tensor."""


def numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclass
class CheckpointInfo:
    path: Path
    config: Any  # Gemma4TextConfig or Gemma4Config
    architecture: str  # the HF class the folder is a checkpoint of
    files: tuple[str, ...]
    tensors: dict[str, tuple[tuple[int, ...], str, str]]  # key -> (shape, safetensors dtype, file), as stored
    expected: dict[str, tuple[int, ...]]  # key -> shape: HF's ``architecture`` of this config (its state dict)
    tied: dict[str, str]  # key -> the key it is tied to (HF's): may be absent from the folder
    text_model: str  # module path of HF's text model inside ``architecture`` ('', 'model', 'model.language_model')
    head: str | None  # module path of the output embedding (``lm_head``), None without one

    @property
    def text_config(self):
        return getattr(self.config, "text_config", None) or self.config

    def bytes_as(self, dtype: torch.dtype | None, keys: Iterable[str] | None = None) -> int:
        """Bytes of the tensors ``keys`` (all by default) once floating-point ones are cast to ``dtype``
        (None: as stored)."""
        size = None if dtype is None else torch.empty((), dtype=dtype).element_size()
        total = 0
        for key in self.tensors if keys is None else keys:
            shape, d, _ = self.tensors[key]
            width = size if size is not None and d.startswith(("F", "BF")) else DTYPE_BYTES.get(d, 4)
            total += numel(shape) * width
        return total

    @property
    def total_bytes(self) -> int:
        return self.bytes_as(None)


# ---------------------------------------------------------------------------------------------------
# Reading: config, index, headers (no tensor data).

def read_config(path: Path) -> tuple[Any, str]:
    """``(HF config, architecture)`` of ``path/config.json``; ``CheckpointError`` when it is not Gemma 4."""
    import transformers

    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise CheckpointError(f"{file}: missing (not an HF checkpoint folder)")
    try:
        raw = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: does not parse as JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: not a JSON object")
    model_type = raw.get("model_type")
    if model_type == "gemma4" and not raw.get("text_config"):
        raise CheckpointError(f"{file}: model_type 'gemma4' without a text_config")
    if model_type not in DEFAULT_ARCH:
        raise CheckpointError(f"{file}: model_type {model_type!r} is not Gemma 4 (expected 'gemma4_text' or 'gemma4')")
    archs = raw.get("architectures") or [DEFAULT_ARCH[model_type]]
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise CheckpointError(f"{file}: architectures {archs} not supported (expected one of {sorted(ARCHITECTURES)})")
    cls = transformers.Gemma4TextConfig if model_type == "gemma4_text" else transformers.Gemma4Config
    want = getattr(transformers, archs[0]).config_class
    if want is not cls:
        raise CheckpointError(f"{file}: architecture {archs[0]} needs model_type {want.model_type!r}, "
                              f"not {model_type!r}")
    try:
        config = cls.from_dict(raw)
    except Exception as e:  # HF's strict dataclass validation
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{file}: not a valid {cls.__name__} ({msg})") from None
    return config, archs[0]


def weight_files(path: Path) -> dict[str, str]:
    """key -> file name, from the index (sharded) or the single file's header."""
    from safetensors import safe_open

    path = Path(path)
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise ValueError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e})") from None
        for name in sorted(set(weight_map.values())):
            if not (path / name).is_file():
                raise CheckpointError(f"{path / name}: missing shard referenced by {INDEX_NAME}")
        return dict(weight_map)
    if not (path / SINGLE_NAME).is_file():
        raise CheckpointError(f"{path}: no {SINGLE_NAME} and no {INDEX_NAME}")
    try:
        with safe_open(path / SINGLE_NAME, framework="pt") as f:
            return {k: SINGLE_NAME for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{path / SINGLE_NAME}: unreadable safetensors header ({_first_line(e)})") from None


def headers(path: Path, weight_map: dict[str, str]) -> dict[str, tuple[tuple[int, ...], str, str]]:
    """key -> (shape, safetensors dtype, file) from the headers of the files ``weight_map`` names."""
    from safetensors import safe_open

    path = Path(path)
    tensors: dict[str, tuple[tuple[int, ...], str, str]] = {}
    for name in sorted(set(weight_map.values())):
        try:
            with safe_open(path / name, framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    tensors[key] = (tuple(sl.get_shape()), sl.get_dtype(), name)
        except Exception as e:
            raise CheckpointError(f"{path / name}: unreadable safetensors header ({_first_line(e)})") from None
    for key, name in weight_map.items():
        if key not in tensors:
            raise CheckpointError(f"{path / name}: lacks {key}, which {INDEX_NAME} places there")
    return tensors


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------------
# What HF's own model class expects.

def meta_model(architecture: str, config: Any) -> torch.nn.Module:
    """HF's ``architecture`` built from ``config`` on the meta device (shapes only, no memory)."""
    import transformers

    with torch.device("meta"):
        return getattr(transformers, architecture)._from_config(copy.deepcopy(config))


def _layout(model: torch.nn.Module) -> tuple[dict[str, tuple[int, ...]], dict[str, str], str, str | None]:
    """``(key -> shape, tied key -> its source, text model path, output embedding path)`` of an HF model."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    names = {id(m): n for n, m in model.named_modules()}
    text = [n for n, m in model.named_modules() if type(m).__name__ == TEXT_MODEL]
    head_module = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = names.get(id(head_module)) if head_module is not None else None
    return expected, tied, text[0] if text else "", head


def read_folder(path: str | Path) -> tuple[Path, Any, str, dict, dict]:
    """``(path, config, architecture, weight map, headers)`` of a local HF Gemma 4 folder whose config this harness
    supports; no tensor data is read."""
    from parity.vlm_config import check_supported_vision

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    config, arch = read_config(path)
    if getattr(config, "text_config", None) is not None:
        check_supported_vlm(config)
        if getattr(config, "vision_config", None) is not None:
            check_supported_vision(config.vision_config)
    else:
        check_supported(config)
    weight_map = weight_files(path)
    return path, config, arch, weight_map, headers(path, weight_map)


def inspect(path: str | Path) -> CheckpointInfo:
    """Validate a local HF Gemma 4 folder from its config and headers only (no tensor data is read)."""
    path, config, arch, weight_map, tensors = read_folder(path)
    try:
        model = meta_model(arch, config)
    except Exception as e:  # a config HF's own class cannot be built from
        raise CheckpointError(f"{path / CONFIG_NAME}: HF's {arch} cannot be built from it ({_first_line(e)})") from None
    expected, tied, text_model, head = _layout(model)

    if tensors and not set(tensors) & set(expected):
        raise CheckpointError(f"{path}: none of its {len(tensors)} tensors is one of HF's {arch} "
                              f"(e.g. {sorted(tensors)[0]}; {arch} has {sorted(expected)[0]})")
    for key, want in expected.items():
        if key not in tensors:
            if key in tied:
                continue
            raise CheckpointError(f"{path}: missing tensor {key} (HF's {arch} of this config has it)")
        got, _, file = tensors[key]
        if got != want:
            raise CheckpointError(f"{path / file}: shape mismatch for {key}: file has {list(got)}, "
                                  f"HF's {arch} of this config expects {list(want)}")
    text_module = model.get_submodule(text_model) if text_model else model
    ignored = [re.compile(re.escape(f"{text_model}.") + p if text_model else p)
               for p in getattr(text_module, "_keys_to_ignore_on_load_unexpected", None) or []]
    for key, (_, _, file) in tensors.items():
        if key not in expected and not any(p.search(key) for p in ignored):  # HF's loader drops those (KV sharing)
            raise CheckpointError(f"{path / file}: unexpected tensor {key} (not in HF's {arch} of this config)")
    return CheckpointInfo(path, config, arch, tuple(sorted(set(weight_map.values()))), tensors, expected, tied,
                          text_model, head)


def text_keys(info: CheckpointInfo) -> dict[str, str]:
    """Folder key -> ``Gemma4ForCausalLM`` key, for the tensors of the text model and the output embedding (of
    a VLM: its language model and ``lm_head``; vision and audio keys are left out), located by HF's own module
    layout of both classes. ``CheckpointError`` when they do not make a whole ``Gemma4ForCausalLM``."""
    if info.architecture == TEXT_ARCH:  # every key HF's model has (not those its loader drops: KV sharing)
        return {k: k for k in info.tensors if k in info.expected}
    expected, tied, text_model, head = _layout(meta_model(TEXT_ARCH, info.text_config))

    def moved(key: str, src: str | None, dst: str | None) -> str | None:
        if src is None or dst is None:
            return None
        if src == "":
            return f"{dst}.{key}"
        if key.startswith(src + "."):
            return (f"{dst}." if dst else "") + key[len(src) + 1:]
        return None

    out = {}
    for key in (k for k in info.tensors if k in info.expected):
        new = moved(key, info.text_model, text_model) or moved(key, info.head, head)
        if new is not None:
            out[key] = new
    have = set(out.values())
    for key, want in expected.items():
        if key not in have and key not in tied:
            raise CheckpointError(f"{info.path}: no tensor for {key} of a {TEXT_ARCH} in this {info.architecture} "
                                  f"checkpoint")
    for key, new in out.items():
        got = info.tensors[key][0]
        if new not in expected or got != expected[new]:
            raise CheckpointError(f"{info.path}: {key} does not fit {TEXT_ARCH}'s {new} "
                                  f"(file has {list(got)}, expected {list(expected.get(new, ()))})")
    return out


# ---------------------------------------------------------------------------------------------------
# Loading.

def load(info: CheckpointInfo | str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
         keys: Mapping[str, str] | Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a validated folder (``inspect`` runs first when given a path): all of them, or those of
    ``keys`` (a mapping renames them: folder key -> returned key). ``dtype`` casts floating-point tensors (None
    keeps the stored dtype)."""
    from safetensors import safe_open

    if not isinstance(info, CheckpointInfo):
        info = inspect(info)
    names = {k: k for k in info.tensors} if keys is None else \
        dict(keys) if isinstance(keys, Mapping) else {k: k for k in keys}
    unknown = [k for k in names if k not in info.tensors]
    if unknown:
        raise CheckpointError(f"{info.path}: no tensor {unknown[0]}")
    by_file: dict[str, list[str]] = {}
    for key in names:
        by_file.setdefault(info.tensors[key][2], []).append(key)
    state: dict[str, torch.Tensor] = {}
    for name in info.files:
        if name not in by_file:
            continue
        with safe_open(info.path / name, framework="pt", device=str(device)) as f:
            for key in by_file[name]:
                t = f.get_tensor(key)
                state[names[key]] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return state
