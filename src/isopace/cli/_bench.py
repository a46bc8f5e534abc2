"""``isopace bench``: drive load at a host and report throughput, latency and response codes.

Two modes:

- closed loop, ``--concurrency C``: C workers each send a request and wait for its answer, then
  send the next (throughput finds its own level: use it to find saturation);
- open loop, ``--tps N``: requests are started on a fixed schedule whatever the answers do;
  latency is measured from the scheduled start, so a host that falls behind shows it (no
  coordinated omission).

Every request is a 0200 purchase (``--amount``, default 1.00) on the bench card, from its own
terminal id per worker (open loop: 64 terminals) with increasing STANs and the current DE 7, so no
two requests share an idempotency key. At the end the run checks that every request got a matching
response (MTI and STAN) and the exit status says so (0 yes, 1 no).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import datetime as dt
import gc
import json
import math
import random
import time
from collections.abc import Callable
from typing import Any

from isopace.cli._output import Output
from isopace.cli._send import FRAMINGS, client_ssl
from isopace.cli._spec import add_spec_flags, chosen_spec

_OPEN_LOOP_TERMINALS = 64


@dataclasses.dataclass
class BenchResult:
    """What a load run measured."""

    mode: str
    target: float
    duration: float
    elapsed: float = 0.0
    sent: int = 0
    answered: int = 0
    mismatched: int = 0
    errors: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    codes: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    latencies: list[float] = dataclasses.field(default_factory=list)

    @property
    def tps(self) -> float:
        return self.answered / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def complete(self) -> bool:
        """Every request sent got its matching response."""
        return self.sent == self.answered and not self.mismatched and not self.errors

    def percentile(self, p: float) -> float:
        """Latency percentile in seconds (nearest rank)."""
        if not self.latencies:
            return math.nan
        data = sorted(self.latencies)
        rank = max(1, math.ceil(p / 100 * len(data)))
        return data[min(rank, len(data)) - 1]

    def as_dict(self) -> dict[str, Any]:
        pct = {f"p{p:g}_ms": round(self.percentile(p) * 1000, 3) for p in (50, 90, 99, 99.9)}
        return {
            "mode": self.mode,
            "target": self.target,
            "duration": self.duration,
            "elapsed": round(self.elapsed, 3),
            "sent": self.sent,
            "answered": self.answered,
            "mismatched": self.mismatched,
            "errors": dict(self.errors),
            "codes": dict(sorted(self.codes.items())),
            "tps": round(self.tps, 1),
            **pct,
            "max_ms": round(max(self.latencies, default=math.nan) * 1000, 3),
            "complete": self.complete,
        }


def _now_de7() -> str:
    return dt.datetime.now(dt.UTC).strftime("%m%d%H%M%S")


async def run_load(
    *,
    host: str = "127.0.0.1",
    port: int,
    duration: float,
    concurrency: int | None = None,
    tps: float | None = None,
    connections: int | None = None,
    pan: str | None = None,
    amount: int = 100,
    timeout: float = 10.0,
    spec: Any = None,
    framing: Any = None,
    ssl: Any = None,
    progress: Callable[[float, int], None] | None = None,
) -> BenchResult:
    """Run one load test (see the module docstring); returns the measurements."""
    from isopace.host.app import BENCH_PAN
    from isopace.iso8583 import ISO87_ASCII, Message
    from isopace.net import Client, NetError, RequestTimeoutError

    if (concurrency is None) == (tps is None):
        raise ValueError("give either concurrency or tps")
    spec = spec if spec is not None else ISO87_ASCII
    mode = "closed" if concurrency is not None else "open"
    if connections is None:
        c = concurrency if concurrency is not None else 64
        connections = max(1, min(8, math.ceil(c / 32)))
    result = BenchResult(mode, float(concurrency or tps or 0), duration)
    template = Message(
        "0200",
        {
            2: pan or BENCH_PAN,
            3: "000000",
            4: f"{amount:012d}",
            42: "BENCHMERCHANT01",
            49: "840",
        },
    )
    nonce = random.randint(0, 999)
    clients = [
        Client(spec, host=host, port=port, framing=framing, ssl=ssl, timeout=timeout)
        for _ in range(connections)
    ]
    await asyncio.gather(*(c.connect() for c in clients))
    gc.collect()
    gc.freeze()  # long-lived objects out of the collector: no full-collection pauses mid-run
    loop = asyncio.get_running_loop()
    clock_second = [-1]
    clock_de7 = [_now_de7()]

    def de7() -> str:
        now = int(time.time())
        if now != clock_second[0]:
            clock_second[0] = now
            clock_de7[0] = _now_de7()
        return clock_de7[0]

    async def one(client: Client, terminal: str, stan: int, started: float) -> bool:
        stan_text = f"{stan:06d}"
        message = template.set_many(
            {7: de7(), 11: stan_text, 37: f"{nonce:03d}{stan:09d}"[-12:], 41: terminal}
        )
        result.sent += 1
        try:
            response = await client.request(message, timeout=timeout)
        except RequestTimeoutError:
            result.errors["timeout"] += 1
            return True
        except NetError as exc:
            result.errors[type(exc).__name__] += 1
            return False
        result.latencies.append(time.perf_counter() - started)
        result.answered += 1
        if response.mti != "0210" or response.get(11) != stan_text:
            result.mismatched += 1
        code = response.get(39)
        result.codes[code if isinstance(code, str) else "none"] += 1
        return True

    start = loop.time()
    end = start + duration
    reporter: asyncio.Task[None] | None = None
    if progress is not None:

        async def report() -> None:
            while True:
                progress(loop.time() - start, result.answered)
                await asyncio.sleep(0.2)

        reporter = loop.create_task(report())
    try:
        if concurrency is not None:

            async def worker(i: int) -> None:
                client = clients[i % len(clients)]
                terminal = f"B{nonce:03d}{i:04d}"
                stan = 0
                while loop.time() < end:
                    stan = stan % 999_999 + 1
                    if not await one(client, terminal, stan, time.perf_counter()):
                        await asyncio.sleep(0.05)  # connection trouble: let it reconnect

            await asyncio.gather(*(worker(i) for i in range(concurrency)))
        else:
            assert tps is not None
            tasks: set[asyncio.Task[bool]] = set()
            total = int(tps * duration)
            k = 0
            t0 = time.perf_counter()
            while k < total:
                now = time.perf_counter() - t0
                due = min(total, int(now * tps) + 1)
                while k < due:
                    terminal_no = k % _OPEN_LOOP_TERMINALS
                    stan = (k // _OPEN_LOOP_TERMINALS) % 999_999 + 1
                    task = loop.create_task(
                        one(
                            clients[terminal_no % len(clients)],
                            f"B{nonce:03d}{terminal_no:04d}",
                            stan,
                            t0 + k / tps,
                        )
                    )
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    k += 1
                await asyncio.sleep(max(0.0, (k / tps) - (time.perf_counter() - t0)))
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        result.elapsed = loop.time() - start
        if reporter is not None:
            reporter.cancel()
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    return result


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="drive load at a host and report throughput and latency",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1", help="host address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8583, help="host port (default: 8583)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--tps", type=float, help="open loop: start N requests per second")
    mode.add_argument(
        "--concurrency", "-c", type=int, help="closed loop: C requests in flight at all times"
    )
    p.add_argument(
        "--duration", "-d", type=float, default=10.0, help="seconds of load (default: 10)"
    )
    p.add_argument(
        "--connections", type=int, help="TCP connections to spread the load on (default: C/32)"
    )
    p.add_argument("--pan", help="card to charge (default: the demo bench card)")
    p.add_argument("--amount", default="1.00", help="amount per request (default: 1.00)")
    p.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait per answer (default: 10)"
    )
    p.add_argument(
        "--framing", choices=FRAMINGS, default="binary2", help="length header (default: binary2)"
    )
    add_spec_flags(p)
    p.add_argument("--tls", action="store_true", help="connect with TLS")
    p.add_argument("--tls-ca", metavar="FILE", help="CA file to verify the host's certificate")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from isopace.cli._send import _amount
    from isopace.host.errors import ConfigError

    if args.duration <= 0:
        raise ConfigError("--duration must be positive")
    if args.concurrency is not None and args.concurrency < 1:
        raise ConfigError("--concurrency must be at least 1")
    if args.tps is not None and args.tps <= 0:
        raise ConfigError("--tps must be positive")
    try:
        amount = int(_amount(args.amount, "840"))  # the bench's requests are in DE 49 840
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return asyncio.run(_bench(args, amount))


async def _bench(args: argparse.Namespace, amount: int) -> int:
    from isopace.host.app import BENCH_PAN
    from isopace.host.errors import StartupError
    from isopace.iso8583 import mask_pan
    from isopace.net import Framing, LengthHeader, NetError

    out = Output()
    what = (
        f"concurrency {args.concurrency}"
        if args.concurrency is not None
        else f"{args.tps:g} tps (open loop)"
    )
    pan = args.pan or BENCH_PAN
    if not args.json:
        out.line(
            f"isopace bench: {args.host}:{args.port}, {what}, {args.duration:g} s, "
            f"0200 of {amount / 100:.2f} on {mask_pan(pan)}"
        )
    progress_cb, finish = _progress(args, out)
    try:
        result = await run_load(
            host=args.host,
            port=args.port,
            duration=args.duration,
            concurrency=args.concurrency,
            tps=args.tps,
            connections=args.connections,
            pan=pan,
            amount=amount,
            timeout=args.timeout,
            spec=chosen_spec(args),
            framing=Framing(header=LengthHeader(args.framing)),
            ssl=client_ssl(args),
            progress=progress_cb,
        )
    except (NetError, OSError) as exc:
        raise StartupError(f"cannot connect to {args.host}:{args.port}: {exc}") from exc
    finally:
        finish()
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        report(result, out)
    return 0 if result.complete else 1


def report(result: BenchResult, out: Output) -> None:
    """Print the summary lines."""
    failed = sum(result.errors.values())
    out.line(
        f"requests    {result.sent} sent, {result.answered} answered, {failed} failed"
        + (f" ({', '.join(f'{k} {v}' for k, v in result.errors.items())})" if failed else "")
    )
    out.line(f"throughput  {result.tps:,.1f} tps over {result.elapsed:.2f} s")
    out.line(
        "latency     "
        + "  ".join(f"p{p:g} {result.percentile(p) * 1000:.2f} ms" for p in (50, 90, 99, 99.9))
        + f"  max {max(result.latencies, default=math.nan) * 1000:.2f} ms"
    )
    out.line(
        "responses   "
        + (", ".join(f"{code}: {n}" for code, n in sorted(result.codes.items())) or "none")
    )
    if result.mismatched:
        out.line(f"mismatched  {result.mismatched} responses did not match their request")
    if result.complete:
        out.line("every request got a response: yes")
    else:
        out.line(f"every request got a response: NO ({result.sent - result.answered} missing)")


def _progress(
    args: argparse.Namespace, out: Output
) -> tuple[Callable[[float, int], None] | None, Callable[[], None]]:
    if args.json or args.no_progress:
        return None, lambda: None
    duration = args.duration
    if out.rich:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(
            TextColumn("load"),
            BarColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[done]} answered, {task.fields[rate]} tps"),
            transient=True,
        )
        task = bar.add_task("load", total=duration, done=0, rate="-")
        bar.start()

        def update(elapsed: float, done: int) -> None:
            rate = f"{done / elapsed:,.0f}" if elapsed > 0 else "-"
            bar.update(task, completed=min(elapsed, duration), done=done, rate=rate)

        return update, bar.stop
    last = {"at": 0.0}

    def plain(elapsed: float, done: int) -> None:
        if elapsed - last["at"] >= 1.0:
            last["at"] = elapsed
            rate = done / elapsed if elapsed > 0 else 0.0
            out.line(f"  {elapsed:5.1f} s  {done} answered  {rate:,.0f} tps")

    return plain, lambda: None
