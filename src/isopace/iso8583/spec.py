"""`Spec`: an immutable ISO 8583 message specification, and the door into the codec.

Layout of a message on the wire (as pyiso8583 4.x): optional header ``h``, MTI (``t``, 4 characters
or 2 BCD bytes), primary bitmap (``p``), secondary bitmap (data element 1) when bit 1 is set, and,
when bit 65 is set, a tertiary bitmap encoded like the secondary one (data element 65 is that
bitmap, never a value), then the data elements in ascending order.

A spec is a description: the field definitions, the required-field rules, the composites, their
loaders and JSON. What it compiles into (the wire format, the layout cache, the generated fast
paths) lives in :mod:`isopace.iso8583._codec` and :mod:`isopace.iso8583._layout`; the spec hands a
decoded message its wire image and asks the wire format to encode one.

Decisions:

- A spec is pyiso8583's dict format plus optional keys (``content`` class, ``data_enc: "hex"``
  for binary carried as hex characters); ``from_pyiso8583`` takes such a dict unchanged and
  encodes byte for byte as pyiso8583 does (tested against it). ``to_json``/``from_json`` carry the
  fields, the required-field rules and the composites.
- Compilation happens once, in the constructor.
- Decoding is lazy. ``decode`` reads the MTI and the bitmaps, then looks the bitmap up in a
  bounded cache of *layouts* (the fields present and a function that finds their spans). The
  first time a bitmap is seen a generic loop over the compiled fields finds the spans; a layout
  seen again gets generated, straight-line code (one Python function per bitmap, prefix lengths
  read through lookup tables). Caches are bounded (``layout_cache_size``; the oldest quarter is
  dropped when full), so a stream of ever-new bitmaps costs no memory growth.
- Only the structure is checked at decode time (MTI, bitmaps, every length prefix, max lengths,
  that the fields end exactly at the end of the data). A value is decoded, and its encoding
  checked, on first access; a bad value raises :class:`DecodeError` naming the field and its
  offset then. Once a few fields of a message have been read, the rest are decoded in one
  generated pass (reading every field costs little more than reading three).
- Encoding a decoded message that was not changed returns the original bytes object. After
  changes only the changed fields are re-encoded; runs of unchanged fields are copied from the
  original bytes in one slice each (the plan is cached per layout and change set, and becomes
  one generated expression once used a few times). Encoding a
  new message uses an encoder generated per set of fields once that set has been seen a few
  times; any problem sends it to the field-by-field path, which raises the exact
  :class:`EncodeError`.
- ``encode`` checks what the wire needs (type, encodability, lengths, fixed lengths exact, as
  pyiso8583 does: no implicit padding); ``validate`` checks the content rules on top.
- Errors never carry field values (so never card data), only numbers, lengths and offsets.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from isopace.iso8583._codec import WireFormat
from isopace.iso8583.composite import BitmapComposite, Positional
from isopace.iso8583.errors import Iso8583Error
from isopace.iso8583.fields import FieldDef
from isopace.iso8583.message import Message, _decoded, _encode
from isopace.iso8583.validation import Violation, validate


def _key_of(k: str | int) -> str:
    if isinstance(k, int):
        return "t" if k == 0 else str(k)
    return k


class Spec:
    """An ISO 8583 message specification (immutable once built; see the module docstring).

    ``fields`` maps ``"h"`` (header, ``max_len`` 0 for none), ``"t"`` or ``0`` (MTI), ``"p"``
    (primary bitmap), ``"1"`` (secondary and tertiary bitmaps) and ``"2"`` .. ``"192"`` (data
    elements; ints accepted) to :class:`FieldDef` or pyiso8583-style dicts. ``required`` maps an MTI
    to the data elements :meth:`validate` requires (a tuple entry means "one of these").
    """

    def __init__(
        self,
        fields: Mapping[str | int, FieldDef | Mapping[str, Any]],
        *,
        name: str = "",
        required: Mapping[str, Iterable[int | tuple[int, ...]]] | None = None,
        composites: Mapping[int, Any] | None = None,
        layout_cache_size: int = 512,
    ) -> None:
        defs: dict[str, FieldDef] = {}
        for k, v in fields.items():
            key = _key_of(k)
            defs[key] = v if isinstance(v, FieldDef) else FieldDef.from_dict(v, f"field {key}")
        if "p" not in defs:
            raise Iso8583Error("spec has no primary bitmap (p)")
        if "h" not in defs:
            defs["h"] = FieldDef(max_len=0, desc="Message Header")
        self.name = name
        self._defs = defs
        self._required: dict[str, tuple[int | tuple[int, ...], ...]] = {
            k: tuple(v) for k, v in (required if required is not None else DEFAULT_REQUIRED).items()
        }
        self._composites: dict[int, Any] = dict(composites or {})
        self._format = WireFormat(defs, max(8, layout_cache_size))

    # --- introspection ----------------------------------------------------------------------
    # --- introspection ----------------------------------------------------------------------
    def field(self, n: int | str) -> FieldDef | None:
        """The definition of data element ``n`` (``"h"``, ``"t"``/0, ``"p"``, 1..192), or None."""
        return self._defs.get(_key_of(n))

    def description(self, n: int) -> str:
        fd = self._defs.get(_key_of(n))
        return fd.desc if fd else ""

    def composite(self, n: int) -> Any:
        """The sub-field format registered for data element ``n`` (KeyError if none)."""
        return self._composites[n]

    def __repr__(self) -> str:
        return f"<Spec {self.name or 'custom'}: {len(self._defs)} definitions>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Spec):
            return NotImplemented
        return self._defs == other._defs and self._required == other._required

    def __hash__(self) -> int:
        return hash((self.name, tuple(sorted(self._defs))))

    # --- pyiso8583 dicts and JSON ----------------------------------------------------------
    @classmethod
    def from_pyiso8583(
        cls, d: Mapping[str, Mapping[str, Any]], *, name: str = "", **kw: Any
    ) -> Spec:
        """Load a spec in pyiso8583's dict format as it is (extra keys such as ``content`` kept)."""
        if not isinstance(d, Mapping):
            raise Iso8583Error("a pyiso8583 spec is a dict of field definitions")
        return cls(dict(d.items()), name=name, **kw)

    def to_pyiso8583(self) -> dict[str, dict[str, Any]]:
        out = {k: fd.to_dict() for k, fd in self._defs.items()}
        return dict(sorted(out.items(), key=lambda kv: _sort_key(kv[0])))

    def to_json(self) -> str:
        composites = {str(n): c.to_dict() for n, c in sorted(self._composites.items())}
        return json.dumps(
            {
                "name": self.name,
                "fields": self.to_pyiso8583(),
                "required": {k: list(v) for k, v in self._required.items()},
                "composites": composites,
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Spec:
        try:
            doc = json.loads(text)
        except (ValueError, TypeError) as e:
            raise Iso8583Error(f"spec JSON is invalid: {e}") from None
        if not isinstance(doc, dict):
            raise Iso8583Error("spec JSON must be an object")
        if "fields" not in doc:  # a bare pyiso8583 dict
            return cls.from_pyiso8583(doc)
        required = doc.get("required")
        req = (
            {
                k: tuple(tuple(x) if isinstance(x, list) else x for x in v)
                for k, v in required.items()
            }
            if isinstance(required, dict)
            else None
        )
        comps = {int(k): composite_from_dict(v) for k, v in (doc.get("composites") or {}).items()}
        return cls(doc["fields"], name=str(doc.get("name", "")), required=req, composites=comps)

    # --- decoding and encoding --------------------------------------------------------------
    def decode(self, data: bytes | bytearray | memoryview) -> Message:
        """Locate every field of ``data`` and return a lazily decoded :class:`Message`."""
        if type(data) is not bytes:
            data = _as_bytes(data)
        fmt = self._format
        # fmt.head(data) unless the MTI alone starts the message and was seen before: the hot
        # path is two dict lookups and the locator, nothing else
        header: str | bytes | None = None
        p = fmt.mti_len
        mti = None if fmt.header is not None else fmt.mtis.get(data[:p])
        if mti is None:
            p, header, mti = fmt.head(data)
        lay = fmt.layouts.get(data[p : p + fmt.bmw])  # fmt.layout(data, p), inlined too
        if lay is None or lay.ext:
            lay = fmt.new_layout(data, p)
        p += lay.width
        try:
            offs = lay.locate(data, p)
        except Exception:
            offs = fmt.locate_careful(data, lay, p)
        return _decoded(mti, header, (self, data, lay, offs))

    def decode_partial(self, data: bytes | bytearray | memoryview) -> Message:
        """The fields of a message :meth:`decode` rejects that can be trusted, for an error
        answer that echoes what it reliably can (:func:`isopace.iso8583.answers.error_reply`).

        The header, MTI and bitmaps must be readable (else :class:`DecodeError`, as from
        ``decode``). Then every field the bitmap announces is located from the start. Only when
        that accounts for the bytes exactly (each length prefix readable and within its maximum,
        each field in the spec, the last one ending at the last byte) are the positions certain:
        each field is then decoded on its own and a value that does not decode is left out.
        When it does not (a field runs past the end, bytes are left over, a prefix is not a
        length), the fault lies somewhere before the point it shows (one digit missing from the
        fixed-length DE 4 is seen only when the last field runs short, every field between read
        one byte off), so no field is trusted and the result has none. For data that ``decode``
        accepts, the fields are those of ``decode(data)``. The result is a message built in code
        (it carries no wire bytes).
        """
        data = _as_bytes(data)
        fmt = self._format
        p, header, mti = fmt.head(data)
        lay = fmt.layout(data, p)
        p += lay.width
        codecs = fmt.table.codecs
        end = len(data)
        spans: list[tuple[int, int, int]] = []
        for n in lay.fields:
            c = codecs[n]
            if c is None:
                return Message(mti, header=header)
            start = p + c.plen
            if c.plen:
                try:
                    count = c.read_len(data, p) if start <= end else -1
                except (KeyError, IndexError, ValueError):
                    count = -1
                if not 0 <= count <= c.fd.max_len:
                    return Message(mti, header=header)
                size = (count + 1) // 2 if c.nibbles else count
            else:
                size = c.fixed_size
            p = start + size
            spans.append((n, start, p))
        if p != end:
            return Message(mti, header=header)
        values: dict[int, str | bytes] = {}
        decs = fmt.table.decs
        for n, s, e in spans:
            try:
                values[n] = decs[n](data, s, e)  # type: ignore[misc]
            except Exception:  # a value that does not decode is left out
                continue
        return Message(mti, values, header=header)

    def decode_mti(self, data: bytes | bytearray | memoryview) -> str:
        """The MTI of ``data`` read as :meth:`decode` reads it (after the header, in the spec's
        MTI encoding), whatever follows; :class:`DecodeError` when it cannot be read. For a
        server that must tell a malformed request from bytes that are no message of this spec."""
        return self._format.head(bytes(data))[2]

    def encode(self, m: Message) -> bytes:
        """Encode ``m``; a decoded, unchanged message gives back its original bytes."""
        return _encode(m, self, self._format)

    # --- validation ------------------------------------------------------------------------
    def validate(self, m: Message) -> list[Violation]:
        """Every violation of this spec's rules in ``m`` (empty list: valid)."""
        return validate(m, self._format.table.codecs, self._required)


def _as_bytes(data: bytes | bytearray | memoryview) -> bytes:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"expected bytes, got {type(data).__name__}")
    return bytes(data)


def _sort_key(k: str) -> tuple[int, int]:
    order = {"h": -3, "t": -2, "p": -1}
    if k in order:
        return (0, order[k])
    try:
        return (1, int(k))
    except ValueError:
        return (2, 0)


_PAN = (2, 35)  # the card number, or the track 2 that holds it
_ORIGINAL = (90, 37)  # what a reversal reverses: original data elements, else the RRN
DEFAULT_REQUIRED: dict[str, tuple[int | tuple[int, ...], ...]] = {
    "0100": (3, 4, 11, 41, _PAN),
    "0120": (3, 4, 11, 41, _PAN),
    "0200": (3, 4, 11, 41, _PAN),
    "0220": (3, 4, 11, 41, _PAN),
    "0400": (3, 4, 11, 41, _ORIGINAL, _PAN),
    "0420": (3, 4, 11, 41, _ORIGINAL, _PAN),
    "0800": (7, 11, 70),
}
"""The fields each request MTI must carry (a tuple: one of them), the one table of required
fields: ``validate``'s ``required`` rule applies it, to a repeat as to its original. A spec can
replace it (``Spec(required=...)``); a host adds only its own policy on top (which MTIs it
accepts, the fields its idempotency key reads)."""


def composite_from_dict(d: Any) -> Positional | BitmapComposite:
    """A composite from its ``to_dict()`` form (a bitmapped one carries its spec as a dict)."""
    try:
        if d["type"] == "positional":
            return Positional(
                [tuple(p) for p in d["parts"]], field=int(d["field"]), pad=str(d.get("pad", " "))
            )
        if d["type"] == "bitmap":
            return BitmapComposite(
                Spec.from_pyiso8583(d["spec"]), field=int(d["field"]), encoding=d.get("encoding")
            )
    except (KeyError, TypeError, ValueError) as e:
        raise Iso8583Error(f"invalid composite definition: {e}") from None
    raise Iso8583Error(f"unknown composite type {d.get('type')!r}")
