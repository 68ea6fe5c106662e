"""Errors that the CLI reports as one clear line, without a traceback."""


class UserError(ValueError):
    """A problem with the user's input (paths, specs, ratios, budgets), with the fix in its message."""
