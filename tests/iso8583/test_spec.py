"""Spec: built-in specs, JSON, composites, validation, headers, caches, decode/encode errors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from isopace.iso8583 import (
    ISO87_ASCII,
    ISO87_BINARY,
    ISO87_EBCDIC,
    DecodeError,
    EncodeError,
    FieldDef,
    Iso8583Error,
    Message,
    Spec,
    iso87_ebcdic,
)
from isopace.iso8583.specs import DE43

from .conftest import AUTH, PAN, PIN

BUILTIN = [ISO87_ASCII, ISO87_BINARY, ISO87_EBCDIC, iso87_ebcdic("cp1047")]


def _full(spec: Spec) -> Message:
    return Message(
        "0200",
        {
            **AUTH,
            52: PIN,
            55: bytes.fromhex("9F2608AABBCCDDEEFF0011"),
            70: "301",
            90: "0" * 42,
            128: bytes(8),
            130: "tertiary",
            192: "last [field] ^",
        },
    )


@pytest.mark.parametrize("spec", BUILTIN, ids=lambda s: s.name)
def test_builtin_round_trip(spec: Spec) -> None:
    for m in (
        Message("0800", {7: "1129204455", 11: "000001", 70: "301"}),
        Message("0200", AUTH),
        _full(spec),
    ):
        wire = spec.encode(m)
        back = spec.decode(wire)
        assert back == m and back.fields() == m.fields()
        assert spec.encode(back) is wire
        assert spec.decode(spec.encode(back.set(39, "00"))) == m.set(39, "00")


def test_wire_formats() -> None:
    m = Message("0200", {3: "000000", 22: "051", 2: "4761739001010010111"})
    assert ISO87_ASCII.encode(m).startswith(b"0200" + b"6000040000000000" + b"19")
    b = ISO87_BINARY.encode(m)
    assert b[:2] == b"\x02\x00" and b[2:10] == bytes.fromhex("6000040000000000")
    assert b[10:21] == bytes.fromhex("194761739001010010111F")  # LL BCD, odd PAN right-padded F
    assert b.endswith(bytes.fromhex("000000" + "0051"))  # n3 left-padded 0
    e = ISO87_EBCDIC.encode(m)
    assert e[:4] == "0200".encode("cp500")
    c1047 = iso87_ebcdic("cp1047").encode(Message("0200", {48: "[x]"}))
    assert c1047.endswith(bytes([0xF0, 0xF0, 0xF3, 0xAD, 0xA7, 0xBD]))


def test_secondary_and_tertiary_bitmaps() -> None:
    m = Message("0200", {3: "000000", 70: "301", 150: "x"})
    wire = ISO87_ASCII.encode(m)
    # primary has bit 1, secondary has bit 65 (tertiary follows)
    assert wire[4:20] == b"A000000000000000"
    assert wire[20:36] == b"8400000000000000"
    assert wire[36:52] == b"0000040000000000"
    assert ISO87_ASCII.decode(wire).fields() == {3: "000000", 70: "301", 150: "x"}
    only_secondary = ISO87_ASCII.encode(Message("0200", {70: "301"}))
    assert only_secondary[4:36] == b"8000000000000000" + b"0400000000000000"


def test_spec_json_round_trip() -> None:
    for spec in BUILTIN:
        again = Spec.from_json(spec.to_json())
        assert again == spec
        m = _full(spec)
        assert again.encode(m) == spec.encode(m)
        assert again.composite(43).parse(m[43]) == spec.composite(43).parse(m[43])
    bare = Spec.from_json(
        '{"t": {"data_enc": "ascii", "len_type": 0, "max_len": 4},'
        ' "p": {"data_enc": "b", "len_type": 0, "max_len": 8},'
        ' "2": {"data_enc": "ascii", "len_enc": "ascii", "len_type": 2, "max_len": 19}}'
    )
    assert bare.decode(bare.encode(Message("0100", {2: "123"})))[2] == "123"


@pytest.mark.parametrize(
    "bad",
    [
        "not json",
        "[]",
        '{"t": {"max_len": 4}}',  # no bitmap
        '{"p": {"max_len": 8}, "2": {"max_len": "x"}}',
        '{"p": {"max_len": 8}, "2": {"max_len": 3, "data_enc": "no-such-codec"}}',
        '{"p": {"max_len": 8}, "2": {"max_len": 3, "len_count": "words"}}',
        '{"p": {"max_len": 8}, "2": {"max_len": 3, "content": "q"}}',
    ],
)
def test_bad_spec(bad: str) -> None:
    with pytest.raises(Iso8583Error):
        Spec.from_json(bad)


def test_composites() -> None:
    value = DE43.build(name="ACME STORES", city="LONDON", country="GB")
    assert value == "ACME STORES              LONDON       GB"
    m = Message("0200", {43: value})
    assert m.composite(43) == {"name": "ACME STORES", "city": "LONDON", "country": "GB"}
    with pytest.raises(EncodeError):
        DE43.build(name="x" * 26)
    with pytest.raises(EncodeError):
        DE43.build(street="x")
    with pytest.raises(DecodeError):
        DE43.parse("short")
    de127 = ISO87_ASCII.composite(127)
    inner = de127.build({2: "SWITCHKEY01", 3: "R" * 48, 20: "20261129"})
    m = ISO87_ASCII.decode(ISO87_ASCII.encode(Message("0200", {127: inner})))
    assert m.composite(127) == {2: "SWITCHKEY01", 3: "R" * 48, 20: "20261129"}
    with pytest.raises(DecodeError) as ei:
        de127.parse(inner[:-3])
    assert str(ei.value).startswith("field 127.20")
    with pytest.raises(EncodeError):
        de127.build({3: "short"})


def test_validation() -> None:
    good = Message("0200", {**AUTH})
    assert ISO87_ASCII.validate(good) == []
    bad = Message(
        "0290",
        {2: "4761739001010011", 3: "00000A", 4: "1", 39: "0!", 28: "X00000001", 52: "zz", 41: "T1"},
    )
    found = {(v.field, v.rule) for v in ISO87_ASCII.validate(bad)}
    assert (0, "mti") in found  # function 9
    assert (2, "luhn") in found
    assert (3, "content") in found
    assert (4, "length") in found
    assert (39, "content") in found
    assert (28, "content") in found
    assert (52, "type") in found
    assert (41, "length") in found
    v = ISO87_ASCII.validate(Message("0200", {3: "000000"}))
    assert {(x.field, x.rule) for x in v} == {
        (4, "required"),
        (11, "required"),
        (41, "required"),
        (2, "required"),
    }
    assert {x.field for x in ISO87_ASCII.validate(Message("0800", {}))} == {7, 11, 70}
    assert {x.field for x in ISO87_ASCII.validate(Message("0401", {3: "000000"}))} >= {90}
    assert ISO87_ASCII.validate(Message("x", {}))[0].rule == "mti"
    custom = Spec.from_pyiso8583(ISO87_ASCII.to_pyiso8583(), required={"0100": (41,)})
    assert [x.field for x in custom.validate(Message("0100", {}))] == [41]
    assert ISO87_BINARY.validate(Message("0200", {**AUTH, 35: "4761739001010010D2812"})) == []


def test_header() -> None:
    fields = {**ISO87_ASCII.to_pyiso8583()}
    fields["h"] = {"data_enc": "ascii", "len_enc": "ascii", "len_type": 0, "max_len": 6}
    spec = Spec.from_pyiso8583(fields)
    m = Message("0800", {70: "301"}, header="ISO026")
    wire = spec.encode(m)
    assert wire.startswith(b"ISO0260800")
    back = spec.decode(wire)
    assert back.header == "ISO026" and back == m
    assert spec.encode(back.with_header("ISO027")).startswith(b"ISO0270800")
    with pytest.raises(EncodeError):
        spec.encode(Message("0800", {70: "301"}))
    with pytest.raises(DecodeError):
        spec.decode(b"ISO")


@pytest.mark.parametrize("decode", ["decode", "decode_partial"])
def test_a_header_that_does_not_decode_is_named_header(decode: str) -> None:
    fields = {**ISO87_ASCII.to_pyiso8583()}
    fields["h"] = {"data_enc": "ascii", "len_enc": "ascii", "len_type": 0, "max_len": 4}
    spec = Spec.from_pyiso8583(fields)
    with pytest.raises(DecodeError) as caught:
        getattr(spec, decode)(b"\xffISO0800" + b"0" * 16)
    assert caught.value.field == "header"
    assert str(caught.value) == "header: invalid ascii data at offset 0"


def test_encode_errors() -> None:
    cases = [
        (Message("0200", {3: "1234567"}), 3),  # fixed length
        (Message("0200", {2: "1" * 20}), 2),  # max
        (Message("0200", {2: b"\x01"}), 2),  # type
        (Message("0200", {52: "not hex"}), 52),
        (Message("020", {}), 0),  # MTI length
        (Message("0200", {3: "00000é"}), 3),  # not ascii
    ]
    for m, field in cases:
        with pytest.raises(EncodeError) as ei:
            ISO87_ASCII.encode(m)
        assert ei.value.field == field, (m, ei.value)
    with pytest.raises(EncodeError):
        ISO87_BINARY.encode(Message("0200", {3: "12345X"}))
    undefined = Spec({"t": FieldDef(4), "p": FieldDef(8, data_enc="b"), "2": FieldDef(4)})
    with pytest.raises(EncodeError) as ei:
        undefined.encode(Message("0200", {3: "000000"}))
    assert ei.value.field == 3


@pytest.mark.parametrize(
    ("wire", "field", "offset"),
    [
        (b"", 0, 0),
        (b"02", 0, 0),
        (b"0200", "bitmap", 4),  # no bitmap
        (b"0200XX00000000000000", "bitmap", 4),  # not hex
        (b"02004000000000000000", 2, 20),  # DE 2 missing
        (b"020040000000000000001", 2, 20),  # length prefix cut
        (b"02004000000000000000AB", 2, 20),  # non-numeric length
        (b"0200400000000000000019123", 2, 22),  # data cut
        (b"02004000000000000000031234", 2, 25),  # extra data
        (b"02008000000000000000", 1, 20),  # secondary bitmap (DE 1) missing
        (b"02008000000000000000XX00000000000000", 1, 20),  # secondary bitmap not hex
        (b"0200" + b"8000000000000000" * 2, 65, 36),  # tertiary bitmap (DE 65) missing
    ],
)
def test_decode_errors(wire: bytes, field: int | str | None, offset: int) -> None:
    with pytest.raises(DecodeError) as ei:
        ISO87_ASCII.decode(wire)
    assert (ei.value.field, ei.value.offset) == (field, offset), str(ei.value)
    if field in ("bitmap", 1, 65):  # names the bitmap, not the message as a whole
        assert not str(ei.value).startswith("message")


def test_encode_error_offsets() -> None:
    # offset: where the field would have started in the output (MTI 4 + bitmap 16 + DE 2 18)
    bad = Message("0200", {2: "4761739001010010", 3: "1234567", 4: "000000002500"})
    good = bad.set(3, "000000")
    for _ in range(5):  # the first encodes and the generated encoder report the same
        assert ISO87_ASCII.encode(good)
        with pytest.raises(EncodeError) as ei:
            ISO87_ASCII.encode(bad)
        assert (ei.value.field, ei.value.offset) == (3, 38)
        assert str(ei.value).endswith(" at offset 38")
    wire = ISO87_ASCII.encode(good)
    for _ in range(5):  # re-encoding a decoded message with a changed field (patch path)
        changed = ISO87_ASCII.decode(wire).set(3, "1234567")
        with pytest.raises(EncodeError) as ei:
            ISO87_ASCII.encode(changed)
        assert (ei.value.field, ei.value.offset) == (3, 38)
        assert ISO87_ASCII.encode(ISO87_ASCII.decode(wire).set(3, "111111"))
    with pytest.raises(EncodeError) as ei:
        ISO87_ASCII.encode(Message("020", {}))
    assert (ei.value.field, ei.value.offset) == (0, 0)
    undefined = Spec({"t": FieldDef(4), "p": FieldDef(8, data_enc="b"), "2": FieldDef(4)})
    with pytest.raises(EncodeError) as ei:
        undefined.encode(Message("0200", {3: "000000"}))
    assert ei.value.offset is None and str(ei.value) == "field 3: field is not defined in the spec"
    assert EncodeError(2, "x").offset is None and str(EncodeError(2, "x")) == "field 2: x"


def test_decode_value_errors_are_lazy_decode_errors() -> None:
    m = ISO87_ASCII.decode(b"02000000000000001000" + b"ZZ" * 8)  # DE 52 is not hex
    with pytest.raises(DecodeError) as ei:
        m[52]
    assert ei.value.field == 52 and ei.value.offset == 20
    m = ISO87_ASCII.decode(b"02002000000000000000" + b"00000\xff")  # DE 3 not ascii
    with pytest.raises(DecodeError):
        m.fields()
    assert "<undecodable>" in repr(m)
    with pytest.raises(TypeError):
        ISO87_ASCII.decode("0200")  # type: ignore[arg-type]
    undefined = Spec({"t": FieldDef(4), "p": FieldDef(8, data_enc="b"), "2": FieldDef(4)})
    with pytest.raises(DecodeError) as ei2:
        undefined.decode(b"0200" + bytes.fromhex("2000000000000000") + b"123456")
    assert ei2.value.field == 3


def test_layout_cache_is_bounded_and_generated_code_agrees() -> None:
    spec = Spec.from_pyiso8583(ISO87_ASCII.to_pyiso8583(), layout_cache_size=16)
    wires = []
    for i in range(2, 60):
        m = Message("0200", {3: "000000", 11: f"{i:06d}", i if i not in (3, 11) else 60: "1" * 1})
        try:
            wires.append((spec.encode(m), m))
        except EncodeError:
            continue
    for _ in range(3):  # generic, then generated locators
        for wire, m in wires:
            assert spec.decode(wire) == m
    assert len(spec._format.layouts) <= 16


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(AUTH)), st.just(""), max_size=8), st.data())
def test_generated_and_generic_encoders_agree(drop: dict[int, str], data: st.DataObject) -> None:
    m = Message("0200", {n: v for n, v in AUTH.items() if n not in drop})
    first = ISO87_ASCII.encode(m)
    for _ in range(3):
        assert ISO87_ASCII.encode(Message("0200", m.fields())) == first
    assert PAN not in str(m)
