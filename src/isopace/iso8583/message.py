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
- JSON: ``{"mti": ..., "fields": {"2": "...", "52": {"hex": "..."}}, "redacted": [...]}``; binary
  values are written as ``{"hex": ...}``. With ``redact=True`` DE 2, 35, 36, 45 and 52 are dropped
  and listed in ``redacted``; DE 55 keeps its other EMV tags but loses 5A (PAN) and 57 (track 2
  equivalent), wherever they sit (nested templates too); if DE 55 cannot be parsed as TLV it
  is dropped whole and listed.
"""

from __future__ import annotations

import binascii
import json
import json.encoder
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from isopace.iso8583.answers import ECHO_FIELDS
from isopace.iso8583.errors import DecodeError, EncodeError, Iso8583Error
from isopace.iso8583.mti import response_mti

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeVar

    from isopace.iso8583.spec import Layout, Spec
    from isopace.iso8583.tlv import TLV

    _T = TypeVar("_T")

Value = str | bytes
_bytes = bytes

REDACTED_FIELDS = frozenset({2, 35, 36, 45, 52})
_REDACTED_TAGS = ("5A", "57")
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
        "_data",
        "_dirty",
        "_gone",
        "_hash",
        "_hdirty",
        "_hdr",
        "_keys",
        "_lay",
        "_memo",
        "_mti",
        "_offs",
        "_redacted",
        "_spec",
        "_vals",
    )

    _mti: str
    _vals: dict[int, Value]
    _spec: Spec | None
    _data: bytes | None
    _lay: Layout | None
    _offs: Sequence[int] | None
    _gone: frozenset[int]
    _dirty: frozenset[int]
    _hdr: Value | None
    _hash: int | None
    _keys: tuple[int, ...] | None
    _redacted: frozenset[int]
    _clean: bool
    _hdirty: bool
    _memo: dict[Any, Any] | None

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
        self._mti = mti
        self._vals = vals
        self._spec = None
        self._data = None
        self._lay = None
        self._offs = None
        self._gone = _EMPTY
        self._dirty = _EMPTY
        self._hdr = header
        self._hash = None
        self._keys = None
        self._redacted = _EMPTY
        self._clean = False
        self._hdirty = False
        self._memo = None

    # --- internal ---------------------------------------------------------------------------
    def _sorted_keys(self) -> tuple[int, ...]:
        keys = self._keys
        if keys is None:
            lay = self._lay
            if lay is None:
                keys = tuple(sorted(self._vals))
            else:
                ks = set(lay.fields)
                ks.update(self._vals)
                ks.difference_update(self._gone)
                keys = tuple(sorted(ks))
            self._keys = keys
        return keys

    def _derive(self) -> Message:
        m = _new(Message)
        m._mti = self._mti
        m._vals = self._vals.copy()
        m._spec = self._spec
        m._data = self._data
        m._lay = self._lay
        m._offs = self._offs
        m._gone = self._gone
        m._dirty = self._dirty
        m._hdr = self._hdr
        m._hash = None
        m._keys = self._keys
        m._redacted = self._redacted
        m._clean = False
        m._hdirty = self._hdirty
        m._memo = None
        return m

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
        return self._spec

    def __getitem__(self, n: int) -> Value:
        vals = self._vals
        if n in vals:
            return vals[n]
        lay = self._lay
        if lay is None:
            raise KeyError(n)
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
        spec: Spec = lay.spec  # type: ignore[assignment]
        offs: Sequence[int] = self._offs  # type: ignore[assignment]
        if lay.bulk is not None and len(vals) >= 3 and self._clean:
            # a few fields read already: decode the rest in one generated pass
            try:
                rest = lay.bulk(self._data, offs)  # type: ignore[arg-type]
            except Exception:  # a bad value: decode field by field below
                pass
            else:
                rest.update(vals)
                self._vals = rest
                return rest[n]  # type: ignore[no-any-return]
        s = offs[i] + spec._plens[n]
        if spec._asc[n]:
            try:
                v: Value = self._data[s : offs[i + 1]].decode("ascii")  # type: ignore[index]
            except UnicodeDecodeError:
                raise DecodeError(n, s, "invalid ascii data") from None
        else:
            v = spec._decs[n](self._data, s, offs[i + 1])  # type: ignore[misc, arg-type]
        vals[n] = v
        return v

    def get(self, n: int, default: Any = None) -> Any:
        v = self._vals.get(n)
        if v is not None:
            return v
        lay = self._lay
        if lay is None or n not in (lay.index or lay.fields) or n in self._gone:
            return default  # absent (no KeyError raised and caught: absent fields are common)
        return self[n]

    def __contains__(self, n: object) -> bool:
        if n in self._vals:
            return True
        lay = self._lay
        return lay is not None and n in (lay.index or lay.fields) and n not in self._gone

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
        lay = self._lay
        if lay is None:
            return {n: vals[n] for n in keys}
        spec = self._spec
        assert spec is not None
        decs = spec._decs
        plens = spec._plens
        data = self._data
        offs = self._offs
        assert offs is not None
        if lay.bulk is not None:
            try:
                rest = lay.bulk(data, offs)  # type: ignore[arg-type]
            except Exception:  # a bad value: decode field by field below
                pass
            else:
                for n in self._gone:  # changed since the decoding: removed fields go
                    del rest[n]
                rest.update(vals)  # and changed or added ones win
                self._vals = rest
                return dict(rest) if list(rest) == list(keys) else {n: rest[n] for n in keys}
        index = lay.index or dict(zip(lay.fields, range(len(lay.fields)), strict=True))
        out: dict[int, Value] = {}
        for n in keys:
            if n in vals:
                out[n] = vals[n]
            else:
                i = index[n]
                v = decs[n](data, offs[i] + plens[n], offs[i + 1])  # type: ignore[misc, arg-type]
                vals[n] = out[n] = v
        return out

    def items(self) -> Iterable[tuple[int, Value]]:
        return self.fields().items()

    # --- typed accessors --------------------------------------------------------------------
    def numeric(self, n: int) -> int:
        """Data element ``n`` as an int (digits only)."""
        v = self[n]
        if isinstance(v, str) and v.isascii() and v.isdigit():
            return int(v)
        raise Iso8583Error(f"field {n}: not a numeric value")

    def amount(self, n: int = 4) -> int:
        """An amount in minor units; ``x+n`` amounts (``C``/``D`` prefix) give a signed value
        (credit positive, debit negative)."""
        v = self[n]
        if isinstance(v, str) and v.isascii():
            sign = 1
            if v[:1] in ("C", "D"):
                sign = -1 if v[0] == "D" else 1
                v = v[1:]
            if v.isdigit():
                return sign * int(v)
        raise Iso8583Error(f"field {n}: not an amount")

    def bytes(self, n: int) -> bytes:
        """A binary data element; a str value is read as hex."""
        v = self[n]
        if isinstance(v, bytes):
            return v
        try:
            return binascii.a2b_hex(v)
        except (binascii.Error, ValueError):
            raise Iso8583Error(f"field {n}: not binary data") from None

    def date_time(self, n: int = 7, *, year: int | None = None) -> datetime:
        """A date-time field as a UTC datetime: ``MMDDhhmmss`` (DE 7; ``year`` defaults to the
        current UTC year), ``YYMMDDhhmmss`` or ``CCYYMMDDhhmmss``."""
        v = self[n]
        if not (isinstance(v, str) and v.isascii() and v.isdigit()):
            raise Iso8583Error(f"field {n}: not a date-time")
        try:
            if len(v) == 10:
                y = year if year is not None else datetime.now(UTC).year
                return datetime.strptime(f"{y:04d}{v}", "%Y%m%d%H%M%S").replace(tzinfo=UTC)
            if len(v) == 12:
                return datetime.strptime(v, "%y%m%d%H%M%S").replace(tzinfo=UTC)
            if len(v) == 14:
                return datetime.strptime(v, "%Y%m%d%H%M%S").replace(tzinfo=UTC)
        except ValueError:
            pass
        raise Iso8583Error(f"field {n}: not a date-time")

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
        from isopace.iso8583.tlv import parse_tlv

        t = memo[n] = parse_tlv(self.bytes(n), field=n)
        return t

    def composite(self, n: int, spec: Spec | None = None) -> dict[Any, Any]:
        """The sub-fields of a composite field (e.g. DE 43, DE 127) per the spec's format."""
        from isopace.iso8583.specs import ISO87_ASCII

        sp = spec or self._spec or ISO87_ASCII
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
        lay = self._lay
        gone = self._gone
        present = n in vals or (
            lay is not None and n in (lay.index or lay.fields) and n not in gone
        )
        m = _new(Message)
        m._mti = self._mti
        m._vals = vals = vals.copy()
        vals[n] = v
        m._spec = self._spec
        m._data = self._data
        m._lay = lay
        m._offs = self._offs
        m._dirty = self._dirty
        m._hdr = self._hdr
        m._hash = None
        m._redacted = self._redacted
        m._clean = False
        m._hdirty = self._hdirty
        m._memo = None
        if self._data is not None:
            dirty = self._dirty
            m._dirty = dirty | _SINGLE[n] if dirty else _SINGLE[n]
            if gone and n in gone:
                gone = gone - _SINGLE[n]
        m._gone = gone
        keys = self._keys
        if present:
            m._keys = keys
        else:
            if keys is None:
                keys = self._sorted_keys()
            i = bisect_left(keys, n)
            m._keys = (*keys[:i], n, *keys[i:])
        return m

    def set_many(self, values: Mapping[int, Value]) -> Message:
        checked = {n: _check(n, v) for n, v in values.items()}
        keys = self._keys
        m = self._derive()
        m._vals.update(checked)
        if self._data is not None:
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
        if self._lay is not None:
            m._gone = self._gone | {n for n in ns if n in self._lay.fields}
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
        lay = self._lay
        if lay is not None:
            return self._reply_decoded(mti, copy, lay)
        vals = self._vals
        fields = {n: vals[n] for n in copy if n in vals}
        return Message(mti, fields, header=self._hdr)

    def _reply_decoded(self, mti: str, copy: Iterable[int], lay: Layout) -> Message:
        key = copy if type(copy) is tuple else tuple(copy)
        replies = lay.replies
        if replies is None:
            replies = lay.replies = {}
        info = replies.get(key)
        if info is None:
            echo = frozenset(key)
            spec: Spec = lay.spec  # type: ignore[assignment]
            kept = tuple(n for n in lay.fields if n in echo)
            dropped = frozenset(lay.fields).difference(kept)
            # in the order of ``copy``: the first bad field is the one the reader meets first
            order = tuple(n for n in dict.fromkeys(key) if n in lay.fields)
            checked = tuple(n for n in order if not spec._asc[n])
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
        data: _bytes = self._data  # type: ignore[assignment]
        for n in checked if data.isascii() else order:
            if n not in vals and n not in gone:
                vals[n] = self[n]
        m = _new(Message)
        m._mti = mti
        m._vals = vals
        m._spec = self._spec
        m._data = data
        m._lay = lay
        m._offs = self._offs
        m._gone = gone
        m._dirty = dirty
        m._hdr = self._hdr
        m._hash = None
        m._keys = keys
        m._redacted = _EMPTY
        m._clean = False
        m._hdirty = True
        m._memo = None
        return m

    # --- equality ---------------------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        if self is other:
            return True
        if self._mti != other._mti or self._hdr != other._hdr:
            return False
        if self._clean and other._clean and self._spec is other._spec and self._data == other._data:
            return True
        return self.fields() == other.fields()

    def __hash__(self) -> int:
        h = self._hash
        if h is None:
            h = self._hash = hash((self._mti, self._hdr, tuple(self.fields().items())))
        return h

    # --- masking, describing ----------------------------------------------------------------
    def to_masked_dict(self) -> dict[str, str]:
        """``{"mti": ..., "2": "476173******0010", ...}``: printable, masked values for logs and
        journal records. Built once per message (a copy is returned)."""
        memo = self._memo
        if memo is None:
            memo = self._memo = {}
        else:
            out = memo.get("masked")
            if out is not None:
                return out.copy()  # type: ignore[no-any-return]
        from isopace.iso8583.masking import mask_value

        out = {"mti": self._mti}
        for n, v in self.fields().items():
            if n == 55:
                out["55"] = mask_value(55, self._icc(v))
            else:
                out[_NAMES[n]] = mask_value(n, v)
        memo["masked"] = out
        return out.copy()

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

    def _icc(self, v: Value) -> Value | TLV:
        """DE 55's TLV (parsed once per message), or ``v`` as it is when it does not parse."""
        try:
            return self.tlv(55)
        except (Iso8583Error, ValueError):
            return v

    def __repr__(self) -> str:
        from isopace.iso8583.masking import mask_value

        inner = ", ".join(f"{n}: {mask_value(n, v)!r}" for n, v in self._safe_items())
        return f"Message({self._mti!r}, {{{inner}}})"

    def _safe_items(self) -> list[tuple[int, Value]]:
        out = []
        for n in self._sorted_keys():
            try:
                out.append((n, self[n]))
            except Iso8583Error:
                out.append((n, "<undecodable>"))
        return out

    def describe(self, spec: Spec | None = None) -> str:
        """A table of the fields with their descriptions; card data masked."""
        from isopace.iso8583.masking import mask_value
        from isopace.iso8583.specs import ISO87_ASCII

        sp = spec or self._spec or ISO87_ASCII
        rows = [("MTI", "Message Type Indicator", self._mti)]
        if self._hdr is not None:
            rows.insert(0, ("h", "Message Header", mask_value(0, self._hdr)))
        for n, v in self._safe_items():
            rows.append((str(n), sp.description(n), mask_value(n, v)))
        w0 = max(len(r[0]) for r in rows)
        w1 = min(40, max(len(r[1]) for r in rows))
        return "\n".join(f"{a:>{w0}}  {b[:w1]:<{w1}}  {c}" for a, b, c in rows)

    # --- JSON -------------------------------------------------------------------------------
    def to_json(self, redact: bool = False) -> str:
        """The message as JSON (see the module docstring); built once per message and mode."""
        memo = self._memo
        if memo is None:
            memo = self._memo = {}
        else:
            cached = memo.get("json-r" if redact else "json")
            if cached is not None:
                return cached  # type: ignore[no-any-return]
        # Written by hand, byte for byte what ``json.dumps(doc, separators=(",", ":"))`` gives
        # for the document (str values through json's own string encoder).
        parts: list[str] = []
        append = parts.append
        redacted = self._redacted
        for n, v in self.fields().items():
            if redact:
                if n in REDACTED_FIELDS:
                    redacted = redacted | _SINGLE[n]
                    continue
                if n == 55:
                    try:
                        v = self._strip_icc(v)
                    except (Iso8583Error, ValueError):
                        redacted = redacted | _SINGLE[n]
                        continue
            if isinstance(v, str):
                append(_KEYS[n] + _json_str(v))
            else:
                append(_KEYS[n] + '{"hex":"' + v.hex().upper() + '"}')
        text: str = '{"mti":' + _json_str(self._mti) + ',"fields":{' + ",".join(parts) + "}"
        h = self._hdr
        if h is not None:
            if isinstance(h, bytes):
                text += ',"header":{"hex":"' + h.hex().upper() + '"}'
            else:
                text += ',"header":' + _ENCODE(h)
        if redacted:
            text += ',"redacted":[' + ",".join(map(str, sorted(redacted))) + "]"
        text += "}"
        memo["json-r" if redact else "json"] = text
        return text

    def _strip_icc(self, v: Value) -> Value:
        """DE 55 (``v``) without EMV tags 5A and 57, wherever they sit; raises as
        :func:`~isopace.iso8583.tlv.parse_tlv` does when it is not TLV."""
        t = self.tlv(55)
        if not _has_tags(t, _REDACTED_TAG_SET):
            return v
        out = t.remove(*_REDACTED_TAGS, deep=True).build()
        return out if isinstance(v, bytes) else out.hex().upper()

    @classmethod
    def from_json(cls, text: str | _bytes) -> Message:
        try:
            doc = json.loads(text)
            if not isinstance(doc, dict) or not isinstance(doc.get("mti"), str):
                raise ValueError("expected an object with an 'mti'")
            raw = doc.get("fields", {})
            if not isinstance(raw, dict):
                raise ValueError("'fields' must be an object")
            fields = {int(k): _json_value(v) for k, v in raw.items()}
            header = _json_value(doc["header"]) if doc.get("header") is not None else None
            redacted = frozenset(int(x) for x in doc.get("redacted", ()))
        except (ValueError, TypeError, binascii.Error) as e:
            raise Iso8583Error(f"message JSON is invalid: {e}") from None
        m = cls(doc["mti"], fields, header=header)
        m._redacted = redacted
        return m


def _json_value(v: Any) -> Value:
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("hex"), str):
        return binascii.a2b_hex(v["hex"])
    raise ValueError("field values are strings or {'hex': ...}")


_json_str: Any = json.encoder.encode_basestring_ascii  # what json.dumps uses (ensure_ascii)
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode
_KEYS = tuple(f'"{n}":' for n in range(193))
_NAMES = tuple(str(n) for n in range(193))


_REDACTED_TAG_SET = frozenset(_REDACTED_TAGS)


def _has_tags(t: TLV, tags: frozenset[str]) -> bool:
    """True when one of ``tags`` occurs in ``t`` at any depth."""
    for tag, _, child in t.objects():
        if tag in tags or (child is not None and _has_tags(child, tags)):
            return True
    return False
