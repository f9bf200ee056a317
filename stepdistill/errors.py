"""User-facing errors: the CLI prints their one-line message and exits non-zero, no traceback."""


class StepdistillError(Exception):
    """A problem with the user's input (config, paths, files), with the fix in its message."""
