"""BER-TLV (EMV DE 55): parsing, building, round trips and every kind of malformed input.

Malformed inputs tried: truncated 2- and 3-byte tags, a 4-byte tag, a missing length byte,
truncated long-form lengths (0x81/0x82/0x83), indefinite (0x80) and 0x84+ length forms, a length
running past the data (top level and inside a constructed tag), nesting past MAX_DEPTH; on build:
bad hex, odd/empty/too long tags, inconsistent multi-byte tags, tag 00, non-str tags, wrong value
types, primitive tags given children, constructed tags given invalid bytes, values over 0xFFFFFF,
items that are not pairs; plus random and mutated bytes (hypothesis).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from isopace.iso8583.errors import DecodeError, EncodeError, Iso8583Error
from isopace.iso8583.tlv import (
    MAX_DEPTH,
    TLV,
    TlvBuildError,
    TlvError,
    build_tlv,
    is_constructed,
    parse_tlv,
)

H = bytes.fromhex

# A realistic ARQC DE 55 (Visa-like), with a constructed template and a 3-byte tag.
ARQC_ITEMS: list[tuple[str, Any]] = [
    ("9F26", H("1B3CF0A8C4D5E6F7")),
    ("9F27", H("80")),
    ("9F10", H("06010A03A0A000")),
    ("9F37", H("1A2B3C4D")),
    ("9F36", H("0042")),
    ("95", H("0000008000")),
    ("9A", H("261129")),
    ("9C", H("00")),
    ("9F02", H("000000002500")),
    ("5F2A", H("0978")),
    ("82", H("3900")),
    ("9F1A", H("0250")),
    ("5A", H("4761739001010010")),
    ("5F34", H("01")),
    ("70", [("57", H("4761739001010010D25122010123456789")), ("5F20", b"DOE/JOHN")]),
    ("DF8101", H("01")),
]


def arqc() -> bytes:
    return build_tlv(ARQC_ITEMS)


# ------------------------------------------------------------------------------------ parsing


def test_parse_simple_primitive_tags() -> None:
    t = parse_tlv(H("9F2608") + H("0123456789ABCDEF") + H("820239009C0100"))
    assert dict(t) == {"9F26": H("0123456789ABCDEF"), "82": H("3900"), "9C": H("00")}
    assert list(t) == ["9F26", "82", "9C"]
    assert len(t) == 3
    assert t["9F26"] == H("0123456789ABCDEF")
    assert "82" in t and "9F27" not in t


def test_lookup_is_case_insensitive_and_keys_uppercase() -> None:
    t = parse_tlv(H("9f2701805f2a020978"))
    assert list(t) == ["9F27", "5F2A"]
    assert t["9f27"] == H("80") and "5f2a" in t
    assert t.get("5f2a") == H("0978")
    with pytest.raises(KeyError):
        t["9F28"]
    assert (42 in t) is False  # type: ignore[comparison-overlap]  # non-str keys: absent


def test_empty_input_and_empty_values() -> None:
    assert len(parse_tlv(b"")) == 0
    assert parse_tlv(b"").build() == b""
    t = parse_tlv(H("9F0300") + H("7000"))
    assert t["9F03"] == b""
    assert t["70"] == b"" and len(t.children("70")) == 0


def test_accepts_bytearray_and_memoryview() -> None:
    data = arqc()
    assert parse_tlv(bytearray(data)) == parse_tlv(data)
    assert parse_tlv(memoryview(data)) == parse_tlv(data)


def test_multi_byte_tags_two_and_three_bytes() -> None:
    t = parse_tlv(H("5F340101") + H("9F8101020AAB") + H("DF7F0101") + H("BF0C03") + H("9F0100"))
    assert list(t) == ["5F34", "9F8101", "DF7F", "BF0C"]
    assert t["9F8101"] == H("0AAB")
    assert t.children("BF0C")["9F01"] == b""


@pytest.mark.parametrize(
    ("length", "header"),
    [
        (0, "00"),
        (1, "01"),
        (127, "7F"),
        (128, "8180"),
        (255, "81FF"),
        (256, "820100"),
        (65535, "82FFFF"),
        (65536, "83010000"),
        (70000, "83011170"),
    ],
)
def test_lengths_minimal_on_build_and_parsed_back(length: int, header: str) -> None:
    value = bytes(range(256)) * (length // 256) + bytes(range(length % 256))
    encoded = build_tlv({"C1": value})
    assert encoded == H("C1" + header) + value
    assert parse_tlv(encoded)["C1"] == value


def test_non_minimal_long_form_lengths_are_accepted() -> None:
    t = parse_tlv(H("9F260108") + H("C1820002ABCD") + H("C283000001EE"))
    assert t["9F26"] == H("08")
    assert t["C1"] == H("ABCD") and t["C2"] == H("EE")
    # build() is canonical: minimal lengths
    assert t.build() == H("9F260108C102ABCDC201EE")


def test_nested_constructed_tags_parsed_recursively() -> None:
    data = arqc()
    t = parse_tlv(data)
    assert t.is_constructed("70") and not t.is_constructed("5A")
    inner = t.children("70")
    assert isinstance(inner, TLV)
    assert inner["57"] == H("4761739001010010D25122010123456789")
    assert inner["5F20"] == b"DOE/JOHN"
    # the mapping value of a constructed tag is its encoded content
    assert t["70"] == inner.build()
    assert "57" not in t  # only top-level tags in the mapping view


def test_deep_nesting_and_find_depth_first() -> None:
    items = [
        ("9F02", H("01")),
        ("E1", [("E2", [("9F02", H("02")), ("5A", H("11"))]), ("5A", H("22"))]),
        ("5A", H("33")),
    ]
    t = parse_tlv(build_tlv(items))
    assert t.find("9F02") == H("01")
    assert t.find("5A") == H(
        "11"
    )  # depth-first, wire order: inside E1/E2 comes before top-level 5A
    assert t.find_all("5a") == [H("11"), H("22"), H("33")]
    assert t.find_all("9F02") == [H("01"), H("02")]
    assert t.find("9F99") is None
    assert t.find("9F99", b"x") == b"x"
    assert t.children("E1").children("E2")["9F02"] == H("02")
    assert t.find("E2") == t.children("E1")["E2"]


def test_children_errors() -> None:
    t = parse_tlv(arqc())
    with pytest.raises(KeyError):
        t.children("77")
    with pytest.raises(ValueError, match="primitive"):
        t.children("9F26")


def test_padding_zero_bytes_skipped() -> None:
    t = parse_tlv(H("00009F2701800000") + H("700600820239000000"))
    assert t.items_in_order() == (("9F27", H("80")), ("70", H("008202390000")))
    assert t.children("70")["82"] == H("3900")
    assert t.build() == H("9F270180") + H("7004") + H("82023900")


def test_duplicates_keep_first_in_mapping_all_in_order() -> None:
    data = H("9F360200019F2701809F36020002")
    t = parse_tlv(data)
    assert t["9F36"] == H("0001")
    assert len(t) == 2
    assert t.items_in_order() == (
        ("9F36", H("0001")),
        ("9F27", H("80")),
        ("9F36", H("0002")),
    )
    assert t.build() == data
    assert t.find_all("9F36") == [H("0001"), H("0002")]


def test_objects_exposes_children() -> None:
    t = parse_tlv(arqc())
    objs = t.objects()
    assert [tag for tag, _, _ in objs] == [tag for tag, _ in ARQC_ITEMS]
    for tag, value, child in objs:
        assert (child is not None) == is_constructed(tag)
        if child is not None:
            assert child.build() == value


def test_is_constructed_helper() -> None:
    assert is_constructed("70") and is_constructed("BF0C") and is_constructed("E1")
    assert not is_constructed("9F26") and not is_constructed("5A")
    assert not is_constructed("zz")


# ------------------------------------------------------------------------- building, round trip


def test_round_trip_realistic_arqc() -> None:
    data = arqc()
    t = parse_tlv(data)
    assert t.build() == data
    assert bytes(t) == data
    assert build_tlv(t) == data
    assert TLV(ARQC_ITEMS) == t
    assert [tag for tag, _ in t.items_in_order()] == [tag for tag, _ in ARQC_ITEMS]


def test_build_accepts_mapping_sequences_and_tlv_values() -> None:
    inner = TLV({"57": H("4761739001010010D25122"), "5F20": b"DOE/JOHN"})
    by_tlv = build_tlv({"9F27": H("80"), "70": inner})
    by_map = build_tlv(
        {"9F27": H("80"), "70": {"57": H("4761739001010010D25122"), "5F20": b"DOE/JOHN"}}
    )
    by_pairs = build_tlv(
        [("9F27", H("80")), ("70", (("57", H("4761739001010010D25122")), ("5F20", b"DOE/JOHN")))]
    )
    by_bytes = build_tlv([("9F27", bytearray(H("80"))), ("70", inner.build())])
    by_lower = build_tlv(
        {
            "9f27": memoryview(H("80")),
            "70": {"57": H("4761739001010010D25122"), "5f20": b"DOE/JOHN"},
        }
    )
    assert by_tlv == by_map == by_pairs == by_bytes == by_lower
    assert parse_tlv(by_map).children("70") == inner


def test_constructed_value_given_as_bytes_is_parsed() -> None:
    t = TLV({"70": H("82023900")})
    assert t.children("70")["82"] == H("3900")


def test_tlv_is_immutable_and_hashable() -> None:
    t = parse_tlv(arqc())
    with pytest.raises(TypeError):
        t["9F26"] = b"x"  # type: ignore[index]
    with pytest.raises(AttributeError):
        t.foo = 1  # type: ignore[attr-defined]
    assert hash(t) == hash(parse_tlv(arqc()))
    assert {t: 1}[parse_tlv(arqc())] == 1


def test_equality_semantics() -> None:
    a = parse_tlv(H("9F270180820239 00".replace(" ", "")))
    b = TLV([("9F27", H("80")), ("82", H("3900"))])
    c = TLV([("82", H("3900")), ("9F27", H("80"))])
    assert a == b
    assert a != c  # order matters between TLVs (it changes the encoding)
    assert a == {"9F27": H("80"), "82": H("3900")} == c  # against a plain mapping: as a dict
    assert a != 5
    # padding and non-minimal lengths do not matter: same objects
    assert parse_tlv(H("00" + "708105" + "0082023900")) == parse_tlv(H("700482023900"))


def test_set_and_remove_return_new_tlv() -> None:
    t = parse_tlv(H("9F360200019F2701809F36020002"))
    t2 = t.set("9f36", H("0003"))
    assert t2.items_in_order() == (("9F36", H("0003")), ("9F27", H("80")))
    t3 = t.set("8A", b"00")
    assert t3.items_in_order()[-1] == ("8A", b"00")
    t4 = t.remove("9F36", "99")
    assert t4.items_in_order() == (("9F27", H("80")),)
    assert t.remove("9F99") is t  # nothing to remove: the same object
    nested = TLV([("5A", H("11")), ("70", [("57", H("22")), ("E1", [("5A", H("33"))])])])
    shallow = nested.remove("5A", "57")
    assert shallow.find_all("5A") == [H("33")] and shallow.find("57") == H("22")
    deep = nested.remove("5a", "57", deep=True)
    assert deep.find("5A") is None and deep.find("57") is None
    assert deep.build() == H("7002E100")
    assert parse_tlv(deep.build()) == deep
    t5 = t.set("70", {"91": H("0102030405060708")})
    assert t5.children("70")["91"] == H("0102030405060708")
    assert t["9F36"] == H("0001")  # original untouched
    with pytest.raises(TlvBuildError):
        t.set("9F36", "0003")


# -------------------------------------------------------------------------- malformed: parsing


@pytest.mark.parametrize(
    ("hexdata", "offset", "tag", "fragment"),
    [
        ("9F", 0, "9F", "truncated tag"),
        ("9F2701809F", 4, "9F", "truncated tag"),
        ("DF81", 0, "DF81", "truncated tag"),
        ("9F818101", 0, "9F8181", "tag longer than 3 bytes"),
        ("82", 1, "82", "truncated length (no length byte)"),
        ("9F26", 2, "9F26", "truncated length (no length byte)"),
        ("9F8101", 3, "9F8101", "truncated length (no length byte)"),
        ("9F2681", 2, "9F26", "truncated length (1 length bytes, 0 left)"),
        ("9F268201", 2, "9F26", "truncated length (2 length bytes, 1 left)"),
        ("9F26830000", 2, "9F26", "truncated length (3 length bytes, 2 left)"),
        ("9F2680", 2, "9F26", "unsupported length byte 0x80"),
        ("9F268401000000", 2, "9F26", "unsupported length byte 0x84"),
        ("9F26FF", 2, "9F26", "unsupported length byte 0xFF"),
        ("9F26080102", 2, "9F26", "length 8 exceeds the 2 bytes left"),
        ("9F2681FF00", 2, "9F26", "length 255 exceeds the 1 bytes left"),
        ("9F27018070045A05112233", 7, "5A", "length 5 exceeds the 2 bytes left"),
        ("7003" + "9F26" + "01" + "AA", 4, "9F26", "length 1 exceeds the 0 bytes left"),
        ("70019F", 2, "9F", "truncated tag"),
        ("E1" + "03" + "E2" + "01" + "9F", 4, "9F", "truncated tag"),
    ],
)
def test_malformed_input_names_tag_and_offset(
    hexdata: str, offset: int, tag: str, fragment: str
) -> None:
    with pytest.raises(TlvError) as info:
        parse_tlv(H(hexdata))
    err = info.value
    assert err.offset == offset
    assert err.tag == tag
    assert err.field == 55
    assert fragment in err.reason
    assert (
        str(err) == f"field 55: tag {tag}: {err.reason[len(f'tag {tag}: ') :]} at offset {offset}"
    )
    assert isinstance(err, DecodeError) and isinstance(err, ValueError)


def test_error_field_is_configurable() -> None:
    with pytest.raises(TlvError, match=r"^field 127\.25: tag 9F26: truncated length"):
        parse_tlv(H("9F26"), field="field 127.25")
    with pytest.raises(TlvError, match=r"^message: tag 9F"):
        parse_tlv(H("9F"), field=None)


def test_nesting_limit_raises_tlv_error_not_recursion_error() -> None:
    deep = b""
    for _ in range(MAX_DEPTH + 5):
        deep = bytes([0xE1, len(deep)]) + deep
    with pytest.raises(TlvError, match="nested deeper than"):
        parse_tlv(deep)
    with pytest.raises(TlvBuildError, match="nested deeper than"):
        build_tlv({"E1": deep})
    ok = b""
    for _ in range(MAX_DEPTH):
        ok = bytes([0xE1, len(ok)]) + ok
    assert len(parse_tlv(ok)) == 1


def test_huge_nesting_attack_is_cheap_and_safe() -> None:
    # 10k nested headers claiming everything that follows: still only MAX_DEPTH levels walked.
    data = b"".join(b"\xe1\x83" + (3 * (10000 - i)).to_bytes(3, "big") for i in range(1, 10001))
    with pytest.raises(TlvError):
        parse_tlv(data)


# ------------------------------------------------------------------------- malformed: building


@pytest.mark.parametrize(
    ("tag", "fragment"),
    [
        ("9G", "not 1-3 bytes of hex"),
        ("9F2", "not 1-3 bytes of hex"),
        ("", "not 1-3 bytes of hex"),
        ("9F818101", "not 1-3 bytes of hex"),
        (" 9F", "not 1-3 bytes of hex"),
        ("00", "padding"),
        ("1F", "announces a multi-byte tag"),
        ("9F", "announces a multi-byte tag"),
        ("5A01", "announces a one-byte tag"),
        ("9F81", "continuation bits"),
        ("9F0101", "continuation bits"),
        ("9F8181", "continuation bits"),
    ],
)
def test_build_rejects_bad_tags(tag: str, fragment: str) -> None:
    with pytest.raises(TlvBuildError, match=fragment) as info:
        build_tlv({tag: b"\x01"})
    err = info.value
    assert isinstance(err, TlvError) and isinstance(err, EncodeError)
    assert isinstance(err, Iso8583Error) and isinstance(err, ValueError)
    assert str(err).startswith("field 55: ")
    assert err.offset == 0


def test_build_rejects_wrong_items_and_values() -> None:
    with pytest.raises(TlvBuildError, match="hex string, not int"):
        build_tlv([(0x9F26, b"\x01")])  # type: ignore[list-item]
    with pytest.raises(TlvBuildError, match="value must be bytes, not str"):
        build_tlv({"9F26": "0123"})
    with pytest.raises(TlvBuildError, match="value must be bytes, not int"):
        build_tlv({"9F26": 5})
    with pytest.raises(TlvBuildError, match="primitive tag needs a bytes value"):
        build_tlv({"9F26": {"5A": b"\x01"}})
    with pytest.raises(TlvBuildError, match="tag 70: constructed value is not valid TLV"):
        build_tlv({"70": H("9F26")})
    with pytest.raises(TlvBuildError, match="pairs"):
        build_tlv([("9F26",)])  # type: ignore[list-item]
    with pytest.raises(TlvBuildError, match="pairs"):
        build_tlv(["9F26"])  # type: ignore[list-item]
    with pytest.raises(TlvBuildError, match="not str"):
        build_tlv("9F2601AA")  # type: ignore[arg-type]
    with pytest.raises(TlvBuildError, match="not bytes"):
        build_tlv(H("9F2601AA"))  # type: ignore[arg-type]
    with pytest.raises(TlvBuildError, match="not int"):
        build_tlv(7)  # type: ignore[arg-type]
    with pytest.raises(TlvBuildError):
        TLV({"9G": b""})


def test_build_rejects_self_referencing_nesting() -> None:
    loop: dict[str, Any] = {}
    loop["E1"] = loop
    with pytest.raises(TlvBuildError, match="nested deeper than"):
        build_tlv(loop)


def test_value_too_long() -> None:
    ok = bytes(0xFFFFFF)
    encoded = build_tlv({"C1": ok})
    assert encoded[:5] == H("C183FFFFFF")
    with pytest.raises(TlvBuildError, match=r"tag C1: value of 16777216 bytes exceeds"):
        build_tlv({"C1": bytes(0x1000000)})


# -------------------------------------------------------------------------------- repr masking


def test_repr_masks_card_data() -> None:
    t = parse_tlv(arqc())
    text = repr(t)
    assert text.startswith("TLV(9F26=1B3CF0A8C4D5E6F7 ")
    assert "4761739001010010" not in text
    assert "DOE/JOHN" not in text
    assert "5A=476173******0010" in text


# ---------------------------------------------------------------------------------- hypothesis


def _tag(first: int, rest: list[int]) -> str:
    return bytes([first, *rest]).hex().upper()


def tags(constructed: bool) -> st.SearchStrategy[str]:
    bit = 0x20 if constructed else 0x00
    one = st.integers(1, 0xFF).filter(lambda b: b & 0x1F != 0x1F and bool(b & 0x20) == constructed)
    first_multi = st.sampled_from([c | 0x1F | bit for c in (0x00, 0x40, 0x80, 0xC0)])
    two = st.tuples(first_multi, st.integers(0, 0x7F)).map(lambda p: _tag(p[0], [p[1]]))
    three = st.tuples(first_multi, st.integers(0x80, 0xFF), st.integers(0, 0x7F)).map(
        lambda p: _tag(p[0], [p[1], p[2]])
    )
    return st.one_of(one.map(lambda b: _tag(b, [])), two, three)


values = st.one_of(st.binary(max_size=20), st.binary(min_size=120, max_size=300))
primitive = st.tuples(tags(False), values)
Tree = list[tuple[str, Any]]
trees: st.SearchStrategy[Tree] = st.recursive(
    st.lists(primitive, max_size=6),
    lambda children: st.lists(
        st.one_of(primitive, st.tuples(tags(True), children)), min_size=1, max_size=5
    ),
    max_leaves=25,
)


def _expected(tree: Tree) -> list[tuple[str, bytes]]:
    return [(tag, v if isinstance(v, bytes) else build_tlv(v)) for tag, v in tree]


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees)
def test_hypothesis_build_parse_round_trip(tree: Tree) -> None:
    data = build_tlv(tree)
    t = parse_tlv(data)
    assert t.items_in_order() == tuple(_expected(tree))
    assert t.build() == data
    assert t == TLV(tree)
    first: dict[str, bytes] = {}
    for tag, value in _expected(tree):
        first.setdefault(tag, value)
    assert dict(t) == first
    for tag, value in tree:
        if not isinstance(value, bytes):
            assert t.children(tag) == parse_tlv(first[tag])


@settings(max_examples=6000, deadline=None)
@given(st.binary(max_size=200))
def test_hypothesis_random_bytes_only_raise_tlv_error(data: bytes) -> None:
    try:
        t = parse_tlv(data)
    except TlvError as err:
        assert 0 <= err.offset <= len(data)
        assert isinstance(err, DecodeError)
        return
    # whatever parsed re-encodes canonically and parses back to the same objects
    again = parse_tlv(t.build())
    assert again == t
    assert again.build() == t.build()
    repr(t)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees, st.data())
def test_hypothesis_mutated_encodings_only_raise_tlv_error(tree: Tree, data: st.DataObject) -> None:
    encoded = bytearray(build_tlv(tree))
    if encoded:
        for _ in range(data.draw(st.integers(1, 4))):
            kind = data.draw(st.sampled_from(["flip", "cut", "insert"]))
            pos = data.draw(st.integers(0, max(len(encoded) - 1, 0)))
            if kind == "flip" and encoded:
                encoded[pos] = data.draw(st.integers(0, 255))
            elif kind == "cut":
                del encoded[pos:]
            else:
                encoded[pos:pos] = data.draw(st.binary(min_size=1, max_size=3))
            if not encoded:
                break
    try:
        t = parse_tlv(bytes(encoded))
    except TlvError:
        return
    assert parse_tlv(t.build()) == t


def test_mapping_interface_is_a_real_mapping() -> None:
    t = parse_tlv(arqc())
    assert isinstance(t, Mapping)
    assert set(t.keys()) == {tag for tag, _ in ARQC_ITEMS}
    assert dict(t.items())["9F27"] == H("80")
