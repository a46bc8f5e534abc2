"""A message's JSON document: written byte for byte as ``json.dumps`` would, read back checked.

Why a module of its own: the document is a format with rules of its own (what redaction drops,
how binary values and headers are carried), and the message only decides when to build it (once
per message and mode, remembered). Both directions live here, so the rules are written once.

- ``{"mti": ..., "fields": {"2": "...", "52": {"hex": "..."}}, "header": ..., "redacted": [...]}``;
  binary values (and a binary header) are written as ``{"hex": ...}``, upper case.
- With ``redact=True`` DE 2, 35, 36, 45 and 52 are dropped and listed in ``redacted``; DE 55 keeps
  its other EMV tags but loses 5A (PAN) and 57 (track 2 equivalent), wherever they sit (nested
  templates too); if DE 55 cannot be parsed as TLV it is dropped whole and listed. A message
  rebuilt from a redacted document keeps the list (``Message.redacted``), and a later redacted
  document lists those fields again.
- Written by hand (str values through json's own string encoder): a journal writes one per
  transaction, and ``json.dumps`` of the document costs several times more.
"""

from __future__ import annotations

import binascii
import json
import json.encoder
from collections.abc import Callable, Mapping
from typing import Any

from isopace.iso8583.errors import Iso8583Error
from isopace.iso8583.tlv import TLV

Value = str | bytes

#: the fields ``redact=True`` drops
REDACTED_FIELDS = frozenset({2, 35, 36, 45, 52})
#: the EMV tags it removes from DE 55: the PAN and the track 2 equivalent
REDACTED_TAGS = ("5A", "57")
_REDACTED_TAG_SET = frozenset(REDACTED_TAGS)

_json_str: Any = json.encoder.encode_basestring_ascii  # what json.dumps uses (ensure_ascii)
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode
_KEYS = tuple(f'"{n}":' for n in range(193))


def write(
    mti: str,
    fields: Mapping[int, Value],
    header: Value | None,
    redacted: frozenset[int],
    redact: bool,
    tlv: Callable[[int], TLV],
) -> str:
    """The document of a message (``tlv(55)``: its DE 55 parsed, for redaction)."""
    parts: list[str] = []
    append = parts.append
    for n, v in fields.items():
        if redact:
            if n in REDACTED_FIELDS:
                redacted = redacted | {n}
                continue
            if n == 55:
                try:
                    v = _strip_icc(tlv(55), v)
                except (Iso8583Error, ValueError):
                    redacted = redacted | {n}
                    continue
        if isinstance(v, str):
            append(_KEYS[n] + _json_str(v))
        else:
            append(_KEYS[n] + '{"hex":"' + v.hex().upper() + '"}')
    text: str = '{"mti":' + _json_str(mti) + ',"fields":{' + ",".join(parts) + "}"
    if header is not None:
        if isinstance(header, bytes):
            text += ',"header":{"hex":"' + header.hex().upper() + '"}'
        else:
            text += ',"header":' + _ENCODE(header)
    if redacted:
        text += ',"redacted":[' + ",".join(map(str, sorted(redacted))) + "]"
    return text + "}"


def _strip_icc(t: TLV, v: Value) -> Value:
    """DE 55 (``v``, parsed: ``t``) without EMV tags 5A and 57, wherever they sit."""
    if not _has_tags(t, _REDACTED_TAG_SET):
        return v
    out = t.remove(*REDACTED_TAGS, deep=True).build()
    return out if isinstance(v, bytes) else out.hex().upper()


def _has_tags(t: TLV, tags: frozenset[str]) -> bool:
    """True when one of ``tags`` occurs in ``t`` at any depth."""
    for tag, _, child in t.objects():
        if tag in tags or (child is not None and _has_tags(child, tags)):
            return True
    return False


def read(text: str | bytes) -> tuple[str, dict[int, Value], Value | None, frozenset[int]]:
    """MTI, fields, header and redacted fields of a document; :class:`Iso8583Error` if it is
    not one."""
    try:
        doc = json.loads(text)
        if not isinstance(doc, dict) or not isinstance(doc.get("mti"), str):
            raise ValueError("expected an object with an 'mti'")
        raw = doc.get("fields", {})
        if not isinstance(raw, dict):
            raise ValueError("'fields' must be an object")
        fields = {int(k): _value(v) for k, v in raw.items()}
        header = _value(doc["header"]) if doc.get("header") is not None else None
        redacted = frozenset(int(x) for x in doc.get("redacted", ()))
    except (ValueError, TypeError, binascii.Error) as e:
        raise Iso8583Error(f"message JSON is invalid: {e}") from None
    return doc["mti"], fields, header, redacted


def _value(v: Any) -> Value:
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("hex"), str):
        return binascii.a2b_hex(v["hex"])
    raise ValueError("field values are strings or {'hex': ...}")
