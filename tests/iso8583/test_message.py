"""Message: reading, copy-on-write changes, typed accessors, reply, equality, JSON, masking."""

from __future__ import annotations

import json

import pytest

from isopace.errors import IsopaceError
from isopace.iso8583 import (
    ECHO_FIELDS,
    ISO87_ASCII,
    DecodeError,
    EncodeError,
    Iso8583Error,
    Message,
)

from .conftest import ICC, PAN, PIN, TRACK2


def test_reads(auth: Message) -> None:
    assert auth.mti == "0200"
    assert auth[41] == "TERM0001"
    assert auth.get(39) is None and auth.get(39, "x") == "x"
    assert 41 in auth and 39 not in auth
    assert list(auth.fields()) == sorted(auth.fields())
    with pytest.raises(KeyError):
        auth[39]


def test_decoded_reads_lazily(auth_wire: bytes) -> None:
    m = ISO87_ASCII.decode(auth_wire)
    assert m._vals == {}  # nothing decoded yet
    assert m[3] == "000000"
    assert set(m._vals) == {3}
    assert m[52] == PIN and m[55] == ICC and m[2] == PAN
    assert 39 not in m and 2 in m
    with pytest.raises(KeyError):
        m[39]


def test_typed_accessors(auth: Message) -> None:
    assert auth.numeric(11) == 123456
    assert auth.amount(4) == 2500
    assert auth.set(28, "D00000150").amount(28) == -150
    assert auth.set(28, "C00000150").amount(28) == 150
    assert auth.bytes(52) == PIN
    assert auth.tlv(55)["9F26"] == bytes.fromhex("AABBCCDDEEFF0011")
    assert auth.date_time(7, year=2026).isoformat() == "2026-11-29T20:44:55+00:00"
    with pytest.raises(Iso8583Error):
        auth.numeric(41)
    with pytest.raises(Iso8583Error):
        auth.amount(41)
    with pytest.raises(Iso8583Error):
        auth.date_time(41)


def test_copy_on_write(auth: Message, auth_wire: bytes) -> None:
    decoded = ISO87_ASCII.decode(auth_wire)
    terminal = decoded[41]
    changed = decoded.set(4, "000000010000").set(39, "00").remove(52)
    assert decoded[4] == "000000002500" and 39 not in decoded and 52 in decoded
    assert changed[4] == "000000010000" and changed[39] == "00" and 52 not in changed
    # the original still hands back its own bytes (same object: the clean fast path)
    assert ISO87_ASCII.encode(decoded) is auth_wire
    # values already read are shared, not copied
    assert changed[41] is terminal
    # the change re-encodes to what a fresh encode gives
    fresh = Message("0200", changed.fields())
    assert ISO87_ASCII.encode(changed) == ISO87_ASCII.encode(fresh)
    assert ISO87_ASCII.decode(ISO87_ASCII.encode(changed)) == changed
    built = Message("0200", {3: "000000"})
    b2 = built.set(4, "000000000001")
    assert 4 not in built and b2[4] == "000000000001"


def test_set_many_remove_with_mti(auth_wire: bytes) -> None:
    m = ISO87_ASCII.decode(auth_wire)
    m2 = m.set_many({39: "05", 38: "ABC123"}).remove(35, 999).with_mti("0210")
    assert m2.mti == "0210" and m2[39] == "05" and 35 not in m2
    back = ISO87_ASCII.decode(ISO87_ASCII.encode(m2))
    assert back == m2 and back.mti == "0210"
    # removing then setting again brings the field back
    m3 = m.remove(41).set(41, "TERM0002")
    assert ISO87_ASCII.decode(ISO87_ASCII.encode(m3))[41] == "TERM0002"


def test_reply(auth: Message) -> None:
    r = auth.reply()
    assert r.mti == "0210"
    assert set(r.fields()) == {n for n in ECHO_FIELDS if n in auth}
    assert r[2] == PAN and 35 not in r and 52 not in r
    assert Message("0100").reply().mti == "0110"
    assert Message("0400").reply().mti == "0410"
    assert Message("0420").reply().mti == "0430"
    assert Message("0800").reply().mti == "0810"
    assert auth.reply("0230", copy=(11,)).fields() == {11: "123456"}
    with pytest.raises(Iso8583Error):
        Message("0210").reply()


def test_equality_and_hash(auth: Message, auth_wire: bytes) -> None:
    decoded = ISO87_ASCII.decode(auth_wire)
    assert decoded == auth and hash(decoded) == hash(auth)
    assert decoded != auth.set(39, "00")
    assert auth != auth.with_mti("0100")
    assert len({auth, decoded, Message("0200", dict(auth.fields()))}) == 1
    assert auth != "0200"


def test_bad_values() -> None:
    for bad in ({1: "x"}, {65: "x"}, {0: "x"}, {193: "x"}, {"2": "x"}, {2.0: "x"}, {True: "x"}):
        with pytest.raises(EncodeError):
            Message("0200", bad)  # type: ignore[arg-type,dict-item]
        with pytest.raises(EncodeError):
            Message("0200").set_many(bad)  # type: ignore[arg-type,dict-item]
    with pytest.raises(EncodeError):
        Message("0200").set(2.0, "x")  # type: ignore[arg-type]
    with pytest.raises(EncodeError):
        Message("0200", {4: 2500})  # type: ignore[dict-item]
    with pytest.raises(EncodeError):
        Message(200)  # type: ignore[arg-type]
    with pytest.raises(EncodeError):
        Message("0200").set(1, "x")
    e = EncodeError(2, "x")
    assert isinstance(e, IsopaceError) and isinstance(e, ValueError)


def test_derived_is_computed_once_per_message(auth: Message) -> None:
    calls: list[str] = []

    def summary(m: Message) -> str:
        calls.append(m.mti)
        return f"{m.mti}/{m[41]}"

    decoded = ISO87_ASCII.decode(ISO87_ASCII.encode(auth))
    assert decoded.derived(summary) == decoded.derived(summary) == "0200/TERM0001"
    assert len(calls) == 1
    changed = decoded.set(41, "TERM0002")  # a new message: derived anew, the old one kept
    assert changed.derived(summary) == "0200/TERM0002" and len(calls) == 2
    assert decoded.derived(summary) == "0200/TERM0001" and len(calls) == 2


def test_json_round_trip(auth: Message) -> None:
    text = auth.to_json()
    back = Message.from_json(text)
    assert back == auth and back.redacted == frozenset()
    assert json.loads(text)["fields"]["52"] == {"hex": PIN.hex().upper()}


def test_json_redacted(auth: Message) -> None:
    text = auth.to_json(redact=True)
    assert PAN not in text and TRACK2 not in text and PIN.hex().upper() not in text
    assert "5A08" not in text  # the PAN inside DE 55
    back = Message.from_json(text)
    assert back.redacted == frozenset({2, 35, 52})
    assert 2 not in back and 35 not in back and 52 not in back
    assert "5A" not in back.tlv(55) and back.tlv(55)["9F26"] == auth.tlv(55)["9F26"]
    # redacted is not part of equality
    assert back == Message.from_json(back.to_json())
    # a DE 55 that is not TLV is dropped whole
    odd = Message("0200", {55: b"\xff\xff"}).to_json(redact=True)
    assert Message.from_json(odd).redacted == frozenset({55})


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[]",
        "{}",
        '{"mti": 1}',
        '{"mti": "0200", "fields": {"x": "1"}}',
        '{"mti": "0200", "fields": {"2": 5}}',
        '{"mti": "0200", "fields": {"52": {"hex": "zz"}}}',
    ],
)
def test_json_bad(text: str) -> None:
    with pytest.raises(Iso8583Error):
        Message.from_json(text)


def _no_card_data(text: str) -> None:
    assert PAN not in text
    assert TRACK2 not in text and "=28122011234567890" not in text
    assert PIN.hex().upper() not in text and PIN.hex() not in text
    assert "4761739001010010" not in text.replace(" ", "")


def test_masking_everywhere(auth: Message, auth_wire: bytes) -> None:
    decoded = ISO87_ASCII.decode(auth_wire)
    for m in (auth, decoded, decoded.set(39, "00")):
        _no_card_data(repr(m))
        _no_card_data(m.describe())
        _no_card_data(str(m.to_masked_dict()))
        assert "476173******0010" in repr(m)
    assert "Primary Account Number" in auth.describe()
    assert auth.to_masked_dict()["mti"] == "0200"


def test_errors_are_masked(auth_wire: bytes) -> None:
    # PAN too long: the error names field and offset, never the value
    long_pan = auth_wire.replace(b"16" + PAN.encode(), b"99" + PAN.encode(), 1)
    with pytest.raises(DecodeError) as ei:
        ISO87_ASCII.decode(long_pan)
    assert ei.value.field == 2 and ei.value.offset == 20
    assert str(ei.value) == "field 2: length 99 exceeds max 19 at offset 20"
    _no_card_data(str(ei.value))
    with pytest.raises(EncodeError) as ee:
        ISO87_ASCII.encode(Message("0200", {2: PAN * 2}))
    _no_card_data(str(ee.value))
    assert ee.value.field == 2
    with pytest.raises(EncodeError) as ee:
        ISO87_ASCII.encode(Message("0200", {2: PAN[:-1] + "é"}))
    _no_card_data(str(ee.value))


def test_unchanged_fields_are_copied_byte_for_byte() -> None:
    # DE 52 arrives as lower-case hex; a fresh encode would write upper case
    wire = ISO87_ASCII.encode(Message("0200", {3: "000000", 52: PIN}))
    lower = wire.replace(PIN.hex().upper().encode(), PIN.hex().encode())
    m = ISO87_ASCII.decode(lower)
    assert m[52] == PIN
    out = ISO87_ASCII.encode(m.set(39, "00").set(3, "200000"))
    assert PIN.hex().encode() in out  # copied as it came, not re-encoded
    assert ISO87_ASCII.decode(out).fields() == {3: "200000", 39: "00", 52: PIN}
    # changing the MTI only re-encodes the MTI
    assert ISO87_ASCII.encode(m.with_mti("0210")) == b"0210" + lower[4:]


def test_json_redacts_nested_card_tags() -> None:
    from isopace.iso8583 import build_tlv, parse_tlv

    nested = parse_tlv(bytes.fromhex("7013" + "5A084761739001010010" + "9F270180" + "9F36020001"))
    icc = build_tlv(nested)
    text = Message("0110", {55: icc}).to_json(redact=True)
    assert "4761739001010010" not in text
    back = Message.from_json(text).tlv(55)
    assert back.find_all("5A") == [] and back.find_all("9F27") == [b"\x80"]
