"""Where a decoded message's fields lie, and the code generated to find, read and rewrite them.

Why a module of its own: this is the codec's hot path, and it needs to know the compiled field
codecs (:class:`~isopace.iso8583.fields.Codec`), nothing else: not the :class:`Spec` that
compiled them (its loaders, names and rules) and not the :class:`Message` that carries the
result. ``spec`` builds these objects; ``message`` reads them; neither reads the other's
private state through them, and this module imports neither.

- A :class:`FieldTable` is one spec's compiled data elements as tuples indexed by field number
  (encoder, decoder, prefix width, "plain ASCII", fixed size, the locator's step). The hot paths
  index these tuples instead of asking the codec objects, which costs an attribute lookup each.
- A :class:`Layout` is what one bitmap means: the fields present, the bytes the bitmaps take, and
  ``locate(data, p)``, which returns where each field starts (``offs[i]`` is field ``i``'s
  start, ``offs[-1]`` the end). Its first uses walk the table generically; from the third use on
  it is straight-line code generated for that bitmap, and so is ``bulk``, which decodes every
  field in one expression. Generation is the point of caching layouts: real traffic repeats a
  handful of bitmaps.
- A :class:`Patch` is how to re-encode a decoded message after changes: its :class:`PatchItem`
  list says, in order, which bytes of the original to copy and which fields to encode anew.
  Once used a few times it is one generated expression of slices and encoder calls.
- A :class:`Plan` is how to encode one set of fields from scratch (bitmap, encoders), generated
  into one expression too once seen a few times.

Generated code only ever raises to say "not the fast case": the callers then take the careful
path, which reports the exact :class:`~isopace.iso8583.errors.DecodeError` or
:class:`~isopace.iso8583.errors.EncodeError`. Both paths give the same bytes and values, which
``tests/iso8583/test_fastpaths.py`` checks.
"""

from __future__ import annotations

import binascii
import enum
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from isopace.iso8583.errors import EncodeError
from isopace.iso8583.fields import Codec

MAX_FIELD = 192
GENERATE_AFTER = 3  # a layout, plan or patch gets generated code the n-th time it is used


class Mislocated(Exception):
    """Raised by the fast locators; the careful path then finds the exact error."""


def _ascii(c: Codec | None) -> bool:
    return bool(c and c.fd.kind == "text" and c.fd.data_enc.lower() in ("ascii", "us-ascii"))


class FieldTable:
    """One spec's compiled data elements, as tuples indexed by field number (None: undefined)."""

    __slots__ = ("asc", "ascii_wire", "codecs", "decs", "encs", "fixed", "plens", "steps")

    def __init__(self, codecs: tuple[Codec | None, ...]) -> None:
        self.codecs = codecs
        self.encs = tuple(c.encode if c else None for c in codecs)
        self.decs = tuple(c.decode if c else None for c in codecs)
        self.plens = tuple(c.plen if c else 0 for c in codecs)
        #: the field is ASCII text: its value is its bytes decoded as ASCII, nothing more
        self.asc = tuple(_ascii(c) for c in codecs)
        #: wire size of a fixed field; -1 variable, -2 undefined
        self.fixed = tuple(-2 if c is None else c.fixed_size if not c.plen else -1 for c in codecs)
        #: every field is ASCII text or hex characters: a valid message is ASCII as a whole
        self.ascii_wire = all(c is None or self.asc[c.number] or c.fd.kind == "hex" for c in codecs)
        #: what the generic locator needs of a variable field, in one tuple
        self.steps: tuple[Any, ...] = tuple(
            None
            if c is None
            else c.fixed_size
            if not c.plen
            else (c.plen, c.len_table, c.read_len, c.fd.max_len, c.nibbles, 0)
            for c in codecs
        )


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
        "table",
        "width",
    )

    def __init__(self, fields: tuple[int, ...], width: int, table: FieldTable | None) -> None:
        self.fields = fields
        self.index: dict[int, int] | None = None  # built when the layout is seen again
        self.width = width  # bytes taken by the bitmaps
        self.ext = table is None  # marker entry: a further bitmap follows
        self.table: FieldTable = table  # type: ignore[assignment]  # None only in the marker
        self.hits = 0
        self.patches: dict[Any, Patch] | None = None
        # what reply() of a message with this layout does, per echo set (Message.reply keeps it)
        self.replies: dict[Any, tuple[Any, ...]] | None = None
        self.bulk: Callable[[bytes, Sequence[int]], dict[int, Any]] | None = None
        self.locate: Callable[[bytes, int], Sequence[int]] = self._generic

    def _generic(self, d: bytes, p: int) -> Sequence[int]:
        table = self.table
        self.hits += 1
        if self.hits >= GENERATE_AFTER:
            self.locate = _generate_locator(self.fields, table.codecs)
            self.bulk = _generate_bulk(self.fields, table)
            self.index = dict(zip(self.fields, range(len(self.fields)), strict=True))
        offs = [p]
        append = offs.append
        steps = table.steps
        fixed = table.fixed
        for n in self.fields:
            size = fixed[n]
            if size >= 0:
                p += size
            else:
                plen, lens, reader, max_len, nib, _ = steps[n]
                if lens is not None:
                    count = lens[d[p : p + plen]]
                else:
                    count = reader(d, p)
                    if count > max_len:
                        raise Mislocated
                p += plen + ((count + 1) >> 1 if nib else count)
            append(p)
        if p != len(d):
            raise Mislocated
        return offs


#: the cache entry of a bitmap whose fields depend on a further bitmap
EXTENDED = Layout((), 0, None)


def _generate_locator(
    fields: tuple[int, ...], codecs: tuple[Codec | None, ...]
) -> Callable[..., Any]:
    """Straight-line locator for one layout: ``o<i>`` is where field i starts."""
    ns: dict[str, Any] = {"Mislocated": Mislocated, "len": len}
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
            lines.append(f"    if n > {c.fd.max_len}: raise Mislocated")
        else:
            ns[f"R{n}"] = c.read_len
            lines.append(f"    n = R{n}(d, {cur})")
            lines.append(f"    if n > {c.fd.max_len}: raise Mislocated")
        if c.nibbles:
            lines.append(f"    {nxt} = {cur} + {w} + ((n + 1) >> 1)")
        else:
            lines.append(f"    {nxt} = {cur} + {w} + n")
    last = f"o{len(fields)}"
    lines.append(f"    if {last} != len(d): raise Mislocated")
    lines.append("    return (" + ", ".join(f"o{i}" for i in range(len(fields) + 1)) + ",)")
    exec("\n".join(lines), ns)
    return ns["locate"]  # type: ignore[no-any-return]


def _generate_bulk(fields: tuple[int, ...], table: FieldTable) -> Callable[..., dict[int, Any]]:
    """Decode every field of one layout in one expression (used once a message has had a few
    fields read: the rest are then decoded together). ASCII fields are sliced out of the
    message decoded once as a whole. Any exception: the caller falls back to decoding field by
    field, which reports the exact problem."""
    ns: dict[str, Any] = {}
    items = []
    whole = table.ascii_wire
    plens, asc = table.plens, table.asc
    for i, n in enumerate(fields):
        start = f"o[{i}] + {plens[n]}" if plens[n] else f"o[{i}]"
        if asc[n] and whole:
            items.append(f"{n}: t[{start}:o[{i + 1}]]")
        elif asc[n]:
            items.append(f"{n}: d[{start}:o[{i + 1}]].decode('ascii')")
        else:
            ns[f"D{n}"] = table.decs[n]
            items.append(f"{n}: D{n}(d, {start}, o[{i + 1}])")
    # the whole message as ASCII: only valid if every byte is ASCII (else per-field decoding)
    text = "    t = d.decode('ascii')\n" if whole else ""
    src = "def bulk(d, o):\n" + text + "    return {" + ", ".join(items) + "}"
    exec(src, ns)
    return ns["bulk"]  # type: ignore[no-any-return]


# --- re-encoding a changed decoded message ------------------------------------------------------
class Part(enum.Enum):
    """What a :class:`PatchItem` writes."""

    OLD_HEAD = "the original header and MTI"
    NEW_HEAD = "the header and MTI encoded anew"
    OLD_BITMAPS = "the original bitmaps"
    RAW = "bytes as they are (the bitmaps of a changed set of fields)"
    SPAN = "the original bytes of the layout's fields start .. stop - 1"
    FIELD = "one field encoded anew"


class PatchItem(NamedTuple):
    """One piece of a re-encoded message; which attributes matter depends on ``part``."""

    part: Part
    field: int = 0  # FIELD: the data element
    start: int = 0  # SPAN: index (in the layout's fields) of the first field copied
    stop: int = 0  # SPAN: index after the last one
    raw: bytes = b""  # RAW: the bytes


_OLD_HEAD = PatchItem(Part.OLD_HEAD)
_NEW_HEAD = PatchItem(Part.NEW_HEAD)
_OLD_BITMAPS = PatchItem(Part.OLD_BITMAPS)


def patch_plan(
    lay: Layout,
    keys: tuple[int, ...],
    dirty: frozenset[int],
    head_changed: bool,
    bitmaps: Callable[[tuple[int, ...]], bytes],
) -> tuple[PatchItem, ...]:
    """How to encode a message of layout ``lay`` that now has fields ``keys``, ``dirty`` of them
    changed: the unchanged ones in runs copied from the original bytes, one slice per run.
    ``bitmaps(keys)`` encodes the bitmaps of another set of fields than the layout's."""
    items = [_NEW_HEAD if head_changed else _OLD_HEAD]
    items.append(_OLD_BITMAPS if keys == lay.fields else PatchItem(Part.RAW, raw=bitmaps(keys)))
    index = lay.index or dict(zip(lay.fields, range(len(lay.fields)), strict=True))
    encs = lay.table.encs
    run: list[int] | None = None  # [start, stop) of the run of unchanged fields being built
    for n in keys:
        if n in dirty or n not in index:
            if encs[n] is None:
                raise EncodeError(n, "field is not defined in the spec")
            if run is not None:
                items.append(PatchItem(Part.SPAN, start=run[0], stop=run[1]))
                run = None
            items.append(PatchItem(Part.FIELD, field=n))
        else:
            i = index[n]
            if run is not None and run[1] == i:
                run[1] = i + 1
            else:
                if run is not None:
                    items.append(PatchItem(Part.SPAN, start=run[0], stop=run[1]))
                run = [i, i + 1]
    if run is not None:
        items.append(PatchItem(Part.SPAN, start=run[0], stop=run[1]))
    return tuple(items)


Head = Callable[[Any], bytes]  # the header and MTI of a message, encoded


class Patch:
    """A patch plan and, once used a few times, ``fast``: a generated straight-line function
    doing the same (callers try it first; :meth:`apply` is the item by item path)."""

    __slots__ = ("encs", "fast", "head", "hits", "items", "width")

    def __init__(
        self, items: tuple[PatchItem, ...], width: int, head: Head, encs: Sequence[Any]
    ) -> None:
        self.items = items
        self.width = width  # of the original bitmaps
        self.head = head
        self.encs = encs
        self.hits = 0
        self.fast: Callable[[Any, bytes, Sequence[int], dict[int, Any]], bytes] | None = None

    def apply(self, m: Any, data: bytes, offs: Sequence[int], vals: dict[int, Any]) -> bytes:
        """The bytes of message ``m`` (its header and MTI encoded by ``head(m)``), whose original
        is ``data`` with fields at ``offs`` and whose changed values are in ``vals``; an
        :class:`EncodeError` says where the failing field would have started."""
        if self.fast is None:
            self.hits += 1
            if self.hits >= GENERATE_AFTER:
                self.fast = _generate_patch(self.items, self.width, self.head, self.encs)
        width = self.width
        encs = self.encs
        out: list[bytes] = []
        append = out.append
        for item in self.items:
            part = item.part
            if part is Part.FIELD:
                n = item.field
                try:
                    append(encs[n](vals[n]))
                except EncodeError as e:  # where the field would have started
                    raise e.at(sum(map(len, out))) from None
            elif part is Part.SPAN:
                append(data[offs[item.start] : offs[item.stop]])
            elif part is Part.OLD_HEAD:
                append(data[: offs[0] - width])
            elif part is Part.OLD_BITMAPS:
                append(data[offs[0] - width : offs[0]])
            elif part is Part.NEW_HEAD:
                append(self.head(m))
            else:
                append(item.raw)
        return b"".join(out)


def _generate_patch(
    items: tuple[PatchItem, ...], width: int, head: Head, encs: Sequence[Any]
) -> Callable[..., bytes]:
    """One expression for a patch plan: slices of the original bytes, new fields through their
    encoders (which raise the exact :class:`EncodeError`, as the item loop does)."""
    ns: dict[str, Any] = {"HEAD": head}
    parts = []
    for k, item in enumerate(items):
        part = item.part
        if part is Part.FIELD:
            n = item.field
            ns[f"E{n}"] = encs[n]
            parts.append(f"E{n}(v[{n}])")
        elif part is Part.SPAN:
            parts.append(f"d[o[{item.start}]:o[{item.stop}]]")
        elif part is Part.OLD_HEAD:
            parts.append(f"d[:o[0] - {width}]")
        elif part is Part.OLD_BITMAPS:
            parts.append(f"d[o[0] - {width}:o[0]]")
        elif part is Part.NEW_HEAD:
            parts.append("HEAD(m)")
        else:
            ns[f"K{k}"] = item.raw
            parts.append(f"K{k}")
    src = "def patch(m, d, o, v):\n    return b''.join((" + ", ".join(parts) + ",))"
    exec(src, ns)
    return ns["patch"]  # type: ignore[no-any-return]


# --- encoding a message built in code ------------------------------------------------------------
class Plan:
    """How to encode one set of fields: the bitmaps, the encoders, and (once used a few
    times) a generated straight-line encoder."""

    __slots__ = ("bitmap", "encs", "fast", "hits", "keys")

    def __init__(self, keys: tuple[int, ...], bitmap: bytes, encs: tuple[Any, ...]) -> None:
        self.keys = keys
        self.bitmap = bitmap
        self.encs = encs
        self.hits = 0
        self.fast: Callable[[dict[int, Any], bytes], bytes] | None = None


def generate_encoder(plan: Plan, codecs: tuple[Codec | None, ...]) -> Callable[..., bytes]:
    """Straight-line encoder for one set of fields: ASCII text, hex and binary fields inline,
    others through their compiled encoder. Any exception sends the caller to the careful path."""
    ns: dict[str, Any] = {
        "Mislocated": Mislocated,
        "BM": plan.bitmap,
        "HX": binascii.b2a_hex,
        "bytes": bytes,
    }
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
            lines.append(f"    if type(b{n}) is not bytes: raise Mislocated")
        else:
            ns[f"C{n}"] = c.encode
            parts.append(f"C{n}(vals[{n}])")
            continue
        if c.plen == 0:
            lines.append(f"    if len(b{n}) != {fd.max_len}: raise Mislocated")
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


# --- bitmaps -------------------------------------------------------------------------------------
def _bit_tables() -> tuple[tuple[tuple[int, ...], ...], ...]:
    return tuple(
        tuple(
            tuple(8 * pos + bit + 1 for bit in range(8) if byte & (0x80 >> bit))
            for byte in range(256)
        )
        for pos in range(24)
    )


#: ``BITS[pos][byte]``: the field numbers byte ``pos`` of the 24 bitmap bytes announces
BITS = _bit_tables()
