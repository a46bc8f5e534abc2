"""isopace.net: ISO 8583 over TCP.

A sans-IO core — :mod:`~isopace.net.framing` (length headers, TPDU, keep-alive, maximum frame size)
and :mod:`~isopace.net.matching` (request/response matching by key) — and a thin asyncio shell:
:class:`Server` (with the port's limits of :mod:`~isopace.net.limits`), :class:`Client` and
:class:`ClientPool`. Logger: ``isopace.net``. The decisions
are written down in each module's docstring.

::

    from isopace.iso8583 import ISO87_ASCII
    from isopace.net import Client, Framing, LengthHeader, Server

    async def handler(request):
        return request.reply().set(39, "00")

    framing = Framing(header=LengthHeader.BINARY2)          # the default
    async with Server(ISO87_ASCII, handler, framing=framing, port=0) as server:
        async with Client(ISO87_ASCII, port=server.port, framing=framing) as client:
            response = await client.request(request, timeout=5)  # matched on DE 11 + DE 41

The layer never imports ``isopace.flow`` or ``isopace.store``: a host wraps its flow in a handler.
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
from isopace.net.limits import ServerStats, default_max_connections, raise_open_file_limit
from isopace.net.listener import Listener
from isopace.net.matching import KeyFunc, Matcher, rrn_key, stan_terminal_key
from isopace.net.pool import ClientPool
from isopace.net.server import Handler, Server, recover_mti

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
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
    "Listener",
    "MatchKeyError",
    "Matcher",
    "NetError",
    "NotConnectedError",
    "RequestTimeoutError",
    "Server",
    "ServerStats",
    "SignOnHook",
    "Tpdu",
    "UnmatchedHandler",
    "default_max_connections",
    "echo_test",
    "raise_open_file_limit",
    "recover_mti",
    "rrn_key",
    "stan_terminal_key",
]
