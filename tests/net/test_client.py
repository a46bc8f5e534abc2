"""Client and pool behaviour on real sockets (127.0.0.1, port 0).

Inputs tried: 1000 concurrent requests answered in random order; a duplicate in-flight key; a
request without DE 11; a timeout followed by the late response (unmatched handler); a caller
cancelling its request; the server restarting (reconnect with backoff, sign-on hook each time);
idle echo tests, answered and unanswered; host-initiated 0800; the host closing mid-frame;
requests before connect and after close; a pool over two hosts, one of which goes away."""

from __future__ import annotations

import asyncio
import logging
import random

import pytest

from isopace.iso8583 import Message
from isopace.net import (
    Client,
    ClientPool,
    ConnectionLostError,
    DuplicateKeyError,
    Framing,
    MatchKeyError,
    NotConnectedError,
    RequestTimeoutError,
    Server,
    rrn_key,
)

from .conftest import SPEC, TRACK1, TRACK2, assert_no_card_data, make_request


async def test_1000_concurrent_answered_in_random_order() -> None:
    order: list[str] = []

    async def handler(request: Message) -> Message:
        await asyncio.sleep(random.random() * 0.05)
        order.append(request[11])
        return request.reply().set(39, "00").set(38, request[11])

    async with (
        Server(SPEC, handler, max_in_flight=1000) as server,
        Client(SPEC, port=server.port) as client,
    ):
        requests = [make_request(i, terminal=f"T{i % 7:07d}") for i in range(1000)]
        responses = await asyncio.gather(*(client.request(r) for r in requests))
        for request, response in zip(requests, responses, strict=True):
            assert response[11] == request[11] and response[41] == request[41]
            assert response[38] == request[11]
        assert order != sorted(order)  # really out of order
        assert client.in_flight == 0


async def test_duplicate_and_missing_key(server: Server) -> None:
    gate = asyncio.Event()

    async def slow(request: Message) -> Message:
        await gate.wait()
        return request.reply()

    async with Server(SPEC, slow) as srv, Client(SPEC, port=srv.port) as client:
        first = asyncio.create_task(client.request(make_request(1)))
        await asyncio.sleep(0.05)
        with pytest.raises(DuplicateKeyError, match="000001"):
            await client.request(make_request(1))
        with pytest.raises(MatchKeyError):
            await client.request(Message("0200", {41: "TERM0001"}))
        gate.set()
        assert (await first)[11] == "000001"


async def test_rrn_key_alternative(server: Server) -> None:
    async with Client(SPEC, port=server.port, key=rrn_key) as client:
        response = await client.request(make_request(1).set(37, "000000000042"))
        assert response[37] == "000000000042"


async def test_timeout_cleans_up_and_late_response_is_unmatched() -> None:
    async def late(request: Message) -> Message:
        await asyncio.sleep(0.3)
        return request.reply().set(39, "00")

    unmatched: list[Message] = []
    async with (
        Server(SPEC, late) as server,
        Client(SPEC, port=server.port, on_unmatched=unmatched.append) as client,
    ):
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(RequestTimeoutError, match="000001") as info:
            await client.request(make_request(1), timeout=0.1)
        assert 0.09 <= loop.time() - t0 < 1.0
        assert isinstance(info.value, TimeoutError)
        assert client.in_flight == 0
        await asyncio.sleep(0.35)
        assert [m[11] for m in unmatched] == ["000001"]
        # the same key can be used again
        assert (await client.request(make_request(1)))[39] == "00"


async def test_cancelled_request_leaves_matcher() -> None:
    async def late(request: Message) -> Message:
        await asyncio.sleep(0.2)
        return request.reply()

    async with Server(SPEC, late) as server, Client(SPEC, port=server.port) as client:
        task = asyncio.create_task(client.request(make_request(1)))
        await asyncio.sleep(0.05)
        assert client.in_flight == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert client.in_flight == 0


async def test_not_connected_errors() -> None:
    client = Client(SPEC, port=1, connect_timeout=1)
    with pytest.raises(NotConnectedError):
        await client.request(make_request(1))
    with pytest.raises(NotConnectedError, match="cannot connect"):
        await client.connect()
    await client.close()
    with pytest.raises(NotConnectedError, match="closed"):
        await client.request(make_request(1))


async def test_reconnect_after_server_restart() -> None:
    sign_ons: list[str] = []

    async def handler(request: Message) -> Message:
        if request.mti == "0800":
            sign_ons.append(request[70])
        return request.reply().set(39, "00")

    async def sign_on(client: Client) -> None:
        msg = Message("0800", {11: client.next_stan(), 70: "001"})
        assert (await client.request(msg, timeout=2))[39] == "00"

    server = Server(SPEC, handler)
    await server.start()
    port = server.port
    client = Client(
        SPEC, port=port, on_connect=sign_on, backoff_initial=0.05, backoff_max=0.2, timeout=5
    )
    await client.connect()
    assert (await client.request(make_request(1)))[39] == "00"
    await server.close()
    for _ in range(100):
        if not client.connected:
            break
        await asyncio.sleep(0.01)
    assert not client.connected
    await asyncio.sleep(0.3)  # a few failed attempts with backoff
    server = Server(SPEC, handler, port=port)
    await server.start()
    # the request waits for the reconnection within its timeout
    assert (await client.request(make_request(2)))[39] == "00"
    assert sign_ons == ["001", "001"]
    assert client.connections_made == 2
    await client.close()
    await server.close()


async def test_echo_on_idle() -> None:
    echoes: list[Message] = []

    async def handler(request: Message) -> Message:
        if request.mti == "0800":
            echoes.append(request)
        return request.reply().set(39, "00")

    async with (
        Server(SPEC, handler) as server,
        Client(SPEC, port=server.port, echo_interval=0.1) as client,
    ):
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        while len(echoes) < 2 and loop.time() - t0 < 5:
            await asyncio.sleep(0.01)
        assert len(echoes) == 2 and loop.time() - t0 >= 0.19  # one per idle interval
        assert all(m[70] == "301" and 7 in m for m in echoes)
        # traffic keeps the line from being idle: no echo while requests flow
        before = len(echoes)
        for i in range(8):
            await client.request(make_request(i))
            await asyncio.sleep(0.04)
        assert len(echoes) - before <= 1
        assert client.connections_made == 1


async def test_unanswered_echo_reconnects() -> None:
    async def handler(request: Message) -> Message | None:
        return None if request.mti == "0800" else request.reply()

    async with (
        Server(SPEC, handler) as server,
        Client(SPEC, port=server.port, echo_interval=0.1, backoff_initial=0.01) as client,
    ):
        for _ in range(100):
            if client.connections_made >= 2:
                break
            await asyncio.sleep(0.02)
        assert client.connections_made >= 2


async def test_host_initiated_messages() -> None:
    framing = Framing()
    echo = SPEC.encode(Message("0800", {11: "000077", 70: "301"}))
    stray = SPEC.encode(make_request(99).reply().set(39, "00"))
    received: list[bytes] = []

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(framing.encode_frame(echo) + framing.encode_frame(stray))
        received.append(await reader.read(4096))

    host = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    port = host.sockets[0].getsockname()[1]
    unmatched: list[Message] = []

    async def on_unmatched(message: Message) -> None:
        unmatched.append(message)

    async with Client(SPEC, port=port, on_unmatched=on_unmatched, reconnect=False):
        for _ in range(100):
            if received and unmatched:
                break
            await asyncio.sleep(0.01)
    host.close()
    answer = SPEC.decode(framing.decoder().frames(received[0])[0].payload)
    assert answer.mti == "0810" and answer[39] == "00" and answer[70] == "301"
    assert [m[11] for m in unmatched] == ["000099"]


async def test_host_closing_mid_frame_fails_in_flight(caplog: pytest.LogCaptureFixture) -> None:
    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(4096)
        writer.write(b"\x00\x40" + b"0210")
        await writer.drain()
        writer.close()

    host = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    port = host.sockets[0].getsockname()[1]
    async with Client(SPEC, port=port, reconnect=False) as client:
        with pytest.raises(ConnectionLostError):
            await client.request(make_request(1), timeout=5)
    host.close()
    assert "closed in the middle of a frame (6 bytes dropped)" in caplog.text


async def test_connection_lost_fails_in_flight() -> None:
    gate = asyncio.Event()

    async def stuck(request: Message) -> Message:
        await gate.wait()
        return request.reply()

    server = Server(SPEC, stuck)
    await server.start()
    async with Client(SPEC, port=server.port, reconnect=False) as client:
        task = asyncio.create_task(client.request(make_request(1)))
        await asyncio.sleep(0.05)
        await server.close(timeout=0.05)
        with pytest.raises(ConnectionLostError, match="in flight"):
            await task
        await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(NotConnectedError, match="reconnect is off"):
            await client.request(make_request(2), timeout=5)
        assert loop.time() - t0 < 1


async def test_pool_over_two_hosts() -> None:
    seen: dict[str, int] = {"a": 0, "b": 0}

    def handler_for(name: str):  # type: ignore[no-untyped-def]
        async def handler(request: Message) -> Message:
            seen[name] += 1
            await asyncio.sleep(0.001)
            return request.reply().set(39, "00")

        return handler

    a = Server(SPEC, handler_for("a"))
    b = Server(SPEC, handler_for("b"))
    await a.start()
    await b.start()
    pool = ClientPool(
        SPEC, [("127.0.0.1", a.port), ("127.0.0.1", b.port)], size=2, backoff_initial=0.05
    )
    await pool.connect()
    for _ in range(100):
        if pool.connected == 4:
            break
        await asyncio.sleep(0.01)
    responses = await asyncio.gather(
        *(pool.request(make_request(i, terminal=f"P{i:07d}")) for i in range(200))
    )
    assert all(r[39] == "00" for r in responses)
    assert seen["a"] > 20 and seen["b"] > 20
    with pytest.raises(DuplicateKeyError):
        await asyncio.gather(pool.request(make_request(1)), pool.request(make_request(1)))
    await a.close()
    for _ in range(100):
        if pool.connected == 2:
            break
        await asyncio.sleep(0.01)
    seen["b"] = 0
    responses = await asyncio.gather(*(pool.request(make_request(i)) for i in range(300, 350)))
    assert all(r[39] == "00" for r in responses) and seen["b"] == 50
    await pool.close()
    await b.close()


async def test_pool_with_no_host_up() -> None:
    pool = ClientPool(SPEC, [("127.0.0.1", 1)], connect_timeout=0.2, backoff_initial=0.05)
    with pytest.raises(NotConnectedError, match=r"127\.0\.0\.1:1"):
        await pool.connect(timeout=0.3)
    with pytest.raises(NotConnectedError):
        await pool.request(make_request(1), timeout=0.1)
    await pool.close()


async def test_keepalive_from_host() -> None:
    received: list[bytes] = []

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"\x00\x00")
        received.append(await asyncio.wait_for(reader.read(2), 2))

    host = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    port = host.sockets[0].getsockname()[1]
    async with Client(SPEC, port=port, answer_keepalive=True, reconnect=False):
        for _ in range(100):
            if received:
                break
            await asyncio.sleep(0.01)
    host.close()
    assert received == [b"\x00\x00"]


def test_on_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        async def handler(request: Message) -> Message:
            await asyncio.sleep(random.random() * 0.01)
            return request.reply().set(39, "00")

        async with (
            Server(SPEC, handler, max_in_flight=4) as server,
            Client(SPEC, port=server.port, framing=Framing()) as client,
        ):
            responses = await asyncio.gather(*(client.request(make_request(i)) for i in range(200)))
            assert [r[11] for r in responses] == [f"{i:06d}" for i in range(200)]
            with pytest.raises(RequestTimeoutError):
                await client.request(make_request(999), timeout=0.0001)

    uvloop.run(main())


async def test_unmatched_handler_failures_logged_masked(caplog: pytest.LogCaptureFixture) -> None:
    async def stray(request: Message) -> Message:
        return request.reply().set_many({39: "00", 11: "999999"})  # matches no request

    def sync_handler(message: Message) -> None:
        raise ValueError(f"no request for {message[2]} ({TRACK2}, {TRACK1})")

    async def async_handler(message: Message) -> None:
        await asyncio.sleep(0)
        raise ValueError(f"no request for {message[2]} ({TRACK2}, {TRACK1})")

    caplog.set_level(logging.INFO, "isopace.net")
    for handler in (sync_handler, async_handler):
        async with (
            Server(SPEC, stray) as server,
            Client(SPEC, port=server.port, on_unmatched=handler) as client,
        ):
            await client.send(make_request(1))
            for _ in range(100):
                if caplog.text.count("unmatched-message handler failed") == (
                    1 if handler is sync_handler else 2
                ):
                    break
                await asyncio.sleep(0.01)
    assert caplog.text.count("unmatched-message handler failed") == 2
    assert "ValueError: no request for 476173******0119 (476173******0119=****" in caplog.text
    assert "Traceback" in caplog.text
    assert not [r for r in caplog.records if r.exc_info or r.exc_text]
    assert_no_card_data(caplog)
