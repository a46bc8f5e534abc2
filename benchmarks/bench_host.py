"""The authorization host end to end: ``isopace bench`` load against an ``isopace serve`` process
(SQLite ledger and journal with ``synchronous=FULL``, durable SQLite idempotency store, recovery
at start-up) vs the bare asyncio echo baseline of ``bench_net`` (length-prefixed frames of the
same size, echoed), both as two processes (server and load generator), same concurrency.

Reported: saturation throughput (closed loop, ``CONCURRENCY`` in flight) and its ratio to the echo
(target >= 0.25x), then an open-loop run at 50% of that throughput with its latency percentiles
(target p99 < 20 ms).

The machine is shared, so each measurement runs ``BENCH_ROUNDS`` times (default 3), the echo
and the host alternating; every round is printed and the best of each is compared (as in
``bench_net``). ``BENCH_COMPARE=DIR`` runs a second host from another checkout (its ``src``) in
the same run, its rounds interleaved with this tree's, so a change is measured before and after
under the same load on the machine; the latency runs then offer both hosts one rate, half the
slower one's saturation.

Run: ``./scripts/bench host``; ``BENCH_SECONDS`` (default 5) per run, ``BENCH_CONCURRENCY``
(default 64), ``BENCH_ROUNDS`` (default 3), ``BENCH_SERVE_ARGS`` (extra ``isopace serve`` flags,
e.g. ``--uvloop``), ``BENCH_COMPARE`` (a checkout to measure beside this one).
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
#: another checkout (``git worktree add /tmp/before main~3``) whose host runs beside this one's
COMPARE = Path(os.environ["BENCH_COMPARE"]).resolve() if os.environ.get("BENCH_COMPARE") else None
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
    return f"{name:30s} {r.tps:9,.0f} tps   {pct}   [{codes}; {ok}]"


class _Host:
    """One ``isopace serve`` process, from this checkout or from ``BENCH_COMPARE``'s."""

    def __init__(self, name: str, tree: Path, tmp: Path) -> None:
        self.name = name
        self.port = _free_port()
        self.saturated: list[BenchResult] = []
        self.paced: list[BenchResult] = []
        self._log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        env = _env()
        env["PYTHONPATH"] = os.pathsep.join([str(tree / "src"), env["PYTHONPATH"]])
        # isopace serve with its defaults: SQLite, synchronous=FULL, durable idempotency, recovery.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "isopace", "serve", "--port", str(self.port),
             "--db", str(tmp / name / "bench.db"), "--log-level", "WARNING", *SERVE_ARGS],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=tree,
        )  # fmt: skip

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self._log.close()

    @property
    def best(self) -> BenchResult:
        return max(self.saturated, key=lambda r: r.tps)


def main() -> None:
    echo_port = _free_port()
    echo = subprocess.Popen(
        [sys.executable, "-c", _ECHO_SERVER, str(echo_port)], env=_env(), cwd=ROOT
    )
    tmp = tempfile.TemporaryDirectory()
    trees = [("this tree", ROOT)]
    if COMPARE:
        trees.append((f"BENCH_COMPARE {COMPARE.name}", COMPARE))
    hosts = [_Host(f"host{i}", tree, Path(tmp.name)) for i, (_, tree) in enumerate(trees)]
    names = {host.name: label for host, (label, _) in zip(hosts, trees, strict=True)}
    echoes: list[float] = []
    try:
        _wait_port(echo_port, echo)
        for host in hosts:
            _wait_port(host.port, host.proc)
            asyncio.run(run_load(port=host.port, duration=1.0, concurrency=CONCURRENCY))  # warm-up
        for _ in range(ROUNDS):  # echo and hosts alternate, so a noisy moment hits every one
            echoes.append(asyncio.run(_echo_rate(echo_port)))
            for host in hosts:
                host.saturated.append(
                    asyncio.run(run_load(port=host.port, duration=SECONDS, concurrency=CONCURRENCY))
                )
        # One offered rate for every host: half the slowest saturation, so latencies compare.
        half = max(1.0, min(host.best.tps for host in hosts) / 2)
        for _ in range(ROUNDS):
            for host in hosts:
                host.paced.append(asyncio.run(run_load(port=host.port, duration=SECONDS, tps=half)))
    finally:
        echo.terminate()
        echo.wait(30)
        for host in hosts:
            host.stop()
        tmp.cleanup()

    echo_tps = max(echoes)
    print(
        f"bare asyncio echo              {echo_tps:9,.0f} rt/s  ({CONCURRENCY} in flight, "
        f"2 processes, best of {ROUNDS} x {SECONDS:g} s; rounds: "
        + ", ".join(f"{e:,.0f}" for e in echoes)
        + ")"
    )
    for host in hosts:
        label = names[host.name]
        ratio = host.best.tps / echo_tps if echo_tps else 0.0
        print(f"--- {label}")
        for i, r in enumerate(host.saturated, 1):
            print(_line(f"saturation round {i} (c={CONCURRENCY})", r))
        print(
            f"best {host.best.tps:,.0f} tps: ratio {ratio:.3f}x of the bare echo (target >= 0.25x)",
            "ok" if ratio >= 0.25 else "MISSED",
        )
        for i, r in enumerate(host.paced, 1):
            print(_line(f"at {half:,.0f} tps round {i}", r))
        calm = min(host.paced, key=lambda r: r.percentile(99))
        p99 = calm.percentile(99) * 1000
        print(
            f"best p99 at {half:,.0f} tps: {p99:.2f} ms (target < 20 ms)",
            "ok" if p99 < 20 else "MISSED",
        )
    if len(hosts) == 2:
        this, other = hosts
        per_round = ", ".join(
            f"{a.tps / b.tps:.2f}" for a, b in zip(this.saturated, other.saturated, strict=True)
        )
        print(
            f"this tree / BENCH_COMPARE saturation: {this.best.tps / other.best.tps:.2f}x best "
            f"(per round: {per_round})"
        )


if __name__ == "__main__":
    main()
