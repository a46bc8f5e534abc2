"""The asyncio shell shared by the server and the client: a ``Protocol`` that feeds a
:class:`FrameDecoder`, batches writes and tracks write back-pressure. Private."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

from isopace._cardtext import error_text
from isopace.net.framing import Frame, FrameDecoder, Framing

logger = logging.getLogger("isopace.net")


def peer_name(transport: asyncio.BaseTransport) -> str:
    return address_text(transport.get_extra_info("peername"))


def address_text(address: Any) -> str:
    """``host:port`` of a socket address (as ``getpeername`` gives it)."""
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


class FramedProtocol(asyncio.Protocol):
    """Frames in (``frame_received``), frames out (``write_frame``, batched once per loop turn)."""

    def __init__(self, framing: Framing) -> None:
        self.framing = framing
        self.decoder: FrameDecoder = framing.decoder()
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.closed = False
        self.last_activity = 0.0
        self._loop = asyncio.get_running_loop()
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._reading_paused = False

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.peer = peer_name(transport)
        self.last_activity = self._loop.time()

    @property
    def write_paused(self) -> bool:
        """Whether the transport asked us to stop writing (its buffer is over the high mark)."""
        return self._write_paused

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain_waiters()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._out.clear()
        self._wake_drain_waiters()

    # -- writing -------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Queue bytes; they go out in one write at the end of this loop turn."""
        if self.closed:
            return
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        out = self._out
        if not out or self.closed or self.transport is None:
            out.clear()
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self.last_activity = self._loop.time()
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the transport's write buffer is above its high-water mark."""
        if self._write_paused and not self.closed:
            waiter: asyncio.Future[None] = self._loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter

    def _wake_drain_waiters(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- reading -------------------------------------------------------------------------------

    def pause(self) -> None:
        if not self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = False
            self.transport.resume_reading()

    def frame_received(self, frame: Frame) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def dispatch(self, frame: Frame) -> None:
        """``frame_received(frame)``; an error there is logged (masked), never fatal: a bug
        handling one frame must not take the connection down."""
        try:
            self.frame_received(frame)
        except Exception as exc:
            logger.error(
                "error processing a frame from %s\n%s",
                self.peer,
                error_text(exc, traceback=True),
                extra={"peer": self.peer},
            )

    def control_frame(self, frame: Frame, answer_keepalive: bool) -> None:
        """Handle a frame with no message to decode (``frame.tpdu is None`` and an empty payload
        or a TPDU framing): a keep-alive, answered when ``answer_keepalive``, or a frame too
        short to carry its TPDU, logged and dropped."""
        payload = frame.payload
        if not payload:
            if answer_keepalive:
                self.write(self.framing.keepalive())
            return
        logger.warning(
            "frame of %d bytes from %s is too short for its TPDU; dropped",
            len(payload),
            self.peer,
            extra={"peer": self.peer, "length": len(payload)},
        )

    def close_transport(self, abort: bool = False) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.flush()
            if abort:
                self.transport.abort()
            else:
                self.transport.close()
