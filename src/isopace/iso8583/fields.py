"""Field definitions and their compiled codecs.

A :class:`FieldDef` is the description of one data element in pyiso8583's vocabulary
(``data_enc``, ``len_enc``, ``len_type``, ``max_len``, ``len_count``, ``left_pad``/``right_pad``)
plus a content class (``n``, ``an``, ``ans``, ``b``, ``z``, ``x+n``). :func:`compile_field` turns it
once into plain closures: a length-prefix reader, an encoder ``value -> wire bytes`` and a lazy
decoder ``(data, start, end) -> value``. Nothing interprets the definition per message.

Value types follow the data encoding:

- text encodings (``ascii``, ``latin-1``, EBCDIC ``cp500`` / ``cp037`` / ``cp1047``, any
  Python codec): ``str``;
- ``b`` counted in nibbles, or ``b`` with a numeric content class (``n``, ``z``, ``x+n``): BCD
  packed digits, ``str`` of hex digits (leading zeros kept, pad nibble removed as pyiso8583 does);
- track 2 (content ``z``) in BCD: ``=`` is written as the nibble ``D`` and read back as ``=``;
- ``b`` otherwise: raw binary, ``bytes`` (pyiso8583 shows these as upper-case hex strings);
- ``hex`` (an isopace extension): binary carried as ASCII hex characters on the wire (``bytes``
  value; the length prefix and ``max_len`` count wire characters, so the wire is the same as a
  pyiso8583 ``ascii`` field holding upper-case hex).
"""

from __future__ import annotations

import binascii
import codecs
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from isopace.iso8583.errors import DecodeError, EncodeError

Value = str | bytes
Encoder = Callable[[Any], bytes]
Decoder = Callable[[bytes, int, int], Value]
LenReader = Callable[[bytes, int], int]

CONTENT_CLASSES = frozenset({"n", "a", "an", "ans", "as", "ns", "b", "z", "x+n", "hex"})
_KINDS = ("text", "bcd", "bin", "hex")


# --- EBCDIC cp1047 (not in the standard library): a permutation of Latin-1 ----------------------


def _cp1047_tables() -> tuple[bytes, bytes]:
    to_latin = bytearray(bytes(range(256)).decode("cp037").encode("latin-1"))
    for pos, char in ((0x5F, "^"), (0xB0, "¬"), (0xAD, "["), (0xBD, "]"), (0xBA, "Ý"), (0xBB, "¨")):
        to_latin[pos] = ord(char)
    from_latin = bytearray(256)
    for ebcdic, latin in enumerate(to_latin):
        from_latin[latin] = ebcdic
    return bytes(to_latin), bytes(from_latin)


_CP1047_TO_LATIN1, _LATIN1_TO_CP1047 = _cp1047_tables()


def text_codec(enc: str) -> tuple[Callable[[str], bytes], Callable[[bytes], str]]:
    """(encode, decode) functions for a text encoding name; raises LookupError if unknown."""
    name = enc.lower().replace("_", "-")
    if name in ("cp1047", "ibm1047", "ibm-1047", "1047"):
        to_l, from_l = _CP1047_TO_LATIN1, _LATIN1_TO_CP1047

        def enc1047(s: str) -> bytes:
            return s.encode("latin-1").translate(from_l)

        def dec1047(b: bytes) -> str:
            return b.translate(to_l).decode("latin-1")

        return enc1047, dec1047
    codecs.lookup(enc)

    def encode(s: str) -> bytes:
        return s.encode(enc)

    def decode(b: bytes) -> str:
        return b.decode(enc)

    return encode, decode


# --- field definition --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FieldDef:
    """One data element, in pyiso8583's terms plus a content class."""

    max_len: int
    data_enc: str = "ascii"
    len_enc: str = "ascii"
    len_type: int = 0
    len_count: str = "bytes"
    left_pad: str = ""
    right_pad: str = ""
    content: str | None = None
    desc: str = ""
    extra: tuple[tuple[str, Any], ...] = field(default=(), compare=True)

    @property
    def kind(self) -> str:
        if self.data_enc == "hex":
            return "hex"
        if self.data_enc == "b":
            if self.len_count == "nibbles" or self.content in ("n", "z", "x+n"):
                return "bcd"
            return "bin"
        return "text"

    @property
    def fixed(self) -> bool:
        return self.len_type == 0

    @property
    def binary(self) -> bool:
        """True when the value is ``bytes``."""
        return self.kind in ("bin", "hex")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "data_enc": self.data_enc,
            "len_enc": self.len_enc,
            "len_type": self.len_type,
            "max_len": self.max_len,
            "desc": self.desc,
        }
        if self.len_count != "bytes":
            d["len_count"] = self.len_count
        if self.left_pad:
            d["left_pad"] = self.left_pad
        if self.right_pad:
            d["right_pad"] = self.right_pad
        if self.content is not None:
            d["content"] = self.content
        for k, v in self.extra:
            d[k] = v
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "field") -> FieldDef:
        from isopace.iso8583.errors import Iso8583Error

        known = {
            "data_enc",
            "len_enc",
            "len_type",
            "max_len",
            "len_count",
            "left_pad",
            "right_pad",
            "content",
            "desc",
        }
        try:
            fd = cls(
                max_len=int(d["max_len"]),
                data_enc=str(d.get("data_enc", "ascii")),
                len_enc=str(d.get("len_enc", "ascii")),
                len_type=int(d.get("len_type", 0)),
                len_count=str(d.get("len_count", "bytes")),
                left_pad=str(d.get("left_pad", ""))[:1],
                right_pad=str(d.get("right_pad", ""))[:1],
                content=d.get("content"),
                desc=str(d.get("desc", "")),
                extra=tuple(sorted((k, v) for k, v in d.items() if k not in known)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise Iso8583Error(f"{where}: invalid field definition ({e})") from None
        if fd.len_count not in ("bytes", "nibbles"):
            raise Iso8583Error(f"{where}: len_count must be 'bytes' or 'nibbles'")
        if fd.len_type < 0 or fd.max_len < 0:
            raise Iso8583Error(f"{where}: len_type and max_len must not be negative")
        if fd.content is not None and fd.content not in CONTENT_CLASSES:
            raise Iso8583Error(f"{where}: unknown content class {fd.content!r}")
        if fd.data_enc not in ("b", "hex"):
            try:
                text_codec(fd.data_enc)
            except LookupError:
                raise Iso8583Error(f"{where}: unknown data encoding {fd.data_enc!r}") from None
        if fd.len_type and fd.len_enc not in ("b", "bcd"):
            try:
                text_codec(fd.len_enc)
            except LookupError:
                raise Iso8583Error(f"{where}: unknown length encoding {fd.len_enc!r}") from None
        return fd


# --- compiled codec ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Codec:
    """The compiled form of a FieldDef: closures plus what generated code needs."""

    number: int
    fd: FieldDef
    plen: int  # width of the length prefix in bytes (0: fixed)
    nibbles: bool
    read_len: LenReader  # prefix value at data[p:p+plen]; KeyError/IndexError/ValueError if bad
    len_table: dict[bytes, int] | None  # prefix bytes -> count (text/BCD prefixes up to 4 digits)
    encode: Encoder  # value -> prefix + data
    decode: Decoder  # (message bytes, data start, data end) -> value
    fixed_size: int  # wire bytes of a fixed field (0 for variable)


_MAX_TABLE_DIGITS = 4


def _prefix_tables(
    fd: FieldDef, number: int
) -> tuple[LenReader, dict[bytes, int] | None, Callable[[int], bytes]]:
    """Length-prefix reader, lookup table (or None) and writer for a variable field."""
    w = fd.len_type
    cap_digits: int
    if fd.len_enc == "b":
        cap = (1 << (8 * w)) - 1

        if w == 1:

            def read_b1(d: bytes, p: int) -> int:
                return d[p]

            reader: LenReader = read_b1
        else:

            def read_bn(d: bytes, p: int) -> int:
                chunk = d[p : p + w]
                if len(chunk) != w:
                    raise IndexError
                return int.from_bytes(chunk, "big")

            reader = read_bn

        def write_b(n: int) -> bytes:
            return n.to_bytes(w, "big")

        return reader, None, write_b
    if fd.len_enc == "bcd":
        cap_digits = 2 * w
        cap = 10**cap_digits - 1

        def write_bcd(n: int) -> bytes:
            return binascii.a2b_hex(f"{n:0{cap_digits}d}")

        table: dict[bytes, int] | None = None
        if cap_digits <= _MAX_TABLE_DIGITS:
            table = {write_bcd(i): i for i in range(min(cap, fd.max_len) + 1)}

        def read_bcd(d: bytes, p: int) -> int:
            chunk = d[p : p + w]
            h = chunk.hex()
            if len(chunk) != w or not h.isdigit():
                raise ValueError("invalid BCD length")
            return int(h)

        return read_bcd, table, write_bcd
    enc, dec = text_codec(fd.len_enc)
    cap = 10**w - 1

    def write_text(n: int) -> bytes:
        return enc(f"{n:0{w}d}")

    table = None
    if w <= _MAX_TABLE_DIGITS:
        table = {write_text(i): i for i in range(min(cap, fd.max_len) + 1)}

    def read_text(d: bytes, p: int) -> int:
        chunk = d[p : p + w]
        if len(chunk) != w:
            raise IndexError
        s = dec(chunk)
        if not (s.isascii() and s.isdigit()):
            raise ValueError("non-numeric length")
        return int(s)

    return read_text, table, write_text


def _enc_error(number: int, reason: str) -> EncodeError:
    return EncodeError(number, reason)


def compile_field(number: int, fd: FieldDef) -> Codec:
    """Compile one field definition into its closures."""
    kind = fd.kind
    nibbles = fd.len_count == "nibbles"
    max_len = fd.max_len
    w = fd.len_type
    unit = fd.len_count

    # --- data part: value -> (data bytes, counted length) ------------------------------------
    if kind == "text":
        tenc, tdec = text_codec(fd.data_enc)

        def data_enc(v: Any) -> tuple[bytes, int]:
            if not isinstance(v, str):
                raise _enc_error(number, f"expected str, got {type(v).__name__}")
            try:
                b = tenc(v)
            except UnicodeError:
                raise _enc_error(
                    number, f"value has characters that {fd.data_enc} cannot encode"
                ) from None
            return b, (2 * len(b) if nibbles else len(b))

        def decode(d: bytes, s: int, e: int) -> Value:
            try:
                return tdec(d[s:e])
            except UnicodeError:
                raise DecodeError(number, s, f"invalid {fd.data_enc} data") from None

    elif kind == "hex":

        def data_enc(v: Any) -> tuple[bytes, int]:
            if isinstance(v, str):
                try:
                    v = binascii.a2b_hex(v)
                except (binascii.Error, ValueError):
                    raise _enc_error(number, "expected bytes or an even-length hex str") from None
            elif not isinstance(v, bytes | bytearray | memoryview):
                raise _enc_error(number, f"expected bytes, got {type(v).__name__}")
            b = binascii.b2a_hex(v).upper()
            return b, (2 * len(b) if nibbles else len(b))

        def decode(d: bytes, s: int, e: int) -> Value:
            try:
                return binascii.a2b_hex(d[s:e])
            except (binascii.Error, ValueError):
                raise DecodeError(number, s, "invalid hex data") from None

    elif kind == "bin":

        def data_enc(v: Any) -> tuple[bytes, int]:
            if isinstance(v, str):
                try:
                    v = binascii.a2b_hex(v)
                except (binascii.Error, ValueError):
                    raise _enc_error(number, "expected bytes or an even-length hex str") from None
            elif not isinstance(v, bytes | bytearray | memoryview):
                raise _enc_error(number, f"expected bytes, got {type(v).__name__}")
            b = bytes(v)
            return b, (2 * len(b) if nibbles else len(b))

        def decode(d: bytes, s: int, e: int) -> Value:
            return d[s:e]

    else:  # bcd
        lpad = fd.left_pad[:1]
        rpad = fd.right_pad[:1]
        track = fd.content == "z"  # track 2 in BCD: the '=' separator travels as nibble D

        def data_enc(v: Any) -> tuple[bytes, int]:
            if not isinstance(v, str):
                raise _enc_error(number, f"expected str of digits, got {type(v).__name__}")
            if track:
                v = v.replace("=", "D")
            n = len(v)
            if n & 1:
                if lpad:
                    v = lpad + v
                elif rpad:
                    v = v + rpad
                else:
                    raise _enc_error(number, "odd-length BCD data and no pad defined")
            try:
                b = binascii.a2b_hex(v)
            except (binascii.Error, ValueError):
                raise _enc_error(number, "BCD data must be hex digits") from None
            return b, (n if nibbles else len(b))

        if nibbles:
            plen_ = w
            if w:
                reader_holder: list[LenReader] = []

                def decode(d: bytes, s: int, e: int) -> Value:
                    h = d[s:e].hex().upper()
                    count = reader_holder[0](d, s - plen_)
                    if count & 1:
                        if lpad and h[:1] == lpad:
                            return h[1:]
                        if rpad and h[-1:] == rpad:
                            return h[:-1]
                        raise DecodeError(
                            number, s, f"BCD data is {len(h)} nibbles, expecting {count}"
                        )
                    return h

            else:
                odd = bool(max_len & 1)

                def decode(d: bytes, s: int, e: int) -> Value:
                    h = d[s:e].hex().upper()
                    if odd:
                        if lpad and h[:1] == lpad:
                            return h[1:]
                        if rpad and h[-1:] == rpad:
                            return h[:-1]
                        raise DecodeError(
                            number, s, f"BCD data is {len(h)} nibbles, expecting {max_len}"
                        )
                    return h

        else:

            def decode(d: bytes, s: int, e: int) -> Value:
                return d[s:e].hex().upper()

    if kind == "bcd" and fd.content == "z":
        plain = decode

        def decode(d: bytes, s: int, e: int) -> Value:
            v = plain(d, s, e)
            return v.replace("D", "=") if isinstance(v, str) else v

    # --- prefix ---------------------------------------------------------------------------
    if w == 0:
        size = (max_len + 1) // 2 if nibbles else max_len

        def read_fixed(d: bytes, p: int) -> int:
            return max_len

        def encode_fixed(v: Any) -> bytes:
            b, n = data_enc(v)
            if n != max_len:
                raise _enc_error(number, f"length {n} {unit}, expecting exactly {max_len}")
            return b

        return Codec(number, fd, 0, nibbles, read_fixed, None, encode_fixed, decode, size)

    reader, table, writer = _prefix_tables(fd, number)
    if kind == "bcd" and nibbles:
        reader_holder.append(reader)
    digits = 2 * w if fd.len_enc == "bcd" else w
    cap = (1 << (8 * w)) - 1 if fd.len_enc == "b" else 10**digits - 1
    limit = min(max_len, cap)
    prefixes = [writer(i) for i in range(min(limit, 9999) + 1)]
    n_pref = len(prefixes)

    def encode(v: Any) -> bytes:
        b, n = data_enc(v)
        if n > limit:
            if n > max_len:
                raise _enc_error(number, f"length {n} {unit} exceeds max {max_len}")
            raise _enc_error(number, f"length {n} does not fit a {w}-byte length prefix")
        if n < n_pref:
            return prefixes[n] + b
        return writer(n) + b

    return Codec(number, fd, w, nibbles, reader, table, encode, decode, 0)
