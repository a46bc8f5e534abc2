"""Round trips per second through ``Server`` + ``Client`` (handler answers ``request.reply()``)
against a bare asyncio server and client that only echo 2-byte length-prefixed frames of the same
size, with 64 requests in flight on one connection. The ratio is the figure of merit (target
>= 0.5x); the run is repeated on uvloop when it is installed.

Two more cases split the cost: "transport only" is the same Server + Client with a pass-through
codec (what the network layer itself costs), and "bare echo, client batching" is a bare client
that, like isopace's, sends the frames written in one loop turn in one write (a stricter limit:
the plain bare client pays one ``send`` per request).

Run: ``./scripts/bench net``. Each case runs ``BENCH_ROUNDS`` times (default 3, alternating with the
other case) for ``BENCH_SECONDS`` (default 2) after a 0.5 s warm-up; the best round of each counts.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, cast

from isopace.iso8583 import ISO87_ASCII, Message
from isopace.net import Client, Server

CONCURRENCY = 64
SECONDS = float(os.environ.get("BENCH_SECONDS", "2"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
WARMUP = 0.5

REQUEST = Message(
    "0200",
    {
        2: "4761739001010119",
        3: "000000",
        4: "000000002500",
        7: "1129120000",
        11: "000001",
        12: "120000",
        13: "1129",
        22: "051",
        25: "00",
        37: "000000000001",
        41: "TERM0001",
        42: "MERCHANT0000001",
        49: "978",
    },
)


Result = tuple[float, float]
"""(round trips per second, CPU microseconds per round trip) of one measured run."""


async def _measure(one_round_trip: Callable[[int, int], Awaitable[None]]) -> Result:
    """Run CONCURRENCY workers for WARMUP + SECONDS; round trips per second in the measured part
    and the process CPU time (user + system, both ends of the connection) per round trip."""
    loop = asyncio.get_running_loop()
    counting = False
    count = 0
    stop = False

    async def worker(w: int) -> None:
        nonlocal count
        i = 0
        while not stop:
            i += 1
            await one_round_trip(w, i)
            if counting:
                count += 1

    tasks = [loop.create_task(worker(w)) for w in range(CONCURRENCY)]
    await asyncio.sleep(WARMUP)
    counting = True
    t0 = time.perf_counter()
    c0 = time.process_time()
    await asyncio.sleep(SECONDS)
    counting = False
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0
    stop = True
    await asyncio.gather(*tasks)
    return count / elapsed, cpu / max(count, 1) * 1e6


# --- bare asyncio: length-prefixed echo --------------------------------------------------------


class _EchoServer(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        pos = 0
        n = len(buf)
        while n - pos >= 2:
            end = pos + 2 + int.from_bytes(buf[pos : pos + 2], "big")
            if end > n:
                break
            pos = end
        if pos:
            self.transport.write(buf[:pos])
        self.buf = buf[pos:]


class _EchoClient(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = b""
        self.waiters: collections.deque[asyncio.Future[bytes]] = collections.deque()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        pos = 0
        n = len(buf)
        while n - pos >= 2:
            end = pos + 2 + int.from_bytes(buf[pos : pos + 2], "big")
            if end > n:
                break
            self.waiters.popleft().set_result(buf[pos + 2 : end])
            pos = end
        self.buf = buf[pos:]

    async def request(self, frame: bytes) -> bytes:
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        self.transport.write(frame)
        return await fut


class _BatchingEchoClient(_EchoClient):
    """The same, but the frames written in one loop turn go out in one write (as isopace does)."""

    def __init__(self) -> None:
        super().__init__()
        self.out: list[bytes] = []

    async def request(self, frame: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bytes] = loop.create_future()
        self.waiters.append(fut)
        if not self.out:
            loop.call_soon(self.flush)
        self.out.append(frame)
        return await fut

    def flush(self) -> None:
        self.transport.write(b"".join(self.out))
        self.out.clear()


async def bare() -> Result:
    return await _bare(_EchoClient)


async def bare_batching() -> Result:
    return await _bare(_BatchingEchoClient)


async def _bare(client_class: type[_EchoClient]) -> Result:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_EchoServer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport, client = await loop.create_connection(client_class, "127.0.0.1", port)
    payload = ISO87_ASCII.encode(REQUEST)
    frame = len(payload).to_bytes(2, "big") + payload

    async def one(w: int, i: int) -> None:
        await client.request(frame)

    try:
        return await _measure(one)
    finally:
        transport.close()
        server.close()
        await server.wait_closed()


# --- isopace ----------------------------------------------------------------------------------


async def _reply(request: Message) -> Message:
    return request.reply()


async def isopace(eager: bool = False) -> Result:
    async with (
        Server(ISO87_ASCII, _reply, max_in_flight=CONCURRENCY, eager=eager) as server,
        Client(ISO87_ASCII, port=server.port) as client,
    ):
        terminals = [f"TERM{w:04d}" for w in range(CONCURRENCY)]

        async def one(w: int, i: int) -> None:
            request = REQUEST.set_many({11: f"{i % 1000000:06d}", 41: terminals[w]})
            response = await client.request(request, timeout=10)
            assert response.mti == "0210"

        return await _measure(one)


async def isopace_eager() -> Result:
    return await isopace(eager=True)


# --- isopace's transport alone: the same Server + Client with a pass-through codec --------------


class _Raw:
    """Stands in for a Message: MTI, STAN and terminal read straight from fixed positions."""

    __slots__ = ("mti", "stan", "terminal")

    def __init__(self, mti: str, stan: str, terminal: str) -> None:
        self.mti, self.stan, self.terminal = mti, stan, terminal

    def get(self, n: int, default: object = None) -> object:
        return self.stan if n == 11 else self.terminal if n == 41 else default

    def reply(self) -> _Raw:
        return _Raw("0210", self.stan, self.terminal)


class _RawSpec:
    """A codec that costs next to nothing, with messages the size of the real ones."""

    def __init__(self, size: int) -> None:
        self.pad = b"x" * (size - 18)

    def decode(self, data: bytes) -> _Raw:
        return _Raw(data[:4].decode(), data[4:10].decode(), data[10:18].decode())

    def encode(self, m: _Raw) -> bytes:
        return (m.mti + m.stan + m.terminal).encode() + self.pad


async def _raw_reply(request: _Raw) -> _Raw:
    return request.reply()


async def transport_only() -> Result:
    spec: Any = _RawSpec(len(ISO87_ASCII.encode(REQUEST)))
    async with (
        Server(spec, cast(Any, _raw_reply), max_in_flight=CONCURRENCY) as server,
        Client(spec, port=server.port) as client,
    ):
        terminals = [f"TERM{w:04d}" for w in range(CONCURRENCY)]

        async def one(w: int, i: int) -> None:
            request: Any = _Raw("0200", f"{i % 1000000:06d}", terminals[w])
            response = await client.request(request, timeout=10)
            assert response.mti == "0210"

        return await _measure(one)


def _codec_cost() -> float:
    """Microseconds of ISO 8583 codec work in one round trip, measured alone."""
    n = 5000
    data = ISO87_ASCII.encode(REQUEST)
    t0 = time.perf_counter()
    for i in range(n):
        request = REQUEST.set_many({11: f"{i:06d}", 41: "TERM0001"})
        wire = ISO87_ASCII.encode(request)  # client
        response = ISO87_ASCII.encode(ISO87_ASCII.decode(wire).reply())  # server
        got = ISO87_ASCII.decode(response)  # client
        got.get(11), got.get(41)
    del data
    return (time.perf_counter() - t0) / n * 1e6


def _run(name: str, runner: Callable[[Callable[[], Coroutine[Any, Any, Result]]], Result]) -> None:
    # Alternate the cases and keep the best round of each: the machine may be shared, and a
    # burst of other work during one case would otherwise skew the ratio. The CPU time per round
    # trip is the steadier figure when other processes compete for the cores.
    cases = {
        "bare asyncio echo": bare,
        "isopace Server+Client": isopace,
        "  with Server(eager=True)": isopace_eager,
        "  transport only (pass-through codec)": transport_only,
        "bare echo, batching client": bare_batching,
    }
    results: dict[str, list[Result]] = {k: [] for k in cases}
    for _ in range(ROUNDS):
        for key, case in cases.items():
            results[key].append(runner(case))
    best = {k: (max(r for r, _ in v), min(c for _, c in v)) for k, v in results.items()}
    base_rate, base_cpu = best["bare asyncio echo"]
    print(f"{name}: {'':38s}{'rt/s':>9s} {'CPU us/rt':>10s}   vs bare: rt/s   CPU")
    for key, (rate, cpu) in best.items():
        line = f"  {key:38s}{rate:9,.0f} {cpu:10.1f}"
        if key != "bare asyncio echo":
            line += f"   {rate / base_rate:12.2f}x {base_cpu / cpu:5.2f}x"
        if key.startswith("isopace") or key.startswith("  with"):
            line += "   (target >= 0.50x)"
        print(line, flush=True)


def main() -> None:
    print(
        f"{CONCURRENCY} requests in flight on one connection, best of {ROUNDS} x {SECONDS:g} s; "
        f"ISO 8583 codec work per round trip measured alone: {_codec_cost():.1f} us",
        flush=True,
    )
    _run("asyncio", lambda f: asyncio.run(f()))
    try:
        import uvloop
    except ImportError:
        print("uvloop   not installed (pip install isopace[uvloop])")
        return
    _run("uvloop", lambda f: uvloop.run(f()))


if __name__ == "__main__":
    main()
