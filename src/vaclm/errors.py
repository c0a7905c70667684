"""The one exception type users see: a single line that names the problem and the fix."""


class VaclmError(Exception):
    """Bad input or state. The CLI prints the message on one line and exits non-zero."""
