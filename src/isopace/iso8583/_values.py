"""A field's value read as what it means: a number, an amount, bytes, a date-time.

Why apart from :class:`~isopace.iso8583.message.Message`: these are rules about values (which
text is a number, how a ``C``/``D`` sign reads, which date layouts exist), not about the message
that carries them; ``Message.numeric(n)`` and its siblings read the field and ask here. Each
raises :class:`~isopace.iso8583.errors.Iso8583Error` naming the field, never its value.
"""

from __future__ import annotations

import binascii
from datetime import UTC, datetime

from isopace.iso8583.errors import Iso8583Error

Value = str | bytes


def numeric(n: int, v: Value) -> int:
    """``v`` (data element ``n``) as an int: ASCII digits only."""
    if isinstance(v, str) and v.isascii() and v.isdigit():
        return int(v)
    raise Iso8583Error(f"field {n}: not a numeric value")


def amount(n: int, v: Value) -> int:
    """An amount in minor units; ``x+n`` amounts (``C``/``D`` prefix) give a signed value
    (credit positive, debit negative)."""
    if isinstance(v, str) and v.isascii():
        sign = 1
        if v[:1] in ("C", "D"):
            sign = -1 if v[0] == "D" else 1
            v = v[1:]
        if v.isdigit():
            return sign * int(v)
    raise Iso8583Error(f"field {n}: not an amount")


def binary(n: int, v: Value) -> bytes:
    """Binary data; a str value is read as hex."""
    if isinstance(v, bytes):
        return v
    try:
        return binascii.a2b_hex(v)
    except (binascii.Error, ValueError):
        raise Iso8583Error(f"field {n}: not binary data") from None


def date_time(n: int, v: Value, year: int | None) -> datetime:
    """A UTC datetime: ``MMDDhhmmss`` (``year`` defaults to the current UTC year),
    ``YYMMDDhhmmss`` or ``CCYYMMDDhhmmss``."""
    if not (isinstance(v, str) and v.isascii() and v.isdigit()):
        raise Iso8583Error(f"field {n}: not a date-time")
    try:
        if len(v) == 10:
            y = year if year is not None else datetime.now(UTC).year
            return datetime.strptime(f"{y:04d}{v}", "%Y%m%d%H%M%S").replace(tzinfo=UTC)
        if len(v) == 12:
            return datetime.strptime(v, "%y%m%d%H%M%S").replace(tzinfo=UTC)
        if len(v) == 14:
            return datetime.strptime(v, "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        pass
    raise Iso8583Error(f"field {n}: not a date-time")
