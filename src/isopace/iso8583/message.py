"""`Message`: an immutable, copy-on-write ISO 8583 message.

Decisions:

- Values are ``str`` for every non-binary field (numeric fields keep their leading zeros) and
  ``bytes`` for binary ones. ``Message`` itself does not know a spec: a value's type is checked
  against the spec when the message is encoded. Data elements are 2..192; 1 and 65 are the
  secondary / tertiary bitmaps, always derived from the fields present, so they cannot be set.
- Immutable by API: every change returns a new ``Message`` that shares the unchanged values and,
  for a decoded message, the original wire bytes and field spans. A decoded message caches the
  values it decoded on first access (invisible to callers).
- A decoded message remembers its spec and bytes: ``spec.encode(m)`` hands the bytes back while
  ``m`` is unchanged, and after changes re-encodes only the changed fields.
- ``reply()`` of a decoded message is derived from it like any change (the request's bytes, the
  echo fields kept, the others dropped, a new MTI): the echoed values are not decoded, and
  encoding the reply with the same spec copies them as slices of the request. It still fails
  as reading the echo fields would (a quick ASCII check of the bytes stands in for decoding the
  ASCII fields). Such a reply reports the request's ``spec``.
- Equality and hash by content: MTI, header and data elements. ``redacted`` is not part of it.
- What is derived from a whole message is computed once per message and remembered (messages
  are immutable): ``to_json`` (each mode), ``to_masked_dict`` (a copy is handed out), the
  parsed TLV of ``tlv(n)``, which redaction and masking of DE 55 reuse, and what other layers
  derive through ``derived(fn)``.
- ``repr``, ``describe``, ``to_masked_dict`` mask card data (DE 2, 35, 36, 45, 52; EMV tags in 55;
  a card number in any other text field: see :func:`isopace.iso8583.masking.mask_value`).
- JSON: ``{"mti": ..., "fields": {"2": "...", "52": {"hex": "..."}}, "redacted": [...]}``; with
  ``redact=True`` card data is dropped and listed (the rules: :mod:`isopace.iso8583._json`).
- A decoded message holds one reference to its wire image (spec, bytes, layout, where each field
  starts: :data:`Wire`), shared by every message derived from it; :func:`_decoded` is the
  constructor ``Spec.decode`` calls and ``Spec.encode`` hands the message to :func:`_encode`.
  Where fields lie and the generated fast paths are :mod:`isopace.iso8583._layout`'s.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from isopace.iso8583 import _json, _render, _values
from isopace.iso8583._json import REDACTED_FIELDS as REDACTED_FIELDS
from isopace.iso8583.errors import DecodeError, EncodeError
from isopace.iso8583.mti import response_mti
from isopace.iso8583.tlv import TLV, parse_tlv

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeVar

    from isopace.iso8583._codec import WireFormat
    from isopace.iso8583._layout import Layout
    from isopace.iso8583.spec import Spec

    _T = TypeVar("_T")

Value = str | bytes
_bytes = bytes

#: A decoded message's wire image, shared by every message derived from it: the spec that
#: decoded it, its bytes, their layout and where each field starts (``offs[i]``: the layout's
#: field ``i``; one more offset, the end). A plain tuple: it is built for every decode.
Wire = tuple["Spec", bytes, "Layout", Sequence[int]]

ECHO_FIELDS: tuple[int, ...] = (2, 3, 4, 7, 11, 12, 13, 32, 37, 41, 42, 49, 90, 95)
"""The request's fields an answer echoes (when present): PAN, processing code, amount,
transmission date-time, STAN, local time and date, acquirer, RRN, terminal, merchant, currency,
and a reversal's original data elements and replacement amounts (the acquirer matches an 0410
to the reversal by them). What :meth:`Message.reply` copies by default; re-exported by
:mod:`isopace.iso8583.answers`, whose error answers echo them too."""

_EMPTY: frozenset[int] = frozenset()
_VALID_KEYS = frozenset(range(2, 193)) - {65}
_OK_VALUE_TYPES = frozenset({str, bytes})
_INT = frozenset({int})  # 2.0 == 2 as a dict key: the key's type is checked, not only its value
_new = object.__new__
# one frozenset per data element: the change sets of one-field changes are shared (their hash,
# cached by frozenset, is computed once)
_SINGLE: tuple[frozenset[int], ...] = tuple(frozenset((n,)) for n in range(193))


def _check(n: Any, v: Any) -> Value:
    if type(n) is not int or not 2 <= n <= 192 or n == 65:
        if n in (1, 65):
            raise EncodeError(n, "bitmaps are derived from the fields present and cannot be set")
        raise EncodeError(None, f"data element numbers are ints 2..192, got {n!r}")
    tv = type(v)
    if tv is str or tv is bytes:
        return v  # type: ignore[no-any-return]
    if isinstance(v, str):
        return str(v)
    if isinstance(v, bytes | bytearray | memoryview):
        return bytes(v)
    raise EncodeError(n, f"value must be str or bytes, got {type(v).__name__}")


class Message:
    """An ISO 8583 message: an MTI and data elements 2..192 (see the module docstring)."""

    __slots__ = (
        "_clean",
        "_dirty",
        "_gone",
        "_hash",
        "_hdirty",
        "_hdr",
        "_keys",
        "_memo",
        "_mti",
        "_redacted",
        "_vals",
        "_wire",
    )

    _mti: str
    _vals: dict[int, Value]  # the values set, and for a decoded message those decoded so far
    _wire: Wire | None  # None: built in code
    _gone: frozenset[int]  # wire fields removed since the decoding
    _dirty: frozenset[int]  # wire fields whose value changed (or were added) since
    _hdr: Value | None
    _hash: int | None
    _keys: tuple[int, ...] | None  # the fields present, sorted; None: not known yet
    _redacted: frozenset[int]
    _clean: bool  # decoded and unchanged: the wire bytes are its encoding
    _hdirty: bool  # header or MTI changed since the decoding
    _memo: dict[Any, Any] | None  # what is derived from the whole message, once

    def __init__(
        self,
        mti: str,
        fields: Mapping[int, Value] | None = None,
        *,
        header: Value | None = None,
    ) -> None:
        if not isinstance(mti, str):
            raise EncodeError(0, f"MTI must be a str, got {type(mti).__name__}")
        vals: dict[int, Value] = dict(fields) if fields else {}
        if vals and not (
            _VALID_KEYS.issuperset(vals)
            and _INT.issuperset(map(type, vals))
            and _OK_VALUE_TYPES.issuperset(map(type, vals.values()))
        ):
            vals = {n: _check(n, v) for n, v in vals.items()}
        _fill(self, mti, vals, None, header, None, _EMPTY, _EMPTY, False, _EMPTY)

    # --- internal ---------------------------------------------------------------------------
    def _sorted_keys(self) -> tuple[int, ...]:
        keys = self._keys
        if keys is None:
            wire = self._wire
            if wire is None:
                keys = tuple(sorted(self._vals))
            else:
                _, _, lay, _ = wire
                ks = set(lay.fields)
                ks.update(self._vals)
                ks.difference_update(self._gone)
                keys = tuple(sorted(ks))
            self._keys = keys
        return keys

    def _derive(self) -> Message:
        """A changed copy to be: everything but the derived state (hash, memo, clean)."""
        return _fill(
            _new(Message),
            self._mti,
            self._vals.copy(),
            self._wire,
            self._hdr,
            self._keys,
            self._gone,
            self._dirty,
            self._hdirty,
            self._redacted,
        )

    # --- reading ----------------------------------------------------------------------------
    @property
    def mti(self) -> str:
        return self._mti

    @property
    def header(self) -> Value | None:
        """The message header (specs with an ``h`` field), or None."""
        return self._hdr

    @property
    def redacted(self) -> frozenset[int]:
        """Fields dropped by ``to_json(redact=True)`` before this message was rebuilt from it."""
        return self._redacted

    @property
    def spec(self) -> Spec | None:
        """The spec this message was decoded with, or derived from a decoded message with
        (``set``, ``reply``...); None for a message built in code."""
        wire = self._wire
        if wire is None:
            return None
        spec, _, _, _ = wire
        return spec

    def __getitem__(self, n: int) -> Value:
        vals = self._vals
        if n in vals:
            return vals[n]
        wire = self._wire
        if wire is None:
            raise KeyError(n)
        _, data, lay, offs = wire
        index = lay.index
        if index is not None:
            i = index[n]
        else:  # a layout seen once: binary search in its (sorted) fields
            fields = lay.fields
            i = bisect_left(fields, n)
            if i == len(fields) or fields[i] != n:
                raise KeyError(n)
        if n in self._gone:
            raise KeyError(n)
        if lay.bulk is not None and len(vals) >= 3 and self._clean:
            # a few fields read already: decode the rest in one generated pass
            try:
                rest = lay.bulk(data, offs)
            except Exception:  # a bad value: decode field by field below
                pass
            else:
                rest.update(vals)
                self._vals = rest
                return rest[n]  # type: ignore[no-any-return]
        table = lay.table
        s = offs[i] + table.plens[n]
        if table.asc[n]:
            try:
                v: Value = data[s : offs[i + 1]].decode("ascii")
            except UnicodeDecodeError:
                raise DecodeError(n, s, "invalid ascii data") from None
        else:
            v = table.decs[n](data, s, offs[i + 1])  # type: ignore[misc]
        vals[n] = v
        return v

    def get(self, n: int, default: Any = None) -> Any:
        v = self._vals.get(n)
        if v is not None:
            return v
        wire = self._wire
        if wire is None:
            return default
        _, _, lay, _ = wire
        if n not in (lay.index or lay.fields) or n in self._gone:
            return default  # absent (no KeyError raised and caught: absent fields are common)
        return self[n]

    def __contains__(self, n: object) -> bool:
        if n in self._vals:
            return True
        wire = self._wire
        if wire is None:
            return False
        _, _, lay, _ = wire
        return n in (lay.index or lay.fields) and n not in self._gone

    def __iter__(self) -> Iterator[int]:
        return iter(self._sorted_keys())

    def __len__(self) -> int:
        return len(self._sorted_keys())

    def keys(self) -> tuple[int, ...]:
        """The data elements present, in numeric order."""
        return self._sorted_keys()

    def fields(self) -> dict[int, Value]:
        """All data elements (no MTI, no bitmaps) in numeric order."""
        keys = self._keys
        if keys is None:
            keys = self._sorted_keys()
        vals = self._vals
        wire = self._wire
        if wire is None:
            return {n: vals[n] for n in keys}
        _, data, lay, offs = wire
        if lay.bulk is not None:
            try:
                rest = lay.bulk(data, offs)
            except Exception:  # a bad value: decode field by field below
                pass
            else:
                for n in self._gone:  # changed since the decoding: removed fields go
                    del rest[n]
                rest.update(vals)  # and changed or added ones win
                self._vals = rest
                return dict(rest) if list(rest) == list(keys) else {n: rest[n] for n in keys}
        index = lay.index or dict(zip(lay.fields, range(len(lay.fields)), strict=True))
        decs = lay.table.decs
        plens = lay.table.plens
        out: dict[int, Value] = {}
        for n in keys:
            if n in vals:
                out[n] = vals[n]
            else:
                i = index[n]
                v = decs[n](data, offs[i] + plens[n], offs[i + 1])  # type: ignore[misc]
                vals[n] = out[n] = v
        return out

    def items(self) -> Iterable[tuple[int, Value]]:
        return self.fields().items()

    # --- typed accessors (the rules: :mod:`isopace.iso8583._values`) -------------------------
    def numeric(self, n: int) -> int:
        """Data element ``n`` as an int (digits only)."""
        return _values.numeric(n, self[n])

    def amount(self, n: int = 4) -> int:
        """An amount in minor units; ``x+n`` amounts (``C``/``D`` prefix) give a signed value
        (credit positive, debit negative)."""
        return _values.amount(n, self[n])

    def bytes(self, n: int) -> bytes:
        """A binary data element; a str value is read as hex."""
        return _values.binary(n, self[n])

    def date_time(self, n: int = 7, *, year: int | None = None) -> datetime:
        """A date-time field as a UTC datetime: ``MMDDhhmmss`` (DE 7; ``year`` defaults to the
        current UTC year), ``YYMMDDhhmmss`` or ``CCYYMMDDhhmmss``."""
        return _values.date_time(n, self[n], year)

    def tlv(self, n: int = 55) -> TLV:
        """A BER-TLV field (EMV DE 55) as a read-only mapping: ``m.tlv(55)["9F26"]``.

        Parsed once per message (messages and TLVs are immutable)."""
        memo = self._memo
        if memo is None:
            memo = self._memo = {}
        else:
            t = memo.get(n)
            if t is not None:
                return t  # type: ignore[no-any-return]
        t = memo[n] = parse_tlv(self.bytes(n), field=n)
        return t

    def composite(self, n: int, spec: Spec | None = None) -> dict[Any, Any]:
        """The sub-fields of a composite field (e.g. DE 43, DE 127) per the spec's format
        (``spec``, else the message's own, else ISO 8583:1987 ASCII)."""
        sp = spec or self.spec or _render.fallback_spec()
        return sp.composite(n).parse(self[n])  # type: ignore[no-any-return]

    # --- changing ---------------------------------------------------------------------------
    def set(self, n: int, value: Value) -> Message:
        """A new message with data element ``n`` set to ``value``."""
        tv = type(value)
        if (tv is str or tv is bytes) and type(n) is int and 2 <= n <= 192 and n != 65:
            v = value
        else:
            v = _check(n, value)
        vals = self._vals
        wire = self._wire
        gone = self._gone
        dirty = self._dirty
        if wire is None:
            present = n in vals
        else:
            _, _, lay, _ = wire
            present = n in vals or (n in (lay.index or lay.fields) and n not in gone)
            dirty = dirty | _SINGLE[n] if dirty else _SINGLE[n]
            if gone and n in gone:
                gone = gone - _SINGLE[n]
        keys = self._keys
        if not present:
            if keys is None:
                keys = self._sorted_keys()
            i = bisect_left(keys, n)
            keys = (*keys[:i], n, *keys[i:])
        vals = vals.copy()
        vals[n] = v
        return _fill(
            _new(Message),
            self._mti,
            vals,
            wire,
            self._hdr,
            keys,
            gone,
            dirty,
            self._hdirty,
            self._redacted,
        )

    def set_many(self, values: Mapping[int, Value]) -> Message:
        checked = {n: _check(n, v) for n, v in values.items()}
        keys = self._keys
        m = self._derive()
        m._vals.update(checked)
        if self._wire is not None:
            m._dirty = self._dirty.union(checked)
            m._gone = self._gone.difference(checked)
            m._keys = None
        elif keys is None or not self._vals.keys() >= checked.keys():
            m._keys = None  # fields added: sorted again when needed
        return m

    def remove(self, *ns: int) -> Message:
        """A new message without the given data elements (absent ones are ignored)."""
        m = self._derive()
        for n in ns:
            m._vals.pop(n, None)
        wire = self._wire
        if wire is not None:
            _, _, lay, _ = wire
            m._gone = self._gone | {n for n in ns if n in lay.fields}
            m._dirty = self._dirty - set(ns)
        m._keys = None
        return m

    def with_mti(self, mti: str) -> Message:
        if not isinstance(mti, str):
            raise EncodeError(0, f"MTI must be a str, got {type(mti).__name__}")
        m = self._derive()
        m._mti = mti
        m._hdirty = True
        return m

    def with_header(self, header: Value | None) -> Message:
        m = self._derive()
        m._hdr = header
        m._hdirty = True
        return m

    def reply(self, mti: str | None = None, copy: Iterable[int] = ECHO_FIELDS) -> Message:
        """A response: the echo fields that are present copied, the MTI
        :func:`~isopace.iso8583.mti.response_mti` derives (``0200`` -> ``0210``) unless ``mti``
        is given.

        The reply of a decoded message shares its wire bytes: the echoed fields are carried over
        as spans of the request (not decoded, only checked to decode as :meth:`__getitem__`
        would), so encoding the reply with the same spec copies them as slices."""
        if mti is None:
            mti = response_mti(self._mti)
        wire = self._wire
        if wire is not None:
            return self._reply_decoded(mti, copy, wire)
        vals = self._vals
        fields = {n: vals[n] for n in copy if n in vals}
        return Message(mti, fields, header=self._hdr)

    def _reply_decoded(self, mti: str, copy: Iterable[int], wire: Wire) -> Message:
        _, _, lay, _ = wire
        key = copy if type(copy) is tuple else tuple(copy)
        replies = lay.replies
        if replies is None:
            replies = lay.replies = {}
        # what reply does for this layout and echo set, worked out once: (the echo set, the
        # layout's fields echoed, those not, the echoed ones whose decoding checks more than an
        # ASCII test does, every echoed one in the order asked: the first bad one is reported).
        # A plain tuple: it is unpacked on every reply, and a NamedTuple unpacks slower.
        info = replies.get(key)
        if info is None:
            echo = frozenset(key)
            asc = lay.table.asc
            kept = tuple(n for n in lay.fields if n in echo)
            dropped = frozenset(lay.fields).difference(kept)
            # in the order of ``copy``: the first bad field is the one the reader meets first
            order = tuple(n for n in dict.fromkeys(key) if n in lay.fields)
            checked = tuple(n for n in order if not asc[n])
            info = (echo, kept, dropped, checked, order)
            if len(replies) >= 16:
                replies.clear()
            replies[key] = info
        echo, kept, gone, checked, order = info
        vals = self._vals
        dirty = self._dirty
        if vals:
            vals = {n: v for n, v in vals.items() if n in echo}
            if dirty:
                dirty = dirty.intersection(echo)
        else:
            vals = {}
        keys = kept
        if self._gone or dirty:
            # changed before the reply: fields removed, set or added since the decoding
            gone = gone.union(self._gone)
            present = set(kept).difference(gone)
            present.update(vals)
            keys = tuple(sorted(present))
        # the request's fields that do not decode make reply() fail, as if it decoded them
        _, data, _, _ = wire
        for n in checked if data.isascii() else order:
            if n not in vals and n not in gone:
                vals[n] = self[n]
        return _fill(_new(Message), mti, vals, wire, self._hdr, keys, gone, dirty, True, _EMPTY)

    # --- equality ---------------------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        if self is other:
            return True
        if self._mti != other._mti or self._hdr != other._hdr:
            return False
        if self._clean and other._clean:
            mine, theirs = self._wire, other._wire
            assert mine is not None and theirs is not None
            spec, data, _, _ = mine
            if spec is theirs[0] and data == theirs[1]:
                return True
        return self.fields() == other.fields()

    def __hash__(self) -> int:
        h = self._hash
        if h is None:
            h = self._hash = hash((self._mti, self._hdr, tuple(self.fields().items())))
        return h

    # --- masking, describing (the renderings: :mod:`isopace.iso8583._render`) ------------
    def to_masked_dict(self) -> dict[str, str]:
        """``{"mti": ..., "2": "476173******0010", ...}``: printable, masked values for logs and
        journal records. Built once per message (a copy is returned)."""
        return self.derived(_render.masked_dict).copy()

    def derived(self, make: Callable[[Message], _T]) -> _T:
        """``make(self)``, computed once per message and remembered (messages are immutable):
        for what another layer derives from a whole message, such as the form a store keeps of
        it, which the journal and the idempotency store then share instead of building twice.
        ``make`` must depend on the message alone."""
        memo = self._memo
        if memo is None:
            memo = self._memo = {}
        elif make in memo:
            return memo[make]  # type: ignore[no-any-return]
        value = memo[make] = make(self)
        return value

    def __repr__(self) -> str:
        return _render.masked_repr(self)

    def describe(self, spec: Spec | None = None) -> str:
        """A table of the fields with their descriptions (from ``spec``, else the message's own,
        else ISO 8583:1987 ASCII's); card data masked."""
        return _render.describe(self, spec)

    # --- JSON -------------------------------------------------------------------------------
    def to_json(self, redact: bool = False) -> str:
        """The message as JSON (:mod:`isopace.iso8583._json`: the document, what redaction
        drops); built once per message and mode."""
        memo = self._memo
        if memo is None:
            memo = self._memo = {}
        else:
            cached = memo.get("json-r" if redact else "json")
            if cached is not None:
                return cached  # type: ignore[no-any-return]
        text = _json.write(self._mti, self.fields(), self._hdr, self._redacted, redact, self.tlv)
        memo["json-r" if redact else "json"] = text
        return text

    @classmethod
    def from_json(cls, text: str | _bytes) -> Message:
        mti, fields, header, redacted = _json.read(text)
        m = cls(mti, fields, header=header)
        m._redacted = redacted
        return m


def _fill(
    m: Message,
    mti: str,
    vals: dict[int, Value],
    wire: Wire | None,
    hdr: Value | None,
    keys: tuple[int, ...] | None,
    gone: frozenset[int],
    dirty: frozenset[int],
    hdirty: bool,
    redacted: frozenset[int],
    clean: bool = False,
) -> Message:
    """Every slot of ``m`` set: the one place that knows them all (hash and memo start empty)."""
    m._mti = mti
    m._vals = vals
    m._wire = wire
    m._hdr = hdr
    m._keys = keys
    m._gone = gone
    m._dirty = dirty
    m._hdirty = hdirty
    m._redacted = redacted
    m._clean = clean
    m._hash = None
    m._memo = None
    return m


def _decoded(mti: str, header: Value | None, wire: Wire) -> Message:
    """The message ``Spec.decode`` returns: nothing decoded yet, its fields those of the layout.
    (:func:`_fill` written out: one call less on the hottest path.)"""
    m = _new(Message)
    m._mti = mti
    m._vals = {}
    m._wire = wire
    m._hdr = header
    m._keys = wire[2].fields  # the layout's
    m._gone = _EMPTY
    m._dirty = _EMPTY
    m._hdirty = False
    m._redacted = _EMPTY
    m._clean = True
    m._hash = None
    m._memo = None
    return m


def _encode(m: Message, spec: Spec, fmt: WireFormat) -> bytes:
    """``spec.encode(m)`` (``fmt``: the spec's wire format): the original bytes of a decoded,
    unchanged message, those bytes patched for a changed one, else the fields encoded."""
    wire = m._wire
    if wire is not None and wire[0] is spec:  # decoded with this spec
        if m._clean:
            return wire[1]  # the hot path: before the unpacking the patch paths need
        _, data, lay, offs = wire
        keys = m._keys
        if keys is None:
            keys = m._sorted_keys()
        dirty, hdirty = m._dirty, m._hdirty
        patches = lay.patches  # fmt.patch_for's cache, looked up here first: the hot path
        patch = None if patches is None else patches.get((keys, dirty, hdirty))
        if patch is None:
            patch = fmt.patch_for(lay, keys, dirty, hdirty)
        fast = patch.fast
        if fast is not None:
            try:
                return fast(m, data, offs, m._vals)
            except EncodeError:
                pass  # the item by item path reports where
        return patch.apply(m, data, offs, m._vals)
    keys = m._keys
    if keys is None:
        keys = m._sorted_keys()
    return fmt.encode(m, keys, m._vals if wire is None else m.fields())
