"""Server behaviour on real sockets (127.0.0.1, port 0).

Inputs tried: every framing kind (length headers x include-header x TPDU); 1-byte writes; 50
frames in one write; keep-alive frames; a declared length over the maximum; non-digit length
headers; garbage payloads with and without a readable MTI; an unreadable length prefix and a
truncated field (format error echoing the recovered fields); a response MTI sent as a request; a
frame too short for its TPDU; a peer closing mid-frame; a handler that raises; a handler that
returns None; back-pressure at the in-flight bound; graceful shutdown within and past its deadline;
TLS with a self-signed certificate."""

from __future__ import annotations

import asyncio
import logging
import shutil
import ssl
import subprocess
from pathlib import Path

import pytest

from isopace.iso8583 import ISO87_BINARY, ISO87_EBCDIC, Iso8583Error, Message, Spec
from isopace.net import Client, Framing, LengthHeader, NetError, Server, Tpdu, recover_mti

from .conftest import (
    SPEC,
    TRACK1,
    TRACK2,
    assert_no_card_data,
    make_request,
    raw_exchange,
    reply_handler,
)

ALL_FRAMINGS = [
    Framing(header=h, include_header=inc, tpdu=tp)
    for h in LengthHeader
    for inc in (False, True)
    for tp in (False, True)
]


async def test_round_trip_every_framing() -> None:
    for framing in ALL_FRAMINGS:
        async with (
            Server(SPEC, reply_handler, framing=framing) as server,
            Client(SPEC, port=server.port, framing=framing, timeout=5) as client,
        ):
            response = await client.request(make_request(1))
            assert response.mti == "0210"
            assert response[39] == "00" and response[11] == "000001"


async def test_tpdu_swapped_on_reply() -> None:
    framing = Framing(tpdu=True)
    async with Server(SPEC, reply_handler, framing=framing) as server:
        tpdu = Tpdu(destination=b"\x00\x01", source=b"\x00\x02")
        wire = framing.encode_frame(SPEC.encode(make_request(7)), tpdu)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(wire)
        dec = framing.decoder()
        frames = []
        while not frames:
            frames = dec.frames(await asyncio.wait_for(reader.read(4096), 5))
        writer.close()
        assert frames[0].tpdu == Tpdu(destination=b"\x00\x02", source=b"\x00\x01")
        assert SPEC.decode(frames[0].payload).mti == "0210"


async def test_one_byte_writes_and_coalesced_frames(server: Server) -> None:
    framing = Framing()
    one = framing.encode_frame(SPEC.encode(make_request(1)))
    (resp,) = await raw_exchange(server.port, one, chunk=1)
    assert SPEC.decode(resp)[11] == "000001"
    many = b"".join(framing.encode_frame(SPEC.encode(make_request(i))) for i in range(50))
    responses = await raw_exchange(server.port, many, count=50)
    assert sorted(SPEC.decode(r)[11] for r in responses) == [f"{i:06d}" for i in range(50)]


async def test_half_closed_peer_still_gets_its_answers() -> None:
    async def slow(request: Message) -> Message:
        await asyncio.sleep(0.05)
        return request.reply().set(39, "00")

    framing = Framing()
    wire = b"".join(framing.encode_frame(SPEC.encode(make_request(i))) for i in range(5))
    for handler, bound in ((slow, 256), (slow, 2), (reply_handler, 256), (reply_handler, 1)):
        async with Server(SPEC, handler, max_in_flight=bound) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(wire)
            writer.write_eof()
            data = await asyncio.wait_for(reader.read(), 5)  # until the server closes
            assert len(framing.decoder().frames(data)) == 5
            writer.close()


async def test_keepalive_answered(server: Server) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"\x00\x00")
    assert await asyncio.wait_for(reader.readexactly(2), 5) == b"\x00\x00"
    writer.close()


async def test_oversize_length_closes_with_clear_log(caplog: pytest.LogCaptureFixture) -> None:
    framing = Framing(header=LengthHeader.BINARY4, max_frame_size=1024)
    async with Server(SPEC, reply_handler, framing=framing) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"\x7f\xff\xff\xff" + b"x" * 100)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
        writer.close()
        assert "declared frame length 2147483647 exceeds the maximum 1024" in caplog.text
        # the server itself still serves
        async with Client(SPEC, port=server.port, framing=framing) as client:
            assert (await client.request(make_request(2)))[39] == "00"


async def test_bad_ascii_length_closes(caplog: pytest.LogCaptureFixture) -> None:
    framing = Framing(header=LengthHeader.ASCII4)
    async with Server(SPEC, reply_handler, framing=framing) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"12ab0200")
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    assert "not 4 ASCII digits" in caplog.text


async def test_garbage_payloads_connection_survives(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    framing = Framing()
    caplog.set_level(logging.WARNING, "isopace.net")
    good = SPEC.encode(make_request(5))
    wire = (
        framing.encode_frame(b"\xde\xad\xbe\xef garbage")  # no MTI: logged, dropped
        + framing.encode_frame(b"0200ZZZZ")  # MTI readable, bitmap not: format error
        + framing.encode_frame(SPEC.encode(make_request(4).with_mti("0210")))  # a response
        + framing.encode_frame(good)
    )
    responses = [SPEC.decode(r) for r in await raw_exchange(server.port, wire, count=2)]
    assert responses[0].mti == "0210" and responses[0][39] == "30"
    assert responses[1][11] == "000005" and responses[1][39] == "00"
    assert "unparseable frame of 12 bytes" in caplog.text
    assert "malformed 0200 message" in caplog.text
    assert "not a request" in caplog.text
    assert "4761739001010119" not in caplog.text  # card data masked


async def test_truncated_message_gets_format_error(server: Server) -> None:
    good = SPEC.encode(make_request(6))
    (resp,) = await raw_exchange(server.port, Framing().encode_frame(good[:-3]))
    assert SPEC.decode(resp).mti == "0210" and SPEC.decode(resp)[39] == "30"


async def test_field_failing_lazily_gets_format_error_with_echo_fields() -> None:
    async def reads_everything(request: Message) -> Message:
        request.fields()  # decodes every field: DE 42 is not text
        return request.reply().set(39, "00")

    wire = SPEC.encode(make_request(12).set(42, "MERCHANT0000001"))
    wire = wire.replace(b"MERCHANT0000001", b"\xff" * 15)
    async with Server(SPEC, reads_everything) as server:
        (resp,) = await raw_exchange(server.port, Framing().encode_frame(wire))
    response = SPEC.decode(resp)
    assert response.mti == "0210" and response[39] == "30"
    assert response[11] == "000012" and response[41] == "TERM0001"  # matchable by the client
    assert 42 not in response


async def test_undecodable_frame_format_error_echoes_nothing_read_past_the_fault(
    server: Server,
) -> None:
    """A frame whose bytes do not add up to its fields (a length prefix unreadable, the last
    field cut short, one digit missing from the fixed DE 4) is answered 30 with no field read
    after the fault: under the old rule the short DE 4 made DE 11 come back as "000061"."""
    track2 = "4761739001010119=28122011234567890"
    wire = SPEC.encode(make_request(15).set(35, track2))
    at = wire.index(b"34" + track2.encode())
    bad_prefix = wire[:at] + b"X4" + wire[at + 2 :]  # DE 35's length prefix unreadable
    truncated = SPEC.encode(make_request(16))[:-2]  # DE 49 cut short
    wire = SPEC.encode(make_request(100006))
    at = wire.index(b"000000002500")  # DE 4
    short_amount = wire[:at] + wire[at + 1 :]
    framing = Framing()
    frames = b"".join(framing.encode_frame(f) for f in (bad_prefix, truncated, short_amount))
    answers = [SPEC.decode(r) for r in await raw_exchange(server.port, frames, count=3)]
    for answer in answers:
        assert answer.mti == "0210" and answer.fields() == {39: "30"}


@pytest.mark.parametrize("spec", [ISO87_BINARY, ISO87_EBCDIC], ids=["binary", "ebcdic"])
async def test_format_error_in_binary_and_ebcdic_specs(spec: Spec) -> None:
    good = spec.encode(make_request(13))
    async with Server(spec, reply_handler) as server:
        async with Client(spec, port=server.port) as client:
            assert (await client.request(make_request(13)))[39] == "00"
        (resp,) = await raw_exchange(server.port, Framing().encode_frame(good[:-2]))
    response = spec.decode(resp)
    assert response.mti == "0210" and response[39] == "30"


async def test_short_tpdu_frame_dropped(caplog: pytest.LogCaptureFixture) -> None:
    framing = Framing(tpdu=True)
    async with Server(SPEC, reply_handler, framing=framing) as server:
        good = framing.encode_frame(SPEC.encode(make_request(8)), Tpdu())
        (resp,) = await raw_exchange(server.port, b"\x00\x03abc" + good, framing=framing)
        assert SPEC.decode(resp)[11] == "000008"
    assert "too short for its TPDU" in caplog.text


async def test_peer_closing_mid_frame(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"\x00\x50" + b"0200")
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    for _ in range(100):
        if server.connections == 0:
            break
        await asyncio.sleep(0.01)
    assert server.connections == 0
    assert "closed in the middle of a frame (6 bytes dropped)" in caplog.text
    async with Client(SPEC, port=server.port) as client:
        assert (await client.request(make_request(9)))[39] == "00"


async def test_handler_errors_and_none() -> None:
    async def handler(request: Message) -> Message | None:
        if request[11] == "000001":
            raise RuntimeError("boom")
        if request[11] == "000002":
            return None
        if request[11] == "000004":
            return request.reply().set(4, "1" * 13)  # too long: cannot be encoded
        if request[11] == "000005":
            return "0210"  # type: ignore[return-value]
        return request.reply().set(39, "00")

    async with Server(SPEC, handler) as server, Client(SPEC, port=server.port) as client:
        failed = await client.request(make_request(1))
        assert failed.mti == "0210" and failed[39] == "96" and failed[41] == "TERM0001"
        with pytest.raises(TimeoutError):
            await client.request(make_request(2), timeout=0.1)
        assert (await client.request(make_request(3)))[39] == "00"
        assert (await client.request(make_request(4)))[39] == "96"
        assert (await client.request(make_request(5)))[39] == "96"


async def test_validation_failure_gets_format_error() -> None:
    async with (
        Server(SPEC, reply_handler, validate=True) as server,
        Client(SPEC, port=server.port) as client,
    ):
        assert (await client.request(make_request(1)))[39] == "00"
        bad = make_request(2).set(4, "00000000250X")  # not numeric
        response = await client.request(bad)
        assert response[39] == "30" and response[11] == "000002"


async def test_back_pressure_bounds_in_flight() -> None:
    running = 0
    peak = 0
    gate = asyncio.Event()

    async def handler(request: Message) -> Message:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await gate.wait()
        running -= 1
        return request.reply().set(39, "00")

    async with (
        Server(SPEC, handler, max_in_flight=3) as server,
        Client(SPEC, port=server.port) as client,
    ):
        tasks = [asyncio.create_task(client.request(make_request(i))) for i in range(20)]
        await asyncio.sleep(0.1)
        assert peak == 3 and server.in_flight == 3
        gate.set()
        responses = await asyncio.gather(*tasks)
        assert len(responses) == 20 and peak == 3


async def test_no_new_requests_while_writes_are_paused() -> None:
    handled: list[str] = []

    async def handler(request: Message) -> Message:
        handled.append(request[11])
        return request.reply().set(39, "00")

    async with Server(SPEC, handler) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        for _ in range(100):
            if server.connections:
                break
            await asyncio.sleep(0.01)
        (conn,) = server._connections
        conn.pause_writing()  # as the transport does when its buffer passes the high-water mark
        framing = Framing()
        wire = b"".join(framing.encode_frame(SPEC.encode(make_request(i))) for i in range(10))
        writer.write(wire)
        await asyncio.sleep(0.1)
        assert handled == []
        conn.resume_writing()
        decoder = framing.decoder()
        frames: list[object] = []
        while len(frames) < 10:
            frames += decoder.frames(await asyncio.wait_for(reader.read(65536), 5))
        assert len(handled) == 10
        writer.close()


async def test_graceful_shutdown_finishes_in_flight() -> None:
    started = asyncio.Event()

    async def handler(request: Message) -> Message:
        started.set()
        await asyncio.sleep(0.2 if request[11] == "000001" else 30)
        return request.reply().set(39, "00")

    server = Server(SPEC, handler)
    await server.start()
    async with Client(SPEC, port=server.port, reconnect=False) as client:
        slow_ok = asyncio.create_task(client.request(make_request(1)))
        await started.wait()
        await server.close(timeout=2)
        assert (await slow_ok)[39] == "00"
        assert server.connections == 0

    server = Server(SPEC, handler)
    await server.start()
    async with Client(SPEC, port=server.port, reconnect=False) as client:
        started.clear()
        stuck = asyncio.create_task(client.request(make_request(2)))
        await started.wait()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await server.close(timeout=0.2)
        assert loop.time() - t0 < 2
        with pytest.raises(ConnectionError):
            await stuck
    with pytest.raises(NetError):
        _ = server.port


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_tls(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    async with (
        Server(SPEC, reply_handler, ssl=server_ctx) as server,
        Client(SPEC, port=server.port, ssl=client_ctx, server_hostname="localhost") as client,
    ):
        responses = await asyncio.gather(*(client.request(make_request(i)) for i in range(20)))
        assert [r[11] for r in responses] == [f"{i:06d}" for i in range(20)]
    # a client that does not trust the certificate cannot connect
    async with Server(SPEC, reply_handler, ssl=server_ctx) as server:
        untrusting = Client(SPEC, port=server.port, ssl=ssl.create_default_context())
        with pytest.raises(ConnectionError):
            await untrusting.connect()
        await untrusting.close()


def test_recover_mti() -> None:
    assert recover_mti(b"0200\xff") == "0200"
    assert recover_mti("0200".encode("cp500") + b"x") == "0200"
    assert recover_mti(b"\x02\x00\x01") == "0200"
    assert recover_mti(b"\xde\xad") is None
    assert recover_mti(b"") is None


async def test_handlers_run_in_a_task_unless_eager() -> None:
    """By default a handler runs in a task from its first line, so ``asyncio.timeout`` (and a flow
    run's deadline) can interrupt it; ``eager=True`` trades that for no task per instant answer."""
    seen: list[bool] = []

    async def timed(request: Message) -> Message:
        seen.append(asyncio.current_task() is not None)
        try:
            async with asyncio.timeout(0.05):
                await asyncio.sleep(5)
            code = "00"
        except TimeoutError:
            code = "68"  # response received too late
        return request.reply().set(39, code)

    async with (
        Server(SPEC, timed) as server,
        Client(SPEC, port=server.port, timeout=5) as client,
    ):
        response = await client.request(make_request(1))
    assert response[39] == "68" and seen == [True]

    seen.clear()
    async with (
        Server(SPEC, timed, eager=True) as server,
        Client(SPEC, port=server.port, timeout=5) as client,
    ):
        response = await client.request(make_request(2))
    assert response[39] == "96" and seen == [False]  # asyncio.timeout refuses to run outside a task
    async with (
        Server(SPEC, reply_handler, eager=True) as server,
        Client(SPEC, port=server.port, timeout=5) as client,
    ):
        assert (await client.request(make_request(3)))[39] == "00"


async def test_handler_failures_logged_masked(caplog: pytest.LogCaptureFixture) -> None:
    # a handler raising with card data in its message (plain error, codec error, chained cause),
    # and a response that cannot be encoded: the log has the masked text and traceback only
    async def handler(m: Message) -> Message:
        if m[11] == "000001":
            raise ValueError(f"bad {m[2]} track 2 {TRACK2} track 1 {TRACK1}")
        if m[11] == "000002":
            raise Iso8583Error(f"field 35: {TRACK2} refused")
        if m[11] == "000003":
            try:
                raise KeyError(TRACK1)
            except KeyError as exc:
                raise RuntimeError(f"lookup of {m[2]} failed") from exc
        return m.reply().set(4, "1" * 13)  # cannot be encoded

    caplog.set_level(logging.INFO, "isopace.net")
    async with Server(SPEC, handler) as server, Client(SPEC, port=server.port) as client:
        for stan in (1, 3, 4):
            assert (await client.request(make_request(stan)))[39] == "96"
        assert (await client.request(make_request(2)))[39] == "30"
    assert "handler failed" in caplog.text and "Traceback" in caplog.text
    assert "ValueError: bad 476173******0119 track 2 476173******0119=****" in caplog.text
    assert "B476173******0119^****" in caplog.text
    assert "cannot be sent" in caplog.text and "malformed request" in caplog.text
    assert not [r for r in caplog.records if r.exc_info or r.exc_text]
    assert_no_card_data(caplog)


async def test_positional_framing_host_port() -> None:
    framing = Framing(header=LengthHeader.ASCII4)
    async with (
        Server(SPEC, reply_handler, framing, "127.0.0.1", 0) as server,
        Client(SPEC, framing, "127.0.0.1", server.port) as client,
    ):
        assert (await client.request(make_request(1)))[39] == "00"
        assert server.framing is framing and client.framing is framing
    ssl_positional = Server(SPEC, reply_handler, framing, "127.0.0.1", 0, None)
    assert ssl_positional.ssl is None and ssl_positional.host == "127.0.0.1"
    with pytest.raises(TypeError):
        Client(SPEC)  # type: ignore[call-arg]
