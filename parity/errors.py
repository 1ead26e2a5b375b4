"""Errors a user can cause: the CLI turns them into one line on stderr and exit code 2."""


class UserError(Exception):
    """Bad input or usage (paths, configs, unsupported features, impossible device requests)."""


class CaseError(UserError):
    """A case file that does not validate."""
