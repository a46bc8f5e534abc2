"""The root of every error isopace raises, so callers can catch the whole family at once."""

from __future__ import annotations


class IsopaceError(Exception):
    """Base of all isopace errors; each layer derives its own (and ``ValueError`` for bad input)."""
