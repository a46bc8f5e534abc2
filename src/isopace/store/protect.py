"""Card data protection for everything a store writes: journal records, idempotency answers.

Nothing a store writes may hold card data in clear. The rules, field by field (one masker for
everything that leaves memory: the detection is ``isopace._cardtext.mask_text``'s, the one the
log line and ``describe`` use):

- **DE 2 (PAN)**: not stored in the message. A journal's request row keeps it as first 6 / last 4
  digits (``pan_masked``) plus a keyed HMAC-SHA256 fingerprint (``pan_hmac``), so operators can
  still find every record of one card (:meth:`CardDataProtector.fingerprint`); when DE 2 is
  absent the PAN inside track 2 is used.
- **DE 35, 36, 45 (tracks) and DE 52 (PIN block)**: dropped.
- **DE 55 (ICC data)**: EMV card tags removed, wherever they sit: 5A (PAN), 57 (track 2
  equivalent), 56 (track 1 equivalent), 9F6B (track 2 data), 9F1F / 9F20 (track discretionary
  data), 5F20 (cardholder name), 5F24 (expiry); the other tags kept. A DE 55 that does not
  parse as BER-TLV is dropped whole: what cannot be inspected is not kept.
- **Every other text field** (n, an, ans, z: DE 34, 43, 44, 48, 54, 61, 62, 102-104, 120...):
  kept, with each card number in it (a 13-19 digit run passing Luhn, digits grouped by spaces or
  dashes too) masked in place to first 6 / last 4, and the track data after it to ``****``.
  Amounts, STAN, terminal, RRN, dates (DE 4, 11, 41, 37, 7) are too short to be touched, so
  recovery and the host's ``recover`` hooks, which read the MTI, the id and the durable
  properties, get what they need. The price: a 13-19 digit value that merely passes Luhn (one
  in ten) is stored masked, as the log shows it.
- **Binary fields (b)** other than DE 52 / 55: kept as hex, unless the same detector finds a
  card number in their packed-BCD reading (``4761739001010010``, F-padded ``...0005F``) or, for
  bytes that are ASCII text, in that text; such a field is dropped (a masked value is not
  binary). A card number glued inside a longer run of digits (a BCD block of 20 or more
  digits) is not recognised, the same limit as in text.
- **Header**: kept as it is (the built-in specs have none).
- **A field of a decoded message whose value does not decode** (decoding is lazy: a request
  can be located, handed to the flow and journalled before a stage reads, say, a DE 55 of an odd
  number of hex characters): dropped, so the BEGIN of every request that decoded can be
  recorded, and the transaction answered for it (30) has its journal record.

Each field masked or dropped (the card data fields included) is named in the stored message's
``redacted`` list: ``Message.from_json`` rebuilds the message for recovery, and a replayed
idempotency answer takes those fields back from the duplicate's own request (``refill``), so a
retransmission gets its own values, never the masked ones. The journal's durable properties and
error texts go through the same masker (:func:`~isopace._cardtext.mask_json`,
:func:`scrub_text`, an alias of ``isopace._cardtext.mask_text``): a stage that needs a card for
recovery keeps a reference to it (the ledger's ``pan_ref``), not the number. Idempotency keys
are stored as computed: the host's default key (MTI class, DE 41, 11, 7) holds no card data; a
key configured over a card field would. :func:`mask_pan` is ``isopace._cardtext``'s too (first
6 / last 4; shorter numbers show less).

Without an HMAC key no fingerprint is stored (searching by card is then unavailable): a key kept
in the same database as the fingerprints would make them reversible by brute force over the six
hidden digits, so the key must come from the application's configuration, never from the store
(key files and their ids: :mod:`isopace.store.keys`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from isopace._cardtext import holds_card_number, mask_text
from isopace._cardtext import mask_pan as mask_pan
from isopace.iso8583 import CARD_DATA_FIELDS, card_number

if TYPE_CHECKING:
    from isopace.iso8583 import Message, Spec

__all__ = [
    "EMV_CARD_TAGS",
    "CardDataProtector",
    "ProtectedMessage",
    "card_text_fields",
    "mask_pan",
    "scrub_text",
    "stored_json",
    "strip_emv_card_tags",
]

scrub_text = mask_text
"""Free text (an abort cause) with card data masked: the masker every layer shares."""

#: EMV tags removed from DE 55 before a message is journalled.
EMV_CARD_TAGS = frozenset({"5A", "57", "56", "9F6B", "9F1F", "9F20", "5F20", "5F24"})


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


def _decodable(message: Message) -> Message:
    """``message`` without the fields whose values do not decode."""
    bad = []
    for n in message:
        try:
            message[n]
        except ValueError:
            bad.append(n)
    return message.remove(*bad) if bad else message


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

    def protect(self, message: Message) -> ProtectedMessage:
        """Protect ``message`` for storage (see the module docstring)."""
        return ProtectedMessage(*self.protect_fields(message))

    def protect_fields(
        self, message: Message, pan: bool = True
    ) -> tuple[str, str | None, str | None]:
        """``protect`` as a plain tuple ``(json, pan_masked, pan_hmac)`` (the journals' path);
        ``pan=False`` leaves the PAN columns out (None)."""
        try:
            return self._protect_fields(message, pan)
        except ValueError:  # a field that does not decode (an Iso8583Error): keep the others
            return self._protect_fields(_decodable(message), pan)

    def _protect_fields(self, message: Message, pan: bool) -> tuple[str, str | None, str | None]:
        text = stored_json(message)
        if not pan:
            return text, None, None
        number = message.get(2)
        if not (isinstance(number, str) and number):
            number = card_number(message)
        if number is None:
            return text, None, None
        return text, mask_pan(number.strip()), self.fingerprint(number)


# -- what a store keeps of a message ---------------------------------------------------------------


def stored_json(message: Message) -> str:
    """The JSON any store keeps of ``message`` (journal request and response, idempotency
    answers): EMV card tags out of DE 55 (:func:`strip_emv_card_tags`; all of DE 55 when it is
    not TLV), DE 2 / 35 / 36 / 45 / 52 dropped (``to_json(redact=True)``), and every other
    field in which the shared masker finds a card number masked in place (text) or dropped
    (binary), each listed in ``redacted`` (see the module docstring).

    Built once per message (``Message.derived``): a response goes to the journal and to the
    idempotency store, and is scanned for card numbers once."""
    return message.derived(_stored_json)


def _stored_json(message: Message) -> str:
    if 55 in message:
        raw = message.get(55)
        try:
            data = raw if isinstance(raw, bytes) else bytes.fromhex(str(raw))
            message = message.set(55, strip_emv_card_tags(data))
        except ValueError:
            message = message.remove(55)
    text = message.to_json(redact=True)
    found = card_text_fields(message)
    if not found:
        return text
    doc = json.loads(text)
    fields = doc["fields"]
    for n, masked in found.items():
        if masked is None:
            fields.pop(str(n), None)
        else:
            fields[str(n)] = masked
    doc["redacted"] = sorted(set(doc.get("redacted", ())) | found.keys())
    return json.dumps(doc, separators=(",", ":"))


def card_text_fields(message: Message) -> dict[int, str | None]:
    """The fields of ``message`` (other than the card data fields, DE 2, 35, 36, 45, 52, and
    DE 55, which have rules of their own) in which :func:`~isopace._cardtext.mask_text` finds a
    card number: field -> its masked text, or None for a binary field (packed BCD or ASCII
    digits inside), which cannot hold a masked value and is dropped."""
    found: dict[int, str | None] = {}
    # only the fields long enough to hold a card number are read (and so decoded)
    for n in _long_enough(message.spec).intersection(message.keys()):
        value = message[n]
        if isinstance(value, str):
            masked = mask_text(value)
            if masked != value:
                found[n] = masked
        elif len(value) * 2 >= _SHORTEST_PAN and holds_card_number(value):
            found[n] = None
    return found


#: Fields whose card data have rules of their own (dropped whole, or TLV-filtered).
_OWN_RULES = CARD_DATA_FIELDS | {55}
#: The data elements a message built in code may hold (it has no spec to say more).
_ANY_FIELD = frozenset(range(2, 193)) - {65} - _OWN_RULES
_SCAN: dict[int, tuple[Spec, frozenset[int]]] = {}


def _long_enough(spec: Spec | None) -> frozenset[int]:
    """The fields ``card_text_fields`` reads under ``spec``: not those with rules of their
    own, nor those the spec makes too short to hold 13 digits (text or BCD digits: under 13;
    bytes: under 7), which are most of a request (DE 3, 4, 7, 11, 12, 13, 37, 41, 49), so they
    are not decoded for nothing. Cached per spec (a host has one or two)."""
    if spec is None:
        return _ANY_FIELD
    cached = _SCAN.get(id(spec))
    if cached is not None and cached[0] is spec:
        return cached[1]
    scan = set(_ANY_FIELD)
    for n in _ANY_FIELD:
        fd = spec.field(n)
        if fd is None:
            continue  # not in the spec: a value set in code, read like any other
        digits = fd.kind == "text" or fd.len_count == "nibbles"
        if fd.max_len < (_SHORTEST_PAN if digits else (_SHORTEST_PAN + 1) // 2):
            scan.discard(n)
    found = frozenset(scan)
    if len(_SCAN) < 64:
        _SCAN[id(spec)] = (spec, found)
    return found


#: The fewest digits :func:`mask_text` takes for a card number.
_SHORTEST_PAN = 13
