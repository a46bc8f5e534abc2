"""The authorization host end to end: ``isopace bench`` load against an ``isopace serve`` process
(SQLite ledger and journal with ``synchronous=FULL``, durable SQLite idempotency store, recovery
at start-up) vs the bare asyncio echo baseline of ``bench_net`` (length-prefixed frames of the
same size, echoed), both as two processes (server and load generator), same concurrency.

Reported: saturation throughput (closed loop, ``CONCURRENCY`` in flight) and its ratio to the echo
(target >= 0.25x), then an open-loop run at 50% of that throughput with its latency percentiles
(target p99 < 20 ms).

The machine is shared, so each measurement runs ``BENCH_ROUNDS`` times (default 3), the echo
and the host alternating, and the best round of each counts (as in ``bench_net``).

Run: ``./scripts/bench host``; ``BENCH_SECONDS`` (default 5) per run, ``BENCH_CONCURRENCY``
(default 64), ``BENCH_ROUNDS`` (default 3), ``BENCH_SERVE_ARGS`` (extra ``isopace serve`` flags,
e.g. ``--uvloop``).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from isopace.cli._bench import BenchResult, run_load
from isopace.iso8583 import ISO87_ASCII

SECONDS = float(os.environ.get("BENCH_SECONDS", "5"))
CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "64"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
#: extra ``isopace serve`` flags, e.g. ``BENCH_SERVE_ARGS=--uvloop``
SERVE_ARGS = os.environ.get("BENCH_SERVE_ARGS", "").split()
ROOT = Path(__file__).resolve().parents[1]

_ECHO_SERVER = """
import asyncio, sys
from benchmarks.bench_net import _EchoServer
async def main():
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_EchoServer, "127.0.0.1", int(sys.argv[1]))
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server did not open port {port}")


async def _echo_rate(port: int) -> float:
    """Closed-loop echo round trips per second through one connection (CONCURRENCY in flight)."""
    from benchmarks.bench_net import REQUEST, _EchoClient

    loop = asyncio.get_running_loop()
    transport, client = await loop.create_connection(_EchoClient, "127.0.0.1", port)
    payload = ISO87_ASCII.encode(REQUEST)
    frame = len(payload).to_bytes(2, "big") + payload
    count = 0
    stop = False

    async def worker() -> None:
        nonlocal count
        while not stop:
            await client.request(frame)
            count += 1

    tasks = [loop.create_task(worker()) for _ in range(CONCURRENCY)]
    await asyncio.sleep(0.5)
    start_count, t0 = count, time.perf_counter()
    await asyncio.sleep(SECONDS)
    rate = (count - start_count) / (time.perf_counter() - t0)
    stop = True
    await asyncio.gather(*tasks)
    transport.close()
    return rate


def _line(name: str, r: BenchResult) -> str:
    pct = "  ".join(f"p{p:g} {r.percentile(p) * 1000:6.2f} ms" for p in (50, 90, 99, 99.9))
    codes = ",".join(f"{k}:{v}" for k, v in sorted(r.codes.items()))
    ok = "all answered" if r.complete else f"INCOMPLETE ({r.sent - r.answered} missing)"
    return f"{name:26s} {r.tps:9,.0f} tps   {pct}   [{codes}; {ok}]"


def main() -> None:
    echo_port = _free_port()
    echo = subprocess.Popen(
        [sys.executable, "-c", _ECHO_SERVER, str(echo_port)], env=_env(), cwd=ROOT
    )
    tmp = tempfile.TemporaryDirectory()
    port = _free_port()
    log = open(Path(tmp.name) / "serve.log", "wb")  # noqa: SIM115 - closed below
    # isopace serve with its defaults: SQLite, synchronous=FULL, durable idempotency, recovery.
    serve = subprocess.Popen(
        [sys.executable, "-m", "isopace", "serve", "--port", str(port),
         "--db", str(Path(tmp.name) / "bench.db"), "--log-level", "WARNING", *SERVE_ARGS],
        stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT,
    )  # fmt: skip
    echoes: list[float] = []
    saturated: list[BenchResult] = []
    paced: list[BenchResult] = []
    try:
        _wait_port(echo_port, echo)
        _wait_port(port, serve)
        asyncio.run(run_load(port=port, duration=1.0, concurrency=CONCURRENCY))  # warm-up
        for _ in range(ROUNDS):
            echoes.append(asyncio.run(_echo_rate(echo_port)))
            saturated.append(
                asyncio.run(run_load(port=port, duration=SECONDS, concurrency=CONCURRENCY))
            )
        best = max(saturated, key=lambda r: r.tps)
        half = max(1.0, best.tps / 2)
        for _ in range(ROUNDS):
            paced.append(asyncio.run(run_load(port=port, duration=SECONDS, tps=half)))
    finally:
        for proc in (echo, serve):
            proc.terminate()
            proc.wait(30)
        log.close()
        tmp.cleanup()

    echo_tps = max(echoes)
    ratio = best.tps / echo_tps if echo_tps else 0.0
    calm = min(paced, key=lambda r: r.percentile(99))
    rounds = f"best of {ROUNDS} x {SECONDS:g} s"
    print(
        f"bare asyncio echo          {echo_tps:9,.0f} rt/s  "
        f"({CONCURRENCY} in flight, 2 processes, {rounds})"
    )
    print(_line(f"isopace saturation (c={CONCURRENCY})", best))
    print(
        f"ratio {ratio:.3f}x of the bare echo (target >= 0.25x)",
        "ok" if ratio >= 0.25 else "MISSED",
    )
    print(_line(f"isopace at 50% ({half:,.0f} tps)", calm))
    p99s = ", ".join(f"{r.percentile(99) * 1000:.1f}" for r in paced)
    p99 = calm.percentile(99) * 1000
    print(
        f"p99 at 50% of saturation: {p99:.2f} ms (target < 20 ms; rounds: {p99s} ms)",
        "ok" if p99 < 20 else "MISSED",
    )


if __name__ == "__main__":
    main()
