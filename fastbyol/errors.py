"""User-facing errors: the CLI prints these as one line and exits with status 2 (no traceback without --debug)."""


class FastByolError(Exception):
    """A problem with the user's input or settings (missing data, bad option); the message names it."""
