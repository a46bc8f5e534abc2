"""What a message looks like to a person: its masked forms (``repr``, ``describe``, the masked
dict for logs and journal records) and the spec that describes a message which has none.

Rendering reads a message through its public API only, so it lives beside
:mod:`isopace.iso8583.message` rather than in it. Card data is always masked here (see
:func:`isopace.iso8583.masking.mask_value`); a field that does not decode renders as
``<undecodable>`` rather than failing the log line or the ``repr`` that shows it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from isopace.iso8583.errors import Iso8583Error
from isopace.iso8583.masking import mask_value

if TYPE_CHECKING:
    from isopace.iso8583.message import Message, Value
    from isopace.iso8583.spec import Spec
    from isopace.iso8583.tlv import TLV

_NAMES = tuple(str(n) for n in range(193))
_FALLBACK: list[Spec] = []


def use_as_fallback(spec: Spec) -> None:
    """Make ``spec`` what ``describe`` and ``composite`` read a message that has no spec with
    (ISO 8583:1987 ASCII, set by :mod:`isopace.iso8583.specs`, which is above the message: a
    spec builds messages, so a message cannot import the specs)."""
    _FALLBACK[:] = [spec]


def fallback_spec() -> Spec:
    return _FALLBACK[0]


def masked_dict(m: Message) -> dict[str, str]:
    """``{"mti": ..., "2": "476173******0010", ...}``: printable, masked values (what
    ``Message.to_masked_dict`` remembers per message)."""
    out = {"mti": m.mti}
    for n, v in m.fields().items():
        if n == 55:
            out["55"] = mask_value(55, _icc(m, v))
        else:
            out[_NAMES[n]] = mask_value(n, v)
    return out


def masked_repr(m: Message) -> str:
    inner = ", ".join(f"{n}: {mask_value(n, v)!r}" for n, v in _safe_items(m))
    return f"Message({m.mti!r}, {{{inner}}})"


def describe(m: Message, spec: Spec | None) -> str:
    """A table of the fields with their descriptions (from ``spec``, else the message's own,
    else the fallback's); card data masked."""
    sp = spec or m.spec or fallback_spec()
    rows = [("MTI", "Message Type Indicator", m.mti)]
    header = m.header
    if header is not None:
        rows.insert(0, ("h", "Message Header", mask_value(0, header)))
    for n, v in _safe_items(m):
        rows.append((str(n), sp.description(n), mask_value(n, v)))
    w0 = max(len(r[0]) for r in rows)
    w1 = min(40, max(len(r[1]) for r in rows))
    return "\n".join(f"{a:>{w0}}  {b[:w1]:<{w1}}  {c}" for a, b, c in rows)


def _icc(m: Message, v: Value) -> Value | TLV:
    """DE 55's TLV (parsed once per message), or ``v`` as it is when it does not parse."""
    try:
        return m.tlv(55)
    except (Iso8583Error, ValueError):
        return v


def _safe_items(m: Message) -> list[tuple[int, Value]]:
    out: list[tuple[int, Value]] = []
    for n in m:
        try:
            out.append((n, m[n]))
        except Iso8583Error:
            out.append((n, "<undecodable>"))
    return out
