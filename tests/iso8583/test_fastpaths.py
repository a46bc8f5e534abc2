"""The fast paths of Message give what the plain, slow ways of computing the same thing give.

Each fast path is checked against a reference written the straightforward way (the code the fast
path replaced): ``reply()`` of a decoded message (wire spans carried over, not decoded) against
decoding every echo field and building a new message; ``set()``, ``set_many()`` and ``get()``
against a message built from the expected fields; the generated re-encoding of a
changed decoded message against a fresh encode; ``to_json`` (with and without redaction),
``to_masked_dict`` and ``tlv`` (remembered per message, JSON written by hand) against the
document through ``json.dumps``, ``mask_value`` per field and ``parse_tlv``.

Inputs tried: every built-in and differential spec (ASCII, BCD, EBCDIC, binary, exotic length
prefixes), random field sets with primary, secondary and tertiary bitmaps, random echo sets in
random order (duplicates, absent and invalid numbers), changes made before and after the reply,
corrupted wire bytes (bad values in echo fields and elsewhere); for JSON and masking: any unicode
text (quotes, backslashes, control characters), binary values and headers, DE 55 as valid TLV
with 5A/57 at top level and nested, as garbage, as mutated TLV, as hex text (upper, lower, odd,
spaced), messages rebuilt from redacted JSON, built and decoded messages.
"""

from __future__ import annotations

import binascii
import contextlib
import json
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
    Iso8583Error,
    Message,
    Spec,
)
from isopace.iso8583.masking import mask_value
from isopace.iso8583.message import REDACTED_FIELDS, response_mti
from isopace.iso8583.tlv import build_tlv, parse_tlv

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
def test_set_and_get_equal_building_the_fields(
    case: tuple[Spec, Message], data: st.DataObject
) -> None:
    spec, built = case
    defined = [n for n in range(2, 129) if n != 65 and spec.field(n) is not None]
    for m in (built, spec.decode(spec.encode(built))):
        expected = dict(m.fields())
        for _ in range(data.draw(st.integers(1, 4))):
            n = data.draw(st.sampled_from(defined))
            v = field_value(data.draw, spec, n)
            if data.draw(st.booleans()):
                m = m.set(n, v)
                expected[n] = v
            else:  # set_many, with fields present and absent
                more = {
                    k: field_value(data.draw, spec, k)
                    for k in data.draw(st.sets(st.sampled_from(defined), max_size=3))
                }
                m = m.set_many({n: v, **more})
                expected.update({n: v, **more})
            assert m == Message(m.mti, expected)
            for k in range(0, 194):
                assert m.get(k) == expected.get(k) and (k in m) == (k in expected)
            assert list(m) == sorted(expected) and m.fields() == dict(sorted(expected.items()))
        want = outcome(lambda m=m: spec.encode(fresh(m)))
        for _ in range(4):
            assert outcome(lambda m=m: spec.encode(m)) == want


# --- JSON, masked dict, TLV: built once per message, by hand ------------------------------------


def slow_to_json(m: Message, redact: bool = False) -> str:
    """to_json the plain way: a document through json.dumps."""
    fields: dict[str, Any] = {}
    redacted = set(m.redacted)
    for n, v in m.fields().items():
        if redact and n in REDACTED_FIELDS:
            redacted.add(n)
            continue
        if redact and n == 55:
            try:
                raw = v if isinstance(v, bytes) else binascii.a2b_hex(v)
                t = parse_tlv(raw)
                if any(t.find_all(tag) for tag in ("5A", "57")):
                    out = t.remove("5A", "57", deep=True).build()
                    v = out if isinstance(v, bytes) else out.hex().upper()
            except (Iso8583Error, ValueError):
                redacted.add(n)
                continue
        fields[str(n)] = {"hex": v.hex().upper()} if isinstance(v, bytes) else v
    doc: dict[str, Any] = {"mti": m.mti, "fields": fields}
    if m.header is not None:
        h = m.header
        doc["header"] = {"hex": h.hex().upper()} if isinstance(h, bytes) else h
    if redacted:
        doc["redacted"] = sorted(redacted)
    return json.dumps(doc, separators=(",", ":"))


def slow_to_masked_dict(m: Message) -> dict[str, str]:
    out = {"mti": m.mti}
    for n, v in m.fields().items():
        out[str(n)] = mask_value(n, v)
    return out


tags = st.sampled_from(["5A", "57", "9F26", "9F27", "5F20", "9F6B", "82", "DF01"])
primitive = st.tuples(tags, st.binary(max_size=12))
tlv_items = st.lists(
    st.one_of(primitive, st.tuples(st.sampled_from(["70", "77", "BF0C"]), st.lists(primitive))),
    max_size=6,
)


@st.composite
def icc_values(draw: st.DrawFn) -> str | bytes:
    items = draw(tlv_items)
    data = build_tlv([(t, build_tlv(v) if isinstance(v, list) else v) for t, v in items])
    choice = draw(st.sampled_from(["tlv", "garbage", "mutated"]))
    if choice == "garbage":
        data = draw(st.binary(max_size=20))
    elif choice == "mutated" and data:
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1 :]
    if draw(st.booleans()):
        text = data.hex()
        return draw(st.sampled_from([text, text.upper(), text + "Z", " ".join(text)]))
    return data


texts = st.text(max_size=20)  # any unicode: quotes, backslashes, controls, surrogates-free


@st.composite
def json_messages(draw: st.DrawFn) -> Message:
    fields: dict[int, str | bytes] = {}
    for n in draw(st.lists(st.integers(2, 128).filter(lambda n: n != 65), max_size=10)):
        fields[n] = draw(st.one_of(texts, st.binary(max_size=10)))
    if draw(st.booleans()):
        fields[55] = draw(icc_values())
    for n, v in draw(st.dictionaries(st.sampled_from([2, 35, 36, 45, 52]), texts)).items():
        fields[n] = v
    header = draw(st.one_of(st.none(), texts, st.binary(max_size=4)))
    m = Message(draw(st.sampled_from(["0200", "0210", 'é"\\'])), fields, header=header)
    if draw(st.booleans()):  # a message rebuilt from redacted JSON: ``redacted`` is set
        m = Message.from_json(slow_to_json(m, redact=True))
        if draw(st.booleans()):
            m = m.set(2, "4761739001010010")
    return m


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_messages(), st.data())
def test_json_masked_and_tlv_equal_the_slow_ways(m: Message, data: st.DataObject) -> None:
    if data.draw(st.booleans()):  # decoded from the wire, when the spec takes it
        with contextlib.suppress(Iso8583Error):
            m = ISO87_ASCII.decode(ISO87_ASCII.encode(m))
    check_json_and_masking(m, data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    requests(),
    # DE 55 holds at most 255 bytes (510 hex characters in ISO87_ASCII)
    st.one_of(st.none(), icc_values().filter(lambda v: isinstance(v, bytes) and len(v) <= 255)),
    st.data(),
)
def test_json_of_decoded_messages_equal_the_slow_ways(
    case: tuple[Spec, Message], icc: bytes | None, data: st.DataObject
) -> None:
    spec, m = case
    if icc is not None and spec is ISO87_ASCII:
        m = m.set(55, icc)
    decoded = spec.decode(spec.encode(m))
    if data.draw(st.booleans()):
        decoded = decoded.reply().set(39, "00")
    check_json_and_masking(decoded, data)


def check_json_and_masking(m: Message, data: st.DataObject) -> None:
    if data.draw(st.booleans()):
        outcome(lambda: m.tlv(55))  # parsed (and remembered) before the rest
    for _ in range(2):  # the second time from the memo
        for redact in (False, True):
            assert outcome(lambda redact=redact: m.to_json(redact)) == outcome(
                lambda redact=redact: slow_to_json(m, redact)
            )
        want = outcome(lambda: slow_to_masked_dict(m))
        got = outcome(m.to_masked_dict)
        assert got == want
        if got[0] == "ok":
            got[1]["mti"] = "changed"  # the caller's copy: the next call is unaffected
        assert outcome(lambda: m.tlv(55)) == outcome(lambda: parse_tlv(m.bytes(55)))
    back = Message.from_json(m.to_json())
    assert back == m and back.redacted == m.redacted


def test_json_memo_is_per_message() -> None:
    m = Message("0200", {**AUTH, 52: PIN, 55: ICC})
    text = m.to_json(redact=True)
    assert m.to_json(redact=True) is text
    assert m.to_json() != text
    changed = m.set(41, "TERM0002")
    assert '"41":"TERM0002"' in changed.to_json(redact=True)
    assert changed.tlv(55) == m.tlv(55) and m.tlv(55) is m.tlv(55)
    assert "<55:" in Message("0200", {55: b"\x9f"}).to_masked_dict()["55"]
