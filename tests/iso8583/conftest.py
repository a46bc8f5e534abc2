"""Shared fixtures and strategies for the ISO 8583 tests."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import strategies as st

from isopace.iso8583 import ISO87_ASCII, Message

PAN = "4761739001010010"
TRACK2 = "4761739001010010=28122011234567890"
PIN = bytes.fromhex("1234567890ABCDEF")
ICC = bytes.fromhex("5A0847617390010100109F2608AABBCCDDEEFF00119F2701809F3704A1B2C3D4")

AUTH: dict[int, str | bytes] = {
    2: PAN,
    3: "000000",
    4: "000000002500",
    7: "1129204455",
    11: "123456",
    12: "204455",
    13: "1129",
    14: "2812",
    18: "5411",
    22: "051",
    25: "00",
    32: "12345678",
    35: TRACK2,
    37: "123456789012",
    41: "TERM0001",
    42: "MERCHANT0000001",
    43: "ACME STORES              LONDON       GB",
    49: "826",
}


@pytest.fixture
def auth() -> Message:
    return Message("0200", {**AUTH, 52: PIN, 55: ICC})


@pytest.fixture
def auth_wire(auth: Message) -> bytes:
    return ISO87_ASCII.encode(auth)


def with_tertiary(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A copy of a pyiso8583 spec dict with data elements 129..192 defined (pyiso8583 4.x
    reads them through the tertiary bitmap but its built-in specs stop at 128)."""
    out = {k: dict(v) for k, v in spec.items()}
    for n in range(129, 193):
        out[str(n)] = {
            "data_enc": "ascii",
            "len_enc": "ascii",
            "len_type": 2,
            "max_len": 30,
            "desc": f"Tertiary {n}",
        }
    return out


def field_numbers() -> st.SearchStrategy[list[int]]:
    """Sets of data elements hitting primary-only, secondary and tertiary bitmaps."""
    primary = st.lists(st.integers(2, 64), max_size=12)
    secondary = st.lists(st.integers(66, 128), max_size=4)
    tertiary = st.lists(st.integers(129, 192), max_size=3)
    return st.tuples(
        primary, st.one_of(st.just([]), secondary), st.one_of(st.just([]), tertiary)
    ).map(lambda t: sorted(set(t[0]) | set(t[1]) | set(t[2])))
