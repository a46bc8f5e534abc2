"""Built-in specs by name, and spec files in isopace's JSON or pyiso8583's dict format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from iso8583.specs import default

import iso8583
from isopace.iso8583 import (
    ISO87_ASCII,
    ISO87_ASCII_BINARY_BITMAP,
    ISO87_BINARY,
    ISO87_EBCDIC,
    SPECS,
    Iso8583Error,
    Message,
    load_spec_file,
    spec_by_name,
)

PURCHASE = Message(
    "0200",
    {2: "4111111111111111", 3: "000000", 4: "000000002500", 11: "100006", 41: "TERM0001"},
)


def test_every_built_in_name() -> None:
    assert list(SPECS) == ["ascii", "ascii-binary-bitmap", "bcd", "ebcdic"]
    assert spec_by_name("ascii") is ISO87_ASCII
    assert spec_by_name("ascii-binary-bitmap") is ISO87_ASCII_BINARY_BITMAP
    assert spec_by_name("bcd") is ISO87_BINARY
    assert spec_by_name("ebcdic") is ISO87_EBCDIC


def test_the_layouts_differ_where_their_names_say() -> None:
    ascii_wire = ISO87_ASCII.encode(PURCHASE)
    binary_bitmap_wire = ISO87_ASCII_BINARY_BITMAP.encode(PURCHASE)
    assert ascii_wire[:20] == b"0200" + b"7020000000800000"  # hex-character bitmap
    assert binary_bitmap_wire[:12] == b"0200" + bytes.fromhex("7020000000800000")
    assert ascii_wire[20:] == binary_bitmap_wire[12:]  # the same ASCII data after the bitmap


def test_an_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(Iso8583Error, match=r"'binary' is not a built-in spec \(known: ascii, asc"):
        spec_by_name("binary")


def test_isopace_json_spec_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.json"
    path.write_text(ISO87_ASCII_BINARY_BITMAP.to_json())
    spec = load_spec_file(path)
    assert spec == ISO87_ASCII_BINARY_BITMAP
    assert spec.encode(PURCHASE) == ISO87_ASCII_BINARY_BITMAP.encode(PURCHASE)


def test_pyiso8583_spec_file_encodes_as_pyiso8583(tmp_path: Path) -> None:
    path = tmp_path / "acquirer.json"
    path.write_text(json.dumps(default))
    spec = load_spec_file(path)
    assert spec.name == "acquirer"
    doc = {"t": "0200", **{str(k): v for k, v in PURCHASE.fields().items()}}
    theirs, _ = iso8583.encode(doc, default)
    assert spec.encode(PURCHASE) == bytes(theirs)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, r"spec file .*missing\.json: No such file"),
        (b"{not json", r"spec file .*bad\.json: invalid JSON"),
        (b"\xff\xfe{}", r"spec file .*bad\.json: not UTF-8 text"),
        (b"[1, 2]", r"spec file .*bad\.json: neither an isopace spec"),
        (b'{"2": {"max_len": 19}}', r"spec file .*bad\.json: neither an isopace spec"),
        (b'{"t": 5}', r"spec file .*bad\.json: .*"),
    ],
)
def test_a_bad_spec_file_says_what_is_wrong(
    tmp_path: Path, content: bytes | None, expected: str
) -> None:
    path = tmp_path / ("missing.json" if content is None else "bad.json")
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(Iso8583Error, match=expected):
        load_spec_file(path)
