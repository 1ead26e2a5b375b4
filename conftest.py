"""Registers the parity pytest plugin (options --parity-*, markers, the case-parametrised suites)."""
import signal

import pytest

pytest_plugins = ["parity.pytest_plugin"]


def pytest_configure(config):
    # Under pytest-xdist the workers already fill the cores; torch's own intra-op threads on top of them
    # oversubscribe the CPU (measured: small-tensor ops 30-100x slower). One thread per worker.
    if hasattr(config, "workerinput"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _sigint_handler_left_as_found():
    """No test (nor what it imports) may leave SIGINT's handler changed: Ctrl-C tests in the same worker process rely
    on it (parity.interrupts delivers a held interrupt to the handler in force)."""
    before = signal.getsignal(signal.SIGINT)
    yield
    after = signal.getsignal(signal.SIGINT)
    if after is not before:
        signal.signal(signal.SIGINT, before)
        pytest.fail(f"SIGINT's handler changed by this test: {before!r} -> {after!r} (restored)")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own, which reads the groups into the test ids
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist with ``--dist loadgroup`` (the README's test command) a test module's tests that share a
    module-scoped fixture of its own (a gloo world of CPU processes, an HF reference) run on one worker: the fixture is
    built once, not once on each worker that gets one of them (measured: every gloo world of tests/ built twice)."""
    for item in items:
        defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        if any(d and d[-1].scope == "module" for d in defs.values()):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
