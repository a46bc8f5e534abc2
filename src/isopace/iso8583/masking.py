"""Masking of card data for everything printed, logged or journalled, and the Luhn check.

What is masked, and how:

- ``CARD_DATA_FIELDS``: DE 2 (PAN), 35 (track 2), 36 (track 3), 45 (track 1) and 52 (PIN block).
  DE 2 shows the first 6 and last 4 digits (:func:`mask_pan`); tracks show only the masked PAN
  (:func:`mask_track`); DE 52 always renders as ``****`` whatever its length.
- ``CARD_TLV_TAGS``: EMV tags inside DE 55 that carry card data, masked wherever DE 55 is rendered:
  ``5A`` (PAN, as :func:`mask_pan`), ``57`` (track 2 equivalent), ``9F6B`` (contactless track 2)
  and ``56`` (track 1 data) as :func:`mask_track`; ``5F20`` (cardholder name), ``9F1F`` (track 1
  discretionary data), ``9F20`` (track 2 discretionary data) and ``99`` (transaction PIN data)
  fully replaced by ``****``. Discretionary data can hold CVV/PIN-verification values and the
  name is cardholder data, so they are hidden rather than shortened. Expiry (``5F24``) and the
  PAN sequence number (``5F34``) are shown: not sensitive on their own, useful to support staff.
- PAN rule (:func:`mask_pan`): at most the first 6 and last 4 digits are ever shown, and at least
  3 are always hidden. 13 characters or more: first 6 + ``*`` + last 4. 8 to 12: last 4 only.
  Fewer than 8: everything masked. The length is kept (``476173******0010``).
- Tracks (:func:`mask_track`): an optional start sentinel / format code (``;``, ``%``, ``B``) is
  kept, the leading digit run (the PAN, for track 3 the format code + PAN) is masked as a PAN,
  the separator (``=``, ``D``, ``^``) is kept and everything after it (expiry, service code,
  discretionary data, track 1 name) becomes ``****``. Anything not shaped like a track becomes
  ``****`` entirely.
- :func:`mask_value` renders any field value as printable text: card fields masked as above,
  DE 55 parsed as TLV with card tags masked (``<55: N bytes, unparsed>`` when malformed, never the
  content), other bytes as uppercase hex, other strings as they are with non-printables escaped.
  It does not scrub other fields: use :func:`mask_text` for free text of unknown origin.
- :func:`mask_text` masks every run of 13-19 digits (optionally grouped by single spaces or
  dashes) that passes Luhn: a last line of defence for error messages and log lines built from
  arbitrary text.
"""

from __future__ import annotations

import re

from isopace.iso8583.tlv import TLV, TlvError, parse_tlv

__all__ = [
    "CARD_DATA_FIELDS",
    "CARD_TLV_TAGS",
    "luhn_check_digit",
    "luhn_ok",
    "mask_pan",
    "mask_text",
    "mask_tlv",
    "mask_track",
    "mask_value",
]

CARD_DATA_FIELDS = frozenset({2, 35, 36, 45, 52})
"""Data elements holding card data: PAN, track 2, track 3, track 1, PIN block."""

_TLV_PAN_TAGS = frozenset({"5A"})
_TLV_TRACK_TAGS = frozenset({"56", "57", "9F6B"})
_TLV_HIDDEN_TAGS = frozenset({"5F20", "9F1F", "9F20", "99"})

CARD_TLV_TAGS = _TLV_PAN_TAGS | _TLV_TRACK_TAGS | _TLV_HIDDEN_TAGS
"""EMV tags (inside DE 55) holding card data: 5A, 56, 57, 5F20, 99, 9F1F, 9F20, 9F6B."""

HIDDEN = "****"
"""What replaces a value that is hidden entirely (PIN block, discretionary data, names)."""

_TRACK_PREFIXES = frozenset({"", ";", "%", "B", "b", "%B", "%b"})
_TRACK_SEPARATORS = frozenset("=Dd^")


# ----------------------------------------------------------------------------------------- Luhn


def luhn_ok(digits: str) -> bool:
    """True when ``digits`` (ASCII digits only, at least 2) ends with a valid Luhn check digit."""
    if len(digits) < 2 or not (digits.isascii() and digits.isdigit()):
        return False
    return _luhn_sum(digits, double_first=False) % 10 == 0


def luhn_check_digit(partial: str) -> str:
    """The Luhn check digit to append to ``partial`` (ASCII digits); ``ValueError`` otherwise."""
    if not (partial.isascii() and partial.isdigit()):
        raise ValueError("Luhn check digit needs a non-empty string of ASCII digits")
    return str((10 - _luhn_sum(partial, double_first=True) % 10) % 10)


def _luhn_sum(digits: str, *, double_first: bool) -> int:
    # Walk from the right: the rightmost digit is doubled when computing a check digit
    # (it will sit next to the check digit), not when verifying a complete number.
    total = 0
    double = double_first
    for ch in reversed(digits):
        d = ord(ch) - 48
        if double:
            d *= 2
            if d > 9:
                d -= 9
        total += d
        double = not double
    return total


# ---------------------------------------------------------------------------------- PAN, tracks


def mask_pan(pan: str) -> str:
    """``4761739001010010`` -> ``476173******0010``. Never shows more than first 6 + last 4."""
    pan = _printable(pan)
    n = len(pan)
    if n >= 13:
        return pan[:6] + "*" * (n - 10) + pan[-4:]
    if n >= 8:
        return "*" * (n - 4) + pan[-4:]
    return "*" * n


def mask_track(value: str | bytes) -> str:
    """Track 1/2/3 (or an EMV track 2 equivalent): ``4761739001010010=25121010000012300000`` ->
    ``476173******0010=****``."""
    text = _track_text(value)
    i = 0
    n = len(text)
    while i < n and not ("0" <= text[i] <= "9"):
        i += 1
    prefix = text[:i]
    if prefix not in _TRACK_PREFIXES:
        return HIDDEN
    j = i
    while j < n and "0" <= text[j] <= "9":
        j += 1
    pan = text[i:j]
    rest = text[j:]
    if not rest:
        return prefix + mask_pan(pan)
    if rest[0] in _TRACK_SEPARATORS:
        return prefix + mask_pan(pan) + rest[0] + HIDDEN
    return HIDDEN


def _track_text(value: str | bytes) -> str:
    if isinstance(value, str):
        return value
    if value.isascii() and value.decode("ascii").isprintable():
        return value.decode("ascii")
    # Binary (EMV 57 style, packed digits with D separator and F padding).
    return value.hex().upper().rstrip("F")


def _bcd_digits(value: bytes) -> str:
    return value.hex().upper().rstrip("F")


# ------------------------------------------------------------------------------------ rendering


def _printable(text: str) -> str:
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def mask_value(field: int, value: str | bytes | TLV) -> str:
    """Printable, masked text for the value of data element ``field``."""
    if field == 2:
        if isinstance(value, (bytes, bytearray)):
            value = _track_text(bytes(value))
        return mask_pan(value if isinstance(value, str) else str(value))
    if field in (35, 36, 45):
        if isinstance(value, (str, bytes)):
            return mask_track(value)
        return HIDDEN
    if field == 52:
        return HIDDEN
    if field == 55:
        return _mask_icc(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex().upper()
    if isinstance(value, TLV):
        return mask_tlv(value)
    return _printable(value if isinstance(value, str) else str(value))


def _mask_icc(value: object) -> str:
    if isinstance(value, TLV):
        return mask_tlv(value)
    if isinstance(value, str):
        try:
            data = bytes.fromhex(value)
        except ValueError:
            return f"<55: {len(value)} chars, unparsed>"
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    else:
        return "<55: unparsed>"
    try:
        tlv = parse_tlv(data)
    except TlvError:
        return f"<55: {len(data)} bytes, unparsed>"
    return mask_tlv(tlv)


def mask_tlv(tlv: TLV) -> str:
    """``9F26=0123456789ABCDEF 5A=476173******0010 70[57=476173******0010D****]``: every object in
    wire order, card tags (``CARD_TLV_TAGS``) masked, constructed tags rendered as ``tag[...]``."""
    return " ".join(_mask_tlv_object(tag, value, child) for tag, value, child in tlv.objects())


def _mask_tlv_object(tag: str, value: bytes, child: TLV | None) -> str:
    if child is not None:
        return f"{tag}[{mask_tlv(child)}]"
    if tag in _TLV_PAN_TAGS:
        return f"{tag}={mask_pan(_bcd_digits(value))}"
    if tag in _TLV_TRACK_TAGS:
        # 56 (track 1) is ASCII; 57 and 9F6B are packed digits with a D separator.
        text = _track_text(value) if tag == "56" else _bcd_digits(value)
        return f"{tag}={mask_track(text)}"
    if tag in _TLV_HIDDEN_TAGS:
        return f"{tag}={HIDDEN}"
    return f"{tag}={value.hex().upper()}"


# ------------------------------------------------------------------------------------ free text

_DIGIT_GROUPS = re.compile(r"[0-9]+(?:[ -][0-9]+)*")
_GROUP = re.compile(r"[0-9]+")


def _mask_groups(match: re.Match[str]) -> str:
    found = match.group(0)
    groups = [(m.start(), m.end()) for m in _GROUP.finditer(found)]
    if len(groups) == 1:
        n = len(found)
        return mask_pan(found) if 13 <= n <= 19 and luhn_ok(found) else found
    # Several groups ("4761 7390 0101 0010", "stan 123456 4761-7390-..."): mask the longest
    # run of whole groups holding 13-19 digits that passes Luhn, left to right.
    out: list[str] = []
    pos = 0
    i = 0
    while i < len(groups):
        # candidates start at group i and grow while they hold at most 19 digits
        hit = -1
        hit_digits = ""
        digits = ""
        for j in range(i, len(groups)):
            a, b = groups[j]
            digits += found[a:b]
            if len(digits) > 19:
                break
            if len(digits) >= 13 and luhn_ok(digits):
                hit, hit_digits = j, digits
        if hit < 0:
            i += 1
            continue
        out.append(found[pos : groups[i][0]])
        out.append(mask_pan(hit_digits))
        pos = groups[hit][1]
        i = hit + 1
    out.append(found[pos:])
    return "".join(out)


# A masked PAN followed by track data: "=" / "D" and digits (track 2, EMV 57), or "^name^digits"
# (track 1). The tail carries expiry, service code and discretionary data (CVV): hidden too.
_TRACK_TAIL = re.compile(
    r"([0-9]{6}\*{3,9}[0-9]{4})(?:([=D])[0-9][0-9A-F]*|(\^)[^^\r\n]{0,26}\^[0-9]*)"
)


def _hide_tail(match: re.Match[str]) -> str:
    return match.group(1) + (match.group(2) or match.group(3)) + HIDDEN


def mask_text(text: str) -> str:
    """Mask every 13-19 digit run that passes Luhn, as :func:`mask_pan` does, and the track data
    that follows such a PAN (``=25121010...``, ``D2512...``, ``^NAME^2512...`` become ``=****``...).

    A run is a maximal sequence of ASCII digits, or of digit groups joined by single spaces or
    dashes (whole groups are combined: ``4761 7390 0101 0010``). Digits glued to a longer digit
    run (20 or more with no separator, e.g. inside a hex dump) are not a PAN candidate. Other text
    is returned unchanged."""
    if not any("0" <= ch <= "9" for ch in text):
        return text
    out = _DIGIT_GROUPS.sub(_mask_groups, text)
    if out == text:
        return text
    return _TRACK_TAIL.sub(_hide_tail, out)
