"""Registers the parity pytest plugin (options --parity-*, markers, the case-parametrised suites)."""
pytest_plugins = ["parity.pytest_plugin"]
