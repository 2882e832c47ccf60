"""The one exception type users see: its message is a single line naming problem and fix."""


class DovetailError(Exception):
    """A user-facing error; the CLI prints it as one line and exits non-zero."""
