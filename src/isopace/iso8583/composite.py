"""Composite data elements: positional sub-fields (DE 43) and bitmapped sub-fields (DE 127.x).

``Positional`` splits a fixed-length text field into named, space-padded parts; ``BitmapComposite``
reads a field whose content is itself a small ISO 8583 body (its own bitmap and sub-fields,
described by a nested :class:`~isopace.iso8583.spec.Spec` without an MTI). Reading one from its
JSON form (``composite_from_dict``) builds that spec, so it lives in :mod:`isopace.iso8583.spec`:
this module sits below the spec, which keeps its composites.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from isopace.iso8583.errors import DecodeError, EncodeError
from isopace.iso8583.message import Message

if TYPE_CHECKING:
    from isopace.iso8583.spec import Spec

Value = str | bytes


class Positional:
    """Named fixed-width parts of a text field, e.g. DE 43 name (25) / city (13) / country (2)."""

    def __init__(
        self, parts: Sequence[tuple[str, int]], *, field: int = 43, pad: str = " "
    ) -> None:
        self.parts = tuple((str(name), int(width)) for name, width in parts)
        self.field = field
        self.pad = pad
        self.length = sum(w for _, w in self.parts)

    def parse(self, value: Value) -> dict[str, str]:
        if isinstance(value, bytes):
            raise DecodeError(self.field, 0, "positional composite expects text")
        if len(value) != self.length:
            raise DecodeError(self.field, 0, f"length {len(value)}, expecting {self.length}")
        out: dict[str, str] = {}
        p = 0
        for name, width in self.parts:
            out[name] = value[p : p + width].rstrip(self.pad)
            p += width
        return out

    def build(self, parts: Mapping[str, str] | None = None, **kw: str) -> str:
        values = {**(parts or {}), **kw}
        unknown = set(values) - {name for name, _ in self.parts}
        if unknown:
            raise EncodeError(self.field, f"unknown sub-fields {sorted(unknown)}")
        out = []
        for name, width in self.parts:
            v = values.get(name, "")
            if not isinstance(v, str) or len(v) > width:
                raise EncodeError(self.field, f"sub-field {name} must be text of at most {width}")
            out.append(v.ljust(width, self.pad))
        return "".join(out)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "positional",
            "field": self.field,
            "pad": self.pad,
            "parts": [list(p) for p in self.parts],
        }


class BitmapComposite:
    """A field carrying its own bitmap and sub-fields (e.g. DE 127.x), per a nested spec.

    ``encoding`` is how the outer field's ``str`` value maps to the nested bytes (``ascii`` for a
    text field); for a binary outer field (``bytes`` values) use ``None``.
    """

    def __init__(self, spec: Spec, *, field: int = 127, encoding: str | None = "ascii") -> None:
        self.spec = spec
        self.field = field
        self.encoding = encoding

    def parse(self, value: Value) -> dict[int, Value]:
        try:
            raw = value if isinstance(value, bytes) else value.encode(self.encoding or "latin-1")
        except UnicodeError:
            raise DecodeError(self.field, 0, "sub-fields are not valid text") from None
        try:
            return self.spec.decode(raw).fields()
        except DecodeError as e:
            raise DecodeError(f"field {self.field}.{e.field}", e.offset, e.reason) from None

    def build(self, fields: Mapping[int, Value]) -> Value:
        try:
            raw = self.spec.encode(Message("", fields))
        except EncodeError as e:
            raise EncodeError(f"field {self.field}.{e.field}", e.reason) from None
        return raw if self.encoding is None else raw.decode(self.encoding)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "bitmap",
            "field": self.field,
            "encoding": self.encoding,
            "spec": self.spec.to_pyiso8583(),
        }
