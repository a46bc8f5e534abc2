"""`spec.validate`'s ``tlv`` and ``date`` rules, `date_time_problem`, `mti_problems` and
`spec.decode_mti`, with a fuzz of each: whatever the input, the documented answer (a violation,
a text, a `DecodeError`), never another exception.

Inputs tried: DE 55 with a length that runs past its data, a truncated tag, a constructed tag
whose content is bad, an odd number of hex characters on the wire, random bytes; DE 7 / 12 / 13
with month 00, 13, 99, day 00, 31 April, 30 February, hour 24 / 25, minute 60, second 60, and
the edges that are real (29 February, 31 December, 23:59:59, 00:00:00); random text; MTIs of
every shape; frames of random bytes for every built-in spec.
"""

from __future__ import annotations

from datetime import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from isopace.iso8583 import (
    ISO87_ASCII,
    ISO87_BINARY,
    ISO87_EBCDIC,
    DecodeError,
    Message,
    Spec,
    date_time_problem,
    mti_problems,
)
from isopace.iso8583.validation import DATE_TIME_FIELDS

from .conftest import AUTH, ICC

SPEC = ISO87_ASCII


def rules(m: Message, field: int) -> list[tuple[str, str]]:
    return [(v.rule, v.message) for v in SPEC.validate(m) if v.field == field]


def test_well_formed_de55_and_dates_break_no_rule() -> None:
    m = Message("0200", {**AUTH, 55: ICC})
    assert SPEC.validate(m) == []
    assert SPEC.validate(SPEC.decode(SPEC.encode(m))) == []


@pytest.mark.parametrize(
    ("data", "expect"),
    [
        (bytes.fromhex("9F260A0102"), "length 10 exceeds"),  # runs past the data
        (bytes.fromhex("9F"), "9F"),  # the tag is cut short
        (bytes.fromhex("9F2602AA"), "exceeds"),
        (bytes.fromhex("70039F2605AA"), "9F26"),  # a constructed tag's content is bad
        (bytes.fromhex("5A84000000010"[:12]), "5A"),  # a length form EMV does not allow
    ],
)
def test_de55_not_ber_tlv_breaks_the_tlv_rule(data: bytes, expect: str) -> None:
    found = rules(Message("0200", {**AUTH, 55: data}), 55)
    assert [rule for rule, _ in found] == ["tlv"]
    assert "field 55" in found[0][1] and "BER-TLV" in found[0][1] and expect in found[0][1]


def test_de55_odd_hex_on_the_wire_is_reported_not_raised() -> None:
    raw = SPEC.encode(Message("0200", {**AUTH, 55: bytes.fromhex("9F2602AAAA")}))
    i = raw.index(b"9F2602AAAA")
    m = SPEC.decode(raw[: i - 3] + b"009" + b"9F2602AAA" + raw[i + 10 :])
    found = rules(m, 55)
    assert found and "field 55" in found[0][1]


@pytest.mark.parametrize(
    ("field", "value", "unit"),
    [
        (7, "0029101010", "month 00"),
        (7, "1329101010", "month 13"),
        (7, "9999999999", "month 99"),
        (7, "1100101010", "day 00"),
        (7, "0431101010", "day 31"),
        (7, "0230101010", "day 30"),
        (7, "1129241010", "hour 24"),
        (7, "1129106010", "minute 60"),
        (7, "1129101060", "second 60"),
        (12, "250000", "hour 25"),
        (12, "006000", "minute 60"),
        (12, "000060", "second 60"),
        (13, "1301", "month 13"),
        (13, "0230", "day 30"),
        (13, "1232", "day 32"),
    ],
)
def test_date_time_that_is_not_real_breaks_the_date_rule(field: int, value: str, unit: str) -> None:
    found = rules(Message("0200", {**AUTH, field: value}), field)
    assert [rule for rule, _ in found] == ["date"]
    assert found[0][1].startswith(f"field {field}: {unit} is not")


@pytest.mark.parametrize(
    "fields",
    [
        {7: "0229235959", 12: "235959", 13: "0229"},
        {7: "1231000000", 12: "000000", 13: "1231"},
        {7: "0101000000", 12: "120000", 13: "0101"},
    ],
)
def test_real_dates_and_times_break_no_rule(fields: dict[int, str]) -> None:
    assert SPEC.validate(Message("0200", {**AUTH, **fields})) == []


def test_date_rule_leaves_other_shapes_to_the_length_and_content_rules() -> None:
    found = rules(Message("0200", {**AUTH, 7: "99AB999999"}), 7)
    assert [rule for rule, _ in found] == ["content"]
    found = rules(Message("0200", {**AUTH, 13: "99"}), 13)
    assert [rule for rule, _ in found] == ["length"]


def test_date_rule_applies_to_iso8583_1987_messages_only() -> None:
    # version 1 (1993) gives DE 12 / 13 other layouts: the 1987 ones are not imposed on it
    assert rules(Message("1200", {**AUTH, 13: "2612"}), 13) == []
    assert [r for r, _ in rules(Message("0200", {**AUTH, 13: "2612"}), 13)] == ["date"]


def test_date_time_problem() -> None:
    assert date_time_problem("0229", "MMDD") is None
    assert date_time_problem("240229", "YYMMDD") is None  # 2024 is a leap year
    assert date_time_problem("250229", "YYMMDD") == "day 29 is not 01..28 (YYMMDD)"
    assert date_time_problem("12x4", "MMDD") == "not 4 digits (MMDD)"
    assert date_time_problem("١٢٠١", "MMDD") == "not 4 digits (MMDD)"  # digits, not ASCII
    assert date_time_problem("123", "MMDD") == "not 4 digits (MMDD)"
    with pytest.raises(ValueError, match="unknown unit"):
        date_time_problem("1234", "MMXX")


def test_mti_problems() -> None:
    assert mti_problems("0200") == []
    assert mti_problems("ABCD") == ["MTI must be four digits"]
    assert mti_problems("9999") == [
        "MTI version 9 is not 0, 1 or 2",
        "MTI function 9 is not 0..5",
        "MTI origin 9 is not 0..5",
    ]
    assert mti_problems("0000") == ["MTI class 0 is reserved"]
    assert [v.message for v in SPEC.validate(Message("9999", AUTH)) if v.rule == "mti"] == (
        mti_problems("9999")
    )


@pytest.mark.parametrize("spec", [ISO87_ASCII, ISO87_BINARY, ISO87_EBCDIC])
def test_decode_mti_reads_what_decode_reads(spec: Spec) -> None:
    raw = spec.encode(Message("0200", AUTH))
    assert spec.decode_mti(raw) == spec.decode(raw).mti == "0200"
    assert spec.decode_mti(raw[:4]) == "0200"  # whatever follows
    with pytest.raises(DecodeError):
        spec.decode_mti(raw[:1])


def test_decode_mti_never_guesses_another_encoding() -> None:
    # HTTP text under the ASCII spec is the MTI "GET ", not BCD 4745
    assert ISO87_ASCII.decode_mti(b"GET / HTTP/1.1\r\n") == "GET "
    with pytest.raises(DecodeError):
        ISO87_ASCII.decode_mti(b"\xf0\xf2\xf0\xf0")  # EBCDIC digits are not ASCII text


# -- fuzz ------------------------------------------------------------------------------------


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=127))
def test_fuzz_de55_validation_reports_and_never_raises(data: bytes) -> None:
    m = Message("0200", {**AUTH, 55: data})
    violations = SPEC.validate(m)
    assert all(v.field == 55 and v.rule == "tlv" for v in violations), violations
    assert SPEC.validate(SPEC.decode(SPEC.encode(m))) == violations  # the same from the wire


@settings(max_examples=2000, deadline=None)
@given(st.text(alphabet="0123456789ABCDEF", max_size=40))
def test_fuzz_de55_hex_text_on_the_wire(hex_text: str) -> None:
    raw = SPEC.encode(Message("0200", {**AUTH, 55: bytes.fromhex("ABCDEF")}))
    i = raw.index(b"006ABCDEF")
    wire = raw[:i] + f"{len(hex_text):03d}".encode() + hex_text.encode() + raw[i + 9 :]
    for v in SPEC.validate(SPEC.decode(wire)):  # odd counts included
        assert v.field == 55 and v.rule in ("tlv", "encoding"), v


@settings(max_examples=3000, deadline=None)
@given(
    st.sampled_from(sorted(DATE_TIME_FIELDS.items())),
    st.one_of(st.text(max_size=12), st.text(alphabet="0123456789", min_size=4, max_size=10)),
)
def test_fuzz_date_validation(field_layout: tuple[int, str], value: str) -> None:
    field, layout = field_layout
    problem = date_time_problem(value, layout)
    assert problem is None or isinstance(problem, str)
    violations = SPEC.validate(Message("0200", {**AUTH, field: value}))
    assert all(v.field == field for v in violations), violations
    shaped = len(value) == len(layout) and value.isascii() and value.isdigit()
    assert [v.rule for v in violations if v.rule == "date"] == (
        ["date"] if shaped and problem is not None else []
    )
    if problem is None:
        assert violations == []


@settings(max_examples=5000, deadline=None)
@given(
    st.sampled_from(["MMDDhhmmss", "hhmmss", "MMDD", "YYMMDDhhmmss"]),
    st.lists(st.integers(0, 99), min_size=6, max_size=6),
)
def test_fuzz_date_time_problem_agrees_with_the_calendar(layout: str, numbers: list[int]) -> None:
    value = "".join(f"{n:02d}" for n in numbers)[: len(layout)]
    units = dict(zip([layout[i : i + 2] for i in range(0, len(layout), 2)], numbers, strict=False))
    try:
        datetime(
            2000 + units.get("YY", 0),
            units.get("MM", 1),
            units.get("DD", 1),
            units.get("hh", 0),
            units.get("mm", 0),
            units.get("ss", 0),
        )
        real = True
    except ValueError:
        real = False
    assert (date_time_problem(value, layout) is None) == real, value


@settings(max_examples=3000, deadline=None)
@given(st.sampled_from([ISO87_ASCII, ISO87_BINARY, ISO87_EBCDIC]), st.binary(max_size=12))
def test_fuzz_decode_mti(spec: Spec, data: bytes) -> None:
    try:
        mti = spec.decode_mti(data)
    except DecodeError:
        return
    assert isinstance(mti, str) and len(mti) == 4
    assert isinstance(mti_problems(mti), list)
