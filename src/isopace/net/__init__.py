"""isopace.net: ISO 8583 over TCP.

A sans-IO core — :mod:`~isopace.net.framing` (length headers, TPDU, keep-alive, maximum frame size)
and :mod:`~isopace.net.matching` (request/response matching by key) — and a thin asyncio shell:
:class:`Server`, :class:`Client` and :class:`ClientPool`. Logger: ``isopace.net``.
"""

from isopace.net.client import Client, SignOnHook, UnmatchedHandler, echo_test
from isopace.net.errors import (
    ConnectionLostError,
    DuplicateKeyError,
    FrameError,
    FrameTooLargeError,
    IncompleteFrameError,
    MatchKeyError,
    NetError,
    NotConnectedError,
    RequestTimeoutError,
)
from isopace.net.framing import (
    DEFAULT_MAX_FRAME_SIZE,
    Frame,
    FrameDecoder,
    Framing,
    LengthHeader,
    Tpdu,
)
from isopace.net.matching import KeyFunc, Matcher, rrn_key, stan_terminal_key
from isopace.net.pool import ClientPool
from isopace.net.server import ECHO_FIELDS, Handler, Server, error_response, recover_mti

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "ECHO_FIELDS",
    "Client",
    "ClientPool",
    "ConnectionLostError",
    "DuplicateKeyError",
    "Frame",
    "FrameDecoder",
    "FrameError",
    "FrameTooLargeError",
    "Framing",
    "Handler",
    "IncompleteFrameError",
    "KeyFunc",
    "LengthHeader",
    "MatchKeyError",
    "Matcher",
    "NetError",
    "NotConnectedError",
    "RequestTimeoutError",
    "Server",
    "SignOnHook",
    "Tpdu",
    "UnmatchedHandler",
    "echo_test",
    "error_response",
    "recover_mti",
    "rrn_key",
    "stan_terminal_key",
]
