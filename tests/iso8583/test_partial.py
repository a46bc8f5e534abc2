"""Spec.decode_partial: the fields of a message decode rejects that can be trusted.

Inputs tried: valid messages of every built-in and differential spec (same fields as decode);
a value that does not decode in a frame whose bytes add up (every other field kept); a
corrupted length prefix (non-digit, over the maximum) of each variable-length field of an
authorization, a fixed-length field one digit short, truncated and padded messages, a field
present in the bitmap but not defined in the spec (no field trusted); unreadable MTI and
bitmaps; random corruption (never anything but DecodeError, and nothing recovered that was not
sent).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from isopace.iso8583 import ISO87_ASCII, DecodeError, Iso8583Error, Message, Spec

from .conftest import AUTH, PIN
from .test_fastpaths import requests

WIRE_AUTH = {**AUTH, 52: PIN}


def _prefix_at(n: int) -> int:
    """Offset of field n's length prefix in the ISO87_ASCII encoding of WIRE_AUTH: the fields
    before it take the bytes they take in a message holding only them (same bitmap width)."""
    before = {k: v for k, v in WIRE_AUTH.items() if k < n}
    return len(ISO87_ASCII.encode(Message("0200", before)))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_valid_messages_recover_every_field(case: tuple[Spec, Message]) -> None:
    spec, m = case
    wire = spec.encode(m)
    partial = spec.decode_partial(wire)
    assert partial == spec.decode(wire) and partial.fields() == m.fields()
    assert partial.spec is None  # a built message: never encoded as the original bytes


@pytest.mark.parametrize("field", [2, 32, 35])
@pytest.mark.parametrize("bad", [b"X", b"9"])
def test_a_bad_length_prefix_leaves_no_field_trusted(field: int, bad: bytes) -> None:
    wire = ISO87_ASCII.encode(Message("0200", WIRE_AUTH))
    at = _prefix_at(field)
    corrupt = wire[:at] + bad + wire[at + 1 :]  # "X4": not a number; "94": over the maximum
    with pytest.raises(DecodeError):
        ISO87_ASCII.decode(corrupt)
    partial = ISO87_ASCII.decode_partial(corrupt)
    assert partial.mti == "0200" and partial.fields() == {}


def test_a_fixed_field_one_digit_short_echoes_nothing_read_after_it() -> None:
    """DE 4 with 11 digits: every field after it would be read one byte off (DE 11 "100006"
    as "000061"...), and the frame only runs short at its last field."""
    request = {2: "4111111111111111", 3: "000000", 4: "000000002500", 7: "1206143000"}
    request |= {11: "100006", 41: "TERM0001"}
    wire = ISO87_ASCII.encode(Message("0200", request))
    at = wire.index(b"000000002500")
    short = wire[:at] + wire[at + 1 :]
    with pytest.raises(DecodeError):
        ISO87_ASCII.decode(short)
    assert ISO87_ASCII.decode_partial(short).fields() == {}


def test_truncated_and_padded_leave_no_field_trusted() -> None:
    wire = ISO87_ASCII.encode(Message("0200", WIRE_AUTH))
    assert ISO87_ASCII.decode_partial(wire[:-5]).fields() == {}  # DE 52 cut short
    assert ISO87_ASCII.decode_partial(wire + b"xx").fields() == {}  # bytes left over


def test_undefined_field_and_unreadable_head() -> None:
    spec = Spec.from_pyiso8583(
        {k: v for k, v in ISO87_ASCII.to_pyiso8583().items() if k != "32"}, name="no 32"
    )
    wire = ISO87_ASCII.encode(Message("0200", WIRE_AUTH))
    with pytest.raises(DecodeError, match="not defined"):
        spec.decode(wire)
    assert spec.decode_partial(wire).fields() == {}  # its size unknown: nothing after it sure
    for head in (b"02", b"0200ZZZZZZZZZZZZZZZZ"):
        with pytest.raises(DecodeError):
            ISO87_ASCII.decode_partial(head)
    with pytest.raises(TypeError):
        ISO87_ASCII.decode_partial("0200")  # type: ignore[arg-type]


def test_values_that_do_not_decode_are_left_out() -> None:
    wire = ISO87_ASCII.encode(Message("0200", WIRE_AUTH))
    wire = wire.replace(b"TERM0001", b"\xffERM0001")  # the bytes still add up
    with pytest.raises(DecodeError):
        ISO87_ASCII.decode(wire)[41]
    got = ISO87_ASCII.decode_partial(wire).fields()
    assert got == {n: v for n, v in WIRE_AUTH.items() if n != 41}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests(), st.data())
def test_random_corruption(case: tuple[Spec, Message], data: st.DataObject) -> None:
    spec, m = case
    wire = bytearray(spec.encode(m))
    clean = spec.decode(bytes(wire))
    offs = clean._wire[3]  # type: ignore[index]  # where each field starts (and the last one ends)
    assert offs is not None
    if offs[0] >= len(wire):
        return  # no field bytes to corrupt
    i = data.draw(st.integers(offs[0], len(wire) - 1))  # after the bitmaps
    wire[i] = data.draw(st.integers(0, 255))
    try:
        partial = spec.decode_partial(bytes(wire))
    except Iso8583Error:
        raise AssertionError("the head was intact: decode_partial must not fail") from None
    starts = dict(zip(clean.keys(), offs, strict=False))
    ends = dict(zip(clean.keys(), offs[1:], strict=True))
    for n, v in partial.fields().items():
        assert n in m  # the bitmap is intact: no field made up
        if not starts[n] <= i < ends[n]:  # not the corrupted field: what was sent
            assert v == m[n]
