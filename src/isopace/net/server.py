"""The asyncio ISO 8583 server.

``Server(spec, handler)`` accepts TCP (or TLS) connections, cuts each byte stream into frames with
the sans-IO :class:`~isopace.net.framing.FrameDecoder`, decodes every frame with ``spec`` and calls
``handler(request) -> response | None``; a response goes back on the same connection.

Decisions:

- Each connection is an ``asyncio.Protocol`` (faster than streams) rather than a task reading a
  stream; each request runs in its own task, so responses leave in completion order, not arrival
  order (pipelining; the client matches them by key). Writes made in one loop turn go out in one
  ``transport.write``.
- ``eager=True`` starts the handler eagerly: it runs up to its first real suspension inside
  ``data_received`` (in a copy of the context, as a task would), and a task is created only if it
  suspends, so a handler that answers at once costs no task. It is off by default because the
  code before that first suspension runs outside any task: ``asyncio.current_task()`` is None
  there, so ``asyncio.timeout`` and a flow run's deadline cannot interrupt it. Turn it on for
  handlers that do not rely on the current task.
- Back-pressure: at most ``max_in_flight`` requests per connection run at once; at the bound the
  server stops taking frames and pauses reading the socket, and resumes when one finishes. It also
  stops taking frames while the transport's write buffer is above its high-water mark (a client
  that sends but does not read cannot make the server buffer responses without bound).
- Keep-alive (zero-length) frames are answered with a keep-alive frame (``keepalive_reply``).
- Bad input never kills the server, and the connection survives whatever leaves the stream in sync:
  * what a frame is, read with the configured spec only (never by guessing another encoding,
    which made framed HTTP text an "MTI 4755" under the ASCII spec):
    - a frame the spec decodes (MTI, bitmaps and every field located) is a message: a response
      MTI (function digit 1, 3 or 5) is dropped (below); anything else goes to the handler, an
      MTI that is no valid request (``9999``, ``ABCD``) included: the host declines it 30 and
      journals it, and the answer echoes that MTI as received (no response MTI derives from it);
    - a frame the spec does not decode whose MTI (``spec.decode_mti``) is a valid request MTI
      (``validate``'s ``mti`` rule: digits, version 0-2, class 1-9, origin 0-5; function 0, 2 or
      4) is a malformed request: answered with a format error (DE 39 = ``"30"``) by
      :func:`isopace.iso8583.error_reply`, echoing what the spec's ``decode_partial`` can trust:
      the fields that decode when the frame's bytes add up to its fields, none when they do not
      (a misread DE 11 could pair the answer with another transaction) or the bitmap is
      unreadable;
    - any other frame (no MTI of this spec, or one no request has: ``GET `` under ASCII, ``4745``
      under BCD) is not a message of this spec: dropped. The first drop on a connection logs one
      WARNING; later ones are counted into the next, at most one every ``DROP_LOG_INTERVAL``;
    - a frame the spec does not decode but another built-in spec (``isopace.iso8583.SPECS``)
      decodes whole, into a valid request MTI, is a peer speaking another wire format (most
      often pyiso8583's ``default``, a binary bitmap, at a host expecting a hex one): dropped
      like the above, the WARNING naming both specs and the ``--spec`` that would read it. Not
      answered: the answer would be in a layout the peer cannot read, and what it would echo was
      read through the wrong layout. The other specs are tried only on this failure path, so a
      frame that decodes costs nothing more;
  * a request whose fields fail to decode when the handler reads them (decoding is lazy), or that
    ``spec.validate`` rejects when ``validate=True``: format error echoing the fields that still
    decode (``error_reply``). Which code an exception is answered with is the exception's
    (:func:`isopace.iso8583.response_code_for`): 30 for the request's bad input, 96 for
    anything else;
  * a handler that raises anything else, or returns a response that cannot be encoded: logged,
    answered with DE 39 = ``"96"`` (system malfunction) so the acquirer does not wait for its
    timeout;
  * a message that is itself a response (0210, 0810...) is logged and dropped;
  * a length header that cannot be read or declares more than ``framing.max_frame_size``: the
    stream is out of sync, so the connection is closed with a warning naming the peer and the
    length; the declared size is never allocated. Nothing a peer sends logs an ERROR: that level
    is for the server's own failures (a handler that raises, a response it cannot send).
  Logs show messages through their masked ``repr`` and never log raw bytes; exceptions (and
  their tracebacks) are logged as text masked by ``isopace._cardtext.error_text``, never through
  ``exc_info``, so a handler's error message cannot put card data in the log.
- ``close(timeout)``: stop accepting, stop reading new requests, let the running transactions
  finish and send their responses within ``timeout`` seconds, then cancel what remains (the flow
  rolls it back) and close the connections. Requests still buffered unread are not started.
- A peer that half-closes (sends EOF after its requests) still gets every answer; the server
  closes once nothing is in flight.
- TLS: pass an ``ssl.SSLContext`` (server side).
- Limits (why, and the defaults: :mod:`isopace.net.limits`): ``idle_timeout``, ``frame_timeout``,
  ``max_connections``, ``max_buffered_bytes``. The timeouts cost the per-request path one clock
  read per batch of frames and no timer work: each connection has one loop timer, armed at the
  earliest deadline it may have (the idle deadline, or a frame's when one starts); when it fires
  it compares the deadlines with the time of the last complete frame and either closes the
  connection or re-arms for what is left. A connection with a request in flight is not idle
  (the server owes it an answer; the transaction's own deadline bounds that), and a connection
  whose reading is paused at the in-flight bound is not stalled mid-frame (the frames are whole,
  the server is not reading them); a connection paused because its peer does not read the
  answers is idle, and closed as such. Past ``max_buffered_bytes`` of unfinished frames across
  all connections, the connection holding the most is closed, and the next, until the total
  fits: the one that pushed the total over is often an honest client whose frame arrived in two
  reads, while a client pinning memory holds the most (up to a whole frame for as long as the
  frame timeout lets it); finding it scans the connections, but only when the cap is hit. A
  connection over ``max_connections`` is closed straight after ``accept()``; connections still
  in their TLS handshake count. Closing for a limit aborts the transport (an answer still
  buffered for a peer that does not read would otherwise keep it open), is counted in
  :attr:`Server.stats`, and is logged rate-limited (one line at once, then one line with a count
  per ``log_interval``), never a line per connection; so are accept errors
  (:mod:`isopace.net.listener`: why the server owns its listening sockets).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import socket
import ssl as _ssl
from collections.abc import Awaitable, Callable, Coroutine, Generator
from types import TracebackType
from typing import TYPE_CHECKING, Any

from isopace._cardtext import error_text
from isopace.iso8583 import SPECS, Message, error_reply, mti_problems, response_code_for
from isopace.iso8583 import response_codes as rc
from isopace.iso8583.mti import answer_mti, is_request, is_response
from isopace.net._tally import Tally
from isopace.net._transport import FramedProtocol, address_text
from isopace.net.errors import FrameError, FrameTooLargeError, NetError
from isopace.net.framing import Frame, Framing, Tpdu
from isopace.net.limits import (
    BUFFER_CAP,
    DEFAULT_FRAME_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_BUFFERED_BYTES,
    FRAME_TIMEOUT,
    IDLE_TIMEOUT,
    ServerStats,
    default_max_connections,
)
from isopace.net.listener import Listener

if TYPE_CHECKING:
    from isopace.iso8583 import Spec

__all__ = ["Handler", "Server", "recover_mti"]

Handler = Callable[[Message], Awaitable[Message | None]]
"""``async (request) -> response | None`` (None: no answer, e.g. for a notification)."""

DROP_LOG_INTERVAL = 60.0
"""Seconds between two warnings about unreadable frames dropped on one connection."""

logger = logging.getLogger("isopace.net")


def recover_mti(payload: bytes) -> str | None:
    """The MTI at the start of an undecodable message, if it can be read: 4 ASCII digits, 4 EBCDIC
    digits or 2 BCD bytes (tried in that order). None otherwise.

    A guess across encodings, for tools; the server reads the MTI with its spec only."""
    head = payload[:4]
    if len(head) == 4:
        if head.isdigit() and head.isascii():
            return head.decode("ascii")
        if all(0xF0 <= b <= 0xF9 for b in head):
            return "".join(chr(b - 0xC0) for b in head)
    if len(payload) >= 2:
        digits = payload[:2].hex()
        if digits.isdigit():
            return digits
    return None


def _spec_name(spec: Spec) -> str:
    """``spec``'s built-in name (``--spec``), else its own name."""
    for name, known in SPECS.items():
        if known is spec:
            return name
    return repr(getattr(spec, "name", None) or "custom")


def _other_layout(spec: Spec, payload: bytes) -> str | None:
    """The name of a built-in spec other than ``spec`` that decodes ``payload`` whole (every
    field) into a valid request MTI, or None. Only for frames ``spec`` failed to decode."""
    for name, other in SPECS.items():
        if other is spec:
            continue
        try:
            message = other.decode(payload)
            message.fields()
            mti = message.mti
        except Exception:
            continue
        if is_request(mti) and not mti_problems(mti):
            return name
    return None


class _Resume:
    """Awaitable that carries on a coroutine already started by hand: it passes what the
    coroutine yields up to the task and what the task sends (or throws) down (``yield from``)."""

    __slots__ = ("coro", "first")

    def __init__(self, coro: Coroutine[Any, Any, None], first: Any) -> None:
        self.coro = coro
        self.first = first

    def __await__(self) -> Generator[Any, Any, None]:
        coro = self.coro
        value = self.first
        self.first = None
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:
                try:
                    value = coro.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    value = coro.send(sent)
                except StopIteration:
                    return


async def _resume(coro: Coroutine[Any, Any, None], first: Any) -> None:
    await _Resume(coro, first)


class _Connection(FramedProtocol):
    def __init__(self, server: Server) -> None:
        super().__init__(server.framing)
        self.server = server
        self.in_flight = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = False
        self.eof = False
        self.decoder_broken = False
        self._pumping = False
        self._tpdu = self.framing.tpdu
        self._blocked = False
        # the port's limits (module notes: "Limits")
        self.made = False
        self.dropped: str | None = None  # why the server closed it for a limit
        self.last_frame = 0.0  # loop time of the last complete frame (or of the connection)
        self._partial_since = 0.0  # loop time the bytes held began to arrive
        self.held = 0  # bytes of unfinished frames, as counted in the server's total
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._dropped = 0  # unreadable frames not yet reported (see `_undecodable`)
        self._drop_logged_at = -DROP_LOG_INTERVAL

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        server = self.server
        self.made = True
        server._opening -= 1
        server._connections.add(self)
        self.last_frame = now = self._loop.time()
        if server.idle_timeout is not None:
            self._arm(now + server.idle_timeout)
        logger.debug("connection from %s", self.peer, extra={"peer": self.peer})

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.server._connections.discard(self)
        self._release()
        pending = self.decoder.pending
        if self.dropped is not None:
            pass  # counted and logged (rate-limited) by the server as it closed it
        elif pending and not self.decoder_broken:
            logger.warning(
                "connection from %s closed in the middle of a frame (%d bytes dropped)",
                self.peer,
                pending,
                extra={"peer": self.peer, "pending": pending},
            )
        elif exc is not None:
            logger.info(
                "connection from %s lost: %s", self.peer, error_text(exc), extra={"peer": self.peer}
            )
        else:
            logger.debug("connection from %s closed", self.peer, extra={"peer": self.peer})
        if self.server._connections_changed is not None:
            self.server._connections_changed.set()

    def data_received(self, data: bytes) -> None:
        self.decoder.feed(data)
        self.pump()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._blocked:
            self._blocked = False
            self.pump()

    def eof_received(self) -> bool | None:
        # The peer will send no more. Answer what is in flight first (a half-closed TCP peer still
        # reads), then close; with nothing in flight, close now.
        self.eof = True
        if self.in_flight:
            return True
        self.flush()  # answers queued in this loop turn go out before the transport closes
        return None

    def pump(self) -> None:
        """Take frames while below the in-flight bound; pause reading at the bound."""
        self._pumping = True
        try:
            self._pump()
        finally:
            self._pumping = False
        if self.decoder.pending != self.held:  # rare: frames mostly arrive whole in one read
            self._held_changed()

    def _pump(self) -> None:
        limit = self.server.max_in_flight
        decoder = self.decoder
        while not self.stopping and not self.closed:
            room = limit - self.in_flight
            if room <= 0 or self._write_paused:
                self._blocked = True
                self.pause()
                return
            try:
                frames = decoder.take(room)
            except FrameError as exc:
                self.decoder_broken = True
                self._fatal(exc)
                return
            if not frames:
                if self.eof and self.in_flight == 0:
                    self.close_transport()  # half-closed peer, everything answered
                else:
                    self.resume()
                return
            self.last_frame = self._loop.time()
            for frame in frames:
                if self.closed or self.stopping:
                    return
                self.dispatch(frame)

    def _fatal(self, exc: FrameError) -> None:
        # a WARNING, not an ERROR: a peer's bytes caused it, and a peer must not be able to fill
        # the log with errors
        text = error_text(exc)
        extra = {"peer": self.peer, "error": text}
        if isinstance(exc, FrameTooLargeError):
            logger.warning(
                "closing connection from %s: declared frame length %d exceeds the maximum %d",
                self.peer,
                exc.length,
                exc.max_size,
                extra=extra,
            )
        else:
            logger.warning("closing connection from %s: %s", self.peer, text, extra=extra)
        self.close_transport()

    def frame_received(self, frame: Frame) -> None:
        server = self.server
        payload = frame.payload
        if frame.tpdu is None and (not payload or self._tpdu):
            self.control_frame(frame, server.keepalive_reply)
            return
        try:
            request = server.spec.decode(payload)
            mti = request.mti
        except Exception as exc:  # the codec's DecodeError, or anything a custom spec raises
            self._undecodable(frame, exc)
            return
        if is_response(mti):
            logger.warning(
                "unexpected message %r from %s (not a request); dropped",
                request,
                self.peer,
                extra={"peer": self.peer, "mti": mti},
            )
            return
        self.in_flight += 1
        coro = self._handle(request, frame.tpdu)
        if server.eager:
            # Run the handler up to its first suspension now (in its own context), and make a
            # task only if it suspends. A handler that answers at once costs no task.
            context = contextvars.copy_context()
            try:
                first = context.run(coro.send, None)
            except StopIteration:
                return
            task = self._loop.create_task(_resume(coro, first), context=context)
        else:
            task = self._loop.create_task(coro)
        self.tasks.add(task)  # `_handle` takes it out as it ends (cheaper than a done callback)

    def _undecodable(self, frame: Frame, exc: Exception) -> None:
        """A frame ``spec.decode`` rejects: a format error if the spec reads a valid request MTI
        in it and no other built-in spec reads the frame, else dropped (see "what a frame is" in
        the module notes)."""
        spec = self.server.spec
        payload = frame.payload
        text = error_text(exc)
        mti: str | None
        try:
            mti = spec.decode_mti(payload)
        except Exception:  # not even an MTI of this spec (or a spec without decode_mti)
            mti = None
        extra: dict[str, object] = {
            "peer": self.peer,
            "error": text,
            "length": len(payload),
            "mti": mti,
        }
        request = mti is not None and is_request(mti) and not mti_problems(mti)
        # another wire format? Asked here only when it decides the answer; for a frame dropped
        # anyway, only when the warning is written (below)
        layout = _other_layout(spec, payload) if request else None
        if request and layout is None:
            assert mti is not None
            logger.warning(
                "malformed %s message from %s: %s; answering with a format error",
                mti,
                self.peer,
                text,
                extra=extra,
            )
            try:  # the fields that can be trusted (none if the frame's bytes do not add up)
                found = spec.decode_partial(payload)
            except Exception:  # a bitmap that cannot be read: nothing to echo
                found = Message(mti)
            if found.mti != mti:  # a custom spec's decode_partial reading another MTI
                found = Message(mti)
            self._send(error_reply(found, response_code_for(exc)), frame.tpdu)
            return
        self._dropped += 1
        now = self._loop.time()
        if now < self._drop_logged_at + DROP_LOG_INTERVAL:
            return  # counted; said in the next warning
        count, self._dropped = self._dropped, 0
        self._drop_logged_at = now
        if not request:
            layout = _other_layout(spec, payload)
        hint = ""
        if layout is not None:
            hint = f"; the bytes decode as {layout}: start the host with --spec {layout}"
            extra["decodes_as"] = layout
        logger.warning(
            "unparseable frame of %d bytes from %s under the spec %s: %s%s; dropped%s",
            len(payload),
            self.peer,
            _spec_name(spec),
            text,
            hint,
            f" ({count} dropped since the last warning)" if count > 1 else "",
            extra={**extra, "dropped": count},
        )

    async def _handle(self, request: Message, tpdu: Tpdu | None) -> None:
        server = self.server
        try:
            try:
                if server.validate and (violations := server.spec.validate(request)):
                    logger.warning(
                        "request %r from %s fails validation: %s; answering with a format error",
                        request,
                        self.peer,
                        "; ".join(v.message for v in violations),
                        extra={"peer": self.peer, "mti": request.mti},
                    )
                    response: Message | None = error_reply(request, rc.FORMAT_ERROR)
                else:
                    response = await server.handler(request)
            except Exception as exc:
                code = response_code_for(exc)
                text = error_text(exc)
                extra = {"peer": self.peer, "mti": request.mti, "error": text}
                if code == rc.FORMAT_ERROR:  # the request's fault: a field that does not decode
                    logger.warning(
                        "malformed request %r from %s: %s; answering with a format error",
                        request,
                        self.peer,
                        text,
                        extra=extra,
                    )
                else:  # never exc_info: the formatter would print the exception unmasked
                    logger.error(
                        "handler failed for %r from %s: %s; answering with DE 39 = %s\n%s",
                        request,
                        self.peer,
                        text,
                        code,
                        error_text(exc, traceback=True),
                        extra=extra,
                    )
                response = error_reply(request, code)
            if response is not None:
                self._send(response, tpdu, request)
        finally:
            self.in_flight -= 1
            self.tasks.discard(asyncio.current_task())
            if self._blocked:
                self._blocked = False
                self.pump()
            elif self.eof and self.in_flight == 0 and not self._pumping:
                self.close_transport()  # the peer half-closed: answered everything, now close

    def _send(self, response: Message, tpdu: Tpdu | None, request: Message | None = None) -> None:
        """Encode and send ``response``; if it cannot be encoded, send DE 39 = 96 instead (with the
        request's echo fields when they encode, else bare)."""
        if self.closed:
            logger.info(
                "connection from %s closed; response %r dropped",
                self.peer,
                response,
                extra={"peer": self.peer},
            )
            return
        spec = self.server.spec
        reply_tpdu = tpdu.reply() if tpdu is not None else None
        try:
            self.write(self.framing.encode_frame(spec.encode(response), reply_tpdu))
            return
        except Exception as exc:  # EncodeError, FrameError, a handler's wrong return type
            text = error_text(exc)
            logger.error(
                "response %r to %s cannot be sent: %s; answering with DE 39 = 96",
                response,
                self.peer,
                text,
                extra={"peer": self.peer, "error": text},
            )
        if request is None:
            fallbacks = [Message(response.mti, {39: rc.SYSTEM_MALFUNCTION})]
        else:
            fallbacks = [
                error_reply(request, rc.SYSTEM_MALFUNCTION),
                Message(answer_mti(request.mti), {39: rc.SYSTEM_MALFUNCTION}),
            ]
        for fallback in fallbacks:
            try:
                self.write(self.framing.encode_frame(spec.encode(fallback), reply_tpdu))
                return
            except Exception:
                continue

    def stop(self) -> None:
        self.stopping = True
        self.pause()

    # -- the port's limits (module notes: "Limits") ----------------------------------------------

    def _held_changed(self) -> None:
        """Count the bytes of unfinished frames in the server's total; start the frame timeout
        when they begin; close connections if the total passes the cap."""
        if self.dropped is not None or self.closed:
            return
        server = self.server
        held = self.decoder.pending
        if not self.held:
            now = self._loop.time()
            self._partial_since = now
            if server.frame_timeout is not None:
                self._arm(now + server.frame_timeout)
        server._buffered += held - self.held
        self.held = held
        if server.max_buffered_bytes is not None and server._buffered > server.max_buffered_bytes:
            server._shed()

    def _arm(self, when: float) -> None:
        """Make the timer fire at ``when`` at the latest."""
        if when >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._check_deadlines)

    def _check_deadlines(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        if self.closed or self.stopping:
            return
        server = self.server
        now = self._loop.time()
        due = math.inf
        frame_timeout = server.frame_timeout
        if frame_timeout is not None and self.decoder.pending:
            if self._blocked:  # whole frames the server has not read yet: look again later
                due = now + frame_timeout
            else:
                # a frame completed since the bytes began arriving: the partial one began then
                deadline = max(self._partial_since, self.last_frame) + frame_timeout
                if now >= deadline:
                    self.drop(FRAME_TIMEOUT)
                    return
                due = deadline
        idle_timeout = server.idle_timeout
        if idle_timeout is not None:
            if self.in_flight:  # the server owes it an answer: not idle
                due = min(due, now + min(idle_timeout, 1.0))
            elif now >= self.last_frame + idle_timeout:
                self.drop(IDLE_TIMEOUT)
                return
            else:
                due = min(due, self.last_frame + idle_timeout)
        if due < math.inf:
            self._arm(due)

    def drop(self, reason: str) -> None:
        """Close this connection for a limit (``reason``: a key of `ServerStats.closed`): its
        bytes leave the server's total now; counted and logged by the server."""
        if self.dropped is not None or self.closed:
            return
        self.dropped = reason
        self.stopping = True
        self._release()
        self.server._dropped(self, reason)
        self.close_transport(abort=True)

    def _release(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = math.inf
        self.server._buffered -= self.held
        self.held = 0


def _held(conn: _Connection) -> int:
    return conn.held


class Server:
    """An ISO 8583 server. ``await start()`` (or ``async with``), then ``port`` is the bound port.

    ``Server(spec, handler, framing, host, port, ssl)``: those six may be given by position or by
    name; the rest by name only.

    ``max_in_flight`` bounds the concurrent requests per connection; ``keepalive_reply`` answers
    zero-length frames; ``validate`` runs ``spec.validate`` on each request before the handler;
    ``eager`` starts handlers without a task until they first suspend (see the module notes).

    The port's limits (module notes, and :mod:`isopace.net.limits` for why and the defaults):
    ``idle_timeout`` (300 s) and ``frame_timeout`` (30 s) in seconds, None for none;
    ``max_connections`` (None: :func:`~isopace.net.limits.default_max_connections`, read at
    :meth:`start`); ``max_buffered_bytes`` (32 MiB) of unfinished frames across connections, None
    for no cap; ``log_interval``: seconds between the summary lines of repeated events."""

    def __init__(
        self,
        spec: Spec,
        handler: Handler,
        framing: Framing | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl: _ssl.SSLContext | None = None,
        *,
        max_in_flight: int = 256,
        keepalive_reply: bool = True,
        validate: bool = False,
        backlog: int = 128,
        eager: bool = False,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
        frame_timeout: float | None = DEFAULT_FRAME_TIMEOUT,
        max_connections: int | None = None,
        max_buffered_bytes: int | None = DEFAULT_MAX_BUFFERED_BYTES,
        log_interval: float = 10.0,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        for name, value in (
            ("idle_timeout", idle_timeout),
            ("frame_timeout", frame_timeout),
            ("max_connections", max_connections),
            ("max_buffered_bytes", max_buffered_bytes),
            ("log_interval", log_interval),
        ):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive (or None: no limit), got {value}")
        self.spec = spec
        self.handler = handler
        self.framing = framing if framing is not None else Framing()
        self.host = host
        self.ssl = ssl
        self.max_in_flight = max_in_flight
        self.keepalive_reply = keepalive_reply
        self.validate = validate
        self.eager = eager
        self.idle_timeout = idle_timeout
        self.frame_timeout = frame_timeout
        self.max_connections = max_connections
        self.max_buffered_bytes = max_buffered_bytes
        self.log_interval = log_interval
        self.stats = ServerStats()
        """What the limits did (for metrics)."""
        self._requested_port = port
        self._backlog = backlog
        self._listener: Listener | None = None
        self._loop: asyncio.AbstractEventLoop  # set by start()
        self._connections: set[_Connection] = set()
        self._opening = 0  # accepted, connection not made yet (TLS handshake)
        self._opening_tasks: set[asyncio.Task[None]] = set()
        self._buffered = 0  # bytes of unfinished frames across connections
        self._tallies: dict[str, Tally] = {}
        self._connections_changed: asyncio.Event | None = None
        self._closed: asyncio.Event | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`)."""
        if self._listener is None or not self._listener.sockets:
            raise NetError("the server is not started")
        return self._listener.port

    @property
    def sockets(self) -> list[socket.socket]:
        """The listening sockets (after :meth:`start`)."""
        return self._listener.sockets if self._listener is not None else []

    @property
    def connections(self) -> int:
        """The number of open connections (those in their TLS handshake included)."""
        return len(self._connections) + self._opening

    @property
    def buffered_bytes(self) -> int:
        """Bytes of unfinished frames held across connections (``max_buffered_bytes`` caps it)."""
        return self._buffered

    @property
    def in_flight(self) -> int:
        """The number of requests being handled, across connections."""
        return sum(c.in_flight for c in self._connections)

    async def start(self) -> None:
        if self._listener is not None:
            raise NetError("the server is already started")
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._connections_changed = asyncio.Event()
        self._closed = asyncio.Event()
        if self.max_connections is None:
            self.max_connections = default_max_connections()
        self._tallies = self._make_tallies(loop)
        listener = Listener(
            self._accepted,
            backlog=self._backlog,
            stats=self.stats,
            log_interval=self.log_interval,
        )
        await listener.open(self.host, self._requested_port)
        self._listener = listener
        self._port = self.port
        logger.info(
            "listening on %s:%d%s",
            self.host,
            self.port,
            " (TLS)" if self.ssl else "",
            extra={"host": self.host, "port": self.port, "tls": self.ssl is not None},
        )

    async def serve_forever(self) -> None:
        """Start if needed, then wait until :meth:`close`."""
        if self._listener is None:
            await self.start()
        assert self._closed is not None
        await self._closed.wait()

    async def close(self, timeout: float = 5.0) -> None:
        """Graceful shutdown: stop accepting and reading, let running transactions finish within
        ``timeout`` seconds (then cancel them), close every connection."""
        listener = self._listener
        if listener is None or self._closed is None or self._closed.is_set():
            return
        listener.close()
        for opening in list(self._opening_tasks):
            opening.cancel()
        connections = list(self._connections)
        for conn in connections:
            conn.stop()
        tasks = [t for conn in connections for t in conn.tasks]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            if pending:
                logger.warning(
                    "shutdown deadline of %g s passed: cancelling %d transactions",
                    timeout,
                    len(pending),
                    extra={"cancelled": len(pending)},
                )
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending, timeout=1.0)
        for conn in connections:
            conn.close_transport()
        await self._wait_connections_closed(1.0)
        for conn in list(self._connections):
            conn.close_transport(abort=True)
        if self._opening_tasks:
            await asyncio.wait(list(self._opening_tasks), timeout=1.0)
        for tally in self._tallies.values():
            tally.close()
        self._closed.set()
        logger.info("server on port %s closed", self._port, extra={"port": self._port})

    # -- the port's limits (module notes: "Limits") ----------------------------------------------

    def _make_tallies(self, loop: asyncio.AbstractEventLoop) -> dict[str, Tally]:
        def tally(event: str, text: str, level: int = logging.WARNING) -> Tally:
            return Tally(loop, event, text, level=level, interval=self.log_interval)

        return {
            "refused": tally(
                "refused",
                f"refused a connection: {self.max_connections} connections open, the maximum",
            ),
            "opening": tally(
                "connection_setup", "a connection failed to set up", level=logging.INFO
            ),
            IDLE_TIMEOUT: tally(
                IDLE_TIMEOUT,
                f"closed a connection that sent no frame for {self.idle_timeout} s",
                level=logging.INFO,
            ),
            FRAME_TIMEOUT: tally(
                FRAME_TIMEOUT,
                f"closed a connection that did not finish a frame within {self.frame_timeout} s",
            ),
            BUFFER_CAP: tally(
                BUFFER_CAP,
                "closed the connection holding the most bytes of unfinished frames: across "
                f"connections they passed the maximum of {self.max_buffered_bytes} bytes",
            ),
        }

    def _accepted(self, sock: socket.socket, address: object) -> None:
        """A connection just accepted: refused at once over ``max_connections``, else set up."""
        assert self.max_connections is not None
        if self.connections >= self.max_connections:
            sock.close()
            self.stats.refused += 1
            self._tallies["refused"].note(f"from {address_text(address)}")
            return
        self._opening += 1
        task = self._loop.create_task(self._open_connection(sock, address))
        self._opening_tasks.add(task)
        task.add_done_callback(self._opening_tasks.discard)

    async def _open_connection(self, sock: socket.socket, address: object) -> None:
        conn = _Connection(self)
        try:
            if self.ssl is None:
                await self._loop.connect_accepted_socket(lambda: conn, sock)
            else:
                await self._loop.connect_accepted_socket(
                    lambda: conn,
                    sock,
                    ssl=self.ssl,
                    ssl_handshake_timeout=self.frame_timeout,  # None: asyncio's 60 s
                )
        except Exception as exc:  # a failed TLS handshake, a peer already gone
            sock.close()
            self._tallies["opening"].note(f"{address_text(address)}: {error_text(exc)}")
        finally:
            if not conn.made:
                self._opening -= 1

    def _dropped(self, conn: _Connection, reason: str) -> None:
        self.stats.closed[reason] += 1
        self._tallies[reason].note(conn.peer)

    def _shed(self) -> None:
        """Close connections, the one holding the most bytes first, until the bytes of
        unfinished frames fit under ``max_buffered_bytes`` (module notes: why this one)."""
        cap = self.max_buffered_bytes
        assert cap is not None
        while self._buffered > cap:
            victim = max(self._connections, key=_held, default=None)
            if victim is None or not victim.held:
                return
            victim.drop(BUFFER_CAP)

    async def _wait_connections_closed(self, timeout: float) -> None:
        assert self._connections_changed is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._connections and (left := deadline - loop.time()) > 0:
            self._connections_changed.clear()
            try:
                await asyncio.wait_for(self._connections_changed.wait(), left)
            except TimeoutError:
                break

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
