"""Differential tests against pyiso8583 4.0.1, the oracle.

Hypothesis builds messages within a spec; our encoding must equal pyiso8583's byte for byte, and
each side must decode the other's output to the same fields. Specs: pyiso8583's ``default`` and
``default_ascii`` (extended with data elements 129..192 so that tertiary bitmaps occur), and our
ISO87_BINARY / ISO87_EBCDIC exported to pyiso8583's format (BCD with pads and nibble counts, BCD
and EBCDIC length prefixes, binary MTI and bitmaps).
"""

from __future__ import annotations

import string
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from iso8583.specs import default, default_ascii

import iso8583
from isopace.iso8583 import (
    ISO87_ASCII_BINARY_BITMAP,
    ISO87_BINARY,
    ISO87_EBCDIC,
    FieldDef,
    Message,
    Spec,
)

from .conftest import field_numbers, with_tertiary


def _exotic() -> dict[str, dict[str, Any]]:
    """pyiso8583's default with fields switched to every length-prefix and data encoding."""
    d = with_tertiary(default)

    def f(**kw: Any) -> dict[str, Any]:
        base = {"data_enc": "ascii", "len_enc": "ascii", "len_type": 0, "desc": "x"}
        return {**base, **kw}

    d["2"] = f(
        data_enc="b", len_enc="bcd", len_type=1, max_len=19, len_count="nibbles", right_pad="F"
    )
    d["3"] = f(data_enc="b", len_type=0, max_len=6, len_count="nibbles")
    d["22"] = f(data_enc="b", len_type=0, max_len=3, len_count="nibbles", left_pad="0")
    d["32"] = f(
        data_enc="b", len_enc="b", len_type=1, max_len=11, len_count="nibbles", left_pad="0"
    )
    d["35"] = f(data_enc="b", len_enc="b", len_type=2, max_len=300)
    d["43"] = f(data_enc="cp500", len_enc="cp500", len_type=2, max_len=40)
    d["44"] = f(data_enc="latin-1", len_enc="cp500", len_type=3, max_len=25)
    d["45"] = f(len_type=4, max_len=76)
    d["48"] = f(data_enc="b", len_enc="bcd", len_type=2, max_len=999)
    d["54"] = f(len_enc="b", len_type=1, max_len=120, len_count="nibbles")
    d["60"] = f(data_enc="cp037", len_enc="ascii", len_type=3, max_len=999)
    d["62"] = f(
        data_enc="b", len_enc="ascii", len_type=3, max_len=999, len_count="nibbles", left_pad="0"
    )
    return d


SPECS: dict[str, dict[str, Any]] = {
    "exotic": _exotic(),
    "default": with_tertiary(default),
    "default_ascii": with_tertiary(default_ascii),
    "iso87_binary": ISO87_BINARY.to_pyiso8583(),
    "iso87_ebcdic": ISO87_EBCDIC.to_pyiso8583(),
}
OURS = {name: Spec.from_pyiso8583(d) for name, d in SPECS.items()}
# The built-in ``ascii-binary-bitmap`` spec itself (composites and all), with pyiso8583's
# ``default`` as the oracle; its tertiary elements (129..192) are ours, pyiso8583 stops at 128.
SPECS["ascii-binary-bitmap"] = {
    **default,
    **{
        k: v
        for k, v in ISO87_ASCII_BINARY_BITMAP.to_pyiso8583().items()
        if k.isdigit() and int(k) > 128
    },
}
OURS["ascii-binary-bitmap"] = ISO87_ASCII_BINARY_BITMAP
ASCII_TEXT = string.ascii_letters + string.digits + " .,:;-_/=+*#@!?()"


def value_for(fd: FieldDef) -> st.SearchStrategy[str | bytes]:
    """A value valid for the field (length within max_len, exact for fixed fields)."""
    cap = fd.max_len if fd.len_type == 0 else min(fd.max_len, 40)
    low = fd.max_len if fd.len_type == 0 else 0
    if fd.kind == "bin":
        return st.binary(min_size=low, max_size=cap)
    if fd.kind == "text" and fd.len_count == "nibbles":  # byte length = count / 2
        return st.text(ASCII_TEXT, min_size=low // 2, max_size=cap // 2)
    if fd.kind == "bcd":
        if fd.len_count == "nibbles":
            return st.text("0123456789", min_size=low, max_size=cap)
        return st.text("0123456789", min_size=2 * low, max_size=2 * cap).filter(
            lambda s: len(s) % 2 == 0
        )
    if fd.data_enc not in ("ascii",):
        return st.text(ASCII_TEXT + "äöü€é", min_size=low, max_size=cap).filter(
            lambda t: _encodable(t, fd.data_enc)
        )
    return st.text(ASCII_TEXT, min_size=low, max_size=cap)


def _encodable(text: str, enc: str) -> bool:
    try:
        text.encode(enc)
    except UnicodeError:
        return False
    return True


@st.composite
def messages(draw: st.DrawFn, spec: Spec) -> Message:
    numbers = [n for n in draw(field_numbers()) if spec.field(n) is not None]
    fields = {n: draw(value_for(spec.field(n))) for n in numbers}  # type: ignore[arg-type]
    mti = draw(st.sampled_from(["0100", "0110", "0200", "0210", "0400", "0420", "0800", "1200"]))
    return Message(mti, fields)


def to_pyiso(m: Message) -> dict[str, str]:
    doc = {"t": m.mti}
    for n, v in m.fields().items():
        doc[str(n)] = v.hex().upper() if isinstance(v, bytes) else v
    return doc


def from_pyiso(doc: dict[str, str], spec: Spec) -> dict[int, str | bytes]:
    out: dict[int, str | bytes] = {}
    for k, v in doc.items():
        if k in ("t", "p", "1", "h"):
            continue
        fd = spec.field(int(k))
        assert fd is not None
        out[int(k)] = bytes.fromhex(v) if fd.kind == "bin" else v
    return out


@pytest.mark.parametrize("name", list(SPECS))
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_encode_equals_pyiso8583_and_cross_decodes(name: str, data: st.DataObject) -> None:
    spec = OURS[name]
    pspec = SPECS[name]
    m = data.draw(messages(spec))
    ours = spec.encode(m)
    theirs, _ = iso8583.encode(to_pyiso(m), pspec)
    assert ours == bytes(theirs)
    # pyiso8583 reads our bytes back to the same fields
    doc, _ = iso8583.decode(ours, pspec)
    assert doc["t"] == m.mti
    assert from_pyiso(doc, spec) == m.fields()
    # we read pyiso8583's bytes back to the same fields, lazily and all at once
    back = spec.decode(bytes(theirs))
    assert back.mti == m.mti
    assert back.fields() == m.fields()
    assert back == m
    assert spec.encode(back) == ours


@pytest.mark.parametrize("name", list(SPECS))
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_changed_fields_encode_like_pyiso8583(name: str, data: st.DataObject) -> None:
    """Decode, change / add / remove fields, re-encode: equal to pyiso8583 encoding the result."""
    spec = OURS[name]
    pspec = SPECS[name]
    m = data.draw(messages(spec))
    decoded = spec.decode(spec.encode(m))
    other = data.draw(messages(spec))
    changed = decoded.set_many(other.fields())
    drop = data.draw(st.lists(st.sampled_from(sorted(m.fields()) or [2]), max_size=3))
    changed = changed.remove(*drop)
    ours = spec.encode(changed)
    theirs, _ = iso8583.encode(to_pyiso(changed), pspec)
    assert ours == bytes(theirs)
    assert spec.decode(ours) == changed


WIRE_KEYS = ("data_enc", "len_enc", "len_type", "max_len", "len_count", "left_pad", "right_pad")


def test_ascii_binary_bitmap_is_pyiso8583_default_on_the_wire() -> None:
    """Every element pyiso8583's ``default`` defines is laid out the same by the built-in spec."""
    ours = ISO87_ASCII_BINARY_BITMAP.to_pyiso8583()
    for key, theirs in default.items():
        if key == "h":
            continue
        assert {k: ours[key].get(k) for k in WIRE_KEYS} == {k: theirs.get(k) for k in WIRE_KEYS}, (
            key
        )


def test_default_spec_loads_unchanged() -> None:
    spec = Spec.from_pyiso8583(default)
    assert spec.field(52).binary and not spec.field(2).binary  # type: ignore[union-attr]
    assert spec.to_pyiso8583()["2"]["max_len"] == 19
    s = b"02004010100000000000161234567890123456123456111"
    m = Spec.from_pyiso8583(default_ascii).decode(s)
    doc, _ = iso8583.decode(s, default_ascii)
    assert m.fields() == {2: doc["2"], 12: doc["12"], 20: doc["20"]}


@pytest.mark.parametrize("name", list(SPECS))
def test_specs_survive_json(name: str) -> None:
    spec = OURS[name]
    again = Spec.from_json(spec.to_json())
    assert again == spec
    assert again.to_pyiso8583() == spec.to_pyiso8583()
