"""Built-in specs: ISO 8583:1987 in ASCII, binary (BCD) and EBCDIC flavours, each with a name.

The names are what every command that speaks to a host takes as ``--spec`` (:data:`SPECS`,
:func:`spec_by_name`); :func:`load_spec_file` reads the alternative, ``--spec-file``.

- ``ascii``, ``ISO87_ASCII``: the wire format of pyiso8583's ``default_ascii``: ASCII MTI,
  hex-character bitmaps, ASCII ``LL``/``LLL`` lengths. Binary elements (52, 55, 64, 96, 128) travel
  as upper-case hex characters and read as ``bytes`` (their ``max_len`` counts hex characters).
- ``ascii-binary-bitmap``, ``ISO87_ASCII_BINARY_BITMAP``: the layout most ISO 8583 libraries and
  simulators default to, byte for byte pyiso8583's ``default``: ASCII MTI, data and lengths, but
  8-byte binary bitmaps and binary elements as raw bytes (``max_len`` in bytes).
- ``bcd``, ``ISO87_BINARY``: BCD MTI, binary bitmaps, numeric elements packed BCD (length in
  nibbles, BCD length prefixes; odd fixed lengths left-padded with ``0``, odd variable ones
  right-padded with ``F``), text elements ASCII with BCD length prefixes, binary elements raw.
- ``ebcdic``, ``ISO87_EBCDIC``: EBCDIC (cp500) text, MTI and lengths; binary bitmaps and binary
  elements. ``iso87_ebcdic("cp1047")`` gives the same with code page 1047.

Data elements 129..192 (tertiary bitmap) are defined as ``ans..999``. DE 43 has a positional
composite (name 25, city 13, country 2); DE 127 a bitmapped one (127.2 .. 127.64, see ``_DE127``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from isopace.iso8583._render import use_as_fallback
from isopace.iso8583.composite import BitmapComposite, Positional
from isopace.iso8583.errors import Iso8583Error
from isopace.iso8583.spec import Spec

# (number, content class, max length, length-prefix digits (0: fixed), description)
_ISO87: tuple[tuple[int, str, int, int, str], ...] = (
    (2, "n", 19, 2, "Primary Account Number (PAN)"),
    (3, "n", 6, 0, "Processing Code"),
    (4, "n", 12, 0, "Amount, Transaction"),
    (5, "n", 12, 0, "Amount, Settlement"),
    (6, "n", 12, 0, "Amount, Cardholder Billing"),
    (7, "n", 10, 0, "Transmission Date and Time"),
    (8, "n", 8, 0, "Amount, Cardholder Billing Fee"),
    (9, "n", 8, 0, "Conversion Rate, Settlement"),
    (10, "n", 8, 0, "Conversion Rate, Cardholder Billing"),
    (11, "n", 6, 0, "System Trace Audit Number"),
    (12, "n", 6, 0, "Time, Local Transaction"),
    (13, "n", 4, 0, "Date, Local Transaction"),
    (14, "n", 4, 0, "Date, Expiration"),
    (15, "n", 4, 0, "Date, Settlement"),
    (16, "n", 4, 0, "Date, Conversion"),
    (17, "n", 4, 0, "Date, Capture"),
    (18, "n", 4, 0, "Merchant Type"),
    (19, "n", 3, 0, "Acquiring Institution Country Code"),
    (20, "n", 3, 0, "PAN Country Code"),
    (21, "n", 3, 0, "Forwarding Institution Country Code"),
    (22, "n", 3, 0, "Point-of-Service Entry Mode"),
    (23, "n", 3, 0, "PAN Sequence Number"),
    (24, "n", 3, 0, "Network International ID (NII)"),
    (25, "n", 2, 0, "Point-of-Service Condition Code"),
    (26, "n", 2, 0, "Point-of-Service Capture Code"),
    (27, "n", 1, 0, "Authorizing ID Response Length"),
    (28, "x+n", 9, 0, "Amount, Transaction Fee"),
    (29, "x+n", 9, 0, "Amount, Settlement Fee"),
    (30, "x+n", 9, 0, "Amount, Transaction Processing Fee"),
    (31, "x+n", 9, 0, "Amount, Settlement Processing Fee"),
    (32, "n", 11, 2, "Acquiring Institution ID Code"),
    (33, "n", 11, 2, "Forwarding Institution ID Code"),
    (34, "ans", 28, 2, "Primary Account Number, Extended"),
    (35, "z", 37, 2, "Track 2 Data"),
    (36, "ans", 104, 3, "Track 3 Data"),
    (37, "an", 12, 0, "Retrieval Reference Number"),
    (38, "an", 6, 0, "Authorization ID Response"),
    (39, "an", 2, 0, "Response Code"),
    (40, "an", 3, 0, "Service Restriction Code"),
    (41, "ans", 8, 0, "Card Acceptor Terminal ID"),
    (42, "ans", 15, 0, "Card Acceptor ID Code"),
    (43, "ans", 40, 0, "Card Acceptor Name/Location"),
    (44, "ans", 25, 2, "Additional Response Data"),
    (45, "ans", 76, 2, "Track 1 Data"),
    (46, "ans", 999, 3, "Additional Data - ISO"),
    (47, "ans", 999, 3, "Additional Data - National"),
    (48, "ans", 999, 3, "Additional Data - Private"),
    (49, "an", 3, 0, "Currency Code, Transaction"),
    (50, "an", 3, 0, "Currency Code, Settlement"),
    (51, "an", 3, 0, "Currency Code, Cardholder Billing"),
    (52, "b", 8, 0, "PIN"),
    (53, "n", 16, 0, "Security-Related Control Information"),
    (54, "ans", 240, 3, "Additional Amounts"),
    (55, "b", 255, 3, "ICC data"),
    (56, "ans", 999, 3, "Reserved ISO"),
    (57, "ans", 999, 3, "Reserved National"),
    (58, "ans", 999, 3, "Reserved National"),
    (59, "ans", 999, 3, "Reserved National"),
    (60, "ans", 999, 3, "Reserved National"),
    (61, "ans", 999, 3, "Reserved Private"),
    (62, "ans", 999, 3, "Reserved Private"),
    (63, "ans", 999, 3, "Reserved Private"),
    (64, "b", 8, 0, "MAC"),
    (65, "b", 8, 0, "Bitmap, Extended"),
    (66, "n", 1, 0, "Settlement Code"),
    (67, "n", 2, 0, "Extended Payment Code"),
    (68, "n", 3, 0, "Receiving Institution Country Code"),
    (69, "n", 3, 0, "Settlement Institution Country Code"),
    (70, "n", 3, 0, "Network Management Information Code"),
    (71, "n", 4, 0, "Message Number"),
    (72, "n", 4, 0, "Message Number, Last"),
    (73, "n", 6, 0, "Date, Action"),
    (74, "n", 10, 0, "Credits, Number"),
    (75, "n", 10, 0, "Credits, Reversal Number"),
    (76, "n", 10, 0, "Debits, Number"),
    (77, "n", 10, 0, "Debits, Reversal Number"),
    (78, "n", 10, 0, "Transfer, Number"),
    (79, "n", 10, 0, "Transfer, Reversal Number"),
    (80, "n", 10, 0, "Inquiries, Number"),
    (81, "n", 10, 0, "Authorizations, Number"),
    (82, "n", 12, 0, "Credits, Processing Fee Amount"),
    (83, "n", 12, 0, "Credits, Transaction Fee Amount"),
    (84, "n", 12, 0, "Debits, Processing Fee Amount"),
    (85, "n", 12, 0, "Debits, Transaction Fee Amount"),
    (86, "n", 16, 0, "Credits, Amount"),
    (87, "n", 16, 0, "Credits, Reversal Amount"),
    (88, "n", 16, 0, "Debits, Amount"),
    (89, "n", 16, 0, "Debits, Reversal Amount"),
    (90, "n", 42, 0, "Original Data Elements"),
    (91, "an", 1, 0, "File Update Code"),
    (92, "an", 2, 0, "File Security Code"),
    (93, "an", 5, 0, "Response Indicator"),
    (94, "an", 7, 0, "Service Indicator"),
    (95, "an", 42, 0, "Replacement Amounts"),
    (96, "b", 8, 0, "Message Security Code"),
    (97, "x+n", 17, 0, "Amount, Net Settlement"),
    (98, "ans", 25, 0, "Payee"),
    (99, "n", 11, 2, "Settlement Institution ID Code"),
    (100, "n", 11, 2, "Receiving Institution ID Code"),
    (101, "ans", 17, 2, "File Name"),
    (102, "ans", 28, 2, "Account ID 1"),
    (103, "ans", 28, 2, "Account ID 2"),
    (104, "ans", 100, 3, "Transaction Description"),
    (105, "ans", 999, 3, "Reserved for ISO Use"),
    (106, "ans", 999, 3, "Reserved for ISO Use"),
    (107, "ans", 999, 3, "Reserved for ISO Use"),
    (108, "ans", 999, 3, "Reserved for ISO Use"),
    (109, "ans", 999, 3, "Reserved for ISO Use"),
    (110, "ans", 999, 3, "Reserved for ISO Use"),
    (111, "ans", 999, 3, "Reserved for ISO Use"),
    (112, "ans", 999, 3, "Reserved for National Use"),
    (113, "ans", 999, 3, "Reserved for National Use"),
    (114, "ans", 999, 3, "Reserved for National Use"),
    (115, "ans", 999, 3, "Reserved for National Use"),
    (116, "ans", 999, 3, "Reserved for National Use"),
    (117, "ans", 999, 3, "Reserved for National Use"),
    (118, "ans", 999, 3, "Reserved for National Use"),
    (119, "ans", 999, 3, "Reserved for National Use"),
    (120, "ans", 999, 3, "Reserved for Private Use"),
    (121, "ans", 999, 3, "Reserved for Private Use"),
    (122, "ans", 999, 3, "Reserved for Private Use"),
    (123, "ans", 999, 3, "Reserved for Private Use"),
    (124, "ans", 999, 3, "Reserved for Private Use"),
    (125, "ans", 999, 3, "Reserved for Private Use"),
    (126, "ans", 999, 3, "Reserved for Private Use"),
    (127, "ans", 999, 3, "Reserved for Private Use"),
    (128, "b", 8, 0, "MAC"),
)
_ISO87 += tuple((n, "ans", 999, 3, "Reserved (tertiary bitmap)") for n in range(129, 193))

# Nested 127.x (bitmap + sub-fields), Postilion-style subset; the rest reserved ans..999
_DE127: dict[int, tuple[str, int, int, str]] = {
    2: ("ans", 32, 2, "Switch Key"),
    3: ("ans", 48, 0, "Routing Information"),
    6: ("an", 2, 0, "Authorization Profile"),
    12: ("ans", 25, 2, "Terminal Owner"),
    20: ("n", 8, 0, "Originator / Authorizer Settlement Date"),
    22: ("ans", 999, 3, "Structured Data"),
}

DE43 = Positional([("name", 25), ("city", 13), ("country", 2)], field=43)


def _text(c: str, ml: int, lt: int, desc: str, enc: str) -> dict[str, Any]:
    return {
        "data_enc": enc,
        "len_enc": enc,
        "len_type": lt,
        "max_len": ml,
        "content": c,
        "desc": desc,
    }


def _ascii_fields() -> dict[str, dict[str, Any]]:
    d: dict[str, dict[str, Any]] = {
        "h": _text("ans", 0, 0, "Message Header", "ascii"),
        "t": _text("n", 4, 0, "Message Type Indicator", "ascii"),
        "p": _text("b", 16, 0, "Bitmap, Primary", "ascii"),
        "1": _text("b", 16, 0, "Bitmap, Secondary", "ascii"),
    }
    for n, c, ml, lt, desc in _ISO87:
        if c == "b":
            d[str(n)] = {**_text(c, 2 * ml, lt, desc, "ascii"), "data_enc": "hex"}
        else:
            d[str(n)] = _text(c, ml, lt, desc, "ascii")
    return d


def _binary_bitmap(desc: str) -> dict[str, Any]:
    return {
        "data_enc": "b",
        "len_enc": "ascii",
        "len_type": 0,
        "max_len": 8,
        "content": "b",
        "desc": desc,
    }


def _ascii_binary_bitmap_fields() -> dict[str, dict[str, Any]]:
    d = _ascii_fields()
    d["p"] = _binary_bitmap("Bitmap, Primary")
    d["1"] = _binary_bitmap("Bitmap, Secondary")
    for n, c, ml, lt, desc in _ISO87:
        if c == "b":
            d[str(n)] = {**_text(c, ml, lt, desc, "ascii"), "data_enc": "b"}
    return d


def _binary_fields() -> dict[str, dict[str, Any]]:
    d: dict[str, dict[str, Any]] = {
        "h": _text("ans", 0, 0, "Message Header", "ascii"),
        "t": {
            "data_enc": "b",
            "len_enc": "ascii",
            "len_type": 0,
            "max_len": 2,
            "content": "n",
            "desc": "Message Type Indicator",
        },
        "p": _binary_bitmap("Bitmap, Primary"),
        "1": _binary_bitmap("Bitmap, Secondary"),
    }
    for n, c, ml, lt, desc in _ISO87:
        plen = {0: 0, 2: 1, 3: 2}[lt]
        if c in ("n", "z"):
            f = {
                "data_enc": "b",
                "len_enc": "bcd",
                "len_type": plen,
                "max_len": ml,
                "len_count": "nibbles",
                "content": c,
                "desc": desc,
            }
            if ml & 1 or plen:
                f["left_pad" if not plen else "right_pad"] = "0" if not plen else "F"
            d[str(n)] = f
        elif c == "b":
            d[str(n)] = {
                "data_enc": "b",
                "len_enc": "bcd",
                "len_type": plen,
                "max_len": ml,
                "content": c,
                "desc": desc,
            }
        else:
            d[str(n)] = {**_text(c, ml, plen, desc, "ascii"), "len_enc": "bcd"}
    return d


def _ebcdic_fields(enc: str) -> dict[str, dict[str, Any]]:
    d: dict[str, dict[str, Any]] = {
        "h": _text("ans", 0, 0, "Message Header", enc),
        "t": _text("n", 4, 0, "Message Type Indicator", enc),
        "p": {
            "data_enc": "b",
            "len_enc": enc,
            "len_type": 0,
            "max_len": 8,
            "content": "b",
            "desc": "Bitmap, Primary",
        },
        "1": {
            "data_enc": "b",
            "len_enc": enc,
            "len_type": 0,
            "max_len": 8,
            "content": "b",
            "desc": "Bitmap, Secondary",
        },
    }
    for n, c, ml, lt, desc in _ISO87:
        f = _text(c, ml, lt, desc, enc)
        if c == "b":
            f["data_enc"] = "b"
        d[str(n)] = f
    return d


def _de127(enc: str, binary_bitmap: bool) -> BitmapComposite:
    fields: dict[str, dict[str, Any]] = {
        "p": {
            "data_enc": "b" if binary_bitmap else enc,
            "len_enc": enc,
            "len_type": 0,
            "max_len": 8 if binary_bitmap else 16,
            "content": "b",
            "desc": "Bitmap, 127",
        },
    }
    for n in range(2, 65):
        c, ml, lt, desc = _DE127.get(n, ("ans", 999, 3, "Reserved"))
        fields[str(n)] = _text(c, ml, lt, desc, enc)
    return BitmapComposite(
        Spec.from_pyiso8583(fields, name="DE 127", required={}),
        field=127,
        encoding=None if binary_bitmap else enc,
    )


def iso87_ascii() -> Spec:
    return Spec.from_pyiso8583(
        _ascii_fields(), name="ISO87_ASCII", composites={43: DE43, 127: _de127("ascii", False)}
    )


def iso87_ascii_binary_bitmap() -> Spec:
    return Spec.from_pyiso8583(
        _ascii_binary_bitmap_fields(),
        name="ISO87_ASCII_BINARY_BITMAP",
        composites={43: DE43, 127: _de127("ascii", True)},
    )


def iso87_binary() -> Spec:
    return Spec.from_pyiso8583(_binary_fields(), name="ISO87_BINARY", composites={43: DE43})


def iso87_ebcdic(encoding: str = "cp500") -> Spec:
    return Spec.from_pyiso8583(
        _ebcdic_fields(encoding), name=f"ISO87_EBCDIC_{encoding}", composites={43: DE43}
    )


ISO87_ASCII = iso87_ascii()
use_as_fallback(ISO87_ASCII)  # what Message.describe() and .composite() use by default
ISO87_ASCII_BINARY_BITMAP = iso87_ascii_binary_bitmap()
ISO87_BINARY = iso87_binary()
ISO87_EBCDIC = iso87_ebcdic()

SPECS: dict[str, Spec] = {
    "ascii": ISO87_ASCII,
    "ascii-binary-bitmap": ISO87_ASCII_BINARY_BITMAP,
    "bcd": ISO87_BINARY,
    "ebcdic": ISO87_EBCDIC,
}
"""The built-in specs by the name ``--spec`` takes."""


def spec_by_name(name: str) -> Spec:
    """The built-in spec called ``name``; an unknown name is an error that lists the known ones."""
    try:
        return SPECS[name]
    except KeyError:
        known = ", ".join(SPECS)
        raise Iso8583Error(f"spec {name!r} is not a built-in spec (known: {known})") from None


def load_spec_file(path: str | Path) -> Spec:
    """A spec from a JSON file: isopace's own format (``Spec.to_json``: an object with ``fields``)
    or a pyiso8583 spec dict written as JSON (an object of field definitions keyed ``"t"``,
    ``"p"``, ``"2"`` ...). The file's name becomes the spec's name when it has none."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise Iso8583Error(f"spec file {p}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise Iso8583Error(
            f"spec file {p}: not UTF-8 text ({e.reason} at byte {e.start})"
        ) from None
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise Iso8583Error(f"spec file {p}: invalid JSON: {e}") from None
    if isinstance(doc, dict) and isinstance(doc.get("fields"), dict):
        return Spec.from_json(text)
    if isinstance(doc, dict) and "t" in doc:
        try:
            return Spec.from_pyiso8583(doc, name=p.stem)
        except Iso8583Error as e:
            raise Iso8583Error(f"spec file {p}: {e}") from None
    raise Iso8583Error(
        f'spec file {p}: neither an isopace spec (an object with "fields") nor a pyiso8583 '
        'spec (an object of field definitions with "t", the MTI)'
    )
