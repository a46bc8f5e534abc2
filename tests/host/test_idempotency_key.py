"""The host's idempotency key and request fingerprint as functions (the end-to-end cases are in
test_duplicates_by_content.py): which fields the key reads and what Parse is told is missing (one
rule), and what the fingerprint holds and tells apart, across a card key rotation."""

from __future__ import annotations

import re

import pytest

from isopace.flow import Exchange, Flow
from isopace.host import idempotency_key
from isopace.host.idempotency import IdempotencyKey, RequestFingerprint
from isopace.host.stages import Parse
from isopace.iso8583 import ISO87_ASCII, Message
from isopace.store.keys import Key, KeyRing

PAN = "4111111111111111"


def purchase(**fields: str | None) -> Message:
    values: dict[int, str] = {
        2: PAN,
        3: "000000",
        4: "000000000100",
        7: "1201101010",
        11: "000001",
        12: "101010",
        13: "1201",
        37: "000000000001",
        41: "TERM0001",
        42: "MERCHANT0000001",
        49: "840",
    }
    for name, value in fields.items():
        n = int(name.removeprefix("de"))
        if value is None:
            values.pop(n, None)
        else:
            values[n] = value
    return Message("0200", values)


def key_of(m: Message, key: IdempotencyKey | None = None) -> str | None:
    return (key or idempotency_key())(Exchange("t", m))


def test_default_key_with_de7_is_unchanged_from_earlier_versions() -> None:
    # an answer stored before the upgrade is still found by a retransmission after it
    assert key_of(purchase()) == "020|TERM0001|000001|1201101010"
    assert key_of(purchase(de2=None)) == "020|TERM0001|000001|1201101010"  # no card data


def test_de7_stand_ins_and_de32() -> None:
    assert key_of(purchase(de7=None)) == "020|TERM0001|000001|37=000000000001"
    assert key_of(purchase(de7=None, de37=None)) == "020|TERM0001|000001|12=101010|13=1201"
    assert key_of(purchase(de7=None, de37=None, de13=None)) is None
    assert key_of(purchase(de32="123456")) == "020|TERM0001|000001|1201101010|32=123456"
    # configured, DE 32 is required like any other field, and not added twice
    configured = IdempotencyKey((32, 41, 11))
    assert key_of(purchase(de32="9"), configured) == "020|9|TERM0001|000001"
    assert key_of(purchase(), configured) is None
    assert key_of(Message("0800", {7: "1201101010", 11: "000001", 70: "301"})) is None


@pytest.mark.parametrize(
    ("removed", "named"),
    [
        ((), []),
        ((7,), []),
        ((7, 37), []),
        ((7, 37, 12), ["7 (or 37, or 12 and 13)"]),
        ((41, 7, 37, 13), ["41", "7 (or 37, or 12 and 13)"]),
        ((11,), ["11"]),
    ],
)
async def test_parse_requires_exactly_what_the_key_reads(
    removed: tuple[int, ...], named: list[str]
) -> None:
    key = idempotency_key()
    m = purchase().remove(*removed) if removed else purchase()
    assert key.missing(m) == named
    assert (key_of(m, key) is None) == bool(named)
    ex = Exchange("t", m)
    await Flow().group("main", Parse(ISO87_ASCII, key)).run(ex)
    if named:
        assert ex.response is not None and ex.response[39] == "30"
        assert f"field(s) {', '.join(named)} missing (the idempotency key)" in str(ex.error)
    else:
        assert ex.response is None and not ex.aborted


def _fp(ring: KeyRing, m: Message) -> str:
    return RequestFingerprint(lambda: ring)(Exchange("t", m))


def test_fingerprint_tells_each_field_apart_and_holds_no_card_number() -> None:
    ring = KeyRing.generate()
    base = _fp(ring, purchase())
    assert re.fullmatch(rf"{ring.current.id}:[A-Za-z0-9_-]{{43}}", base), base
    assert not re.search(r"\d{13}", base)  # nothing the card-number masker would touch
    assert _fp(ring, purchase()) == base
    # the key fields beside it (DE 7, 11, 37, 12, 13) are the key's business, not the fingerprint's
    assert _fp(ring, purchase(de11="000002", de7="0101010101")) == base
    for change in (
        {"de2": "5555555555554444"},
        {"de3": "010000"},
        {"de4": "000000000101"},
        {"de49": "978"},
        {"de41": "TERM0002"},
        {"de42": "MERCHANT0000002"},
        {"de42": None},
    ):
        assert _fp(ring, purchase(**change)) != base, change
    assert _fp(ring, Message("0100", purchase().fields())) != base
    # another card key, another fingerprint: the hash is keyed
    assert _fp(KeyRing.generate(), purchase()) != base
    # track 2 instead of DE 2: the same card, the same fingerprint
    swiped = purchase(de2=None).set(35, f"{PAN}=25121010000000000")
    assert _fp(ring, swiped) == base


def test_fingerprint_made_under_a_rotated_key_still_matches() -> None:
    old, new = Key.generate(), Key.generate()
    before = KeyRing([old], source="test")
    stored = _fp(before, purchase())
    after = KeyRing([new, old], source="test")
    fingerprint = RequestFingerprint(lambda: after)
    ex = Exchange("t", purchase())
    assert fingerprint(ex) != stored and fingerprint(ex).startswith(new.id + ":")
    assert fingerprint.matches(ex, stored)
    assert not fingerprint.matches(Exchange("u", purchase(de4="000000000200")), stored)
    # a key no longer in the ring, a fingerprint of the current key, a bare value: no match
    assert not RequestFingerprint(lambda: KeyRing([new], source="t")).matches(ex, stored)
    assert not fingerprint.matches(ex, fingerprint(Exchange("u", purchase(de4="000000000200"))))
    assert not fingerprint.matches(ex, "no key id here")


def test_undecodable_field_does_not_stop_the_fingerprint() -> None:
    """A field the spec cannot decode is read as '?': the request reaches the parse stage,
    which declines it 30 (test_bad_input checks the answer is journalled)."""
    ring = KeyRing.generate()
    good = ISO87_ASCII.encode(purchase())
    at = good.index(b"000000000100")
    bad = ISO87_ASCII.decode(good[:at] + b"00000000AB12" + good[at + 12 :])
    assert _fp(ring, bad) != _fp(ring, purchase())
