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
- :func:`mask_value` renders any field value as printable text: card fields masked as above, DE 55
  parsed as TLV with card tags masked (``<55: N bytes, unparsed>`` when malformed, never the
  content), other bytes as uppercase hex (a card number in packed BCD masked in the hex, bytes that
  are ASCII text holding one shown as ``****``), other strings with non-printables escaped and
  passed through :func:`mask_text`: a card number keyed into a text field (DE 43, DE 48 private
  data, an account number in DE 102) is masked there too. The price is that a numeric 13-19 digit
  value that happens to pass Luhn (one merchant id in ten) is masked as well: over-masking a display
  is safe, a PAN in clear is not.
- :func:`mask_text` masks every run of 13-19 digits (optionally grouped by single spaces or
  dashes) that passes Luhn, and the track data following such a PAN: a last line of defence for
  error messages and log lines built from arbitrary text. It, :func:`mask_pan` and the Luhn
  functions live in ``isopace._cardtext`` (standard library only), the one text masker the flow
  and store layers use too, and are re-exported here unchanged.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from isopace._cardtext import (
    HIDDEN,
    holds_card_number,
    luhn_check_digit,
    luhn_ok,
    mask_pan,
    mask_text,
    mask_track,
    track_text,
)
from isopace._cardtext import printable as _printable
from isopace.iso8583.tlv import CARD_TLV_TAGS, TLV, TlvError, mask_tlv, parse_tlv

if TYPE_CHECKING:
    from isopace.iso8583.message import Message

__all__ = [
    "CARD_DATA_FIELDS",
    "CARD_TLV_TAGS",
    "card_number",
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

#: the PAN at the start of a track 2 (DE 35): an optional start sentinel, 12-19 digits, "=" or "D"
_TRACK2_PAN = re.compile(r";?(\d{12,19})[=D]")


def card_number(message: Message) -> str | None:
    """The card number a message carries: DE 2, else the PAN part of track 2 (DE 35), which a
    swiped card's request carries instead (the spec's rules require one of the two). None when
    neither holds one. A field that does not decode raises, as reading it would."""
    pan = message.get(2)
    if isinstance(pan, str) and pan:
        return pan
    track2 = message.get(35)
    if isinstance(track2, str):
        found = _TRACK2_PAN.match(track2)
        if found:
            return found.group(1)
    return None


# ------------------------------------------------------------------------------------ rendering


def mask_value(field: int, value: str | bytes | TLV) -> str:
    """Printable, masked text for the value of data element ``field``."""
    if field == 2:
        if isinstance(value, (bytes, bytearray)):
            value = track_text(bytes(value))
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
        return _mask_binary(bytes(value))
    if isinstance(value, TLV):
        return mask_tlv(value)
    return mask_text(_printable(value if isinstance(value, str) else str(value)))


def _mask_binary(data: bytes) -> str:
    """Binary data as uppercase hex; a card number in it (packed BCD digits, masked as text in
    the hex) or ASCII digits holding one (the hex would spell them out: ``****``) is hidden."""
    text = data.hex().upper()
    if not holds_card_number(data):
        return text
    masked = mask_text(text)
    return masked if masked != text else HIDDEN


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
