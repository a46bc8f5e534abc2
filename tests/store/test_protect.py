"""Card data protection: what a journal record may keep of a message."""

from __future__ import annotations

import hashlib
import hmac
import sqlite3
from pathlib import Path

from isopace.flow import Exchange, Flow, Outcome
from isopace.iso8583 import Message
from isopace.iso8583 import mask_pan as iso8583_mask_pan
from isopace.iso8583.masking import mask_text as iso8583_mask_text
from isopace.store import CardDataProtector, SqliteJournal, mask_pan, scrub_text
from isopace.store.protect import strip_emv_card_tags
from tests.store.helpers import PAN, request


def test_pan_masked_and_fingerprinted_track_pin_emv_removed() -> None:
    p = CardDataProtector(b"secret").protect(request())
    assert p.pan_masked == "476173******0010"
    assert p.pan_hmac == hmac.new(b"secret", PAN.encode(), hashlib.sha256).hexdigest()
    assert PAN not in p.json and PAN[6:12] not in p.json
    back = Message.from_json(p.json)
    assert {2, 35, 52} <= back.redacted
    assert 2 not in back and 35 not in back and 52 not in back
    assert back[4] == "000000002500"
    tags = back.tlv(55)
    assert "5A" not in tags and "9F02" in tags


def test_no_key_no_fingerprint_and_pan_from_track2() -> None:
    m = request().remove(2)
    p = CardDataProtector(None).protect(m)
    assert p.pan_hmac is None and p.pan_masked == "476173******0010"


def test_extra_emv_card_tags_and_malformed_de55() -> None:
    data = bytes.fromhex("5F200A4A4F484E20534D4954485F24032512319F0206000000001000")
    assert strip_emv_card_tags(data) == bytes.fromhex("9F0206000000001000")
    # constructed template: filtered inside
    inner = bytes.fromhex("5A08" + PAN + "9F02060000000010009F")[:-1]
    wrapped = bytes([0x70, len(inner)]) + inner
    assert strip_emv_card_tags(wrapped) == bytes.fromhex("70099F0206000000001000")
    broken = request().set(55, bytes.fromhex("5A20" + PAN))  # length runs past the end
    p = CardDataProtector(b"k").protect(broken)
    assert PAN not in p.json and '"55"' not in p.json


def test_fields_of_a_decoded_message_that_do_not_decode_are_dropped() -> None:
    from isopace.iso8583 import ISO87_ASCII

    raw = ISO87_ASCII.encode(request().set(42, "MERCHANT0000001"))
    i = raw.index(b"MERCHANT0000001")
    decoded = ISO87_ASCII.decode(raw[:i] + b"\xff" * 15 + raw[i + 15 :])  # located, not ASCII
    odd = raw.index(b"5A08")  # DE 55 (hex characters): one fewer, an odd count
    prefix = int(raw[odd - 3 : odd])
    odd_hex = ISO87_ASCII.decode(
        raw[: odd - 3]
        + f"{prefix - 1:03d}".encode()
        + raw[odd : odd + prefix - 1]
        + raw[odd + prefix :]
    )
    for message in (decoded, odd_hex):
        p = CardDataProtector(b"k").protect(message)
        back = Message.from_json(p.json)
        assert back[11] == request()[11] and back[41] == request()[41]
        assert PAN not in p.json and p.pan_masked == "476173******0010"
    assert 42 not in Message.from_json(CardDataProtector(b"k").protect(decoded).json)
    assert 55 not in Message.from_json(CardDataProtector(b"k").protect(odd_hex).json)


def test_scrub_text_and_mask_pan() -> None:
    assert scrub_text(f"card {PAN} declined, stan 000001") == (
        "card 476173******0010 declined, stan 000001"
    )
    assert mask_pan("123456") == "******"  # fewer than 8 digits: nothing shown


def test_scrub_text_is_the_shared_masker() -> None:
    assert scrub_text is iso8583_mask_text and mask_pan is iso8583_mask_pan
    # track data after the PAN is hidden too: short discretionary data, track 1 name
    assert scrub_text(f"t2 {PAN}=2512101123? t1 B{PAN}^DOE/JOHN^25121011234") == (
        "t2 476173******0010=****? t1 B476173******0010^****"
    )


async def test_journal_error_column_masks_track_data(tmp_path: Path) -> None:
    track1 = f"B{PAN}^DOE/JOHN^25121011234"

    class Refuse:
        name = "refuse"

        def prepare(self, ex: Exchange) -> None:
            track2 = ex.request[35]
            raise ValueError(f"bad track {track2} / {ex.request[2]}=2512101123 / {track1}")

    path = tmp_path / "j.db"
    async with SqliteJournal(path, hmac_key="k") as journal:
        flow = Flow(journal=journal).group("main", Refuse())
        assert await flow.run(Exchange("tx-1", request())) is Outcome.ABORTED
        records = await journal.by_id("tx-1")
    conn = sqlite3.connect(path)
    try:
        (error,) = conn.execute("SELECT error FROM journal WHERE kind = 'ABORTED'").fetchone()
    finally:
        conn.close()
    assert error == (
        "ValueError: bad track 476173******0010=**** / 476173******0010=**** / "
        "B476173******0010^****"
    )
    assert records[-1].error == error
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    for secret in (PAN, "2512101123", "25121010000000000", "DOE/JOHN", "25121011234"):
        assert secret.encode() not in raw, secret


def test_fingerprint_is_hmac_sha256_for_every_key_length() -> None:
    for key in (b"k", b"x" * 63, b"y" * 64, b"z" * 65, bytes(range(200)), "clé".encode()):
        protector = CardDataProtector(key)
        for pan in (PAN, "5500000000000004", " 4111111111111111 "):
            expected = hmac.new(key, pan.strip().encode(), hashlib.sha256).hexdigest()
            assert protector.fingerprint(pan) == expected
    assert CardDataProtector("clé").fingerprint(PAN) == CardDataProtector(
        "clé".encode()
    ).fingerprint(PAN)
