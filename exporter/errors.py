"""Errors that reach the user as one line: what went wrong and what to do."""


class UsageError(Exception):
    """Bad input from the user (model, budget, shapes, files); the CLI prints it and exits 2."""
