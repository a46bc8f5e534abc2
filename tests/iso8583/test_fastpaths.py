"""The fast paths of Message give what the plain, slow ways of computing the same thing give.

Each fast path is checked against a reference written the straightforward way (the code the fast
path replaced): ``reply()`` of a decoded message (wire spans carried over, not decoded) against
decoding every echo field and building a new message; ``set()``; the generated re-encoding of a
changed decoded message against a fresh encode. Inputs tried: every built-in and differential
spec (ASCII, BCD, EBCDIC, binary, exotic length prefixes), random field sets with primary,
secondary and tertiary bitmaps, random echo sets in random order (duplicates, absent and invalid
numbers), changes made before and after the reply, and corrupted wire bytes (bad values in echo
fields and elsewhere).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from isopace.iso8583 import (
    ECHO_FIELDS,
    ISO87_ASCII,
    ISO87_BINARY,
    ISO87_EBCDIC,
    DecodeError,
    FieldDef,
    Message,
    Spec,
)
from isopace.iso8583.message import response_mti

from .conftest import AUTH, ICC, PIN, field_numbers
from .test_differential import OURS
from .test_differential import value_for as _value_for

ALL_SPECS: list[Spec] = [ISO87_ASCII, ISO87_BINARY, ISO87_EBCDIC, *OURS.values()]
REQUEST_MTIS = ["0100", "0200", "0400", "0420", "0800", "1200"]


def value_for(fd: FieldDef) -> st.SearchStrategy[str | bytes]:
    """A valid value (the differential tests' strategy, plus binary carried as hex)."""
    if fd.kind == "hex":
        size = fd.max_len // 2
        return st.binary(min_size=size if fd.len_type == 0 else 0, max_size=min(size, 40))
    return _value_for(fd)


@st.composite
def messages(draw: st.DrawFn, spec: Spec) -> Message:
    numbers = [n for n in draw(field_numbers()) if spec.field(n) is not None]
    fields = {n: draw(value_for(spec.field(n))) for n in numbers}  # type: ignore[arg-type]
    return Message(draw(st.sampled_from(REQUEST_MTIS)), fields)


def slow_reply(m: Message, mti: str | None = None, copy: Iterable[int] = ECHO_FIELDS) -> Message:
    """reply() the plain way: decode each echo field, build a new message."""
    if mti is None:
        mti = response_mti(m.mti)
    fields = {}
    for n in copy:
        if n in m:
            fields[n] = m[n]
    return Message(mti, fields, header=m.header)


def outcome(fn: Callable[[], Any]) -> tuple[Any, ...]:
    try:
        return ("ok", fn())
    except Exception as e:  # compare errors by type and text
        return ("error", type(e), str(e))


def same_message(a: Message, b: Message) -> None:
    assert a == b and hash(a) == hash(b)
    assert a.mti == b.mti and a.header == b.header
    assert a.fields() == b.fields() and list(a) == list(b) and len(a) == len(b)
    for n in range(0, 194):
        assert (n in a) == (n in b)
        assert a.get(n) == b.get(n)


def fresh(m: Message) -> Message:
    """``m`` rebuilt in code (no wire bytes)."""
    return Message(m.mti, m.fields(), header=m.header)


copies = st.one_of(
    st.just(ECHO_FIELDS),
    st.lists(st.integers(0, 195), max_size=20).map(tuple),
    st.lists(st.sampled_from(ECHO_FIELDS), max_size=14),  # a list, possibly out of order
)


@st.composite
def requests(draw: st.DrawFn) -> tuple[Spec, Message]:
    spec = draw(st.sampled_from(ALL_SPECS))
    return spec, draw(messages(spec))


def field_value(draw: st.DrawFn, spec: Spec, n: int) -> str | bytes:
    fd = spec.field(n)
    assert fd is not None
    return draw(value_for(fd))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests(), copies, st.data())
def test_reply_of_decoded_equals_slow_reply(
    case: tuple[Spec, Message], copy: Iterable[int], data: st.DataObject
) -> None:
    spec, built = case
    wire = spec.encode(built)
    decoded = spec.decode(wire)
    # changes before the reply: reads (cached values), sets, removals
    defined = [n for n in range(2, 129) if n != 65 and spec.field(n) is not None]
    for _ in range(data.draw(st.integers(0, 3))):
        op = data.draw(st.sampled_from(["read", "set", "remove"]))
        n = data.draw(st.sampled_from(defined))
        if op == "read":
            decoded.get(n)
        elif op == "set":
            decoded = decoded.set(n, data.draw(value_for(spec.field(n))))  # type: ignore[arg-type]
        else:
            decoded = decoded.remove(n)
    mti = data.draw(st.one_of(st.none(), st.just("0230")))
    fast = decoded.reply(mti, copy=copy)
    slow = slow_reply(decoded, mti, copy=copy)
    same_message(fast, slow)
    assert fast.redacted == slow.redacted == frozenset()
    # changes after the reply, then the encodings (repeated: the generated re-encoder kicks in)
    for n in data.draw(st.lists(st.sampled_from(defined), max_size=3)):
        value = field_value(data.draw, spec, n)
        fast, slow = fast.set(n, value), slow.set(n, value)
    if data.draw(st.booleans()) and len(fast):
        n = data.draw(st.sampled_from(list(fast)))
        fast, slow = fast.remove(n), slow.remove(n)
    same_message(fast, slow)
    expected = outcome(lambda: spec.encode(slow))
    for _ in range(4):
        assert outcome(lambda: spec.encode(fast)) == expected
    if expected[0] == "ok":
        assert spec.decode(expected[1]) == slow
    # with another spec: the values are decoded then, and encoded as any message's
    other = data.draw(st.sampled_from(ALL_SPECS))
    assert outcome(lambda: other.encode(fast)) == outcome(lambda: other.encode(slow))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests(), copies, st.data())
def test_reply_of_corrupted_wire_fails_as_slow_reply(
    case: tuple[Spec, Message], copy: Iterable[int], data: st.DataObject
) -> None:
    spec, built = case
    wire = bytearray(spec.encode(built))
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(wire) - 1))
        wire[i] = data.draw(st.one_of(st.integers(0x80, 0xFF), st.integers(0, 255)))
    try:
        decoded = spec.decode(bytes(wire))
        reads = data.draw(st.lists(st.integers(2, 128), max_size=4))
        for n in reads:  # some fields read (and cached) before the reply, as a handler would
            outcome(lambda n=n: decoded.get(n))
    except Exception:
        return  # the structure broke: nothing to reply to
    again = spec.decode(bytes(wire))
    for n in reads:
        outcome(lambda n=n: again.get(n))
    fast = outcome(lambda: decoded.reply(copy=copy))
    slow = outcome(lambda: slow_reply(again, copy=copy))
    assert fast[0] == slow[0]
    event(f"reply: {fast[0]}")
    if fast[0] == "ok":
        same_message(fast[1], slow[1])
        assert outcome(lambda: spec.encode(fast[1])) == outcome(lambda: spec.encode(slow[1]))
    else:
        assert fast == slow


def test_reply_carries_wire_spans() -> None:
    request = Message("0200", {**AUTH, 52: PIN, 55: ICC})
    wire = ISO87_ASCII.encode(request)
    decoded = ISO87_ASCII.decode(wire)
    r = decoded.reply()
    assert r._vals == {} and decoded._vals == {}  # nothing decoded
    assert r.spec is ISO87_ASCII and r.mti == "0210"
    assert list(r) == [n for n in ECHO_FIELDS if n in request]
    out = ISO87_ASCII.encode(r.set(39, "00").set(38, "123456"))
    assert out == ISO87_ASCII.encode(slow_reply(request).set(39, "00").set(38, "123456"))
    assert r[11] == "123456" and r.get(35) is None and 35 not in r and 52 not in r
    # the request is untouched
    assert ISO87_ASCII.encode(decoded) is wire


@pytest.mark.parametrize("spec", [ISO87_ASCII, ISO87_BINARY, ISO87_EBCDIC])
def test_reply_of_bad_echo_field_raises_like_reading_it(spec: Spec) -> None:
    request = Message("0200", {**AUTH, 52: PIN})
    wire = bytearray(spec.encode(request))
    decoded = spec.decode(bytes(wire))
    # corrupt DE 41 (an echo field) so it no longer decodes, keep the structure
    start = wire.index(spec.encode(Message("0200", {41: AUTH[41]}))[-8:])
    wire[start] = 0xFF if spec is not ISO87_EBCDIC else 0x00
    bad = spec.decode(bytes(wire))
    try:
        bad[41]
    except DecodeError as e:
        expected = str(e)
    else:  # this encoding reads any byte: nothing to check
        assert spec is ISO87_EBCDIC
        return
    with pytest.raises(DecodeError) as info:
        bad.reply()
    assert str(info.value) == expected
    # not echoed: no error
    assert bad.reply(copy=(11,)).fields() == {11: "123456"}
    assert decoded.reply() == slow_reply(decoded)


def test_reply_with_header_spec() -> None:
    d = ISO87_ASCII.to_pyiso8583()
    d["h"] = {"data_enc": "ascii", "len_type": 0, "max_len": 6, "desc": "Header"}
    spec = Spec.from_pyiso8583(d)
    m = Message("0200", dict(AUTH), header="ISO026")
    decoded = spec.decode(spec.encode(m))
    r = decoded.reply()
    assert r.header == "ISO026"
    assert spec.encode(r.set(39, "00")) == spec.encode(slow_reply(m).set(39, "00"))
    with pytest.raises(Exception, match="header"):
        spec.encode(r.with_header(None))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests(), st.data())
def test_set_equals_building_the_fields(case: tuple[Spec, Message], data: st.DataObject) -> None:
    spec, built = case
    defined = [n for n in range(2, 129) if n != 65 and spec.field(n) is not None]
    for m in (built, spec.decode(spec.encode(built))):
        expected = dict(m.fields())
        for _ in range(data.draw(st.integers(1, 4))):
            n = data.draw(st.sampled_from(defined))
            v = field_value(data.draw, spec, n)
            m = m.set(n, v)
            expected[n] = v
            assert m == Message(m.mti, expected)
            assert list(m) == sorted(expected) and m.fields() == dict(sorted(expected.items()))
        want = outcome(lambda m=m: spec.encode(fresh(m)))
        for _ in range(4):
            assert outcome(lambda m=m: spec.encode(m)) == want
