"""Registers the parity pytest plugin (options --parity-*, markers, the case-parametrised suites)."""
pytest_plugins = ["parity.pytest_plugin"]


def pytest_configure(config):
    # Under pytest-xdist the workers already fill the cores; torch's own intra-op threads on top of them
    # oversubscribe the CPU (measured: small-tensor ops 30-100x slower). One thread per worker.
    if hasattr(config, "workerinput"):
        import torch

        torch.set_num_threads(1)
