"""Errors of the network layer. Every one derives from :class:`NetError` (itself an
:class:`isopace.IsopaceError`); the ones caused by bad input also derive from ``ValueError``,
timeouts from ``TimeoutError`` and lost connections from ``ConnectionError`` so that generic
handlers keep working."""

from __future__ import annotations

from collections.abc import Hashable

from isopace.errors import IsopaceError


class NetError(IsopaceError):
    """Base class of every error raised by :mod:`isopace.net`."""


class FrameError(NetError, ValueError):
    """Bytes on the wire that do not form a frame: a bad length header, a frame larger than the
    maximum, a payload that cannot be framed. When raised by :class:`FrameDecoder` the stream has
    lost synchronisation and the connection must be closed."""


class FrameTooLargeError(FrameError):
    """A declared (or requested) frame length above the configured maximum. The declared size is
    never allocated."""

    def __init__(self, length: int, max_size: int) -> None:
        self.length = length
        self.max_size = max_size
        super().__init__(f"frame length {length} exceeds the maximum frame size {max_size}")


class IncompleteFrameError(FrameError):
    """The stream ended in the middle of a frame (the peer closed mid-frame)."""

    def __init__(self, pending: int) -> None:
        self.pending = pending
        super().__init__(f"stream ended with {pending} bytes of an incomplete frame")


class MatchKeyError(NetError, ValueError):
    """A request carries no matching key (for example DE 11 is missing)."""


class DuplicateKeyError(NetError, ValueError):
    """A request whose matching key is already in flight on the connection (or pool)."""

    def __init__(self, key: Hashable) -> None:
        self.key = key
        super().__init__(f"a request with matching key {key!r} is already in flight")


class NotConnectedError(NetError, ConnectionError):
    """The client has no connection (never connected, closed, or the connection attempt failed)."""


class ConnectionLostError(NetError, ConnectionError):
    """The connection closed while the request was in flight. The peer may or may not have
    processed it: the caller decides (typically with a reversal)."""


class RequestTimeoutError(NetError, TimeoutError):
    """No response arrived within the request's timeout. The pending entry has been removed, so a
    late response goes to the unmatched-response handler."""

    def __init__(self, key: Hashable, timeout: float) -> None:
        self.key = key
        self.timeout = timeout
        super().__init__(f"no response for key {key!r} within {timeout:g} s")
