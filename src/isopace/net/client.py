"""The asyncio ISO 8583 client: many concurrent requests on one connection, matched by key.

``await client.request(message, timeout=...)`` encodes and sends ``message`` and waits for the
response whose key (default DE 11 + DE 41, see :mod:`isopace.net.matching`) equals the request's.

Decisions:

- One connection per client; any number of requests in flight on it. A request whose key is
  already in flight is refused (:class:`DuplicateKeyError`); one without a key too
  (:class:`MatchKeyError`). Only responses (MTI function digit 1, 3 or 5) are matched.
- Timeouts: one loop timer per connection driven by the sans-IO matcher's deadlines. A request
  that times out raises :class:`RequestTimeoutError` and leaves the matcher, so its late response
  is *unmatched*. A request cancelled by its caller leaves the matcher too.
- Unmatched messages (late responses, requests the host initiates) go to ``on_unmatched`` (plain or
  async callable) or, without one, are logged (masked) and dropped. An 0800 network request from the
  host is answered with 0810 / DE 39 ``"00"`` when ``answer_echo`` (the default).
- :meth:`connect` makes the first connection and raises :class:`NotConnectedError` if it fails;
  :meth:`start` connects in the background instead. Either way, when the connection is lost the
  requests in flight fail with :class:`ConnectionLostError` (the caller decides whether to reverse)
  and, with ``reconnect=True``, the client reconnects with exponential backoff
  (``backoff_initial`` doubled up to ``backoff_max``) and jitter (each delay shortened by a random
  fraction up to ``jitter``). Requests made while disconnected wait for the connection within their
  own timeout, then raise :class:`NotConnectedError`.
- ``on_connect`` (sign-on hook) runs after every (re)connection, before other requests are let
  through; requests the hook makes (e.g. an 0800 sign-on) go straight out. If it raises, the
  connection is closed (and retried by the reconnect loop).
- ``echo_interval``: when nothing was sent or received for that long, the client sends an 0800
  echo test (DE 7, DE 11, DE 70 = ``"301"``, or ``echo_message(client)``); if it fails, the
  connection is closed and re-opened.
- Keep-alive frames from the host are noted as activity and not answered (``answer_keepalive``
  answers them, for hosts that want it); answering both ways would ping-pong forever.
- Writes made in one loop turn go out in one ``transport.write``; a request waits while the
  transport's write buffer is above its high-water mark.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime as _dt
import inspect
import logging
import math
import random
import ssl as _ssl
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING

from isopace._cardtext import error_text
from isopace.iso8583 import Message
from isopace.iso8583.mti import is_request, is_response
from isopace.net._transport import FramedProtocol
from isopace.net.errors import (
    ConnectionLostError,
    DuplicateKeyError,
    FrameError,
    NetError,
    NotConnectedError,
    RequestTimeoutError,
)
from isopace.net.framing import Frame, Framing, Tpdu
from isopace.net.matching import KeyFunc, Matcher, stan_terminal_key

if TYPE_CHECKING:
    from isopace.iso8583 import Spec

__all__ = ["Client", "SignOnHook", "UnmatchedHandler"]

SignOnHook = Callable[["Client"], Awaitable[None]]
"""``async (client) -> None``, run after each (re)connection; may call ``client.request``."""

UnmatchedHandler = Callable[[Message], Awaitable[None] | None]
"""Receives every message that matches no request in flight."""

logger = logging.getLogger("isopace.net")

_signing_on: contextvars.ContextVar[Client | None] = contextvars.ContextVar(
    "isopace_net_signing_on", default=None
)


class _Expired(Exception):
    """Set on a request's future by the matcher's timer; turned into RequestTimeoutError."""


def echo_test(client: Client) -> Message:
    """The default idle echo: 0800 with DE 7 (UTC MMDDhhmmss), DE 11 and DE 70 = 301."""
    now = _dt.datetime.now(_dt.UTC)
    return Message("0800", {7: now.strftime("%m%d%H%M%S"), 11: client.next_stan(), 70: "301"})


class _Connection(FramedProtocol):
    def __init__(self, client: Client) -> None:
        super().__init__(client.framing)
        self.client = client
        self.matcher: Matcher[asyncio.Future[Message]] = Matcher(client.key)
        self.lost: asyncio.Future[None] = self._loop.create_future()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._tpdu = self.framing.tpdu

    # -- timeouts ------------------------------------------------------------------------------

    def schedule(self, deadline: float) -> None:
        if deadline < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = deadline
            self._timer = self._loop.call_at(deadline, self._expire)

    def _expire(self) -> None:
        now = max(self._loop.time(), self._timer_at)
        self._timer = None
        self._timer_at = math.inf
        for _, fut in self.matcher.expire(now):
            if not fut.done():
                fut.set_exception(_Expired())
        nxt = self.matcher.next_deadline()
        if nxt is not None:
            self.schedule(nxt)

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.last_activity = self._loop.time()
        decoder = self.decoder
        decoder.feed(data)
        while True:
            try:
                frames = decoder.take()
            except FrameError as exc:
                text = error_text(exc)
                logger.error(
                    "closing connection to %s: %s",
                    self.peer,
                    text,
                    extra={"peer": self.peer, "error": text},
                )
                self.close_transport()
                return
            if not frames:
                return
            for frame in frames:
                self.dispatch(frame)

    def frame_received(self, frame: Frame) -> None:
        client = self.client
        payload = frame.payload
        if frame.tpdu is None and (not payload or self._tpdu):
            self.control_frame(frame, client.answer_keepalive)
            return
        try:
            message = client.spec.decode(payload)
            mti = message.mti
        except Exception as exc:  # the codec's DecodeError, or anything a custom spec raises
            text = error_text(exc)
            logger.warning(
                "unparseable frame of %d bytes from %s: %s; dropped",
                len(frame.payload),
                self.peer,
                text,
                extra={"peer": self.peer, "error": text},
            )
            return
        if is_response(mti):
            try:
                fut = self.matcher.match(message)
            except Exception:  # a key field that does not decode: unmatched
                fut = None
            if fut is not None:
                if not fut.done():
                    fut.set_result(message)
                return
        elif client.answer_echo and mti[:2] == "08" and is_request(mti):
            self._answer_network(message, frame.tpdu)
            return
        client._unmatched(message)

    def _answer_network(self, request: Message, tpdu: Tpdu | None) -> None:
        try:
            response = request.reply().set(39, "00")
            if (de70 := request.get(70)) is not None:
                response = response.set(70, de70)
            payload = self.client.spec.encode(response)
            self.write(self.framing.encode_frame(payload, tpdu.reply() if tpdu else None))
        except Exception as exc:
            logger.warning(
                "cannot answer network message %r from %s: %s",
                request,
                self.peer,
                error_text(exc),
                extra={"peer": self.peer},
            )

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        drained = self.matcher.drain()
        for key, fut in drained:
            if not fut.done():
                fut.set_exception(
                    ConnectionLostError(
                        f"connection to {self.peer} lost with request {key!r} in flight"
                    )
                )
        if self.decoder.pending:
            logger.warning(
                "connection to %s closed in the middle of a frame (%d bytes dropped)",
                self.peer,
                self.decoder.pending,
                extra={"peer": self.peer},
            )
        if not self.lost.done():
            self.lost.set_result(None)
        self.client._connection_lost(self, exc, len(drained))


class Client:
    """An ISO 8583 client on one connection. ``await connect()`` (or ``async with``), then
    ``await request(message)`` from any number of tasks.

    ``Client(spec, framing, host, port)``: those four may be given by position or by name
    (``port`` is required); the rest by name only."""

    def __init__(
        self,
        spec: Spec,
        framing: Framing | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        key: KeyFunc = stan_terminal_key,
        timeout: float = 30.0,
        ssl: _ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        tpdu: Tpdu | None = None,
        connect_timeout: float = 10.0,
        reconnect: bool = True,
        backoff_initial: float = 0.1,
        backoff_max: float = 30.0,
        jitter: float = 0.5,
        on_connect: SignOnHook | None = None,
        on_unmatched: UnmatchedHandler | None = None,
        echo_interval: float | None = None,
        echo_message: Callable[[Client], Message] | None = None,
        answer_echo: bool = True,
        answer_keepalive: bool = False,
    ) -> None:
        if port is None:
            raise TypeError("Client() missing required argument: 'port'")
        self.spec = spec
        self.host = host
        self.port: int = port
        self.framing = framing if framing is not None else Framing()
        if self.framing.tpdu and tpdu is None:
            tpdu = Tpdu()
        self.tpdu = tpdu if self.framing.tpdu else None
        self.key = key
        self.timeout = timeout
        self.ssl = ssl
        self.server_hostname = server_hostname
        self.connect_timeout = connect_timeout
        self.reconnect = reconnect
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.jitter = jitter
        self.on_connect = on_connect
        self.on_unmatched = on_unmatched
        self.echo_interval = echo_interval
        self.echo_message = echo_message if echo_message is not None else echo_test
        self.answer_echo = answer_echo
        self.answer_keepalive = answer_keepalive
        self.connections_made = 0
        self._conn: _Connection | None = None
        self._ready: asyncio.Event | None = None
        self._live: _Connection | None = None  # the connection while ready (signed on)
        self._closed = False
        self._supervisor: asyncio.Task[None] | None = None
        self._echo_task: asyncio.Task[None] | None = None
        self._callbacks: set[asyncio.Task[None]] = set()
        self._stan = 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def connected(self) -> bool:
        """True when a signed-on connection is open."""
        conn = self._conn
        return (
            conn is not None
            and not conn.closed
            and self._ready is not None
            and self._ready.is_set()
        )

    @property
    def in_flight(self) -> int:
        """Requests waiting for their response."""
        conn = self._conn
        return 0 if conn is None else len(conn.matcher)

    def next_stan(self) -> str:
        """The next systems trace audit number, 000001 to 999999 then around."""
        self._stan = self._stan % 999999 + 1
        return f"{self._stan:06d}"

    # -- connection lifecycle ------------------------------------------------------------------

    def _events(self) -> asyncio.Event:
        if self._ready is None:
            self._ready = asyncio.Event()
        return self._ready

    async def connect(self) -> None:
        """Open the connection (and sign on). Raises :class:`NotConnectedError` if it fails."""
        if self._closed:
            raise NotConnectedError("the client is closed")
        if self._supervisor is not None:
            raise NetError("the client is already started")
        self._events()
        await self._open()
        self._start_tasks()

    def start(self) -> None:
        """Connect in the background (retrying with backoff); does not wait."""
        if self._closed:
            raise NotConnectedError("the client is closed")
        if self._supervisor is not None:
            return
        self._events()
        self._start_tasks(connect_first=True)

    def _start_tasks(self, connect_first: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self._supervisor = loop.create_task(self._supervise(connect_first))
        if self.echo_interval is not None and self._echo_task is None:
            self._echo_task = loop.create_task(self._echo_loop(self.echo_interval))

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until connected (and signed on); :class:`NotConnectedError` after ``timeout``."""
        ready = self._events()
        try:
            await asyncio.wait_for(ready.wait(), timeout)
        except TimeoutError:
            raise NotConnectedError(
                f"no connection to {self.address} within {timeout:g} s"
            ) from None

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Connection(self),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.server_hostname if self.ssl else None,
                ),
                self.connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            raise NotConnectedError(f"cannot connect to {self.address}: {exc}") from exc
        self._conn = conn
        self.connections_made += 1
        if self.on_connect is not None:
            token = _signing_on.set(self)
            try:
                await self.on_connect(self)
            except Exception as exc:
                conn.close_transport(abort=True)
                raise NotConnectedError(f"sign-on to {self.address} failed: {exc!r}") from exc
            finally:
                _signing_on.reset(token)
        if conn.closed:
            raise NotConnectedError(f"connection to {self.address} closed during sign-on")
        self._live = conn
        self._events().set()
        logger.info("connected to %s", self.address, extra={"peer": self.address})

    def _backoff(self, attempt: int) -> float:
        delay: float = min(self.backoff_max, self.backoff_initial * 2.0 ** min(attempt, 32))
        return delay * (1.0 - self.jitter * random.random())

    async def _supervise(self, connect_first: bool) -> None:
        attempt = 0
        need_delay = not connect_first
        while not self._closed:
            conn = self._conn
            if conn is not None and not conn.closed:
                await asyncio.wait([conn.lost])
                attempt = 0
                need_delay = True
                if not self.reconnect:
                    return
                continue
            if need_delay:
                await asyncio.sleep(self._backoff(attempt))
            need_delay = True
            if self._closed:
                return
            try:
                await self._open()
                attempt = 0
            except NotConnectedError as exc:
                attempt += 1
                logger.warning(
                    "%s; retrying (attempt %d)",
                    error_text(exc),
                    attempt,
                    extra={"peer": self.address, "attempt": attempt},
                )

    def _connection_lost(self, conn: _Connection, exc: Exception | None, failed: int) -> None:
        if conn is not self._conn:
            return
        self._live = None
        if self._ready is not None:
            self._ready.clear()
        if not self._closed:
            logger.warning(
                "connection to %s lost%s (%d requests in flight failed)%s",
                self.address,
                f": {error_text(exc)}" if exc else "",
                failed,
                "; reconnecting" if self.reconnect else "",
                extra={"peer": self.address, "failed": failed},
            )

    async def _echo_loop(self, interval: float) -> None:
        loop = asyncio.get_running_loop()
        ready = self._events()
        while not self._closed:
            conn = self._conn
            if conn is None or conn.closed or not ready.is_set():
                await ready.wait()
                continue
            idle = loop.time() - conn.last_activity
            if idle < interval:
                await asyncio.sleep(interval - idle)
                continue
            try:
                echo = self.echo_message(self)
                response = await self.request(echo, timeout=min(self.timeout, interval))
                if response.get(39, "00") != "00":
                    logger.warning(
                        "echo test to %s answered with DE 39 = %s",
                        self.address,
                        response.get(39),
                        extra={"peer": self.address},
                    )
            except RequestTimeoutError as exc:
                if conn is self._conn and not conn.closed:
                    logger.warning(
                        "echo test to %s failed: %s; closing the connection",
                        self.address,
                        error_text(exc),
                        extra={"peer": self.address},
                    )
                    conn.close_transport(abort=True)
                    await asyncio.wait([conn.lost])
            except ConnectionError:
                continue  # the supervisor reconnects
            except Exception as exc:  # a duplicate key, an echo message that does not encode...
                logger.warning(
                    "echo test to %s not sent: %s",
                    self.address,
                    error_text(exc),
                    extra={"peer": self.address},
                )
                conn.last_activity = loop.time()  # try again after a full interval

    async def close(self) -> None:
        """Close the connection and stop reconnecting; requests in flight fail."""
        self._closed = True
        tasks = [t for t in (self._supervisor, self._echo_task) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        conn = self._conn
        if conn is not None and not conn.closed:
            conn.close_transport()
            _, pending = await asyncio.wait([conn.lost], timeout=1.0)
            if pending:
                conn.close_transport(abort=True)
        self._live = None
        if self._ready is not None:
            self._ready.clear()

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- requests ------------------------------------------------------------------------------

    async def _ready_connection(self, deadline: float, timeout: float) -> _Connection:
        conn = self._conn
        if _signing_on.get() is self:
            if conn is None or conn.closed:
                raise NotConnectedError(f"connection to {self.address} lost during sign-on")
            return conn
        if self._closed:
            raise NotConnectedError("the client is closed")
        if self._supervisor is None:
            raise NotConnectedError("the client is not connected: call connect() or start()")
        loop = asyncio.get_running_loop()
        ready = self._events()
        while True:
            conn = self._conn
            if conn is not None and not conn.closed and ready.is_set():
                return conn
            if self._supervisor.done():
                raise NotConnectedError(
                    f"the connection to {self.address} is closed and reconnect is off"
                )
            left = deadline - loop.time()
            if left <= 0 or self._closed:
                raise NotConnectedError(f"no connection to {self.address} within {timeout:g} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ready.wait(), left)

    async def request(self, message: Message, *, timeout: float | None = None) -> Message:
        """Send ``message`` and return the matching response.

        Raises :class:`RequestTimeoutError`, :class:`ConnectionLostError`,
        :class:`NotConnectedError`, :class:`DuplicateKeyError`, :class:`MatchKeyError`, or the
        codec's ``EncodeError``."""
        if timeout is None:
            timeout = self.timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        conn = self._live
        if conn is None or conn.closed:
            conn = await self._ready_connection(deadline, timeout)
        matcher = conn.matcher
        key = matcher.request_key(message)
        if key in matcher:
            raise DuplicateKeyError(key)
        data = self.framing.encode_frame(self.spec.encode(message), self.tpdu)
        if conn.write_paused:
            await conn.drain()
            if conn.closed:
                raise ConnectionLostError(f"connection to {self.address} lost before sending")
        fut: asyncio.Future[Message] = loop.create_future()
        matcher.add_key(key, fut, deadline)
        conn.schedule(deadline)
        conn.write(data)
        try:
            return await fut
        except _Expired:
            raise RequestTimeoutError(key, timeout) from None
        finally:
            if fut.cancelled():
                matcher.remove(key)

    async def send(self, message: Message) -> None:
        """Send ``message`` without waiting for an answer (its response, if any, is unmatched)."""
        loop = asyncio.get_running_loop()
        conn = self._live
        if conn is None or conn.closed:
            conn = await self._ready_connection(loop.time() + self.timeout, self.timeout)
        conn.write(self.framing.encode_frame(self.spec.encode(message), self.tpdu))

    # -- unmatched -----------------------------------------------------------------------------

    def _unmatched(self, message: Message) -> None:
        handler = self.on_unmatched
        if handler is None:
            logger.warning(
                "unmatched message %r from %s; dropped",
                message,
                self.address,
                extra={"peer": self.address, "mti": message.mti},
            )
            return
        try:
            result = handler(message)
        except Exception as exc:
            _unmatched_failed(message, exc)
            return
        if inspect.isawaitable(result):
            task = asyncio.get_running_loop().create_task(self._await_callback(result, message))
            self._callbacks.add(task)
            task.add_done_callback(self._callbacks.discard)

    @staticmethod
    async def _await_callback(result: Awaitable[None], message: Message) -> None:
        try:
            await result
        except Exception as exc:
            _unmatched_failed(message, exc)


def _unmatched_failed(message: Message, exc: Exception) -> None:
    # never logger.exception / exc_info: the formatter would print the exception unmasked
    logger.error(
        "unmatched-message handler failed for %r: %s\n%s",
        message,
        error_text(exc),
        error_text(exc, traceback=True),
        extra={"mti": message.mti, "error": error_text(exc)},
    )
