"""Errors of the ISO 8583 layer: each names the field, the byte offset and the reason, masked,
and the response code (DE 39) a request that fails with it is answered with (see
:mod:`isopace.iso8583.answers`)."""

from __future__ import annotations

from isopace.errors import IsopaceError
from isopace.iso8583.response_codes import FORMAT_ERROR, SYSTEM_MALFUNCTION


class Iso8583Error(IsopaceError, ValueError):
    """Base of the message layer's errors: the cause is always bad input (bytes, values, spec).
    ``response_code``: what a request that failed with it is answered (30, format error: the
    peer sent something this layer cannot read)."""

    offset: int | None = None
    response_code: str = FORMAT_ERROR


def _where(field: int | str | None) -> str:
    if field is None:
        return "message"
    if isinstance(field, int):
        return "MTI" if field == 0 else f"field {field}"
    return field


class DecodeError(Iso8583Error):
    """Bytes that cannot be decoded. ``field`` is the data element (0 the MTI, 1 the secondary
    bitmap, 65 the tertiary bitmap, ``"bitmap"`` the primary bitmap, None the frame as a whole),
    ``offset`` the byte offset in the input where the problem was found."""

    offset: int

    def __init__(self, field: int | str | None, offset: int, reason: str) -> None:
        self.field = field
        self.offset = offset
        self.reason = reason
        super().__init__(f"{_where(field)}: {reason} at offset {offset}")


class EncodeError(Iso8583Error):
    """A message that cannot be encoded with the spec: ``field`` names the data element,
    ``offset`` the byte offset in the output where it would have started (None where no position
    applies, e.g. a value refused by ``Message.set`` or a field the spec does not define). The
    text ends with ``at offset N`` when the offset is known.

    Answered 96 (system malfunction): a message that cannot be encoded was built on this side
    (a stage set a value the spec cannot carry); the peer's request was not at fault."""

    response_code = SYSTEM_MALFUNCTION

    def __init__(self, field: int | str | None, reason: str, offset: int | None = None) -> None:
        self.field = field
        self.reason = reason
        self.offset = offset
        text = f"{_where(field)}: {reason}"
        super().__init__(text if offset is None else f"{text} at offset {offset}")

    def at(self, offset: int) -> EncodeError:
        """This error with ``offset`` filled in (itself when it already has one)."""
        if self.offset is not None or type(self) is not EncodeError:
            return self
        return EncodeError(self.field, self.reason, offset)
