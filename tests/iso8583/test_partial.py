"""Spec.decode_partial: best-effort recovery of the fields of a message decode rejects.

Inputs tried: valid messages of every built-in and differential spec (same fields as decode);
a corrupted length prefix (non-digit, over the maximum) of each variable-length field of an
authorization; a field present in the bitmap but not defined in the spec; truncated and padded
messages; unreadable MTI and bitmaps; random corruption (never anything but DecodeError, and
what is recovered forward of the first corrupted byte is what was sent).
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
def test_bad_length_prefix_recovers_both_ends(field: int, bad: bytes) -> None:
    wire = ISO87_ASCII.encode(Message("0200", WIRE_AUTH))
    at = _prefix_at(field)
    corrupt = wire[:at] + bad + wire[at + 1 :]  # "X4": not a number; "94": over the maximum
    with pytest.raises(DecodeError):
        ISO87_ASCII.decode(corrupt)
    partial = ISO87_ASCII.decode_partial(corrupt)
    got = partial.fields()
    assert partial.mti == "0200"
    assert all(WIRE_AUTH[n] == v for n, v in got.items())  # nothing made up
    assert field not in got
    assert {n for n in WIRE_AUTH if n < field} <= set(got)  # everything before it
    assert {37, 41, 42, 43, 49, 52} <= set(got)  # the fixed fields after the last LLVAR
    if field > 11:
        assert got[11] == "123456"


def test_truncated_and_padded_recover_forward_only() -> None:
    wire = ISO87_ASCII.encode(Message("0200", WIRE_AUTH))
    got = ISO87_ASCII.decode_partial(wire[:-5]).fields()  # DE 52 cut short
    assert set(got) == set(WIRE_AUTH) - {52}
    got = ISO87_ASCII.decode_partial(wire + b"xx").fields()  # extra bytes: all located
    assert got == WIRE_AUTH


def test_undefined_field_and_unreadable_head() -> None:
    spec = Spec.from_pyiso8583(
        {k: v for k, v in ISO87_ASCII.to_pyiso8583().items() if k != "32"}, name="no 32"
    )
    wire = ISO87_ASCII.encode(Message("0200", WIRE_AUTH))
    with pytest.raises(DecodeError, match="not defined"):
        spec.decode(wire)
    got = spec.decode_partial(wire).fields()
    assert 11 in got and 41 in got and 32 not in got and 35 not in got
    for head in (b"02", b"0200ZZZZZZZZZZZZZZZZ"):
        with pytest.raises(DecodeError):
            ISO87_ASCII.decode_partial(head)
    with pytest.raises(TypeError):
        ISO87_ASCII.decode_partial("0200")  # type: ignore[arg-type]


def test_values_that_do_not_decode_are_left_out() -> None:
    wire = ISO87_ASCII.encode(Message("0200", WIRE_AUTH))
    wire = wire.replace(b"TERM0001", b"\xffERM0001")
    at = _prefix_at(35)
    wire = wire[:at] + b"X" + wire[at + 1 :]
    got = ISO87_ASCII.decode_partial(wire).fields()
    assert 41 not in got and got[42] == WIRE_AUTH[42] and got[11] == "123456"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests(), st.data())
def test_random_corruption(case: tuple[Spec, Message], data: st.DataObject) -> None:
    spec, m = case
    wire = bytearray(spec.encode(m))
    clean = spec.decode(bytes(wire))
    offs = clean._offs  # where each field starts (and the last one ends)
    assert offs is not None
    if offs[0] >= len(wire):
        return  # no field bytes to corrupt
    i = data.draw(st.integers(offs[0], len(wire) - 1))  # after the bitmaps
    wire[i] = data.draw(st.integers(0, 255))
    try:
        partial = spec.decode_partial(bytes(wire))
    except Iso8583Error:
        raise AssertionError("the head was intact: decode_partial must not fail") from None
    ends = dict(zip(clean.keys(), offs[1:], strict=True))
    for n, v in partial.fields().items():
        assert n in m  # the bitmap is intact: no field made up
        if ends[n] <= i:  # wholly before the corrupted byte: what was sent
            assert v == m[n]
