"""Errors of the ISO 8583 layer: each names the field, the byte offset and the reason, masked."""

from __future__ import annotations

from isopace.errors import IsopaceError


class Iso8583Error(IsopaceError, ValueError):
    """Base of the message layer's errors: the cause is always bad input (bytes, values, spec)."""


def _where(field: int | str | None) -> str:
    if field is None:
        return "message"
    if isinstance(field, int):
        return "MTI" if field == 0 else f"field {field}"
    return field


class DecodeError(Iso8583Error):
    """Bytes that cannot be decoded. ``field`` is the data element (None for the frame as a whole),
    ``offset`` the byte offset in the input where the problem was found."""

    def __init__(self, field: int | str | None, offset: int, reason: str) -> None:
        self.field = field
        self.offset = offset
        self.reason = reason
        super().__init__(f"{_where(field)}: {reason} at offset {offset}")


class EncodeError(Iso8583Error):
    """A message that cannot be encoded with the spec: ``field`` names the data element."""

    def __init__(self, field: int | str | None, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{_where(field)}: {reason}")
