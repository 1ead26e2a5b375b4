"""Parity suites: parametrised pytest tests over the cases in ``cases/`` (see ``parity.pytest_plugin``)."""
