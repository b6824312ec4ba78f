"""Scylla Studio: speculative decoding, draft scaling laws, and the app around them."""

__version__ = "0.1.0"


class ScyllaError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits non-zero."""


def one_line(exc: Exception) -> str:
    """The informative part of an error on one line, for ScyllaError messages (torch puts it
    on the second line after a colon-ended first)."""
    lines = [x.strip() for x in str(exc).splitlines() if x.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} {lines[1]}"[:300]
    return (lines[0] if lines else type(exc).__name__)[:300]
