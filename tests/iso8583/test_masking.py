"""Masking of card data and the Luhn check.

Inputs tried: PANs of every length 0-19 (and odd characters), track 1/2/3 with and without
sentinels, EMV track 2 equivalents, values not shaped like tracks, PIN blocks as bytes and hex text,
DE 55 as bytes / hex text / TLV (nested, duplicated card tags, malformed), free text with PANs
plain, grouped, embedded and next to longer digit runs; hypothesis for leak checks.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from isopace.iso8583.masking import (
    CARD_DATA_FIELDS,
    CARD_TLV_TAGS,
    luhn_check_digit,
    luhn_ok,
    mask_pan,
    mask_text,
    mask_tlv,
    mask_track,
    mask_value,
)
from isopace.iso8583.tlv import TLV, build_tlv, parse_tlv

H = bytes.fromhex
PAN = "4761739001010010"
TRACK2 = PAN + "=25122010123456789"
TRACK1 = "B" + PAN + "^DOE/JOHN^2512201012345678900000"
TRACK3 = "01" + PAN + "=9780000000000000000000000000000000000000000001234567"


def test_constants() -> None:
    assert frozenset({2, 35, 36, 45, 52}) == CARD_DATA_FIELDS
    assert {"5A", "57"} <= CARD_TLV_TAGS
    assert {"56", "9F6B", "5F20", "9F1F", "9F20", "99"} <= CARD_TLV_TAGS
    assert "5F24" not in CARD_TLV_TAGS


# ----------------------------------------------------------------------------------------- Luhn


@pytest.mark.parametrize(
    "number",
    [
        "4111111111111111",
        "5555555555554444",
        "378282246310005",
        "6011111111111117",
        "3530111333300000",
        "4222222222222",
        "4761739001010010",
        "6759649826438453",
        "00",
        "18",
    ],
)
def test_luhn_known_valid(number: str) -> None:
    assert luhn_ok(number)
    assert luhn_check_digit(number[:-1]) == number[-1]


@pytest.mark.parametrize(
    "number",
    ["4111111111111112", "4761739001010011", "", "0", "7", "41111111111a1111", "٤١١١", " 4111"],
)
def test_luhn_invalid(number: str) -> None:
    assert not luhn_ok(number)


@pytest.mark.parametrize("bad", ["", "12a", "١٢", "12 3"])
def test_luhn_check_digit_rejects_non_digits(bad: str) -> None:
    with pytest.raises(ValueError):
        luhn_check_digit(bad)


@settings(max_examples=500)
@given(st.text(alphabet="0123456789", min_size=1, max_size=25), st.data())
def test_luhn_check_digit_and_single_digit_errors(partial: str, data: st.DataObject) -> None:
    number = partial + luhn_check_digit(partial)
    assert luhn_ok(number)
    pos = data.draw(st.integers(0, len(number) - 1))
    new = data.draw(st.sampled_from([d for d in "0123456789" if d != number[pos]]))
    assert not luhn_ok(number[:pos] + new + number[pos + 1 :])  # Luhn catches every single error


# ------------------------------------------------------------------------------------------ PAN


@pytest.mark.parametrize(
    ("pan", "masked"),
    [
        ("4761739001010010", "476173******0010"),
        ("4761739001010010123", "476173*********0123"),
        ("4222222222222", "422222***2222"),
        ("476173900101", "********0101"),
        ("47617390", "****7390"),
        ("4761739", "*******"),
        ("4761", "****"),
        ("", ""),
    ],
)
def test_mask_pan(pan: str, masked: str) -> None:
    assert mask_pan(pan) == masked


def test_mask_pan_escapes_non_printables() -> None:
    out = mask_pan("4761\x007390010100")
    assert out.isprintable()
    assert "\x00" not in out


@given(st.text(alphabet="0123456789", max_size=19))
def test_mask_pan_shows_at_most_6_plus_4_and_hides_at_least_3(pan: str) -> None:
    out = mask_pan(pan)
    assert len(out) == len(pan)
    shown = sum(ch != "*" for ch in out)
    assert shown <= 10
    assert len(pan) - shown >= min(3, len(pan))
    for a, b in zip(pan, out, strict=True):
        assert b in ("*", a)
    if len(pan) >= 4:
        assert pan not in out


# --------------------------------------------------------------------------------------- tracks


@pytest.mark.parametrize(
    ("track", "masked"),
    [
        (TRACK2, "476173******0010=****"),
        (";" + TRACK2 + "?", ";476173******0010=****"),
        (PAN + "D25122010123456789", "476173******0010D****"),
        (TRACK1, "B476173******0010^****"),
        ("%" + TRACK1 + "?", "%B476173******0010^****"),
        (TRACK3, "014761********0010=****"),
        (PAN, "476173******0010"),
        (PAN + "X123", "****"),
        ("garbage " + PAN + "=1", "****"),
        ("", ""),
        (";4761739001010010?", "****"),
    ],
)
def test_mask_track(track: str, masked: str) -> None:
    assert mask_track(track) == masked


def test_mask_track_bytes() -> None:
    assert mask_track(TRACK2.encode()) == "476173******0010=****"
    # packed digits (EMV 57 style): D separator, F padding
    assert mask_track(H(PAN + "D2512201012345678F")) == "476173******0010D****"


# ---------------------------------------------------------------------------------- mask_value


def _icc() -> bytes:
    return build_tlv(
        [
            ("9F26", H("1B3CF0A8C4D5E6F7")),
            ("5A", H(PAN)),
            ("5F24", H("251231")),
            ("57", H(PAN + "D2512201012345678F")),
            ("70", [("5A", H(PAN + "FF")), ("5F20", b"DOE/JOHN"), ("9F1F", b"123456789")]),
            ("99", H("0123456789ABCDEF")),
            ("9F6B", H(PAN + "D2512201")),
            ("56", TRACK1.encode()),
            ("9F20", H("0123456789")),
            ("5A", H(PAN)),  # duplicate: rendered (masked) too
        ]
    )


def test_mask_value_card_fields() -> None:
    assert mask_value(2, PAN) == "476173******0010"
    assert mask_value(2, PAN.encode()) == "476173******0010"
    assert mask_value(35, TRACK2) == "476173******0010=****"
    assert mask_value(36, TRACK3) == "014761********0010=****"
    assert mask_value(45, TRACK1) == "B476173******0010^****"
    assert mask_value(52, H("0123456789ABCDEF")) == "****"
    assert mask_value(52, "0123456789ABCDEF") == "****"
    assert mask_value(52, b"") == "****"


def test_mask_value_icc_masks_card_tags() -> None:
    out = mask_value(55, _icc())
    assert out == (
        "9F26=1B3CF0A8C4D5E6F7 5A=476173******0010 5F24=251231 57=476173******0010D**** "
        "70[5A=476173******0010 5F20=**** 9F1F=****] 99=**** 9F6B=476173******0010D**** "
        "56=B476173******0010^**** 9F20=**** 5A=476173******0010"
    )
    assert mask_value(55, _icc().hex()) == out
    assert mask_value(55, _icc().hex().lower()) == out
    assert mask_value(55, parse_tlv(_icc())) == out
    assert mask_tlv(parse_tlv(_icc())) == out
    assert repr(parse_tlv(_icc())) == f"TLV({out})"


def test_mask_value_icc_malformed_shows_no_content() -> None:
    broken = _icc()[:-3]
    assert mask_value(55, broken) == f"<55: {len(broken)} bytes, unparsed>"
    assert mask_value(55, "not hex " + PAN) == f"<55: {len('not hex ' + PAN)} chars, unparsed>"
    assert mask_value(55, broken.hex()) == f"<55: {len(broken)} bytes, unparsed>"
    assert mask_value(55, b"") == ""


def test_mask_value_other_fields() -> None:
    assert mask_value(41, "TERM0001") == "TERM0001"
    assert mask_value(43, "Shop\tParis\x00") == "Shop\\tParis\\x00"
    assert mask_value(64, H("00112233AABBCCDD")) == "00112233AABBCCDD"
    assert mask_value(4, "000000002500") == "000000002500"
    assert mask_value(127, TLV({"9F27": H("80")})) == "9F27=80"


def test_a_card_number_in_any_text_field_is_masked_everywhere_it_is_shown() -> None:
    """A PAN keyed into DE 43 or carried in private data (DE 48) or an account field (DE 102)
    is masked by repr, describe and to_masked_dict like DE 2; other values stay as they are."""
    from isopace.iso8583 import Message

    m = Message(
        "0200",
        {
            2: PAN,
            41: "TERM0001",
            42: "MERCHANT0000001",
            43: "REFUND TO 4111 1111 1111 1111 PARIS",
            48: "ORIG" + PAN + "=25121010000000000",
            102: "4012888888881881",
        },
    )
    shown = [repr(m), m.describe(), str(m.to_masked_dict())]
    for text in shown:
        for secret in (PAN, "4111 1111 1111 1111", "4012888888881881", "25121010000000000"):
            assert secret not in text, text
        assert "TERM0001" in text and "MERCHANT0000001" in text
    masked = m.to_masked_dict()
    assert masked["43"] == "REFUND TO 411111******1111 PARIS"
    assert masked["48"] == "ORIG476173******0010=****"
    assert masked["102"] == "401288******1881"


# ------------------------------------------------------------------------------------ mask_text


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("card " + PAN + " declined", "card 476173******0010 declined"),
        ("pan=4761 7390 0101 0010;", "pan=476173******0010;"),
        ("pan=4761-7390-0101-0010", "pan=476173******0010"),
        ("x4111111111111111y", "x411111******1111y"),
        ("amount 000000002500 stan 123456", "amount 000000002500 stan 123456"),
        ("4111111111111112 fails Luhn", "4111111111111112 fails Luhn"),
        ("47617390010100100", "47617390010100100"),  # 17 digits, Luhn fails
        (
            "field 2: length 99 exceeds max 19 at offset 20",
            "field 2: length 99 exceeds max 19 at offset 20",
        ),
        ("", ""),
        (TRACK2, "476173******0010=****"),
        ("t2 " + PAN + "D2512201012345678F!", "t2 476173******0010D****!"),
        ("t1 '%" + TRACK1 + "?'", "t1 '%B476173******0010^****?'"),
        ("t3 " + TRACK3, "t3 " + TRACK3),  # format code + PAN: one 18-digit run failing Luhn
        ("stan 123456 ok 4111111111111111=", "stan 123456 ok 411111******1111="),
        # discretionary data passing Luhn as a 17-digit run: hidden whole, not as a PAN
        (PAN + "=25121010000000000", "476173******0010=****"),
        ("B" + PAN + "^DOE/JOHN^25121010000000000", "B476173******0010^****"),
    ],
)
def test_mask_text(text: str, masked: str) -> None:
    assert mask_text(text) == masked


def test_mask_text_ignores_longer_digit_runs_only_when_not_luhn() -> None:
    # a PAN glued to more digits is not a 13-19 digit run: left alone (no false positives on
    # long numeric strings); a 13-19 digit Luhn-valid run is always masked.
    assert mask_text("1" * 25) == "1" * 25
    assert PAN not in mask_text(f"a {PAN} b {PAN}")


# ---------------------------------------------------------------------- hypothesis: no leaks

digits = st.text(alphabet="0123456789", min_size=12, max_size=18)
pans = digits.map(lambda p: p + luhn_check_digit(p))


@settings(max_examples=1500, deadline=None)
@given(
    pans,
    st.text(alphabet="0123456789", min_size=8, max_size=20),
    st.binary(min_size=8, max_size=8),
    st.booleans(),
)
def test_no_pan_track_or_pin_block_leaks(
    pan: str, discretionary: str, pin_block: bytes, nest: bool
) -> None:
    track2 = f"{pan}=2512{discretionary}"
    track1 = f"B{pan}^DOE/JOHN^2512{discretionary}"
    track3 = f"01{pan}={discretionary}"
    packed = pan + "D2512" + discretionary
    if len(packed) % 2:
        packed += "F"
    card = [("5A", H(pan + ("F" if len(pan) % 2 else ""))), ("57", H(packed))]
    items: list[tuple[str, object]] = [("9F27", H("80"))]
    items += [("70", card)] if nest else card
    icc = build_tlv(items)
    card_outputs = [
        mask_value(2, pan),
        mask_value(35, track2),
        mask_value(36, track3),
        mask_value(45, track1),
        mask_value(52, pin_block),
        mask_value(52, pin_block.hex().upper()),
        mask_value(55, icc),
        mask_value(55, icc.hex().upper()),
        repr(parse_tlv(icc)),
        mask_track(track2.encode()),
    ]
    # discretionary data must be gone too, unless it could come from what is legitimately shown
    distinctive = len(set(discretionary)) > 1 and discretionary not in mask_pan(pan) + mask_pan(
        "01" + pan
    )
    for out in card_outputs:
        assert pan not in out
        assert pin_block.hex().upper() not in out
        assert not distinctive or discretionary not in out
        assert "DOE/JOHN" not in out
        assert out.isprintable()
    text = mask_text(f"error for {pan} at {track2}, card {pan[:4]} {pan[4:]}")
    assert pan not in text
    assert not distinctive or discretionary not in text
    assert mask_value(52, pin_block) == "****"


@settings(max_examples=1000, deadline=None)
@given(st.integers(min_value=0, max_value=127), st.binary(max_size=64))
def test_mask_value_never_raises_on_any_bytes(field: int, value: bytes) -> None:
    out = mask_value(field, value)
    assert out.isprintable()
    if field in CARD_DATA_FIELDS:
        assert sum(ch.isdigit() for ch in out) <= 10  # never more than first 6 + last 4
    if field == 52:
        assert out == "****"


@settings(max_examples=1000, deadline=None)
@given(st.text(max_size=60), pans, st.text(max_size=60))
def test_mask_text_masks_any_embedded_pan(before: str, pan: str, after: str) -> None:
    pad_l = " " if before[-1:].isdigit() else ""
    pad_r = " " if after[:1].isdigit() else ""
    out = mask_text(before + pad_l + pan + pad_r + after)
    assert pan not in out
