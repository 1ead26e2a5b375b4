"""The systems under test by name (no heavy imports: case files are validated against it before torch loads)."""
from __future__ import annotations

SYSTEMS = {"parity": "parity.systems.ours:ParitySystem",
           "megatron-bridge": "parity.systems.megatron_bridge:MegatronBridgeSystem"}  # name -> "module:factory"
DEFAULT_SYSTEM = "parity"


def known() -> str:
    return ", ".join(sorted(SYSTEMS))


def unknown(name: str) -> str:
    """The one message for a system name that is not registered (case files, flags, the registry lookup)."""
    return f"unknown system under test {name!r} (known: {known()})"


def get(name: str):
    """A new instance of system ``name`` (its module imported now), or a ``UserError`` naming the known ones."""
    import importlib

    from parity.errors import UserError

    if name not in SYSTEMS:
        raise UserError(unknown(name))
    module, factory = SYSTEMS[name].split(":")
    return getattr(importlib.import_module(module), factory)()
