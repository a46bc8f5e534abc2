"""BER-TLV as EMV uses it in DE 55 (ICC system related data): parse, read, change and build.

Encoding rules (ISO/IEC 8825-1 subset, EMV Book 3 Annex B):

- Tags are 1 to 3 bytes. A tag is multi-byte when the low 5 bits of its first byte are all 1;
  each following byte continues the tag while its bit 8 is set. A tag needing a fourth byte is
  rejected. Tags are written as uppercase hex strings (``"9F26"``); lookups accept lowercase too.
- Lengths use the short form (``0x00``-``0x7F``) or the long form ``0x81``/``0x82``/``0x83``
  (1-3 length bytes, so a value holds at most ``0xFFFFFF`` bytes). The indefinite form ``0x80``
  and ``0x84`` and above are rejected. Parsing accepts non-minimal long forms (``81 05``);
  building always writes the minimal form.
- A tag whose first byte has bit 6 (``0x20``) set is constructed: its value is itself TLV and is
  parsed recursively (at most ``MAX_DEPTH`` levels), so malformed nested data fails at parse time.
- ``0x00`` bytes before, between or after objects are padding (EMV Book 3 Annex B1) and skipped;
  consequently ``00`` is not a valid tag, and building refuses it.

Decisions:

- :class:`TLV` is an immutable, hashable, read-only ``Mapping[str, bytes]`` of the top-level
  objects: ``tlv["9F26"]`` is the value bytes (for a constructed tag: its encoded content).
- Duplicate tags: EMV forbids them inside one template, but they occur in the wild. The mapping
  view keeps the **first** occurrence (what a card reader acting on the first match would do);
  ``items_in_order()`` keeps every object in wire order, duplicates included, and ``build()``
  re-encodes all of them.
- ``build()`` is canonical: minimal lengths, no padding, constructed values re-encoded from their
  children. ``parse_tlv(t.build()) == t`` always holds; ``parse_tlv(data).build() == data`` holds
  for canonically encoded input.
- Equality between two ``TLV`` compares the objects in order (duplicates included); against any
  other mapping it compares as a dict.
- Errors: malformed bytes raise :class:`TlvError` (a ``DecodeError``) naming the field, the tag
  and the byte offset in the parsed buffer: the tag's first byte for tag problems, the length's
  first byte for length problems. Invalid input to build raises :class:`TlvBuildError`, which is
  both a ``TlvError`` and an ``EncodeError`` (its ``offset`` is 0: there is no input buffer).
  Nothing else (``IndexError``, ``RecursionError``, ...) escapes on bad input.
- ``repr()`` masks card data (PAN, track equivalents, PIN data): see :mod:`isopace.iso8583.masking`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TypeAlias

from isopace._cardtext import HIDDEN, bcd_digits, mask_pan, mask_track, track_text
from isopace.iso8583.errors import DecodeError, EncodeError, Iso8583Error

__all__ = [
    "CARD_TLV_TAGS",
    "MAX_DEPTH",
    "MAX_VALUE_LENGTH",
    "TLV",
    "TlvBuildError",
    "TlvError",
    "TlvItems",
    "TlvValue",
    "build_tlv",
    "is_constructed",
    "mask_tlv",
    "parse_tlv",
]

MAX_DEPTH = 32
"""Deepest nesting of constructed tags accepted (EMV templates nest two or three levels)."""

MAX_VALUE_LENGTH = 0xFFFFFF
"""Longest value the ``0x83`` long form can carry."""

TlvValue: TypeAlias = (
    "bytes | bytearray | memoryview | TLV | Mapping[str, TlvValue] | Sequence[tuple[str, TlvValue]]"
)
"""A value to build: bytes for a primitive tag; bytes (already encoded TLV), a ``TLV``, a mapping or
a sequence of ``(tag, value)`` pairs for a constructed tag."""

TlvItems: TypeAlias = "Mapping[str, object] | Iterable[tuple[str, object]]"
"""What :func:`build_tlv` and :class:`TLV` accept: a mapping or an iterable of ``(tag, value)``
where each value is a :data:`TlvValue`. (Typed loosely so that literals mixing bytes and nested
items type-check; the values are checked at run time, raising :class:`TlvBuildError`.)"""

_Field: TypeAlias = "int | str | None"
_Entry: TypeAlias = "tuple[str, bytes, TLV | None]"

_HEX = tuple(f"{b:02X}" for b in range(256))
_HEX_DIGITS = frozenset("0123456789ABCDEF")


class TlvError(DecodeError):
    """Malformed BER-TLV. ``tag`` is the tag concerned (hex, None when it could not be read)."""

    def __init__(self, field: _Field, offset: int, reason: str, *, tag: str | None = None) -> None:
        self.tag = tag
        super().__init__(field, offset, f"tag {tag}: {reason}" if tag else reason)


class TlvBuildError(TlvError, EncodeError):
    """Items that cannot be encoded as BER-TLV (bad tag, wrong value type, value too long)."""

    def __init__(self, field: _Field, reason: str, *, tag: str | None = None) -> None:
        self.field = field
        self.offset = 0
        self.tag = tag
        self.reason = f"tag {tag}: {reason}" if tag else reason
        where = (
            "message" if field is None else (f"field {field}" if isinstance(field, int) else field)
        )
        Iso8583Error.__init__(self, f"{where}: {self.reason}")


def is_constructed(tag: str) -> bool:
    """True when ``tag`` (hex) is a constructed tag (bit 6 of its first byte set)."""
    try:
        return bool(int(tag[:2], 16) & 0x20)
    except ValueError:
        return False


# --------------------------------------------------------------------------------------- parsing


def parse_tlv(data: bytes | bytearray | memoryview, *, field: _Field = 55) -> TLV:
    """Parse BER-TLV ``data`` into a :class:`TLV`; ``field`` only names the data element in errors.

    Raises :class:`TlvError` for any malformed input.
    """
    buf = data if isinstance(data, bytes) else bytes(data)
    return _parse(buf, 0, len(buf), field, 0)


def _parse(data: bytes, start: int, end: int, field: _Field, depth: int) -> TLV:
    entries: list[_Entry] = []
    i = start
    hx = _HEX
    while i < end:
        b0 = data[i]
        if b0 == 0:
            i += 1
            continue
        tag_at = i
        i += 1
        if b0 & 0x1F == 0x1F:
            if i >= end:
                raise TlvError(field, tag_at, "truncated tag", tag=hx[b0])
            b1 = data[i]
            i += 1
            if b1 & 0x80:
                if i >= end:
                    raise TlvError(field, tag_at, "truncated tag", tag=hx[b0] + hx[b1])
                b2 = data[i]
                i += 1
                if b2 & 0x80:
                    raise TlvError(
                        field, tag_at, "tag longer than 3 bytes", tag=hx[b0] + hx[b1] + hx[b2]
                    )
                tag = hx[b0] + hx[b1] + hx[b2]
            else:
                tag = hx[b0] + hx[b1]
        else:
            tag = hx[b0]
        if i >= end:
            raise TlvError(field, i, "truncated length (no length byte)", tag=tag)
        len_at = i
        length = data[i]
        i += 1
        if length & 0x80:
            n = length & 0x7F
            if n == 0 or n > 3:
                raise TlvError(field, len_at, f"unsupported length byte 0x{length:02X}", tag=tag)
            if i + n > end:
                raise TlvError(
                    field, len_at, f"truncated length ({n} length bytes, {end - i} left)", tag=tag
                )
            length = int.from_bytes(data[i : i + n], "big")
            i += n
        value_end = i + length
        if value_end > end:
            raise TlvError(
                field, len_at, f"length {length} exceeds the {end - i} bytes left", tag=tag
            )
        child: TLV | None = None
        if b0 & 0x20:
            if depth >= MAX_DEPTH:
                raise TlvError(field, tag_at, f"nested deeper than {MAX_DEPTH} levels", tag=tag)
            child = _parse(data, i, value_end, field, depth + 1)
        entries.append((tag, data[i:value_end], child))
        i = value_end
    return TLV._from_entries(entries)


# -------------------------------------------------------------------------------------- building

_TAG_CACHE: dict[str, tuple[str, bool]] = {}


def _norm_tag(tag: object, field: _Field) -> tuple[str, bool]:
    """Validate a tag given as hex; return (uppercase hex, constructed)."""
    if isinstance(tag, str):
        hit = _TAG_CACHE.get(tag)
        if hit is not None:
            return hit
        t = tag.upper()
    else:
        raise TlvBuildError(field, f"tag must be a hex string, not {type(tag).__name__}")
    shown = t if len(t) <= 8 and t.isprintable() else repr(t[:8])
    if not (2 <= len(t) <= 6 and len(t) % 2 == 0 and _HEX_DIGITS.issuperset(t)):
        raise TlvBuildError(field, "not 1-3 bytes of hex", tag=shown)
    raw = bytes.fromhex(t)
    b0 = raw[0]
    if b0 == 0:
        raise TlvBuildError(field, "tag 00 is padding, not a tag", tag=shown)
    multi = b0 & 0x1F == 0x1F
    if len(raw) == 1:
        if multi:
            raise TlvBuildError(field, "first byte announces a multi-byte tag", tag=shown)
    else:
        if not multi:
            raise TlvBuildError(field, "first byte announces a one-byte tag", tag=shown)
        if any(not b & 0x80 for b in raw[1:-1]) or raw[-1] & 0x80:
            raise TlvBuildError(field, "continuation bits (bit 8) do not end the tag", tag=shown)
    result = (t, bool(b0 & 0x20))
    if len(_TAG_CACHE) < 4096:
        _TAG_CACHE[tag] = result
    return result


def _entries_from(items: object, field: _Field, depth: int) -> list[_Entry]:
    if isinstance(items, TLV):
        return list(items._entries)
    if depth > MAX_DEPTH:
        raise TlvBuildError(field, f"nested deeper than {MAX_DEPTH} levels")
    pairs: Iterable[object]
    if isinstance(items, Mapping):
        pairs = items.items()
    elif isinstance(items, (str, bytes, bytearray, memoryview)) or not isinstance(items, Iterable):
        raise TlvBuildError(
            field, f"items must be a mapping or (tag, value) pairs, not {type(items).__name__}"
        )
    else:
        pairs = items
    out: list[_Entry] = []
    for pair in pairs:
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise TlvBuildError(field, "items must be (tag, value) pairs")
        tag, constructed = _norm_tag(pair[0], field)
        value = pair[1]
        child: TLV | None
        if isinstance(value, (bytes, bytearray, memoryview)):
            v = bytes(value)
            child = None
            if constructed:
                try:
                    child = _parse(v, 0, len(v), field, depth + 1)
                except TlvError as exc:
                    raise TlvBuildError(
                        field, f"constructed value is not valid TLV ({exc.reason})", tag=tag
                    ) from None
        elif isinstance(value, (TLV, Mapping, Sequence)) and not isinstance(value, str):
            if not constructed:
                raise TlvBuildError(field, "primitive tag needs a bytes value", tag=tag)
            child = (
                value
                if isinstance(value, TLV)
                else TLV._from_entries(_entries_from(value, field, depth + 1))
            )
            v = child.build()
        else:
            raise TlvBuildError(field, f"value must be bytes, not {type(value).__name__}", tag=tag)
        if len(v) > MAX_VALUE_LENGTH:
            raise TlvBuildError(
                field, f"value of {len(v)} bytes exceeds {MAX_VALUE_LENGTH} (0xFFFFFF)", tag=tag
            )
        out.append((tag, v, child))
    return out


def _encode_length(n: int) -> bytes:
    if n < 0x80:
        return _LEN1[n]
    if n <= 0xFF:
        return bytes((0x81, n))
    if n <= 0xFFFF:
        return b"\x82" + n.to_bytes(2, "big")
    return b"\x83" + n.to_bytes(3, "big")


_LEN1 = tuple(bytes((n,)) for n in range(0x80))


def _encode(entries: Iterable[_Entry]) -> bytes:
    parts: list[bytes] = []
    for tag, value, child in entries:
        if child is not None:
            value = child.build()
        parts.append(bytes.fromhex(tag))
        parts.append(_encode_length(len(value)))
        parts.append(value)
    return b"".join(parts)


def build_tlv(items: TlvItems | TLV, *, field: _Field = 55) -> bytes:
    """Encode ``items`` (a mapping or ``(tag, value)`` pairs, nested for constructed tags) as
    BER-TLV with minimal lengths. Raises :class:`TlvBuildError` for invalid items."""
    if isinstance(items, TLV):
        return items.build()
    return _encode(_entries_from(items, field, 0))


# ------------------------------------------------------------------------------------------- TLV


class TLV(Mapping[str, bytes]):
    """Immutable BER-TLV objects: a read-only mapping of top-level tag (uppercase hex) to value.

    Build one from items with ``TLV({...})`` / ``TLV([(tag, value), ...])`` or from bytes with
    :func:`parse_tlv`.
    """

    __slots__ = ("_built", "_children", "_entries", "_hash", "_map")

    _entries: tuple[_Entry, ...]
    _map: dict[str, bytes]
    _children: dict[str, TLV]
    _built: bytes | None
    _hash: int | None

    def __init__(self, items: TlvItems | TLV = (), /) -> None:
        self._init(_entries_from(items, 55, 0))

    @classmethod
    def _from_entries(cls, entries: Iterable[_Entry]) -> TLV:
        self = cls.__new__(cls)
        self._init(entries)
        return self

    def _init(self, entries: Iterable[_Entry]) -> None:
        self._entries = tuple(entries)
        m: dict[str, bytes] = {}
        children: dict[str, TLV] = {}
        for tag, value, child in self._entries:
            if tag not in m:
                m[tag] = value
                if child is not None:
                    children[tag] = child
        self._map = m
        self._children = children
        self._built = None
        self._hash = None

    # Mapping protocol ---------------------------------------------------------------------
    def __getitem__(self, tag: str) -> bytes:
        try:
            return self._map[tag]
        except KeyError:
            if isinstance(tag, str) and tag.upper() in self._map:
                return self._map[tag.upper()]
            raise

    def __contains__(self, tag: object) -> bool:
        return tag in self._map or (isinstance(tag, str) and tag.upper() in self._map)

    def __iter__(self) -> Iterator[str]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)

    # TLV specifics ------------------------------------------------------------------------
    def items_in_order(self) -> tuple[tuple[str, bytes], ...]:
        """Every top-level object in wire order, duplicates included."""
        return tuple((tag, value) for tag, value, _ in self._entries)

    def objects(self) -> tuple[tuple[str, bytes, TLV | None], ...]:
        """Every top-level object in wire order as ``(tag, value, children)``; ``children`` is the
        parsed content of a constructed tag, None for a primitive one."""
        return self._entries

    def is_constructed(self, tag: str) -> bool:
        """True when ``tag`` is present here and constructed."""
        return tag.upper() in self._children

    def children(self, tag: str) -> TLV:
        """The objects inside constructed ``tag`` (first occurrence).

        Raises ``KeyError`` if ``tag`` is absent and ``ValueError`` if it is primitive.
        """
        t = tag.upper()
        child = self._children.get(t)
        if child is None:
            if t in self._map:
                raise ValueError(f"tag {t} is primitive, it has no children")
            raise KeyError(tag)
        return child

    def find(self, tag: str, default: bytes | None = None) -> bytes | None:
        """Value of the first ``tag`` at any depth (depth-first, wire order), else ``default``."""
        t = tag.upper()
        for found in self._walk(t):
            return found
        return default

    def find_all(self, tag: str) -> list[bytes]:
        """Values of every ``tag`` at any depth (depth-first, in wire order)."""
        return list(self._walk(tag.upper()))

    def _walk(self, tag: str) -> Iterator[bytes]:
        for t, value, child in self._entries:
            if t == tag:
                yield value
            if child is not None:
                yield from child._walk(tag)

    def set(self, tag: str, value: object) -> TLV:
        """A new TLV with ``tag`` set: replaces the first occurrence in place (dropping any later
        duplicates) or appends it."""
        new = _entries_from([(tag, value)], 55, 0)[0]
        entries: list[_Entry] = []
        placed = False
        for entry in self._entries:
            if entry[0] == new[0]:
                if not placed:
                    entries.append(new)
                    placed = True
            else:
                entries.append(entry)
        if not placed:
            entries.append(new)
        return TLV._from_entries(entries)

    def remove(self, *tags: str, deep: bool = False) -> TLV:
        """A new TLV without the given tags (every occurrence). With ``deep=True`` they are also
        removed from inside constructed tags (which are re-encoded), e.g. to drop 5A/57 wherever
        they sit."""
        return self._without(frozenset(t.upper() for t in tags), deep)

    def _without(self, drop: frozenset[str], deep: bool) -> TLV:
        entries: list[_Entry] = []
        changed = False
        for entry in self._entries:
            tag, _, child = entry
            if tag in drop:
                changed = True
                continue
            if deep and child is not None:
                new_child = child._without(drop, deep)
                if new_child is not child:
                    entry = (tag, new_child.build(), new_child)
                    changed = True
            entries.append(entry)
        return TLV._from_entries(entries) if changed else self

    def build(self) -> bytes:
        """Canonical BER-TLV encoding (minimal lengths, children re-encoded)."""
        built = self._built
        if built is None:
            built = self._built = _encode(self._entries)
        return built

    def __bytes__(self) -> bytes:
        return self.build()

    # value semantics ----------------------------------------------------------------------
    def _key(self) -> tuple[tuple[str, bytes], ...]:
        return tuple(
            (tag, value if child is None else child.build()) for tag, value, child in self._entries
        )

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TLV):
            return self is other or self._key() == other._key()
        if isinstance(other, Mapping):
            return dict(self._map) == dict(other)
        return NotImplemented

    def __hash__(self) -> int:
        h = self._hash
        if h is None:
            h = self._hash = hash(self._key())
        return h

    def __repr__(self) -> str:
        return f"TLV({mask_tlv(self)})"


# ----------------------------------------------------------------- rendering, card data masked
# Here rather than in ``masking`` because a TLV's own repr must never show card data, and the
# message layer's masking builds on this module, not the other way round.

_TLV_PAN_TAGS = frozenset({"5A"})
_TLV_TRACK_TAGS = frozenset({"56", "57", "9F6B"})
_TLV_HIDDEN_TAGS = frozenset({"5F20", "9F1F", "9F20", "99"})

CARD_TLV_TAGS = _TLV_PAN_TAGS | _TLV_TRACK_TAGS | _TLV_HIDDEN_TAGS
"""EMV tags (inside DE 55) holding card data: 5A, 56, 57, 5F20, 99, 9F1F, 9F20, 9F6B."""


def mask_tlv(tlv: TLV) -> str:
    """``9F26=0123456789ABCDEF 5A=476173******0010 70[57=476173******0010D****]``: every object in
    wire order, card tags (``CARD_TLV_TAGS``) masked, constructed tags rendered as ``tag[...]``."""
    return " ".join(_mask_tlv_object(tag, value, child) for tag, value, child in tlv.objects())


def _mask_tlv_object(tag: str, value: bytes, child: TLV | None) -> str:
    if child is not None:
        return f"{tag}[{mask_tlv(child)}]"
    if tag in _TLV_PAN_TAGS:
        return f"{tag}={mask_pan(bcd_digits(value))}"
    if tag in _TLV_TRACK_TAGS:
        # 56 (track 1) is ASCII; 57 and 9F6B are packed digits with a D separator.
        text = track_text(value) if tag == "56" else bcd_digits(value)
        return f"{tag}={mask_track(text)}"
    if tag in _TLV_HIDDEN_TAGS:
        return f"{tag}={HIDDEN}"
    return f"{tag}={value.hex().upper()}"
