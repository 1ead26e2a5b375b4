"""Systems under test: the Megatron side of a run, each behind the engine's port (``parity.engine.system``).

``ours.py`` is system ``parity`` (``parity.models`` + ``parity.bridge``); ``megatron_bridge.py`` is NVIDIA
Megatron-Bridge's Gemma 4 (``parity.mbridge``); ``parity.megatron_layout`` holds the Megatron layout helpers both
use. Systems are registered by name in ``parity.registry``; ``python -m parity run --system NAME`` picks one.
"""
from __future__ import annotations

from parity.engine.system import Elsewhere, Replay, System, call_arg, hf_routing  # noqa: F401  the port
from parity.registry import SYSTEMS, get  # noqa: F401
