"""The port's limits on real sockets (127.0.0.1, port 0), with short limits passed as options.

Inputs tried: half a frame then nothing; a frame trickled a byte at a time; frames that always
end mid-frame in a read but each finish in time; an idle connection; keep-alives only; a request
in flight longer than the idle timeout; a flood of connections past ``max_connections``; partial
frames from several connections past ``max_buffered_bytes``; ``accept()`` failing with EMFILE;
a TLS client that never sends its handshake."""

from __future__ import annotations

import asyncio
import errno
import logging
import shutil
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from isopace.iso8583 import Message
from isopace.net import Client, Framing, Server, default_max_connections
from isopace.net.limits import RESERVED_FILES

from .conftest import SPEC, make_request, reply_handler

FRAMING = Framing()


def _frame(stan: int) -> bytes:
    return FRAMING.encode_frame(SPEC.encode(make_request(stan)))


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """True if the server closes the connection within ``seconds`` (EOF or reset)."""
    try:
        return await asyncio.wait_for(reader.read(), seconds) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


async def _answer(reader: asyncio.StreamReader) -> Message:
    header = await asyncio.wait_for(reader.readexactly(2), 5)
    return SPEC.decode(await reader.readexactly(int.from_bytes(header, "big")))


def _lines(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]


async def _wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not condition():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


# -- frame timeout --------------------------------------------------------------------------------


async def test_half_a_frame_then_stall_is_closed_after_the_frame_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "isopace.net")
    async with Server(SPEC, reply_handler, frame_timeout=0.3, idle_timeout=60) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        frame = _frame(1)
        writer.write(frame[: len(frame) // 2])
        assert not await _closed_within(reader, 0.15)  # not before its time
        assert server.buffered_bytes == len(frame) // 2
        assert await _closed_within(reader, 2.0)
        writer.close()
        await _wait_for(lambda: server.connections == 0)
        assert server.stats.closed["frame_timeout"] == 1
        assert server.buffered_bytes == 0
        (line,) = _lines(caplog, "did not finish a frame within 0.3 s")
        assert line.levelno == logging.WARNING
        assert not _lines(caplog, "in the middle of a frame")  # counted, not a line per close
        # the server still serves
        async with Client(SPEC, port=server.port) as client:
            assert (await client.request(make_request(2)))[39] == "00"


async def test_a_trickled_frame_is_closed_after_the_frame_timeout() -> None:
    """Bytes arriving do not extend the deadline: only a finished frame does."""
    async with Server(SPEC, reply_handler, frame_timeout=0.4, idle_timeout=60) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        frame = _frame(1)
        loop = asyncio.get_running_loop()
        started = loop.time()
        closed = False
        for byte in frame[:-1]:
            try:
                writer.write(bytes((byte,)))
                await writer.drain()
            except ConnectionError:
                closed = True
                break
            if reader.at_eof() or await _closed_within(reader, 0.05):
                closed = True
                break
        assert closed
        assert 0.35 <= loop.time() - started < 2.0
        assert server.stats.closed["frame_timeout"] == 1
        writer.close()


async def test_frames_that_each_finish_in_time_keep_the_connection_open() -> None:
    """Every read ends in the middle of a frame (bytes are always held), but each frame finishes
    within the frame timeout: the deadline runs from the start of the frame, not of the bytes."""
    async with Server(SPEC, reply_handler, frame_timeout=0.4, idle_timeout=60) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        frames = [_frame(i) for i in range(8)]
        writer.write(frames[0][:20])
        for i in range(1, 8):
            await asyncio.sleep(0.25)  # 8 x 0.25 s: far more than one frame timeout in all
            writer.write(frames[i - 1][20:] + frames[i][:20])
            assert (await _answer(reader))[11] == f"{i - 1:06d}"
        assert server.buffered_bytes == 20
        assert server.stats.closed["frame_timeout"] == 0
        writer.write(frames[7][20:])
        assert (await _answer(reader))[11] == "000007"
        writer.close()


# -- idle timeout ---------------------------------------------------------------------------------


async def test_an_idle_connection_is_closed_after_the_idle_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "isopace.net")
    async with Server(SPEC, reply_handler, idle_timeout=0.3) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(_frame(1))
        assert (await _answer(reader))[39] == "00"
        assert not await _closed_within(reader, 0.15)
        assert await _closed_within(reader, 2.0)
        writer.close()
        await _wait_for(lambda: server.connections == 0)
        assert server.stats.closed == {"idle_timeout": 1, "frame_timeout": 0, "buffer_cap": 0}
        (line,) = _lines(caplog, "sent no frame for 0.3 s")
        assert line.levelno == logging.INFO


async def test_keepalives_keep_a_connection_open() -> None:
    async with Server(SPEC, reply_handler, idle_timeout=0.3) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        for _ in range(10):  # 1 s of keep-alives every 0.1 s: more than three idle timeouts
            writer.write(FRAMING.keepalive())
            assert await asyncio.wait_for(reader.readexactly(2), 5) == b"\x00\x00"
            await asyncio.sleep(0.1)
        writer.write(_frame(1))
        assert (await _answer(reader))[39] == "00"
        assert server.stats.closed["idle_timeout"] == 0
        assert await _closed_within(reader, 2.0)  # keep-alives stopped: now it is idle
        writer.close()


async def test_a_connection_waiting_for_its_answer_is_not_idle() -> None:
    async def slow(request: Message) -> Message:
        await asyncio.sleep(1.2)  # more than two idle timeouts
        return request.reply().set(39, "00")

    # Idle time counts from the last frame, so the first check after the answer closes the
    # connection. While the answer is owed the server checks every idle_timeout (0.5, 1.0,
    # 1.5 s): an answer at 1.2 s leaves 0.3 s to read the count. The test used to answer at
    # 0.8 s with a 0.2 s timeout, on a check, and lost that race under CI load.
    async with Server(SPEC, slow, idle_timeout=0.5) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(_frame(1))
        assert (await _answer(reader))[39] == "00"
        assert server.stats.closed["idle_timeout"] == 0
        assert await _closed_within(reader, 2.0)
        writer.close()


# -- max connections ------------------------------------------------------------------------------


async def test_connections_past_the_maximum_are_closed_at_once_and_logged_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "isopace.net")
    async with Server(SPEC, reply_handler, max_connections=3, log_interval=0.5) as server:
        kept = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(3)]
        for i, (reader, writer) in enumerate(kept):
            writer.write(_frame(i))
            assert (await _answer(reader))[39] == "00"
        assert server.connections == 3
        refused = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(20)]
        for reader, _ in refused:
            assert await _closed_within(reader, 1.0)
        assert server.stats.refused == 20
        assert server.connections == 3
        (first,) = _lines(caplog, "refused a connection: 3 connections open, the maximum")
        assert first.levelno == logging.WARNING
        await asyncio.sleep(0.7)  # the interval ends: one line with the count of the others
        lines = _lines(caplog, "refused a connection")
        assert len(lines) == 2
        assert "19 more in the last 0.5 s" in lines[1].getMessage()
        assert lines[1].__dict__["count"] == 19
        # a slot freed is a slot for a new client
        kept[0][1].close()
        await _wait_for(lambda: server.connections == 2)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(_frame(9))
        assert (await _answer(reader))[11] == "000009"
        for _, w in [*kept, *refused, (reader, writer)]:
            w.close()


def test_default_max_connections_leaves_room_for_the_process() -> None:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert default_max_connections() == max(1, soft - RESERVED_FILES)


# -- buffer cap -----------------------------------------------------------------------------------


async def test_the_buffer_cap_closes_the_connection_holding_the_most(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "isopace.net")
    async with Server(SPEC, reply_handler, max_buffered_bytes=1000) as server:
        big_r, big_w = await asyncio.open_connection("127.0.0.1", server.port)
        big_w.write(b"\xea\x60" + b"x" * 898)  # a 60,000-byte frame started: 900 bytes held
        honest_r, honest_w = await asyncio.open_connection("127.0.0.1", server.port)
        frame = _frame(5)
        honest_w.write(frame[:50])  # an honest frame split across two reads
        await _wait_for(lambda: server.buffered_bytes == 950)
        third_r, third_w = await asyncio.open_connection("127.0.0.1", server.port)
        third_w.write(b"\x13\x88" + b"y" * 198)  # 200 more: the total passes the cap
        assert await _closed_within(big_r, 2.0)  # the largest holder goes, not the last comer
        await _wait_for(lambda: server.stats.closed["buffer_cap"] == 1)
        assert server.buffered_bytes == 250
        honest_w.write(frame[50:])
        assert (await _answer(honest_r))[11] == "000005"
        assert not await _closed_within(third_r, 0.1)
        (line,) = _lines(caplog, "holding the most bytes of unfinished frames")
        assert "maximum of 1000 bytes" in line.getMessage()
        assert not _lines(caplog, "in the middle of a frame")
        for w in (big_w, honest_w, third_w):
            w.close()


# -- accept errors --------------------------------------------------------------------------------


async def test_accept_errors_pause_accepting_and_are_logged_rate_limited(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``accept()`` out of descriptors three times, then fine: the client is still served, the
    log has one line at once and one with the count, no traceback."""
    caplog.set_level(logging.DEBUG)
    real_accept = socket.socket.accept
    failures = [3]

    def accept(sock: socket.socket) -> tuple[socket.socket, Any]:
        if failures[0] and sock.family == socket.AF_INET and sock.getsockname()[1] == port[0]:
            failures[0] -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return real_accept(sock)

    port = [0]
    async with Server(SPEC, reply_handler, log_interval=30) as server:
        port[0] = server.port
        monkeypatch.setattr(socket.socket, "accept", accept)
        loop = asyncio.get_running_loop()
        started = loop.time()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(_frame(1))
        assert (await _answer(reader))[39] == "00"
        assert 0.6 <= loop.time() - started < 1.5  # paused 0.1 + 0.2 + 0.4 s
        assert server.stats.accept_errors == 3
        writer.close()
    lines = _lines(caplog, "cannot accept a connection")
    assert len(lines) == 2, [r.getMessage() for r in lines]
    assert "Too many open files; accepting paused for 0.1 s" in lines[0].getMessage()
    assert "2 more in the last 30 s" in lines[1].getMessage()
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


# -- TLS ------------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_a_stalled_tls_handshake_counts_and_times_out(tmp_path: Path) -> None:
    from .test_server import _self_signed

    cert, key = _self_signed(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    async with Server(SPEC, reply_handler, ssl=ctx, frame_timeout=0.3, max_connections=1) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)  # no handshake
        await _wait_for(lambda: srv.connections == 1)
        other_r, other_w = await asyncio.open_connection("127.0.0.1", srv.port)
        assert await _closed_within(other_r, 1.0)  # the handshaking one holds the only slot
        assert srv.stats.refused == 1
        assert await _closed_within(reader, 2.0)
        await _wait_for(lambda: srv.connections == 0)
        writer.close()
        other_w.close()


def test_the_limits_on_uvloop() -> None:
    """The listener and the timers use only what uvloop's loop has too."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        async with Server(
            SPEC, reply_handler, idle_timeout=0.3, frame_timeout=0.2, max_connections=2
        ) as server:
            idle_r, idle_w = await asyncio.open_connection("127.0.0.1", server.port)
            stall_r, stall_w = await asyncio.open_connection("127.0.0.1", server.port)
            stall_w.write(_frame(1)[:10])
            over_r, over_w = await asyncio.open_connection("127.0.0.1", server.port)
            assert await _closed_within(over_r, 1.0)
            assert await _closed_within(stall_r, 1.0)
            assert await _closed_within(idle_r, 1.0)
            assert server.stats.refused == 1
            assert server.stats.closed == {"idle_timeout": 1, "frame_timeout": 1, "buffer_cap": 0}
            async with Client(SPEC, port=server.port) as client:
                assert (await client.request(make_request(2)))[39] == "00"
            for w in (idle_w, stall_w, over_w):
                w.close()

    uvloop.run(main())


@pytest.mark.parametrize(
    "option", ["idle_timeout", "frame_timeout", "max_connections", "max_buffered_bytes"]
)
def test_limits_must_be_positive(option: str) -> None:
    with pytest.raises(ValueError, match=f"{option} must be positive"):
        Server(SPEC, reply_handler, **{option: 0})
