"""A spec's wire format, compiled: header, MTI, bitmaps, the layout cache and the encoders.

Why apart from :class:`~isopace.iso8583.spec.Spec`: a spec is a description (field definitions,
required fields, composites, loaders and JSON); this is what that description compiles into, the
part every message goes through. It sits below both ``spec`` and ``message`` and reads neither's
private state: ``Spec.decode`` asks it where the fields lie and hands the result to the message as
its wire image, and ``Spec.encode`` hands it the message's fields (encoding needs only the public
``mti`` and ``header`` of a message, and what the message passes).

How (see also :mod:`isopace.iso8583._layout`):

- Compilation happens once, in the constructor: every field becomes closures (length reader,
  encoder, decoder) and lookup tables (length prefixes up to four digits, bitmap bits).
- ``head`` reads the header and MTI (MTIs are cached as decoded, the common case a dict
  lookup); ``layout`` looks the bitmap up in a bounded cache of layouts; ``locate`` finds the
  fields' spans, through the layout's generated code when it has it, else field by field with
  exact errors. Caches are bounded (``cache_size``; the oldest quarter is dropped when full), so
  a stream of ever-new bitmaps costs no memory growth.
- ``encode`` encodes a set of fields from scratch through a cached :class:`~._layout.Plan`;
  ``patch`` re-encodes a changed decoded message through a cached :class:`~._layout.Patch`.
- Errors never carry field values (so never card data), only numbers, lengths and offsets.
"""

from __future__ import annotations

import binascii
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from isopace.iso8583._layout import (
    BITS,
    EXTENDED,
    GENERATE_AFTER,
    MAX_FIELD,
    FieldTable,
    Layout,
    Patch,
    Plan,
    generate_encoder,
    patch_plan,
)
from isopace.iso8583.errors import DecodeError, EncodeError
from isopace.iso8583.fields import Codec, FieldDef, compile_field, text_codec

Value = str | bytes
_B0, _B1, _B2, _B3, _B4, _B5, _B6, _B7 = BITS[:8]


class Headed(Protocol):
    """What encoding reads of a message besides its fields."""

    @property
    def mti(self) -> str: ...

    @property
    def header(self) -> Value | None: ...


def _hex_upper(b: bytes) -> bytes:
    return binascii.b2a_hex(b).upper()


Bitmap = tuple[int, Callable[[bytes], bytes], Callable[[bytes], bytes]]  # width, decode, encode


def _bitmap_codec(fd: FieldDef) -> Bitmap:
    if fd.data_enc == "b":
        return 8, bytes, bytes
    if fd.data_enc.lower() in ("ascii", "us-ascii", "latin-1", "latin1"):
        return 16, binascii.a2b_hex, _hex_upper
    tenc, tdec = text_codec(fd.data_enc)

    def dec(b: bytes) -> bytes:
        s = tdec(b)
        if not s.isascii():
            raise ValueError
        return binascii.a2b_hex(s)

    def enc(b: bytes) -> bytes:
        return tenc(b.hex().upper())

    return 16, dec, enc


class WireFormat:
    """The compiled wire format of one spec's field definitions ``defs``."""

    def __init__(self, defs: Mapping[str, FieldDef], cache_size: int) -> None:
        codecs: list[Codec | None] = [None] * (MAX_FIELD + 1)
        for n in range(2, MAX_FIELD + 1):
            fd = defs.get(str(n))
            if fd is not None and n != 65:
                codecs[n] = compile_field(n, fd)
        self.table = FieldTable(tuple(codecs))
        self.cache_size = cache_size
        h = defs["h"]
        self.header: Codec | None = compile_field(-1, h) if h.max_len > 0 else None
        t = defs.get("t") or FieldDef(max_len=0, desc="(no MTI)")
        self.mti_bin = t.data_enc == "b"
        self.mti_len = 0 if "t" not in defs else 2 if self.mti_bin else 4
        if not self.mti_bin:
            self.mti_enc, self.mti_dec = text_codec(t.data_enc)
        self.bm1 = _bitmap_codec(defs["p"])
        secondary = defs.get("1")  # the secondary and tertiary bitmaps; like the primary if absent
        self.bm2 = _bitmap_codec(defs["p"] if secondary is None else secondary)
        self.bmw = self.bm1[0]
        # bitmap bytes -> layout, per number of bitmaps (EXTENDED: a further bitmap follows)
        self.layouts: dict[bytes, Layout] = {}
        self.layouts2: dict[bytes, Layout] = {}
        self.layouts3: dict[bytes, Layout] = {}
        self.plans: dict[tuple[int, ...], Plan] = {}
        self.mtis: dict[bytes, str] = {}
        self.mti_bytes: dict[str, bytes] = {}

    # --- decoding ----------------------------------------------------------------------------
    def head(self, data: bytes) -> tuple[int, Value | None, str]:
        """Where the bitmaps start, the header (None without one) and the MTI of ``data``."""
        p = 0
        header: Value | None = None
        if self.header is not None:
            p, header = self._decode_header(data)
        ml = self.mti_len
        mb = data[p : p + ml]
        mti = self.mtis.get(mb)
        if mti is None:
            mti = self._decode_mti(mb, p)
        return p + ml, header, mti

    def _decode_mti(self, mb: bytes, p: int) -> str:
        if len(mb) != self.mti_len:
            raise DecodeError(0, p, f"MTI is {len(mb)} bytes, expecting {self.mti_len}")
        if self.mti_bin:
            mti = mb.hex().upper()
        else:
            try:
                mti = self.mti_dec(mb)
            except UnicodeError:
                raise DecodeError(0, p, "MTI is not valid text") from None
        if len(self.mtis) < 1024:
            self.mtis[mb] = mti
        return mti

    def _decode_header(self, data: bytes) -> tuple[int, Value]:
        c = self.header
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
        width, dec, _ = self.bm1 if which == 1 else self.bm2
        raw = data[p : p + width]
        name = ("primary", "secondary", "tertiary")[which - 1]
        field: int | str = ("bitmap", 1, 65)[which - 1]  # the bitmaps' data element numbers
        if len(raw) != width:
            raise DecodeError(field, p, f"{name} bitmap is {len(raw)} bytes, expecting {width}")
        try:
            return dec(raw)
        except (ValueError, UnicodeError, binascii.Error):
            raise DecodeError(field, p, f"{name} bitmap is not valid hex") from None

    def layout(self, data: bytes, p: int) -> Layout:
        """The layout of the bitmaps starting at ``data[p]`` (cached)."""
        lay = self.layouts.get(data[p : p + self.bmw])
        if lay is None or lay.ext:
            lay = self.new_layout(data, p)
        return lay

    def new_layout(self, data: bytes, p: int) -> Layout:
        """:meth:`layout` when the primary bitmap alone is not a cached layout: a further
        bitmap follows (looked up in its own cache), or a bitmap never seen (or dropped)."""
        w1 = self.bmw
        key1 = data[p : p + w1]
        try:
            bm = self.bm1[1](key1)
        except Exception:
            bm = b""
        if len(bm) != 8:
            bm = self._bitmap_at(data, p, 1)  # reports the problem
        if not bm[0] & 0x80:  # the common case, inlined and unrolled
            b0, b1, b2, b3, b4, b5, b6, b7 = bm
            fields = _B0[b0] + _B1[b1] + _B2[b2] + _B3[b3] + _B4[b4] + _B5[b5] + _B6[b6] + _B7[b7]
            lay = Layout(fields, w1, self.table)
            cache = self.layouts
            if len(cache) >= self.cache_size:
                self._store(cache, key1, lay)
            else:
                cache[key1] = lay
            return lay
        w2 = self.bm2[0]
        if key1 not in self.layouts:
            self._store(self.layouts, key1, EXTENDED)
        key2 = data[p : p + w1 + w2]
        lay2 = self.layouts2.get(key2)
        if lay2 is not None and not lay2.ext:
            return lay2
        bm += self._bitmap_at(data, p + w1, 2)
        if not bm[8] & 0x80:
            return self._cache(self.layouts2, key2, bm, w1 + w2)
        if key2 not in self.layouts2:
            self._store(self.layouts2, key2, EXTENDED)
        key3 = data[p : p + w1 + 2 * w2]
        lay3 = self.layouts3.get(key3)
        if lay3 is not None:
            return lay3
        bm += self._bitmap_at(data, p + w1 + w2, 3)
        return self._cache(self.layouts3, key3, bm, w1 + 2 * w2)

    def _store(self, cache: dict[Any, Any], key: Any, value: Any) -> None:
        if len(cache) >= self.cache_size:
            # bounded: drop the oldest quarter (dicts keep insertion order)
            for old in list(cache)[: self.cache_size // 4]:
                cache.pop(old, None)  # another thread may have dropped it
        cache[key] = value

    def _cache(self, cache: dict[bytes, Layout], key: bytes, bm: bytes, width: int) -> Layout:
        fields: list[int] = []
        for pos, byte in enumerate(bm):
            if byte:
                fields += BITS[pos][byte]
        if width > self.bmw:  # DE 1 and 65 are bitmaps, not values
            fields = [n for n in fields if n != 1 and n != 65]
        lay = Layout(tuple(fields), width, self.table)
        self._store(cache, key, lay)
        return lay

    def locate(self, data: bytes, lay: Layout, p: int) -> Sequence[int]:
        """Where the fields of ``lay`` start in ``data``, the first one at ``p`` (one more
        offset: the end). :class:`DecodeError` naming the first problem."""
        try:
            return lay.locate(data, p)
        except Exception:
            return self.locate_careful(data, lay, p)

    def locate_careful(self, data: bytes, lay: Layout, p: int) -> tuple[int, ...]:
        """The slow, exact walk over the fields: finds and reports the first problem."""
        offs = [p]
        end = len(data)
        codecs = self.table.codecs
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

    # --- encoding ----------------------------------------------------------------------------
    def plan(self, keys: tuple[int, ...]) -> Plan:
        """Bitmap bytes and per-field encoders for a set of fields (cached, bounded)."""
        plan = self.plans.get(keys)
        if plan is not None:
            return plan
        encs = self.table.encs
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
        bitmap = self.bm1[2](raw[:8])
        if bits & (1 << (MAX_FIELD - 1)):
            bitmap += self.bm2[2](raw[8:16])
        if bits & (1 << (MAX_FIELD - 65)):
            bitmap += self.bm2[2](raw[16:24])
        plan = Plan(keys, bitmap, tuple(encs[n] for n in keys))
        self._store(self.plans, keys, plan)
        return plan

    def _bitmaps(self, keys: tuple[int, ...]) -> bytes:
        return self.plan(keys).bitmap

    def _encode_mti(self, mti: str) -> bytes:
        b = self.mti_bytes.get(mti)
        if b is not None:
            return b
        if not isinstance(mti, str):
            raise EncodeError(0, f"expected str, got {type(mti).__name__}")
        try:
            b = binascii.a2b_hex(mti) if self.mti_bin else self.mti_enc(mti)
        except (binascii.Error, ValueError, UnicodeError):
            raise EncodeError(0, "MTI cannot be encoded") from None
        if len(b) != self.mti_len:
            raise EncodeError(0, f"MTI is {len(b)} bytes, expecting {self.mti_len}")
        if len(self.mti_bytes) < 1024:
            self.mti_bytes[mti] = b
        return b

    def _encode_header(self, header: Value | None) -> bytes:
        c = self.header
        if c is None:
            return b""
        if header is None:
            raise EncodeError("header", "the spec requires a message header", 0)
        try:
            return c.encode(header)
        except EncodeError as e:
            raise EncodeError("header", e.reason, 0) from None

    def encode_head(self, m: Headed) -> bytes:
        """The header (if the spec has one) and the MTI of ``m``, encoded."""
        if self.header is None:
            b = self.mti_bytes.get(m.mti)
            if b is not None:
                return b
            try:
                return self._encode_mti(m.mti)
            except EncodeError as e:
                raise e.at(0) from None
        header = self._encode_header(m.header)
        try:
            return header + self._encode_mti(m.mti)
        except EncodeError as e:
            raise e.at(len(header)) from None

    def encode(self, m: Headed, keys: tuple[int, ...], vals: Mapping[int, Value]) -> bytes:
        """Encode message ``m``, whose fields are ``keys`` (sorted) with values ``vals``."""
        plan = self.plans.get(keys)
        if plan is None:
            plan = self.plan(keys)
        head = self.mti_bytes.get(m.mti)
        if head is None:
            head = self.encode_head(m)
        elif self.header is not None:
            head = self._encode_header(m.header) + head
        fast = plan.fast
        if fast is not None:
            try:
                return fast(vals, head)  # type: ignore[arg-type]
            except Exception:  # the careful path below reports the exact problem
                pass
        else:
            plan.hits += 1
            if plan.hits >= GENERATE_AFTER:
                plan.fast = generate_encoder(plan, self.table.codecs)
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

    def patch_for(
        self, lay: Layout, keys: tuple[int, ...], dirty: frozenset[int], head_changed: bool
    ) -> Patch:
        """How to re-encode a message decoded with layout ``lay`` and since changed: now with
        fields ``keys``, ``dirty`` of them changed, the header or MTI too when ``head_changed``
        (cached per layout and change; unchanged runs of fields are copied as slices)."""
        pk = (keys, dirty, head_changed)
        patches = lay.patches
        if patches is None:
            patches = lay.patches = {}
        entry = patches.get(pk)
        if entry is None:
            items = patch_plan(lay, keys, dirty, head_changed, self._bitmaps)
            entry = Patch(items, lay.width, self.encode_head, self.table.encs)
            if len(patches) >= 64:
                patches.clear()
            patches[pk] = entry
        return entry
