"""Errors that the CLI reports as one clear line, without a traceback."""


class UserError(ValueError):
    """A problem with the user's input (paths, specs, ratios, budgets), with the fix in its message."""


class Interrupted(Exception):
    """Ctrl-C stopped a long job at a point it can continue from; the message says how."""
