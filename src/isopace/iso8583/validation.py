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
- ``required``: a data element the MTI requires is missing. Defaults (overridable per spec):
  0100/0200: 3, 4, 11, 41 and (2 or 35); 0400: 3, 4, 11, 41, 90 and (2 or 35); 0800: 7, 11, 70.
  The rules of a request apply to its repeat (0101, 0201, 0401, 0801).
"""

from __future__ import annotations

import string
from typing import TYPE_CHECKING, NamedTuple

from isopace.iso8583.errors import EncodeError, Iso8583Error
from isopace.iso8583.masking import luhn_ok

if TYPE_CHECKING:
    from isopace.iso8583.message import Message
    from isopace.iso8583.spec import Spec


class Violation(NamedTuple):
    field: int
    rule: str
    message: str


_PRINTABLE = frozenset(string.printable) - frozenset("\t\n\r\x0b\x0c")
_AN = frozenset(string.ascii_letters + string.digits + " ")
_A = frozenset(string.ascii_letters + " ")
_Z = frozenset(string.digits + "=D?;")
_HEX = frozenset(string.hexdigits)


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


def validate(spec: Spec, m: Message) -> list[Violation]:
    out: list[Violation] = []
    mti = m.mti
    if not (len(mti) == 4 and mti.isascii() and mti.isdigit()):
        out.append(Violation(0, "mti", "MTI must be four digits"))
    else:
        if mti[0] not in "012":
            out.append(Violation(0, "mti", f"MTI version {mti[0]} is not 0, 1 or 2"))
        if mti[1] == "0":
            out.append(Violation(0, "mti", "MTI class 0 is reserved"))
        if mti[2] not in "012345":
            out.append(Violation(0, "mti", f"MTI function {mti[2]} is not 0..5"))
        if mti[3] not in "012345":
            out.append(Violation(0, "mti", f"MTI origin {mti[3]} is not 0..5"))
    codecs = spec._codecs
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
    req_key = mti[:3] + "0" if len(mti) == 4 and mti[3] == "1" else mti
    for need in spec._required.get(req_key, spec._required.get(mti, ())):
        if isinstance(need, tuple):
            if not any(k in fields for k in need):
                names = " or ".join(str(k) for k in need)
                out.append(Violation(need[0], "required", f"MTI {mti} requires field {names}"))
        elif need not in fields:
            out.append(Violation(need, "required", f"MTI {mti} requires field {need}"))
    return out
