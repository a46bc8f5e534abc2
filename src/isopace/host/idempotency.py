"""What makes two requests one transaction: the host's idempotency key and request fingerprint.

**The key** (`IdempotencyKey`, configured by ``idempotency_key``, default DE 41, 11, 7) says which
requests are retransmissions of one another: the MTI class (``020`` for 0200 and its repeat 0201)
and the configured fields' values, with two rules, because real traffic does not always carry the
same fields:

- DE 7 (transmission date and time) is often left out of 0100 / 0200 by test tools and some
  acquirers; where it is absent the key takes DE 37 (retrieval reference number) instead, else DE
  12 + 13 (local time and date). Each substitute is written with its field number, so a key made
  of DE 37 never equals one made of DE 7.
- DE 32 (acquiring institution) is added when present, unless it is configured (then it is
  required): terminal ids (DE 41) are unique per acquirer only, so without it two acquirers'
  terminals could share keys.

The parse stage declines 30 a request that lacks what the key needs, and asks the key itself
(`IdempotencyKey.missing`): what Parse requires is exactly what the key reads, one rule.

**The fingerprint** (`RequestFingerprint`) says whether a request with a known key is the same
transaction: MTI class, the card number (DE 2, or the PAN of track 2), DE 3 (processing code), DE 4
(amount), DE 49 (currency), DE 41 (terminal), DE 42 (merchant). A retransmission has the same; a
request that merely reuses a key (another card, another amount: issue 12's 2000.00 on ...4444
reusing the terminal, trace number and time of a 1.00 on ...1111) does not, and the host declines
it 94 (duplicate transmission) instead of answering it with the other transaction's approval.

The stores keep the fingerprint as it is, so it holds no card number: it is one HMAC-SHA256, under
the current card key (the key of the ledger's ``pan_ref``, never in the database), of the fields
above (each with its length, so no two requests' fields run into the same text), written
``<key id>:<base64url>``. A plain hash would not do: a card number has six hidden digits once its
BIN and last four are known, and a million guesses reverse a plain hash of it. Base64, not hex, so
that the text holds no 13-digit run the card-number masker would take for a PAN (the fingerprint
is also kept as a durable property, which the journal masks). A stored fingerprint made under a
card key since rotated out of first place is checked under that key (`RequestFingerprint.matches`),
so a retransmission across a rotation is still replayed. One keyed hash per transaction is all it
costs.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from isopace.iso8583 import Iso8583Error, card_number

if TYPE_CHECKING:
    from isopace.flow import Exchange
    from isopace.iso8583 import Message
    from isopace.store.keys import Key, KeyRing

__all__ = ["DEFAULT_KEY_FIELDS", "FINGERPRINT_FIELDS", "IdempotencyKey", "RequestFingerprint"]

#: The key's fields by default (``idempotency_key`` in the configuration).
DEFAULT_KEY_FIELDS = (41, 11, 7)
#: Stand-ins for a key field the request lacks, tried in order: DE 7 -> DE 37, else DE 12 + 13.
_STAND_INS: dict[int, tuple[tuple[int, ...], ...]] = {7: ((37,), (12, 13))}
#: Added to the key when present, unless configured (then required).
_WHEN_PRESENT = (32,)
#: The request fields of the fingerprint besides the MTI class and the card number.
FINGERPRINT_FIELDS = (3, 4, 49, 41, 42)


def _text(m: Message, n: int) -> str | None:
    value = m.get(n)
    if value is None:
        return None
    return value if isinstance(value, str) else value.hex()


class IdempotencyKey:
    """The host's key function (module docstring): ``key(ex)`` is the key, None for network
    management (08xx, not idempotent) or a request without what the key needs (which the parse
    stage declines 30, naming `missing`)."""

    __slots__ = ("_extra", "_key_of", "fields")

    def __init__(self, fields: Sequence[int] = DEFAULT_KEY_FIELDS) -> None:
        self.fields = tuple(fields)
        self._extra = tuple(n for n in _WHEN_PRESENT if n not in self.fields)
        # one function object, so a request's key is derived once (`Message.derived`) however
        # many stages ask (the flow, the parse stage, the reserve)
        self._key_of = self._key

    def _parts(self, m: Message, missing: list[str] | None) -> list[str] | None:
        """The key's parts; None when a field is missing (each appended to ``missing``)."""
        parts = [m.mti[:3]]
        complete = True
        for n in self.fields:
            value = _text(m, n)
            if value is not None:
                parts.append(value)
                continue
            for fields in _STAND_INS.get(n, ()):
                values = [_text(m, f) for f in fields]
                if None not in values:
                    parts.extend(f"{f}={v}" for f, v in zip(fields, values, strict=True))
                    break
            else:
                complete = False
                if missing is None:
                    return None
                missing.append(_describe(n))
        for n in self._extra:
            value = _text(m, n)
            if value is not None:
                parts.append(f"{n}={value}")
        return parts if complete else None

    def __call__(self, ex: Exchange) -> str | None:
        return ex.request.derived(self._key_of)

    def _key(self, m: Message) -> str | None:
        if m.mti.startswith("08"):
            return None
        parts = self._parts(m, None)
        return None if parts is None else "|".join(parts)

    def missing(self, m: Message) -> list[str]:
        """What ``m`` lacks for a key, each a field ("41") or its alternatives ("7 (or 37, or
        12 and 13)"); empty when the key can be made or ``m`` needs none (08xx)."""
        if m.mti.startswith("08") or m.derived(self._key_of) is not None:
            return []
        missing: list[str] = []
        self._parts(m, missing)
        return missing


def _describe(n: int) -> str:
    stand_ins = _STAND_INS.get(n)
    if not stand_ins:
        return str(n)
    return f"{n} (" + ", ".join("or " + " and ".join(map(str, f)) for f in stand_ins) + ")"


class RequestFingerprint:
    """The host's fingerprint function (module docstring). ``keys`` returns the card keys in use
    (the ledger's ring, which a rotation replaces)."""

    __slots__ = ("_keys", "_makers")

    def __init__(self, keys: Callable[[], KeyRing]) -> None:
        self._keys = keys
        #: key id -> the function deriving a request's fingerprint under that key: one object
        #: per key, so a request's fingerprint is derived once (`Message.derived`) however many
        #: times the flow asks (its claim, its answer)
        self._makers: dict[str, Callable[[Message], str]] = {}

    def __call__(self, ex: Exchange) -> str:
        ring = self._keys()
        key = ring.current
        make = self._makers.get(key.id)
        if make is None:
            if len(self._makers) > 64:  # rotations over a long life: forget the old keys
                self._makers.clear()

            def make(m: Message, ring: KeyRing = ring, key: Key = key) -> str:
                return _under(ring, key, _payload(m))

            self._makers[key.id] = make
        return ex.request.derived(make)

    def matches(self, ex: Exchange, stored: str) -> bool:
        """Whether ``stored``, made under a card key that is no longer the current one, is this
        request's fingerprint under that key."""
        ring = self._keys()
        key_id, sep, _ = stored.partition(":")
        key = ring.key(key_id) if sep else None
        if key is None or key is ring.current:
            return False
        return _under(ring, key, _payload(ex.request)) == stored


def _payload(m: Message) -> str:
    """The fingerprinted fields as text, each length-prefixed (absent: ``-``; a value that does
    not decode: ``?``, so the request goes on to the parse stage, which declines it 30 and that
    answer is stored), ending in ``|`` (the keyed hash strips the text it is given: nothing of
    a field's value is stripped)."""
    out = [m.mti[:3], "|"]
    for n in (2, *FINGERPRINT_FIELDS):
        try:
            value = card_number(m) if n == 2 else _text(m, n)
        except Iso8583Error:
            out.append("?|")
            continue
        out.append("-|" if value is None else f"{len(value)}:{value}|")
    return "".join(out)


def _under(ring: KeyRing, key: Key, payload: str) -> str:
    digest = bytes.fromhex(ring.raw(key, payload))
    return f"{key.id}:{base64.urlsafe_b64encode(digest).rstrip(b'=').decode()}"
