"""NVIDIA Megatron-Bridge's own Gemma 4 as a second system under test (beside ``parity.models``).

Importing this package does not import the bridge: ``available()`` says whether it can be, ``version()``
which release is installed. The model functions live in ``parity.mbridge.model`` (importing it applies
``parity.compat.apply_megatron_bridge()``), the TE stand-ins in ``parity.mbridge.substitutes``, the HF ->
Megatron-Bridge module table in ``parity.mbridge.alignment``.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util

PACKAGE = "megatron-bridge"
TESTED_VERSION = "0.6.2"


def version() -> str | None:
    """The installed megatron-bridge release, or None."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


def available() -> tuple[bool, str]:
    """(True, "") when Megatron-Bridge's Gemma 4 can be imported here, else (False, one-line reason)."""
    installed = version()
    if installed is None:
        return False, f"{PACKAGE} is not installed (bash scripts/setup-cpu.sh --with-megatron-bridge)"
    try:
        if importlib.util.find_spec("megatron.core") is None:
            return False, "megatron-core is not installed"
        from parity.mbridge import model  # noqa: F401
    except Exception as exc:  # the bridge's own import failed: report it in one line
        return False, f"{PACKAGE} {installed} does not import: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    return True, ""


def substituted() -> list[dict[str, str]]:
    """Every part that does not run as it would with Transformer Engine: ``{part, by, reason}``."""
    from parity.mbridge.substitutes import SUBSTITUTED

    return [dict(row) for row in SUBSTITUTED]
