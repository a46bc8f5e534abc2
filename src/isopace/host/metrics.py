"""Prometheus metrics for the host: a `FlowListener` that counts, and a tiny HTTP endpoint.

`Metrics` receives the flow's listener calls (``stage_finished``, ``run_finished``) and keeps, in
plain Python counters (no third-party client):

- ``isopace_transactions_total{outcome,code}``: runs by outcome (committed / aborted / replayed) and
  response code (DE 39, ``none`` when no response was built);
- ``isopace_transaction_seconds``: histogram of a whole run;
- ``isopace_stage_seconds{stage,phase}``: histogram per stage method (prepare / commit / abort);
- ``isopace_stage_errors_total{stage,phase}``: stage methods that raised;
- ``isopace_in_flight``: transactions being processed now (the host brackets each run);
- ``isopace_tps``: transactions finished per second over the last 10 seconds;
- the ISO port's limits (read from the server's counters, `isopace.net.ServerStats`, when the
  endpoint is scraped: nothing on the per-request path): ``isopace_connections_open``,
  ``isopace_connections_refused_total`` (over ``max_connections``),
  ``isopace_connections_closed_total{reason}`` (``idle_timeout``, ``frame_timeout``,
  ``buffer_cap``), ``isopace_accept_errors_total`` and ``isopace_buffered_bytes`` (of unfinished
  frames, across connections).

`MetricsServer` answers ``GET /metrics`` (text exposition format 0.0.4) on its own port with
asyncio streams, and 404 to anything else. It is meant for a scraper on a trusted network: no TLS,
no authentication, one request per connection. It accepts through `isopace.net.Listener`, as the
ISO port does, so a process out of descriptors pauses accepting there too and logs it
rate-limited, instead of a traceback per scrape.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import socket
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Protocol

from isopace.net import Listener

if TYPE_CHECKING:
    from isopace.flow import Exchange, Outcome
    from isopace.net import ServerStats

__all__ = ["BUCKETS", "Histogram", "Metrics", "MetricsServer"]

log = logging.getLogger("isopace.host")

BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
_TPS_WINDOW = 10


class Histogram:
    """Cumulative-bucket histogram in the Prometheus sense."""

    __slots__ = ("count", "counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out = []
        running = 0
        sep = "," if labels else ""
        for bound, n in zip((*BUCKETS, float("inf")), self.counts, strict=True):
            running += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {running}')
        wrapped = f"{{{labels}}}" if labels else ""
        out.append(f"{name}_sum{wrapped} {self.sum!r}")
        out.append(f"{name}_count{wrapped} {self.count}")
        return out


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Port(Protocol):
    """What the metrics read of the ISO port (`isopace.net.Server`)."""

    @property
    def connections(self) -> int: ...

    @property
    def buffered_bytes(self) -> int: ...

    @property
    def stats(self) -> ServerStats: ...


class Metrics:
    """The flow listener feeding the endpoint; cheap synchronous calls on the run's task.
    ``port``: the ISO server whose limits are reported (set by the host once it listens)."""

    def __init__(self) -> None:
        self.transactions: dict[tuple[str, str], int] = defaultdict(int)
        self.stage_seconds: dict[tuple[str, str], Histogram] = defaultdict(Histogram)
        self.stage_errors: dict[tuple[str, str], int] = defaultdict(int)
        self.run_seconds = Histogram()
        self.in_flight = 0
        self.port: Port | None = None
        self._keys: dict[tuple[str, object], tuple[str, str]] = {}
        self._second = [0] * _TPS_WINDOW
        self._stamp = [0] * _TPS_WINDOW
        self.started = time.time()

    # FlowListener ----------------------------------------------------------------------------

    def stage_finished(
        self, stage: str, phase: str, seconds: float, error: BaseException | None
    ) -> None:
        key = self._keys.get((stage, phase))
        if key is None:
            key = self._keys[(stage, phase)] = (stage, str(phase))
        self.stage_seconds[key].observe(seconds)
        if error is not None:
            self.stage_errors[key] += 1

    def run_finished(self, ex: Exchange, outcome: Outcome, seconds: float) -> None:
        code = ex.response.get(39) if ex.response is not None else None
        self.transactions[(str(outcome), code if isinstance(code, str) else "none")] += 1
        self.run_seconds.observe(seconds)
        now = int(time.monotonic())
        slot = now % _TPS_WINDOW
        if self._stamp[slot] != now:
            self._stamp[slot] = now
            self._second[slot] = 0
        self._second[slot] += 1

    # reading ---------------------------------------------------------------------------------

    def tps(self) -> float:
        """Transactions finished per second over the last full seconds of the window."""
        now = int(time.monotonic())
        total = sum(
            n
            for n, stamp in zip(self._second, self._stamp, strict=True)
            if now - _TPS_WINDOW < stamp < now
        )
        return total / (_TPS_WINDOW - 1)

    def render(self) -> str:
        """The text exposition format."""
        lines = [
            "# HELP isopace_transactions_total Transactions by outcome and response code.",
            "# TYPE isopace_transactions_total counter",
        ]
        for (outcome, code), n in sorted(self.transactions.items()):
            labels = f'outcome="{_label(outcome)}",code="{_label(code)}"'
            lines.append(f"isopace_transactions_total{{{labels}}} {n}")
        lines += [
            "# HELP isopace_transaction_seconds Duration of a whole transaction.",
            "# TYPE isopace_transaction_seconds histogram",
            *self.run_seconds.lines("isopace_transaction_seconds", ""),
            "# HELP isopace_stage_seconds Duration of each stage method.",
            "# TYPE isopace_stage_seconds histogram",
        ]
        for (stage, phase), hist in sorted(self.stage_seconds.items()):
            labels = f'stage="{_label(stage)}",phase="{_label(phase)}"'
            lines += hist.lines("isopace_stage_seconds", labels)
        lines += [
            "# HELP isopace_stage_errors_total Stage methods that raised.",
            "# TYPE isopace_stage_errors_total counter",
        ]
        for (stage, phase), n in sorted(self.stage_errors.items()):
            lines.append(
                f'isopace_stage_errors_total{{stage="{_label(stage)}",phase="{_label(phase)}"}} {n}'
            )
        lines += [
            "# HELP isopace_in_flight Transactions being processed.",
            "# TYPE isopace_in_flight gauge",
            f"isopace_in_flight {self.in_flight}",
            "# HELP isopace_tps Transactions finished per second (10 s window).",
            "# TYPE isopace_tps gauge",
            f"isopace_tps {self.tps():.3f}",
            "# HELP isopace_start_time_seconds Start time of the host (Unix time).",
            "# TYPE isopace_start_time_seconds gauge",
            f"isopace_start_time_seconds {self.started:.3f}",
        ]
        if self.port is not None:
            lines += self._port_lines(self.port)
        return "\n".join(lines) + "\n"

    @staticmethod
    def _port_lines(port: Port) -> list[str]:
        stats = port.stats
        lines = [
            "# HELP isopace_connections_open ISO 8583 connections open.",
            "# TYPE isopace_connections_open gauge",
            f"isopace_connections_open {port.connections}",
            "# HELP isopace_connections_refused_total Connections closed at accept: "
            "max_connections were open.",
            "# TYPE isopace_connections_refused_total counter",
            f"isopace_connections_refused_total {stats.refused}",
            "# HELP isopace_connections_closed_total Connections closed for a limit, by reason.",
            "# TYPE isopace_connections_closed_total counter",
        ]
        for reason, n in sorted(stats.closed.items()):
            lines.append(f'isopace_connections_closed_total{{reason="{_label(reason)}"}} {n}')
        lines += [
            "# HELP isopace_accept_errors_total accept() failures (out of descriptors or memory).",
            "# TYPE isopace_accept_errors_total counter",
            f"isopace_accept_errors_total {stats.accept_errors}",
            "# HELP isopace_buffered_bytes Bytes of unfinished frames held across connections.",
            "# TYPE isopace_buffered_bytes gauge",
            f"isopace_buffered_bytes {port.buffered_bytes}",
        ]
        return lines


class MetricsServer:
    """``GET /metrics`` over plain HTTP/1.0-style connections (one request per connection)."""

    def __init__(self, metrics: Metrics, host: str = "127.0.0.1", port: int = 0) -> None:
        self.metrics = metrics
        self.host = host
        self._port = port
        self._listener: Listener | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        if self._listener is None:
            return self._port
        return self._listener.port

    async def start(self) -> None:
        listener = Listener(self._accepted)
        await listener.open(self.host, self._port)
        self._listener = listener

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            for task in self._tasks:
                task.cancel()
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=2)

    def _accepted(self, sock: socket.socket, address: object) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(sock))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, sock: socket.socket) -> None:
        try:
            reader, writer = await asyncio.open_connection(sock=sock)
        except OSError:
            sock.close()
            return
        await self._handle(reader, writer)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = request_line.split()
            if (
                len(parts) >= 2
                and parts[0] in ("GET", "HEAD")
                and parts[1].split("?")[0]
                in (
                    "/metrics",
                    "/",
                )
            ):
                body = self.metrics.render().encode()
                status, ctype = "200 OK", "text/plain; version=0.0.4; charset=utf-8"
            else:
                body, status, ctype = b"not found\n", "404 Not Found", "text/plain"
            header = (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode()
            writer.write(header if parts and parts[0] == "HEAD" else header + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
