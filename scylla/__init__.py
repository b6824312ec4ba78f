"""Scylla Studio: speculative decoding, draft scaling laws, and the app around them."""

__version__ = "0.1.0"


class ScyllaError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits non-zero."""
