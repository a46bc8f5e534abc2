"""Sans-IO framing of ISO 8583 messages on a byte stream.

A frame is a length header, an optional 5-byte TPDU, then the message bytes::

    [length header][TPDU (optional, 5 bytes)][ISO 8583 message]

Decisions (a payments engineer's defaults, written down):

- Length header kinds (:class:`LengthHeader`): 2-byte binary big-endian (the default), 4-byte
  binary big-endian, 2 and 4 ASCII digits, 2-byte BCD (4 digits) and Visa's VMLH (2-byte binary
  length followed by 2 reserved bytes, written as zeros and ignored on read). With
  ``include_header=True`` the declared length counts the header itself (some hosts do).
- The declared length covers the TPDU and the message (everything after the header).
- TPDU: ``60 DDDD SSSS`` (identifier, destination NII, source NII). :meth:`Tpdu.reply` swaps
  destination and source, as the answer to a frame must.
- Keep-alive: a frame of length zero (a header only, no TPDU). :attr:`Frame.keepalive` tells it
  apart; the server answers one with one, the client only notes the activity.
- ``max_frame_size`` (default 64 KiB) bounds the length after the header. A larger declared length
  raises :class:`FrameTooLargeError` as soon as the header is read: the declared size is never
  allocated, and the stream is no longer in sync, so the caller closes the connection. Bad length
  digits do the same. A frame too short to hold its TPDU is returned with ``tpdu=None`` (its
  boundary is known, so the stream stays in sync and the caller decides).

The decoder only buffers what it was fed; it never reads ahead of the declared length. It is a
plain state machine (``feed`` bytes, ``take`` frames: all that are complete, or ``take(1)`` one
at a time), with no I/O. A read holding whole frames is sliced without being copied into a buffer.
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from isopace.net.errors import FrameError, FrameTooLargeError, IncompleteFrameError

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "Frame",
    "FrameDecoder",
    "Framing",
    "LengthHeader",
    "Tpdu",
]

DEFAULT_MAX_FRAME_SIZE = 64 * 1024
TPDU_SIZE = 5
_COMPACT_AT = 64 * 1024


class LengthHeader(enum.Enum):
    """The kinds of length header, with their size in bytes and the largest value they can hold."""

    BINARY2 = "binary2"
    BINARY4 = "binary4"
    ASCII2 = "ascii2"
    ASCII4 = "ascii4"
    BCD2 = "bcd2"
    VMLH = "vmlh"

    @property
    def size(self) -> int:
        """Bytes taken by the header."""
        return _HEADER_SIZE[self]

    @property
    def capacity(self) -> int:
        """The largest length value the header can express."""
        return _HEADER_CAPACITY[self]


_HEADER_SIZE = {
    LengthHeader.BINARY2: 2,
    LengthHeader.BINARY4: 4,
    LengthHeader.ASCII2: 2,
    LengthHeader.ASCII4: 4,
    LengthHeader.BCD2: 2,
    LengthHeader.VMLH: 4,
}
_HEADER_CAPACITY = {
    LengthHeader.BINARY2: 0xFFFF,
    LengthHeader.BINARY4: 0xFFFFFFFF,
    LengthHeader.ASCII2: 99,
    LengthHeader.ASCII4: 9999,
    LengthHeader.BCD2: 9999,
    LengthHeader.VMLH: 0xFFFF,
}


@dataclass(frozen=True, slots=True)
class Tpdu:
    """A Transport Protocol Data Unit: identifier byte (0x60 by convention), destination and source
    NII (2 bytes each, usually BCD)."""

    destination: bytes = b"\x00\x00"
    source: bytes = b"\x00\x00"
    id: int = 0x60

    def __post_init__(self) -> None:
        if len(self.destination) != 2 or len(self.source) != 2:
            raise ValueError("TPDU destination and source must be 2 bytes each")
        if not 0 <= self.id <= 0xFF:
            raise ValueError(f"TPDU identifier {self.id} is not a byte")

    @classmethod
    def from_bytes(cls, data: bytes) -> Tpdu:
        if len(data) != TPDU_SIZE:
            raise FrameError(f"a TPDU is {TPDU_SIZE} bytes, got {len(data)}")
        return cls(destination=bytes(data[1:3]), source=bytes(data[3:5]), id=data[0])

    def to_bytes(self) -> bytes:
        return bytes((self.id,)) + self.destination + self.source

    def reply(self) -> Tpdu:
        """The TPDU of the answer: destination and source swapped."""
        return Tpdu(destination=self.source, source=self.destination, id=self.id)


@dataclass(slots=True)
class Frame:
    """One decoded frame: the message bytes and, with TPDU framing, its TPDU. (Treat it as a value;
    it is not frozen only because a frozen dataclass is slower to build, once per message.)"""

    payload: bytes
    tpdu: Tpdu | None = None

    @property
    def keepalive(self) -> bool:
        """True for a zero-length (keep-alive) frame."""
        return not self.payload and self.tpdu is None


def _int_be(buf: bytes | bytearray, pos: int, size: int) -> int:
    return int.from_bytes(buf[pos : pos + size], "big")


def _read_binary2(buf: bytes | bytearray, pos: int) -> int:
    return (buf[pos] << 8) | buf[pos + 1]


def _read_binary4(buf: bytes | bytearray, pos: int) -> int:
    return _int_be(buf, pos, 4)


def _read_ascii(size: int) -> Callable[[bytes | bytearray, int], int]:
    def read(buf: bytes | bytearray, pos: int) -> int:
        digits = bytes(buf[pos : pos + size])
        if not digits.isdigit():
            raise FrameError(f"length header {digits!r} is not {size} ASCII digits")
        return int(digits)

    return read


def _read_bcd2(buf: bytes | bytearray, pos: int) -> int:
    b0, b1 = buf[pos], buf[pos + 1]
    nibbles = (b0 >> 4, b0 & 0x0F, b1 >> 4, b1 & 0x0F)
    if max(nibbles) > 9:
        raise FrameError(f"length header {bytes((b0, b1)).hex()} is not BCD")
    return nibbles[0] * 1000 + nibbles[1] * 100 + nibbles[2] * 10 + nibbles[3]


_READERS: dict[LengthHeader, Callable[[bytes | bytearray, int], int]] = {
    LengthHeader.BINARY2: _read_binary2,
    LengthHeader.BINARY4: _read_binary4,
    LengthHeader.ASCII2: _read_ascii(2),
    LengthHeader.ASCII4: _read_ascii(4),
    LengthHeader.BCD2: _read_bcd2,
    LengthHeader.VMLH: _read_binary2,
}


def _write_header(kind: LengthHeader, value: int) -> bytes:
    if kind is LengthHeader.BINARY2:
        return value.to_bytes(2, "big")
    if kind is LengthHeader.BINARY4:
        return value.to_bytes(4, "big")
    if kind is LengthHeader.ASCII2:
        return b"%02d" % value
    if kind is LengthHeader.ASCII4:
        return b"%04d" % value
    if kind is LengthHeader.BCD2:
        return bytes.fromhex(f"{value:04d}")
    return value.to_bytes(2, "big") + b"\x00\x00"  # VMLH


@dataclass(frozen=True, slots=True)
class Framing:
    """How messages are framed on a connection. Immutable; share one between connections."""

    header: LengthHeader = LengthHeader.BINARY2
    include_header: bool = False
    tpdu: bool = False
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    max_body: int = field(init=False, repr=False, compare=False)
    """The largest length after the header this framing accepts and produces."""
    _fast: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_frame_size <= 0:
            raise ValueError(f"max_frame_size must be positive, got {self.max_frame_size}")
        capacity = self.header.capacity - (self.header.size if self.include_header else 0)
        object.__setattr__(self, "max_body", min(self.max_frame_size, capacity))
        fast = self.header is LengthHeader.BINARY2 and not self.include_header and not self.tpdu
        object.__setattr__(self, "_fast", fast)

    def encode_frame(self, payload: bytes, tpdu: Tpdu | None = None) -> bytes:
        """The bytes of one frame. With TPDU framing a non-empty payload needs ``tpdu``; an empty
        payload without TPDU is a keep-alive."""
        if self._fast and tpdu is None:
            if len(payload) > self.max_body:
                raise FrameTooLargeError(len(payload), self.max_body)
            return len(payload).to_bytes(2, "big") + payload
        if self.tpdu:
            if tpdu is not None:
                payload = tpdu.to_bytes() + payload
            elif payload:
                raise FrameError("this framing needs a TPDU for every non-empty frame")
        elif tpdu is not None:
            raise FrameError("this framing carries no TPDU")
        length = len(payload)
        if length > self.max_body:
            raise FrameTooLargeError(length, self.max_body)
        if self.include_header:
            length += self.header.size
        if self.header is LengthHeader.BINARY2:
            return length.to_bytes(2, "big") + payload
        return _write_header(self.header, length) + payload

    def keepalive(self) -> bytes:
        """A zero-length (keep-alive) frame."""
        return self.encode_frame(b"")

    def decoder(self) -> FrameDecoder:
        """A new decoder for one connection."""
        return FrameDecoder(self)


class FrameDecoder:
    """Feed bytes as they arrive, take complete frames out. One per connection.

    ``take`` returns no frame until a whole one is buffered; it raises :class:`FrameError` when
    the stream cannot be framed (the decoder then stays broken and keeps raising)."""

    __slots__ = ("_broken", "_buf", "_hsize", "_incl", "_max", "_pos", "_read", "_tpdu")

    def __init__(self, framing: Framing) -> None:
        # The bytes of the last feed when nothing was pending (no copy), else a bytearray.
        self._buf: bytes | bytearray = b""
        self._pos = 0
        self._hsize = framing.header.size
        self._read = _READERS[framing.header]
        self._incl = framing.include_header
        self._max = framing.max_frame_size
        self._tpdu = framing.tpdu
        self._broken: FrameError | None = None

    @property
    def pending(self) -> int:
        """Bytes buffered that do not form a whole frame yet."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes) -> None:
        """Add bytes received from the stream."""
        if not data:
            return
        buf = self._buf
        if self._pos >= len(buf):
            self._buf = data if type(data) is bytes else bytes(data)
            self._pos = 0
        elif type(buf) is bytes:
            grown = bytearray(memoryview(buf)[self._pos :])
            grown += data
            self._buf = grown
            self._pos = 0
        else:
            buf += data

    def take(self, limit: int = sys.maxsize) -> list[Frame]:
        """Up to ``limit`` complete frames, in one pass. If the stream breaks after some frames,
        those are returned and the next call raises the :class:`FrameError`."""
        if self._broken is not None:
            raise self._broken
        buf = self._buf
        pos = self._pos
        size = len(buf)
        hsize = self._hsize
        read = self._read
        incl = self._incl
        max_size = self._max
        tpdu = self._tpdu
        copy = not isinstance(buf, bytes)
        binary2 = read is _read_binary2
        out: list[Frame] = []
        try:
            while len(out) < limit and size - pos >= hsize:
                length = (buf[pos] << 8) | buf[pos + 1] if binary2 else read(buf, pos)
                if incl:
                    if length < hsize:
                        raise FrameError(
                            f"declared length {length} is smaller than the {hsize}-byte header "
                            "it includes"
                        )
                    length -= hsize
                if length > max_size:
                    raise FrameTooLargeError(length, max_size)
                start = pos + hsize
                end = start + length
                if end > size:
                    break
                body: bytes = bytes(buf[start:end]) if copy else buf[start:end]  # type: ignore[assignment]
                pos = end
                if tpdu and body:
                    if len(body) < TPDU_SIZE:
                        out.append(Frame(body, None))
                    else:
                        out.append(Frame(body[TPDU_SIZE:], Tpdu.from_bytes(body[:TPDU_SIZE])))
                else:
                    out.append(Frame(body))
        except FrameError as exc:
            self._broken = exc
            if not out:
                raise
        if pos == size:
            self._buf = b""
            self._pos = 0
        elif copy and pos >= _COMPACT_AT:
            assert isinstance(buf, bytearray)
            del buf[:pos]
            self._pos = 0
        else:
            self._pos = pos
        return out

    def frames(self, data: bytes = b"") -> list[Frame]:
        """Feed ``data`` and return every complete frame now buffered (raises on a broken
        stream only when no complete frame precedes the break; the next call raises then)."""
        self.feed(data)
        return self.take()

    def close(self) -> None:
        """Declare the end of the stream: raises :class:`IncompleteFrameError` if a partial frame
        is buffered."""
        if self.pending:
            raise IncompleteFrameError(self.pending)
