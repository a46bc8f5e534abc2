"""`spec.validate(m)`: every rule a message breaks, at once.

Rules (``Violation.rule``):

- ``mti``: four digits; version 0/1/2 (1987/1993/2003); class 1..9; function 0..5; origin 0..5.
- ``undefined``: a data element the spec does not define.
- ``type``: ``bytes`` where the spec wants text or the reverse.
- ``length``: longer than ``max_len``, or not exactly ``max_len`` for a fixed field (counted in the
  spec's unit: bytes of the encoded value, nibbles, or hex characters).
- ``content``: the content class: ``n`` digits, ``a`` letters, ``an`` letters/digits/space,
  ``ans``/``as``/``ns`` printable, ``z`` track-2 characters (digits, ``=``, ``D``, ``?``, ``;``),
  ``x+n`` ``C``/``D`` then digits, ``b`` (no rule: any bytes).
- ``encoding``: a value the field's encoding cannot represent.
- ``luhn``: DE 2 fails the Luhn check.
- ``tlv``: DE 55 (ICC data) is not well-formed BER-TLV (a length that runs past the data, a
  truncated tag...; see :mod:`isopace.iso8583.tlv`). The TLV parsed here is the message's own
  (``m.tlv(55)``, parsed once), which masking and redaction then reuse.
- ``date``: DE 7 (``MMDDhhmmss``), DE 12 (``hhmmss``) and DE 13 (``MMDD``) must be a real date
  and time: month 01..12, a day the month has, hour 00..23, minute and second 00..59. These are
  the ISO 8583:1987 layouts, so the rule applies to messages of MTI version 0 (1993 and 2003
  give those fields other layouts), and only to a value of the layout's length made of digits
  (any other value already breaks the ``length`` or ``content`` rule). Without a year, 29
  February is a real date (the sender's year may be a leap year).
- ``required``: a data element the MTI requires is missing (the spec's table, by default
  :data:`isopace.iso8583.spec.DEFAULT_REQUIRED`: 0100/0120/0200/0220: 3, 4, 11, 41 and (2 or 35);
  0400/0420: 3, 4, 11, 41, (90 or 37) and (2 or 35); 0800: 7, 11, 70). The rules of a request
  apply to its repeat (0101, 0201, 0421: :func:`isopace.iso8583.mti.original_mti`).
"""

from __future__ import annotations

import calendar
import re
import string
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

from isopace.iso8583.errors import EncodeError, Iso8583Error
from isopace.iso8583.masking import luhn_ok
from isopace.iso8583.mti import mti_problems, original_mti

if TYPE_CHECKING:
    from isopace.iso8583.fields import Codec
    from isopace.iso8583.message import Message


class Violation(NamedTuple):
    field: int
    rule: str
    message: str


_PRINTABLE = frozenset(string.printable) - frozenset("\t\n\r\x0b\x0c")
_AN = frozenset(string.ascii_letters + string.digits + " ")
_A = frozenset(string.ascii_letters + " ")
_Z = frozenset(string.digits + "=D?;")
_HEX = frozenset(string.hexdigits)

#: The date/time data elements the ``date`` rule checks, with their ISO 8583:1987 layouts.
DATE_TIME_FIELDS: Mapping[int, str] = {7: "MMDDhhmmss", 12: "hhmmss", 13: "MMDD"}

#: Each two-character unit of a layout: (name, lowest, highest); DD's highest is the month's.
_UNITS: Mapping[str, tuple[str, int, int]] = {
    "YY": ("year", 0, 99),
    "MM": ("month", 1, 12),
    "DD": ("day", 1, 31),
    "hh": ("hour", 0, 23),
    "mm": ("minute", 0, 59),
    "ss": ("second", 0, 59),
}
#: Days of each month in a leap year (index 1..12): the highest DD without a year.
_DAYS = (0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
#: A pattern per unit that only real values match (DD up to 28: the days every month has).
_PATTERNS = {
    "YY": r"\d\d",
    "MM": r"0[1-9]|1[0-2]",
    "DD": r"0[1-9]|1\d|2[0-8]",
    "hh": r"[01]\d|2[0-3]",
    "mm": r"[0-5]\d",
    "ss": r"[0-5]\d",
}
_Units = tuple[tuple[int, str, int, int], ...]
#: layout -> (its units as (offset, name, lowest, highest), a pattern of the values certainly
#: real: one regular expression match is the check of nearly every value), built once.
_LAYOUTS: dict[str, tuple[_Units, re.Pattern[str]]] = {}


def _layout(layout: str) -> tuple[_Units, re.Pattern[str]]:
    found = _LAYOUTS.get(layout)
    if found is None:
        units = []
        for i in range(0, len(layout), 2):
            unit = _UNITS.get(layout[i : i + 2])
            if unit is None:
                raise ValueError(f"layout {layout!r}: unknown unit {layout[i : i + 2]!r}")
            units.append((i, *unit))
        pattern = "".join(f"(?:{_PATTERNS[layout[i : i + 2]]})" for i, *_ in units)
        found = _LAYOUTS[layout] = (tuple(units), re.compile(pattern, re.ASCII))
    return found


#: (field, layout, the full match of the values certainly real) per field the ``date`` rule checks
_DATE_CHECKS = tuple(
    (n, layout, _layout(layout)[1].fullmatch) for n, layout in DATE_TIME_FIELDS.items()
)


def date_time_problem(value: str, layout: str) -> str | None:
    """What makes ``value`` not a real date/time in ``layout`` (two-character units ``YY``,
    ``MM``, ``DD``, ``hh``, ``mm``, ``ss``, e.g. ``"MMDDhhmmss"``), or None when it is one.

    Never raises for any ``value`` (a ``ValueError`` only for a layout with an unknown unit): a
    value that is not ``len(layout)`` ASCII digits is reported as such. Without ``YY`` the day
    is checked against a leap year (29 February is real)."""
    units, certainly_real = _layout(layout)
    if certainly_real.fullmatch(value):
        return None
    if len(value) != len(layout) or not (value.isascii() and value.isdigit()):
        return f"not {len(layout)} digits ({layout})"
    year = month = -1
    for i, name, low, high in units:
        number = int(value[i : i + 2])
        if name == "day" and 1 <= month <= 12:
            high = (
                _DAYS[month]
                if year < 0 or calendar.isleap(2000 + year)
                else _DAYS[month] - (month == 2)
            )
        if not low <= number <= high:
            return f"{name} {value[i : i + 2]} is not {low:02d}..{high:02d} ({layout})"
        if name == "month":
            month = number
        elif name == "year":
            year = number
    return None


def _content_ok(c: str | None, v: str | bytes) -> bool:
    if c is None or c in ("b", "hex") or isinstance(v, bytes):
        return True
    if c == "n":
        return v.isascii() and (v.isdigit() or v == "")
    if c == "an":
        return _AN.issuperset(v)
    if c == "a":
        return _A.issuperset(v)
    if c == "z":
        return _Z.issuperset(v.upper())
    if c == "x+n":
        return len(v) >= 1 and v[0] in "CD" and v[1:].isascii() and v[1:].isdigit()
    return _PRINTABLE.issuperset(v)


def validate(
    m: Message,
    codecs: Sequence[Codec | None],
    required: Mapping[str, Sequence[int | tuple[int, ...]]],
) -> list[Violation]:
    """Every rule ``m`` breaks (``Spec.validate``): ``codecs`` are the spec's compiled fields
    by number (None: undefined), ``required`` its table of required fields by MTI."""
    mti = m.mti
    out = [Violation(0, "mti", text) for text in mti_problems(mti)]
    try:
        fields = m.fields()
    except Iso8583Error as e:
        return [*out, Violation(getattr(e, "field", None) or 0, "encoding", str(e))]
    for n, v in fields.items():
        c = codecs[n] if 0 <= n < len(codecs) else None
        if c is None:
            out.append(Violation(n, "undefined", f"field {n} is not defined in the spec"))
            continue
        fd = c.fd
        if c.fd.binary != isinstance(v, bytes) and not (c.fd.binary and _HEX.issuperset(v)):
            want = "bytes" if fd.binary else "str"
            out.append(Violation(n, "type", f"field {n} must be {want}"))
            continue
        try:
            c.encode(v)
        except EncodeError as e:
            reason = e.reason
            rule = "length" if "length" in reason else "encoding"
            out.append(Violation(n, rule, f"field {n}: {reason}"))
        if not _content_ok(fd.content, v):
            out.append(Violation(n, "content", f"field {n} is not of content class {fd.content}"))
    pan = fields.get(2)
    if isinstance(pan, str) and pan.isdigit() and not luhn_ok(pan):
        out.append(Violation(2, "luhn", "field 2 fails the Luhn check"))
    if 55 in fields:
        try:
            m.tlv(55)
        except Iso8583Error as e:  # TlvError, or DE 55 not binary data
            out.append(Violation(55, "tlv", f"{e} (not well-formed BER-TLV)"))
    if mti[:1] == "0":
        for n, layout, certainly_real in _DATE_CHECKS:
            value = fields.get(n)
            if value is None or (type(value) is str and certainly_real(value) is not None):
                continue  # absent, or real (one match answers nearly every value)
            # a value of another shape breaks the length or content rule already
            if isinstance(value, str) and len(value) == len(layout) and value.isdigit():
                problem = date_time_problem(value, layout)
                if problem is not None:
                    out.append(Violation(n, "date", f"field {n}: {problem}"))
    for need in required.get(mti) or required.get(original_mti(mti), ()):
        if isinstance(need, tuple):
            if not any(k in fields for k in need):
                names = " or ".join(str(k) for k in need)
                out.append(Violation(need[0], "required", f"MTI {mti} requires field {names}"))
        elif need not in fields:
            out.append(Violation(need, "required", f"MTI {mti} requires field {need}"))
    return out
