"""Card data protection for journal records.

Nothing a journal writes may hold card data in clear. :class:`CardDataProtector` turns a message
into what a record may keep:

- the PAN (DE 2, or the PAN inside track 2 when DE 2 is absent) as first 6 / last 4 digits plus a
  keyed HMAC-SHA256 fingerprint, so operators can still find every record of one card
  (:meth:`CardDataProtector.fingerprint`) without the journal ever holding the number;
- track 1 / track 2 / track 3 (DE 45, 35, 36) and the PIN block (DE 52) removed;
- EMV card tags inside DE 55 removed: 5A (PAN), 57 (track 2 equivalent), 56 (track 1 equivalent),
  9F6B (track 2 data), 9F1F / 9F20 (track discretionary data), 5F20 (cardholder name),
  5F24 (expiry).
  A DE 55 that does not parse as BER-TLV is dropped whole: what cannot be inspected is not kept.

The protected message is ``message.to_json(redact=True)`` of the message with DE 55 filtered, so
``Message.from_json`` rebuilds it for recovery, with ``redacted`` naming the removed fields.

Free text (abort causes) goes through :func:`scrub_text`, an alias of
``isopace._cardtext.mask_text`` (the masker every layer shares, re-exported by
``isopace.iso8583``): a 13-19 digit run passing Luhn keeps its first 6 / last 4 digits and the
track data after it (``=2512...``, ``^NAME^2512...``) becomes ``****``. :func:`mask_pan` is that
module's too (first 6 / last 4; shorter numbers show less).

Without an HMAC key no fingerprint is stored (searching by card is then unavailable): a key kept
in the same database as the fingerprints would make them reversible by brute force over the six
hidden digits, so the key must come from the application's configuration, never from the store
(key files and their ids: :mod:`isopace.store.keys`).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from isopace._cardtext import mask_pan as mask_pan
from isopace._cardtext import mask_text

if TYPE_CHECKING:
    from isopace.iso8583 import Message

__all__ = [
    "EMV_CARD_TAGS",
    "CardDataProtector",
    "ProtectedMessage",
    "mask_pan",
    "scrub_text",
    "strip_emv_card_tags",
]

scrub_text = mask_text
"""Free text (an abort cause) with card data masked: the masker every layer shares."""

#: EMV tags removed from DE 55 before a message is journalled.
EMV_CARD_TAGS = frozenset({"5A", "57", "56", "9F6B", "9F1F", "9F20", "5F20", "5F24"})

_TRACK2_PAN = re.compile(r"^;?(\d{12,19})[=D]")


def _read_tag(data: bytes, i: int) -> tuple[bytes, int]:
    start = i
    first = data[i]
    i += 1
    if first & 0x1F == 0x1F:
        while True:
            if i >= len(data):
                raise ValueError("truncated tag")
            b = data[i]
            i += 1
            if not b & 0x80:
                break
    return data[start:i], i


def _read_length(data: bytes, i: int) -> tuple[int, int]:
    if i >= len(data):
        raise ValueError("missing length")
    first = data[i]
    i += 1
    if first < 0x80:
        return first, i
    n = first & 0x7F
    if n == 0 or n > 4 or i + n > len(data):
        raise ValueError("bad length")
    return int.from_bytes(data[i : i + n], "big"), i + n


def strip_emv_card_tags(data: bytes, tags: frozenset[str] = EMV_CARD_TAGS) -> bytes:
    """Return BER-TLV ``data`` without the given tags (searched inside constructed tags too).

    Raises ``ValueError`` when ``data`` is not well-formed BER-TLV.
    """
    out = bytearray()
    i = 0
    while i < len(data):
        if data[i] in (0x00, 0xFF):  # padding between objects
            i += 1
            continue
        tag, i = _read_tag(data, i)
        length, i = _read_length(data, i)
        if i + length > len(data):
            raise ValueError("value runs past the end")
        value = data[i : i + length]
        i += length
        if tag.hex().upper() in tags:
            continue
        if tag[0] & 0x20:  # constructed: filter what it contains
            value = strip_emv_card_tags(value, tags)
        out += tag + _encode_length(len(value)) + value
    return bytes(out)


def _encode_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


@dataclass(frozen=True, slots=True)
class ProtectedMessage:
    """What a record may keep of a message: the redacted JSON and the PAN's masked form and HMAC."""

    json: str
    pan_masked: str | None
    pan_hmac: str | None


class CardDataProtector:
    """Protects messages for storage; ``hmac_key`` (bytes or str) keys the PAN fingerprints."""

    __slots__ = ("_inner", "_key", "_key_id", "_outer")

    def __init__(self, hmac_key: bytes | str | None = None, *, key_id: str | None = None) -> None:
        self._key: bytes | None = None
        self._key_id: str | None = None
        self._inner: Any = None
        self._outer: Any = None
        self.use_key(hmac_key, key_id=key_id)

    def use_key(self, hmac_key: bytes | str | None, *, key_id: str | None = None) -> None:
        """Fingerprint with ``hmac_key`` from now on (a rotated key, see
        :mod:`isopace.store.keys`). With ``key_id`` a fingerprint is ``<key_id>:<hmac>``, so the
        stored value names the key that made it."""
        if isinstance(hmac_key, str):
            hmac_key = hmac_key.encode()
        if hmac_key is not None and not hmac_key:
            raise ValueError("hmac_key must not be empty")
        inner: Any = None
        outer: Any = None
        if hmac_key is not None:
            # HMAC-SHA256 (RFC 2104) with the keyed inner and outer states computed once: each
            # fingerprint then costs two SHA-256 state copies instead of a new HMAC object
            block = hashlib.sha256(hmac_key).digest() if len(hmac_key) > 64 else hmac_key
            block = block.ljust(64, b"\0")
            inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
            outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))
        self._key, self._key_id, self._inner, self._outer = hmac_key, key_id, inner, outer

    @property
    def key_id(self) -> str | None:
        """The id written before each fingerprint (None: bare fingerprints)."""
        return self._key_id

    @property
    def has_key(self) -> bool:
        return self._key is not None

    def fingerprint(self, pan: str) -> str | None:
        """The keyed HMAC-SHA256 (hex) of a PAN, ``<key_id>:`` first when the key has an id;
        None without a key."""
        if self._inner is None:
            return None
        inner = self._inner.copy()
        inner.update(pan.strip().encode())
        outer = self._outer.copy()
        outer.update(inner.digest())
        if self._key_id is not None:
            return f"{self._key_id}:{outer.hexdigest()}"
        return str(outer.hexdigest())

    @staticmethod
    def pan_of(message: Message) -> str | None:
        """The PAN of a message: DE 2, else the PAN part of track 2 (DE 35)."""
        pan = message.get(2)
        if isinstance(pan, str) and pan:
            return pan
        track2 = message.get(35)
        if isinstance(track2, str):
            m = _TRACK2_PAN.match(track2)
            if m:
                return m.group(1)
        return None

    def protect(self, message: Message) -> ProtectedMessage:
        """Protect ``message`` for storage (see the module docstring)."""
        return ProtectedMessage(*self.protect_fields(message))

    def protect_fields(
        self, message: Message, pan: bool = True
    ) -> tuple[str, str | None, str | None]:
        """``protect`` as a plain tuple ``(json, pan_masked, pan_hmac)`` (the journals' path);
        ``pan=False`` leaves the PAN columns out (None)."""
        if 55 in message:
            raw = message.get(55)
            try:
                data = raw if isinstance(raw, bytes) else bytes.fromhex(str(raw))
                message = message.set(55, strip_emv_card_tags(data))
            except ValueError:
                message = message.remove(55)
        text = message.to_json(redact=True)
        if not pan:
            return text, None, None
        number = message.get(2)
        if not (isinstance(number, str) and number):
            number = self.pan_of(message)
        if number is None:
            return text, None, None
        return text, mask_pan(number.strip()), self.fingerprint(number)
