"""Listening sockets and their accept loop, for :class:`~isopace.net.Server` (and any other
server of the process that must survive running out of descriptors: the host's metrics).

Why the server does not use ``loop.create_server``: asyncio's accept loop reports running out of
descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) through the loop's exception handler,
which logs ``socket.accept() out of system resource`` with a traceback each time, and retries
after a fixed second that cannot be changed; and it builds the transport (and a task) of every
connection before anyone can refuse it. A loop-wide exception handler that recognised the
message would match a private text, would see other servers' errors on the same loop, and would
still leave the retry to asyncio. Owning the listening sockets instead (a non-blocking socket, a
reader callback, ``connect_accepted_socket``; the same on asyncio's selector loop and uvloop;
Windows' proactor loop has no ``add_reader``) gives the port what it needs, in one place:

- the server sees each socket straight after ``accept()`` and may close it there, before any
  transport, protocol or task exists: the cheapest refusal of a connection over the maximum;
- a resource error stops reading the listening sockets for a pause (0.1 s, doubling to 0.5 s
  while the errors go on, back to 0.1 s after an accept succeeds) instead of spinning on a
  socket that stays readable, and is counted into one rate-limited WARNING
  (:class:`~isopace.net._tally.Tally`), never a traceback. Other accept errors (the peer reset
  the connection before it was accepted, a network error the kernel reports on the next
  connection) skip that connection and are counted the same way.

Sockets are set up as ``create_server`` does on POSIX: ``SO_REUSEADDR``, ``IPV6_V6ONLY`` on IPv6
sockets, one socket per address the host name resolves to; with port 0 every address gets the
port the first one was given, so ``port`` means one port.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable
from typing import Any

from isopace._cardtext import error_text
from isopace.net._tally import Tally
from isopace.net._transport import address_text
from isopace.net.limits import ServerStats

RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
PAUSE_MIN = 0.1
PAUSE_MAX = 0.5

Accepted = Callable[[socket.socket, Any], None]
"""``(socket, peer address)``: the server's callback for each accepted connection (non-blocking
socket, which it now owns)."""


class Listener:
    """Listening sockets that hand each accepted connection to ``on_accept`` (see the module
    notes). ``stats.accept_errors`` counts the failed accepts; ``log_interval``: seconds between
    the summary lines of repeated errors."""

    def __init__(
        self,
        on_accept: Accepted,
        *,
        backlog: int = 128,
        stats: ServerStats | None = None,
        log_interval: float = 10.0,
    ) -> None:
        self._on_accept = on_accept
        self._backlog = backlog
        self.stats = stats if stats is not None else ServerStats()
        self._log_interval = log_interval
        self._loop: asyncio.AbstractEventLoop  # set by open()
        self._errors: Tally | None = None
        self._sockets: list[socket.socket] = []
        self._pause = PAUSE_MIN
        self._resume: asyncio.TimerHandle | None = None
        self._reading = False

    @property
    def sockets(self) -> list[socket.socket]:
        return list(self._sockets)

    @property
    def port(self) -> int:
        port: int = self._sockets[0].getsockname()[1]
        return port

    async def open(self, host: str | None, port: int) -> None:
        """Bind and listen on every address of ``host`` (None or "": all interfaces), then start
        accepting. Raises ``OSError`` (with its errno) if an address cannot be bound."""
        self._loop = asyncio.get_running_loop()
        infos = await self._loop.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        seen: set[tuple[int, Any]] = set()
        try:
            for family, kind, proto, _, address in infos:
                if (family, address) in seen:
                    continue
                seen.add((family, address))
                if port == 0 and self._sockets:
                    address = (address[0], self.port, *address[2:])
                sock = socket.socket(family, kind, proto)
                self._sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind(address)
                except OSError as exc:
                    raise OSError(
                        exc.errno, f"cannot bind {address_text(address)}: {exc.strerror}"
                    ) from None
                sock.listen(self._backlog)
                sock.setblocking(False)
        except BaseException:
            self.close()
            raise
        where = address_text(self._sockets[0].getsockname())
        self._errors = Tally(
            self._loop,
            "accept_error",
            f"cannot accept a connection on {where}",
            interval=self._log_interval,
        )
        self._start_reading()

    def close(self) -> None:
        """Stop accepting and close the listening sockets."""
        self._stop_reading()
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        for sock in self._sockets:
            sock.close()
        self._sockets = []
        if self._errors is not None:
            self._errors.close()

    def _start_reading(self) -> None:
        if not self._reading:
            self._reading = True
            for sock in self._sockets:
                self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            for sock in self._sockets:
                self._loop.remove_reader(sock.fileno())

    def _accept(self, sock: socket.socket) -> None:
        # As asyncio does: up to `backlog` connections per readiness event, then let the loop run.
        for _ in range(self._backlog):
            try:
                conn, address = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.stats.accept_errors += 1
                if exc.errno in RESOURCE_ERRORS:
                    self._pause_accepting(exc)
                    return
                # ECONNABORTED (the peer reset it first), or a network error Linux reports on
                # the next connection: that connection is gone, the others may be waiting
                self._note(error_text(exc))
                continue
            self._pause = PAUSE_MIN
            conn.setblocking(False)
            self._on_accept(conn, address)

    def _pause_accepting(self, exc: OSError) -> None:
        delay = self._pause
        self._pause = min(PAUSE_MAX, delay * 2)
        self._note(f"{error_text(exc)}; accepting paused for {delay:g} s")
        self._stop_reading()
        self._resume = self._loop.call_later(delay, self._resumed)

    def _note(self, detail: str) -> None:
        if self._errors is not None:
            self._errors.note(detail)

    def _resumed(self) -> None:
        self._resume = None
        if self._sockets:
            self._start_reading()
