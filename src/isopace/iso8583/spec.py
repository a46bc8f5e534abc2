"""`Spec`: an immutable message specification compiled once into field codecs.

Layout of a message on the wire (as pyiso8583 4.x): optional header ``h``, MTI (``t``, 4 characters
or 2 BCD bytes), primary bitmap (``p``), secondary bitmap (data element 1) when bit 1 is set, and,
when bit 65 is set, a tertiary bitmap encoded like the secondary one (data element 65 is that
bitmap, never a value), then the data elements in ascending order.

Decisions:

- A spec is pyiso8583's dict format plus optional keys (``content`` class, ``data_enc: "hex"``
  for binary carried as hex characters); ``from_pyiso8583`` takes such a dict unchanged and
  encodes byte for byte as pyiso8583 does (tested against it). ``to_json``/``from_json`` carry the
  fields, the required-field rules and the composites.
- Compilation happens once, in the constructor: every field becomes closures (length reader,
  encoder, decoder) and lookup tables (length prefixes up to four digits, bitmap bits).
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

import binascii
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from isopace.iso8583.errors import DecodeError, EncodeError, Iso8583Error
from isopace.iso8583.fields import Codec, FieldDef, compile_field, text_codec

if TYPE_CHECKING:
    from isopace.iso8583.message import Message
    from isopace.iso8583.validation import Violation

MAX_FIELD = 192
_GENERATE_AFTER = 3  # a layout gets generated code the n-th time its bitmap is seen


def _hex_upper(b: bytes) -> bytes:
    return binascii.b2a_hex(b).upper()


class _Bad(Exception):
    """Raised by the fast locators; the careful path then finds the exact error."""


class Layout:
    """The fields present for one bitmap and how to find their spans."""

    __slots__ = (
        "bulk",
        "ext",
        "fields",
        "hits",
        "index",
        "locate",
        "patches",
        "replies",
        "spec",
        "steps",
        "width",
    )

    def __init__(
        self,
        fields: tuple[int, ...],
        steps: tuple[Any, ...],
        width: int,
        spec: Spec | None,
    ) -> None:
        self.fields = fields
        self.index: dict[int, int] | None = None  # built when the layout is seen again
        self.steps = steps  # the spec's per-field steps, indexed by field number
        self.width = width  # bytes taken by the bitmaps
        self.ext = spec is None  # marker entry: a further bitmap follows
        self.spec = spec
        self.hits = 0
        self.patches: dict[Any, _Patch] | None = None
        # reply() of a message with this layout, per echo set: (echo set, fields kept, fields
        # dropped, fields whose decoding is more than an ASCII check)
        self.replies: dict[Any, tuple[Any, ...]] | None = None
        self.bulk: Callable[[bytes, Sequence[int]], dict[int, Any]] | None = None
        self.locate: Callable[[bytes, int], Sequence[int]] = self._generic

    def _generic(self, d: bytes, p: int) -> Sequence[int]:
        self.hits += 1
        if self.hits >= _GENERATE_AFTER and self.spec is not None:
            self.locate = _generate(self.fields, self.spec._codecs)
            self.bulk = _generate_bulk(self.fields, self.spec)
            self.index = dict(zip(self.fields, range(len(self.fields)), strict=True))
        offs = [p]
        append = offs.append
        steps = self.steps
        fixed = self.spec._fixed  # type: ignore[union-attr]
        for n in self.fields:
            size = fixed[n]
            if size >= 0:
                p += size
            else:
                plen, table, reader, max_len, nib, _ = steps[n]
                if table is not None:
                    count = table[d[p : p + plen]]
                else:
                    count = reader(d, p)
                    if count > max_len:
                        raise _Bad
                p += plen + ((count + 1) >> 1 if nib else count)
            append(p)
        if p != len(d):
            raise _Bad
        return offs


def _generate(fields: tuple[int, ...], codecs: tuple[Codec | None, ...]) -> Callable[..., Any]:
    """Straight-line locator for one layout: ``o<i>`` is where field i starts."""
    ns: dict[str, Any] = {"_Bad": _Bad, "len": len}
    lines = ["def locate(d, o0):"]
    for i, n in enumerate(fields):
        c = codecs[n]
        assert c is not None
        cur, nxt = f"o{i}", f"o{i + 1}"
        if not c.plen:
            lines.append(f"    {nxt} = {cur} + {c.fixed_size}")
            continue
        w = c.plen
        if c.len_table is not None:
            ns[f"T{n}"] = c.len_table
            lines.append(f"    n = T{n}[d[{cur}:{cur} + {w}]]")
        elif c.fd.len_enc == "b" and w == 1:
            lines.append(f"    n = d[{cur}]")
            lines.append(f"    if n > {c.fd.max_len}: raise _Bad")
        else:
            ns[f"R{n}"] = c.read_len
            lines.append(f"    n = R{n}(d, {cur})")
            lines.append(f"    if n > {c.fd.max_len}: raise _Bad")
        if c.nibbles:
            lines.append(f"    {nxt} = {cur} + {w} + ((n + 1) >> 1)")
        else:
            lines.append(f"    {nxt} = {cur} + {w} + n")
    last = f"o{len(fields)}"
    lines.append(f"    if {last} != len(d): raise _Bad")
    lines.append("    return (" + ", ".join(f"o{i}" for i in range(len(fields) + 1)) + ",)")
    exec("\n".join(lines), ns)
    return ns["locate"]  # type: ignore[no-any-return]


_EXT = Layout((), (), 0, None)


class _Patch:
    """How to re-encode a changed decoded message: the items of :meth:`Spec._patch_plan` and,
    once used a few times, a generated straight-line function doing the same."""

    __slots__ = ("fast", "hits", "items")

    def __init__(self, items: tuple[Any, ...]) -> None:
        self.items = items
        self.hits = 0
        self.fast: Callable[[Message, Any, Any, dict[int, Any]], bytes] | None = None


def _generate_patch(items: tuple[Any, ...], width: int, spec: Spec) -> Callable[..., bytes]:
    """One expression for a patch plan: slices of the original bytes, new fields through their
    encoders (which raise the exact :class:`EncodeError`, as the item loop does)."""
    ns: dict[str, Any] = {"HEAD": spec._encode_head}
    parts = []
    for k, item in enumerate(items):
        if type(item) is int:
            if item >= 0:
                ns[f"E{item}"] = spec._encs[item]
                parts.append(f"E{item}(v[{item}])")
            elif item == -1:
                parts.append(f"d[:o[0] - {width}]")
            elif item == -2:
                parts.append(f"d[o[0] - {width}:o[0]]")
            else:
                parts.append("HEAD(m)")
        elif type(item) is tuple:
            parts.append(f"d[o[{item[0]}]:o[{item[1]}]]")
        else:
            ns[f"K{k}"] = item
            parts.append(f"K{k}")
    src = "def patch(m, d, o, v):\n    return b''.join((" + ", ".join(parts) + ",))"
    exec(src, ns)
    return ns["patch"]  # type: ignore[no-any-return]


class _Plan:
    """How to encode one set of fields: the bitmaps, the encoders, and (once used a few
    times) a generated straight-line encoder."""

    __slots__ = ("bitmap", "encs", "fast", "hits", "keys")

    def __init__(self, keys: tuple[int, ...], bitmap: bytes, encs: tuple[Any, ...]) -> None:
        self.keys = keys
        self.bitmap = bitmap
        self.encs = encs
        self.hits = 0
        self.fast: Callable[[dict[int, Any], bytes], bytes] | None = None


def _generate_encoder(plan: _Plan, codecs: tuple[Codec | None, ...]) -> Callable[..., bytes]:
    """Straight-line encoder for one set of fields: ASCII text, hex and binary fields inline,
    others through their compiled encoder. Any exception sends the caller to the careful path."""
    ns: dict[str, Any] = {"_Bad": _Bad, "BM": plan.bitmap, "HX": binascii.b2a_hex, "bytes": bytes}
    lines = ["def encode(vals, head):"]
    parts = ["head", "BM"]
    for n in plan.keys:
        c = codecs[n]
        assert c is not None
        fd = c.fd
        kind = fd.kind
        simple = not c.nibbles and (c.plen == 0 or c.len_table is not None)
        if simple and kind == "text" and fd.data_enc.lower() in ("ascii", "us-ascii"):
            lines.append(f"    b{n} = vals[{n}].encode('ascii')")
        elif simple and kind == "hex":
            lines.append(f"    b{n} = HX(vals[{n}]).upper()")
        elif simple and kind == "bin":
            lines.append(f"    b{n} = vals[{n}]")
            lines.append(f"    if type(b{n}) is not bytes: raise _Bad")
        else:
            ns[f"C{n}"] = c.encode
            parts.append(f"C{n}(vals[{n}])")
            continue
        if c.plen == 0:
            lines.append(f"    if len(b{n}) != {fd.max_len}: raise _Bad")
            parts.append(f"b{n}")
        else:
            assert c.len_table is not None
            prefixes = [b""] * (len(c.len_table))
            for raw, count in c.len_table.items():
                prefixes[count] = raw
            ns[f"P{n}"] = tuple(prefixes)
            parts.append(f"P{n}[len(b{n})]")
            parts.append(f"b{n}")
    lines.append("    return b''.join((" + ", ".join(parts) + ",))")
    exec("\n".join(lines), ns)
    return ns["encode"]  # type: ignore[no-any-return]


def _generate_bulk(fields: tuple[int, ...], spec: Spec) -> Callable[..., dict[int, Any]]:
    """Decode every field of one layout in one expression (used once a message has had a few
    fields read: the rest are then decoded together). ASCII fields are sliced out of the
    message decoded once as a whole. Any exception: the caller falls back to decoding field by
    field, which reports the exact problem."""
    ns: dict[str, Any] = {}
    items = []
    whole = spec._ascii_wire
    for i, n in enumerate(fields):
        start = f"o[{i}] + {spec._plens[n]}" if spec._plens[n] else f"o[{i}]"
        if spec._asc[n] and whole:
            items.append(f"{n}: t[{start}:o[{i + 1}]]")
        elif spec._asc[n]:
            items.append(f"{n}: d[{start}:o[{i + 1}]].decode('ascii')")
        else:
            ns[f"D{n}"] = spec._decs[n]
            items.append(f"{n}: D{n}(d, {start}, o[{i + 1}])")
    # the whole message as ASCII: only valid if every byte is ASCII (else per-field decoding)
    text = "    t = d.decode('ascii')\n" if whole else ""
    src = "def bulk(d, o):\n" + text + "    return {" + ", ".join(items) + "}"
    exec(src, ns)
    return ns["bulk"]  # type: ignore[no-any-return]


def _bit_tables() -> tuple[tuple[tuple[int, ...], ...], ...]:
    return tuple(
        tuple(
            tuple(8 * pos + bit + 1 for bit in range(8) if byte & (0x80 >> bit))
            for byte in range(256)
        )
        for pos in range(24)
    )


_BITS = _bit_tables()
_B0, _B1, _B2, _B3, _B4, _B5, _B6, _B7 = _BITS[:8]


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
        self._cache_size = max(8, layout_cache_size)
        self._compile()

    # --- compilation ----------------------------------------------------------------------
    def _compile(self) -> None:
        defs = self._defs
        codecs: list[Codec | None] = [None] * (MAX_FIELD + 1)
        for n in range(2, MAX_FIELD + 1):
            fd = defs.get(str(n))
            if fd is not None and n != 65:
                codecs[n] = compile_field(n, fd)
        self._codecs: tuple[Codec | None, ...] = tuple(codecs)
        self._encs = tuple(c.encode if c else None for c in codecs)
        self._decs = tuple(c.decode if c else None for c in codecs)
        self._plens = tuple(c.plen if c else 0 for c in codecs)
        self._asc = tuple(
            bool(c and c.fd.kind == "text" and c.fd.data_enc.lower() in ("ascii", "us-ascii"))
            for c in codecs
        )
        self._fixed = tuple(-2 if c is None else c.fixed_size if not c.plen else -1 for c in codecs)
        self._ascii_wire = all(
            c is None or self._asc[c.number] or c.fd.kind == "hex" for c in codecs
        )
        self._steps = tuple(
            None
            if c is None
            else c.fixed_size
            if not c.plen
            else (c.plen, c.len_table, c.read_len, c.fd.max_len, c.nibbles, 0)
            for c in codecs
        )
        # header
        h = defs["h"]
        self._header: Codec | None = compile_field(-1, h) if h.max_len > 0 else None
        # MTI
        t = defs.get("t") or FieldDef(max_len=0, desc="(no MTI)")
        self._mti_bin = t.data_enc == "b"
        self._mti_len = 0 if "t" not in defs else 2 if self._mti_bin else 4
        if not self._mti_bin:
            self._mti_enc, self._mti_dec = text_codec(t.data_enc)
        # bitmaps
        for key in ("p", "1"):
            fd = defs.get(key)
            if key == "1" and fd is None:
                fd = defs["p"]
            assert fd is not None
            binary = fd.data_enc == "b"
            width = 8 if binary else 16
            if binary:
                bm_dec: Callable[[bytes], bytes] = bytes
                bm_enc: Callable[[bytes], bytes] = bytes
            elif fd.data_enc.lower() in ("ascii", "us-ascii", "latin-1", "latin1"):
                bm_dec = binascii.a2b_hex
                bm_enc = _hex_upper
            else:
                tenc, tdec = text_codec(fd.data_enc)

                def bm_dec(b: bytes, tdec: Callable[[bytes], str] = tdec) -> bytes:
                    s = tdec(b)
                    if not s.isascii():
                        raise ValueError
                    return binascii.a2b_hex(s)

                def bm_enc(b: bytes, tenc: Callable[[str], bytes] = tenc) -> bytes:
                    return tenc(b.hex().upper())

            if key == "p":
                self._bm1 = (width, bm_dec, bm_enc)
                self._bmw = width
            else:
                self._bm2 = (width, bm_dec, bm_enc)
        self._layouts: dict[bytes, Layout | None] = {}
        self._layouts2: dict[bytes, Layout | None] = {}
        self._layouts3: dict[bytes, Layout] = {}
        self._plans: dict[tuple[int, ...], _Plan] = {}
        self._mtis: dict[bytes, str] = {}
        self._mti_bytes: dict[str, bytes] = {}

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
        from isopace.iso8583.composite import composite_from_dict

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

    # --- decoding --------------------------------------------------------------------------
    def decode(self, data: bytes | bytearray | memoryview) -> Message:
        """Locate every field of ``data`` and return a lazily decoded :class:`Message`."""
        if type(data) is not bytes:
            if not isinstance(data, bytes | bytearray | memoryview):
                raise TypeError(f"expected bytes, got {type(data).__name__}")
            data = bytes(data)
        p = 0
        header: str | bytes | None = None
        if self._header is not None:
            p, header = self._decode_header(data)
        ml = self._mti_len
        mb = data[p : p + ml]
        mti = self._mtis.get(mb)
        if mti is None:
            mti = self._decode_mti(mb, p)
        p += ml
        lay = self._layouts.get(data[p : p + self._bmw])
        if lay is None or lay.ext:
            lay = self._layout(data, p)
        try:
            offs = lay.locate(data, p + lay.width)
        except Exception:
            offs = self._locate_careful(data, lay, p + lay.width)
        m = _new(Message)
        m._mti = mti
        m._vals = {}
        m._spec = self
        m._data = data
        m._lay = lay
        m._offs = offs
        m._gone = _EMPTY
        m._dirty = _EMPTY
        m._hdr = header
        m._hash = None
        m._keys = lay.fields
        m._redacted = _EMPTY
        m._clean = True
        m._hdirty = False
        m._memo = None
        return m

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
        from isopace.iso8583.message import Message

        if type(data) is not bytes:
            if not isinstance(data, bytes | bytearray | memoryview):
                raise TypeError(f"expected bytes, got {type(data).__name__}")
            data = bytes(data)
        p = 0
        header: str | bytes | None = None
        if self._header is not None:
            p, header = self._decode_header(data)
        ml = self._mti_len
        mb = data[p : p + ml]
        mti = self._mtis.get(mb)
        if mti is None:
            mti = self._decode_mti(mb, p)
        p += ml
        lay = self._layouts.get(data[p : p + self._bmw])
        if lay is None or lay.ext:
            lay = self._layout(data, p)
        p += lay.width
        codecs = self._codecs
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
        decs = self._decs
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
        data = bytes(data)
        p = self._decode_header(data)[0] if self._header is not None else 0
        ml = self._mti_len
        mb = data[p : p + ml]
        return self._mtis.get(mb) or self._decode_mti(mb, p)

    def _decode_mti(self, mb: bytes, p: int) -> str:
        if len(mb) != self._mti_len:
            raise DecodeError(0, p, f"MTI is {len(mb)} bytes, expecting {self._mti_len}")
        if self._mti_bin:
            mti = mb.hex().upper()
        else:
            try:
                mti = self._mti_dec(mb)
            except UnicodeError:
                raise DecodeError(0, p, "MTI is not valid text") from None
        if len(self._mtis) < 1024:
            self._mtis[mb] = mti
        return mti

    def _decode_header(self, data: bytes) -> tuple[int, str | bytes]:
        c = self._header
        assert c is not None
        try:
            n = c.read_len(data, 0)
        except (KeyError, IndexError, ValueError):
            raise DecodeError("header", 0, "invalid header length") from None
        if n > c.fd.max_len:
            raise DecodeError("header", 0, f"length {n} exceeds max {c.fd.max_len}")
        size = c.fixed_size if not c.plen else ((n + 1) // 2 if c.nibbles else n)
        end = c.plen + size
        if end > len(data):
            raise DecodeError(
                "header", c.plen, f"header needs {size} bytes, {len(data) - c.plen} left"
            )
        try:
            return end, c.decode(data, c.plen, end)
        except DecodeError as e:  # the header is compiled as a field; its errors name it
            raise DecodeError("header", e.offset, e.reason) from None

    def _bitmap_at(self, data: bytes, p: int, which: int) -> bytes:
        """The bitmap at ``p`` as 8 raw bytes (``which``: 1 primary, 2 secondary, 3 tertiary)."""
        width, dec, _ = self._bm1 if which == 1 else self._bm2
        raw = data[p : p + width]
        name = ("primary", "secondary", "tertiary")[which - 1]
        field: int | str = ("bitmap", 1, 65)[which - 1]  # the bitmaps' data element numbers
        if len(raw) != width:
            raise DecodeError(field, p, f"{name} bitmap is {len(raw)} bytes, expecting {width}")
        try:
            return dec(raw)
        except (ValueError, UnicodeError, binascii.Error):
            raise DecodeError(field, p, f"{name} bitmap is not valid hex") from None

    def _layout(self, data: bytes, p: int) -> Layout:
        """Find (or build and cache) the layout for the bitmaps starting at ``data[p]``."""
        w1 = self._bmw
        key1 = data[p : p + w1]
        try:
            bm = self._bm1[1](key1)
        except Exception:
            bm = b""
        if len(bm) != 8:
            bm = self._bitmap_at(data, p, 1)  # reports the problem
        if not bm[0] & 0x80:  # the common case, inlined and unrolled
            b0, b1, b2, b3, b4, b5, b6, b7 = bm
            fields = _B0[b0] + _B1[b1] + _B2[b2] + _B3[b3] + _B4[b4] + _B5[b5] + _B6[b6] + _B7[b7]
            lay = Layout(fields, self._steps, w1, self)
            cache = self._layouts
            if len(cache) >= self._cache_size:
                self._store(cache, key1, lay)
            else:
                cache[key1] = lay
            return lay
        w2 = self._bm2[0]
        if key1 not in self._layouts:
            self._store(self._layouts, key1, _EXT)
        key2 = data[p : p + w1 + w2]
        lay2 = self._layouts2.get(key2)
        if lay2 is not None and not lay2.ext:
            return lay2
        bm += self._bitmap_at(data, p + w1, 2)
        if not bm[8] & 0x80:
            return self._cache(self._layouts2, key2, bm, w1 + w2)
        if key2 not in self._layouts2:
            self._store(self._layouts2, key2, _EXT)
        key3 = data[p : p + w1 + 2 * w2]
        lay3 = self._layouts3.get(key3)
        if lay3 is not None:
            return lay3
        bm += self._bitmap_at(data, p + w1 + w2, 3)
        return self._cache(self._layouts3, key3, bm, w1 + 2 * w2)

    def _store(self, cache: dict[bytes, Any], key: bytes, value: Any) -> None:
        if len(cache) >= self._cache_size:
            # bounded: drop the oldest quarter (dicts keep insertion order)
            for old in list(cache)[: self._cache_size // 4]:
                cache.pop(old, None)  # another thread may have dropped it
        cache[key] = value

    def _cache(self, cache: dict[bytes, Any], key: bytes, bm: bytes, width: int) -> Layout:
        fields: list[int] = []
        for pos, byte in enumerate(bm):
            if byte:
                fields += _BITS[pos][byte]
        if width > self._bmw:  # DE 1 and 65 are bitmaps, not values
            fields = [n for n in fields if n != 1 and n != 65]
        lay = Layout(tuple(fields), self._steps, width, self)
        self._store(cache, key, lay)
        return lay

    def _locate_careful(self, data: bytes, lay: Layout, p: int) -> tuple[int, ...]:
        """The slow, exact walk over the fields: finds and reports the first problem."""
        offs = [p]
        end = len(data)
        codecs = self._codecs
        n = 0
        for n in lay.fields:
            c = codecs[n]
            if c is None:
                raise DecodeError(
                    n, p, "field is present in the bitmap but not defined in the spec"
                )
            if c.plen:
                if p + c.plen > end:
                    raise DecodeError(n, p, f"length prefix needs {c.plen} bytes, {end - p} left")
                try:
                    count = c.read_len(data, p)
                except (KeyError, IndexError, ValueError):
                    raise DecodeError(n, p, "invalid length prefix") from None
                if count > c.fd.max_len:
                    raise DecodeError(n, p, f"length {count} exceeds max {c.fd.max_len}")
                size = (count + 1) // 2 if c.nibbles else count
                p += c.plen
            else:
                size = c.fixed_size
            if p + size > end:
                raise DecodeError(n, p, f"data needs {size} bytes, {end - p} left")
            p += size
            offs.append(p)
        if p != end:
            raise DecodeError(n or None, p, f"{end - p} bytes of extra data after the last field")
        return tuple(offs)

    # --- encoding --------------------------------------------------------------------------
    def _plan(self, keys: tuple[int, ...]) -> _Plan:
        """Bitmap bytes and per-field encoders for a set of fields (cached, bounded)."""
        plan = self._plans.get(keys)
        if plan is not None:
            return plan
        encs = self._encs
        bits = 0
        for n in keys:
            if type(n) is not int or not 2 <= n <= MAX_FIELD or n == 65 or encs[n] is None:
                if n in (1, 65):
                    raise EncodeError(n, "bitmaps are derived from the fields present")
                raise EncodeError(n, "field is not defined in the spec")
            bits |= 1 << (MAX_FIELD - n)
        if bits & ((1 << 64) - 1):  # tertiary fields
            bits |= 1 << (MAX_FIELD - 65)
        if bits & (((1 << 64) - 1) << 64):
            bits |= 1 << (MAX_FIELD - 1)
        raw = bits.to_bytes(24, "big")
        bitmap = self._bm1[2](raw[:8])
        if bits & (1 << (MAX_FIELD - 1)):
            bitmap += self._bm2[2](raw[8:16])
        if bits & (1 << (MAX_FIELD - 65)):
            bitmap += self._bm2[2](raw[16:24])
        plan = _Plan(keys, bitmap, tuple(encs[n] for n in keys))
        self._store(self._plans, keys, plan)  # type: ignore[arg-type]
        return plan

    def _encode_mti(self, mti: str) -> bytes:
        b = self._mti_bytes.get(mti)
        if b is not None:
            return b
        if not isinstance(mti, str):
            raise EncodeError(0, f"expected str, got {type(mti).__name__}")
        try:
            b = binascii.a2b_hex(mti) if self._mti_bin else self._mti_enc(mti)
        except (binascii.Error, ValueError, UnicodeError):
            raise EncodeError(0, "MTI cannot be encoded") from None
        if len(b) != self._mti_len:
            raise EncodeError(0, f"MTI is {len(b)} bytes, expecting {self._mti_len}")
        if len(self._mti_bytes) < 1024:
            self._mti_bytes[mti] = b
        return b

    def _encode_header(self, m: Message) -> bytes:
        c = self._header
        if c is None:
            return b""
        if m._hdr is None:
            raise EncodeError("header", "the spec requires a message header", 0)
        try:
            return c.encode(m._hdr)
        except EncodeError as e:
            raise EncodeError("header", e.reason, 0) from None

    def encode(self, m: Message) -> bytes:
        """Encode ``m``; a decoded, unchanged message gives back its original bytes."""
        if m._spec is self:
            if m._clean:
                return m._data  # type: ignore[return-value]
            return self._encode_patch(m)
        keys = m._keys
        if keys is None:
            keys = m._sorted_keys()
        plan = self._plans.get(keys)
        if plan is None:
            plan = self._plan(keys)
        vals = m._vals if m._spec is None else m.fields()
        head = self._mti_bytes.get(m._mti)
        if head is None:
            head = self._encode_head(m)
        elif self._header is not None:
            head = self._encode_header(m) + head
        fast = plan.fast
        if fast is not None:
            try:
                return fast(vals, head)
            except Exception:  # the careful path below reports the exact problem
                pass
        else:
            plan.hits += 1
            if plan.hits >= _GENERATE_AFTER:
                plan.fast = _generate_encoder(plan, self._codecs)
        out = [head, plan.bitmap]
        try:
            out += [enc(vals[n]) for n, enc in zip(keys, plan.encs, strict=True)]
        except EncodeError as e:  # where the failing field would have started in the output
            pos = len(head) + len(plan.bitmap)
            for n, enc in zip(keys, plan.encs, strict=True):
                try:
                    pos += len(enc(vals[n]))
                except EncodeError:
                    raise e.at(pos) from None
            raise
        return b"".join(out)

    def _encode_patch(self, m: Message) -> bytes:
        keys = m._keys
        if keys is None:
            keys = m._sorted_keys()
        lay = m._lay
        assert lay is not None
        pk = (keys, m._dirty, m._hdirty)
        patches = lay.patches
        if patches is None:
            patches = lay.patches = {}
        entry = patches.get(pk)
        if entry is None:
            entry = _Patch(self._patch_plan(lay, keys, m._dirty, m._hdirty))
            if len(patches) >= 64:
                patches.clear()
            patches[pk] = entry
        fast = entry.fast
        if fast is not None:
            try:
                return fast(m, m._data, m._offs, m._vals)
            except EncodeError:
                pass  # the loop below reports where
        else:
            entry.hits += 1
            if entry.hits >= _GENERATE_AFTER:
                entry.fast = _generate_patch(entry.items, lay.width, self)
        data = m._data
        offs = m._offs
        assert data is not None and offs is not None
        vals = m._vals
        encs = self._encs
        out: list[bytes] = []
        append = out.append
        for item in entry.items:
            if type(item) is int:
                if item >= 0:
                    try:
                        append(encs[item](vals[item]))  # type: ignore[misc]
                    except EncodeError as e:  # where the field would have started
                        raise e.at(sum(map(len, out))) from None
                elif item == -1:  # original header + MTI
                    append(data[: offs[0] - lay.width])
                elif item == -2:  # original bitmaps
                    append(data[offs[0] - lay.width : offs[0]])
                else:  # new header + MTI
                    append(self._encode_head(m))
            elif type(item) is tuple:
                append(data[offs[item[0]] : offs[item[1]]])
            else:
                append(item)
        return b"".join(out)

    def _encode_head(self, m: Message) -> bytes:
        """The header (if the spec has one) and the MTI of ``m``, encoded."""
        if self._header is None:
            b = self._mti_bytes.get(m._mti)
            if b is not None:
                return b
            try:
                return self._encode_mti(m._mti)
            except EncodeError as e:
                raise e.at(0) from None
        header = self._encode_header(m)
        try:
            return header + self._encode_mti(m._mti)
        except EncodeError as e:
            raise e.at(len(header)) from None

    def _patch_plan(
        self, lay: Layout, keys: tuple[int, ...], dirty: frozenset[int], hdirty: bool
    ) -> tuple[Any, ...]:
        items: list[Any] = [-3 if hdirty else -1]
        items.append(-2 if keys == lay.fields else self._plan(keys).bitmap)
        index = lay.index or dict(zip(lay.fields, range(len(lay.fields)), strict=True))
        run: list[int] | None = None
        for n in keys:
            if n in dirty or n not in index:
                if self._encs[n] is None:
                    raise EncodeError(n, "field is not defined in the spec")
                if run is not None:
                    items.append(tuple(run))
                    run = None
                items.append(n)
            else:
                i = index[n]
                if run is not None and run[1] == i:
                    run[1] = i + 1
                else:
                    if run is not None:
                        items.append(tuple(run))
                    run = [i, i + 1]
        if run is not None:
            items.append(tuple(run))
        return tuple(items)

    # --- validation ------------------------------------------------------------------------
    def validate(self, m: Message) -> list[Violation]:
        """Every violation of this spec's rules in ``m`` (empty list: valid)."""
        return _validate(self, m)


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


_EMPTY: frozenset[int] = frozenset()
_new = object.__new__


from isopace.iso8583.message import Message  # noqa: E402
from isopace.iso8583.validation import validate as _validate  # noqa: E402
