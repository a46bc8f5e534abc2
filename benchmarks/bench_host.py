"""The authorization host end to end, against the host that does nothing: ``isopace bench`` load
(closed loop, ``CONCURRENCY`` in flight) at ``isopace serve`` processes, each its own process, so
load generator and server do not share a core's time.

Why these measurements:

- **The no-op host** (`benchmarks._noop_host`) is ``isopace.net.Server`` with ``isopace serve``'s
  spec (ascii), framing (binary2) and codec, answering every 0200 at once with its 0210 and
  DE 39 = 00. It costs what any host on this wire costs, so the durable host's throughput over
  the no-op's (target >= 0.08x) is what the durable path costs, in the same run under the same
  load, however busy the shared machine is. (It replaces the bare asyncio echo, which ran a
  different load generator and so compared two things at once.) Each round also says how many
  cores the server and the load generator used: against the no-op host the server uses well
  under one and the rate does not grow with more in flight, so the reference is the most this
  load generator gets answered through ``Server``, not ``Server``'s own limit.
- **CPU per approval**: the ``isopace serve`` process's utime + stime (``/proc/PID/stat``, every
  thread's) over each saturation round, over the approvals (DE 39 = 00) of that round (target
  <= 200 µs). Throughput on a shared machine depends on the neighbours; CPU time per approval
  depends on them less, and it says what a transaction costs when the host is the only
  thing running.
- **Transaction logging**: a second durable host with ``--no-log-transactions`` (which also
  turns the per-stage profiler off), rounds interleaved with the first's; logging on costs
  <= 5% of the throughput with it off. Both run at ``--log-level INFO``, serve's default (the
  one that logs the transactions), their output into a file.
- **Latency**: an open-loop run at 50% of the durable host's saturation with its percentiles
  (target p99 < 10 ms): saturation alone says nothing of the wait at an ordinary load.

The machine is shared, so each measurement runs ``BENCH_ROUNDS`` times (default 3), the servers
taking turns within each round so that a noisy moment hits all of them; every round is printed
and the best of each is compared (as in ``bench_net``). ``BENCH_COMPARE=DIR`` runs a second host
from another checkout (its ``src``) in the same run, its rounds interleaved with this tree's, so a
change is measured before and after under the same load on the machine; the latency runs then
offer both hosts one rate, half the slower one's saturation.

Run: ``./scripts/bench host``; ``BENCH_SECONDS`` (default 5) per run, ``BENCH_CONCURRENCY``
(default 64), ``BENCH_ROUNDS`` (default 3), ``BENCH_SERVE_ARGS`` (extra ``isopace serve`` flags,
e.g. ``--uvloop``, which the no-op host follows too), ``BENCH_COMPARE`` (a checkout to measure
beside this one). The databases live in a temporary directory removed at the end; every process
started is stopped, also when the run fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from isopace.cli._bench import BenchResult, run_load

SECONDS = float(os.environ.get("BENCH_SECONDS", "5"))
CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "64"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
#: extra ``isopace serve`` flags, e.g. ``BENCH_SERVE_ARGS=--uvloop``
SERVE_ARGS = os.environ.get("BENCH_SERVE_ARGS", "").split()
#: another checkout (``git worktree add /tmp/before main~3``) whose host runs beside this one's
COMPARE = Path(os.environ["BENCH_COMPARE"]).resolve() if os.environ.get("BENCH_COMPARE") else None
ROOT = Path(__file__).resolve().parents[1]

NOOP_RATIO_TARGET = 0.08  # durable / no-op saturation, at least
CPU_TARGET_US = 200.0  # serve's CPU per approval, at most
LOG_COST_TARGET = 0.05  # throughput lost to transaction logging, at most
P99_TARGET_MS = 10.0  # at half the saturation, below
APPROVED = "00"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(tree / "src"), str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def _cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid``, all its threads, in seconds (``proc(5)``: fields 14 and
    15, counted after the parenthesised command name, which may hold spaces)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass
class _Round:
    """One saturation run, the server's CPU time over it and the load generator's (this
    process's): which of the two was the limit."""

    result: BenchResult
    cpu: float
    load_cpu: float

    @property
    def busy(self) -> str:
        """CPU use of server and load generator, in cores."""
        elapsed = self.result.elapsed
        return f"server {self.cpu / elapsed:.2f}, bench {self.load_cpu / elapsed:.2f} cores"

    @property
    def tps(self) -> float:
        return self.result.tps

    @property
    def us_per_approval(self) -> float:
        approvals = self.result.codes[APPROVED]
        return self.cpu / approvals * 1e6 if approvals else math.nan


class _Server:
    """One server process under load: an ``isopace serve`` or the no-op host."""

    def __init__(self, label: str, argv: list[str], port: int, tree: Path, log: Path) -> None:
        self.label = label
        self.port = port
        self.rounds: list[_Round] = []
        self.paced: list[BenchResult] = []
        self._log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        try:
            self.proc = subprocess.Popen(
                argv, stdout=self._log, stderr=subprocess.STDOUT, env=_env(tree), cwd=tree
            )
        except BaseException:
            self._log.close()
            raise

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.label} did not open port {self.port}{self._log_tail()}")

    def warm_up(self) -> None:
        asyncio.run(run_load(port=self.port, duration=1.0, concurrency=CONCURRENCY))

    def saturate(self) -> None:
        self._check_alive()
        before, load_before = _cpu_seconds(self.proc.pid), time.process_time()
        result = asyncio.run(run_load(port=self.port, duration=SECONDS, concurrency=CONCURRENCY))
        load_cpu = time.process_time() - load_before
        self._check_alive()
        self.rounds.append(_Round(result, _cpu_seconds(self.proc.pid) - before, load_cpu))

    def pace(self, tps: float) -> None:
        self.paced.append(asyncio.run(run_load(port=self.port, duration=SECONDS, tps=tps)))

    def stop(self) -> None:
        try:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        finally:
            self._log.close()

    @property
    def best(self) -> _Round:
        return max(self.rounds, key=lambda r: r.tps)

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.label} exited with {self.proc.returncode}{self._log_tail()}")

    def _log_tail(self, lines: int = 20) -> str:
        self._log.flush()
        tail = self._log_path.read_text(errors="replace").splitlines()[-lines:]
        return "".join(f"\n  | {line}" for line in tail)


def _serve(label: str, tree: Path, tmp: Path, name: str, *flags: str) -> _Server:
    """``isopace serve`` from ``tree`` with its defaults (SQLite, synchronous=FULL, durable
    idempotency, recovery at start-up, transactions logged at INFO), on a free port."""
    port = _free_port()
    argv = [
        sys.executable, "-m", "isopace", "serve", "--port", str(port),
        "--db", str(tmp / name / "bench.db"), "--log-level", "INFO", *flags, *SERVE_ARGS,
    ]  # fmt: skip
    return _Server(label, argv, port, tree, tmp / f"{name}.log")


def _noop(tmp: Path) -> _Server:
    port = _free_port()
    argv = [sys.executable, "-m", "benchmarks._noop_host", str(port)]
    if "--uvloop" in SERVE_ARGS:
        argv.append("--uvloop")
    return _Server("no-op host (Server, reply 00)", argv, port, ROOT, tmp / "noop.log")


@dataclasses.dataclass
class _Lineup:
    noop: _Server
    host: _Server  # isopace serve, this tree, transactions logged
    quiet: _Server  # the same with --no-log-transactions
    compare: _Server | None  # BENCH_COMPARE's isopace serve
    half: float = 0.0  # the offered rate of the latency runs

    @property
    def durable(self) -> list[_Server]:
        return [self.host] if self.compare is None else [self.host, self.compare]

    @property
    def every(self) -> list[_Server]:
        return [self.noop, self.host, self.quiet, *self.durable[1:]]


def _start(tmp: Path, stack: contextlib.ExitStack) -> _Lineup:
    """Start every server, each one's stop on ``stack`` as soon as it runs."""

    def run(server: _Server) -> _Server:
        stack.callback(server.stop)
        return server

    noop = run(_noop(tmp))
    host = run(_serve("isopace serve (this tree)", ROOT, tmp, "host"))
    quiet = run(
        _serve("isopace serve --no-log-transactions", ROOT, tmp, "quiet", "--no-log-transactions")
    )
    compare = None
    if COMPARE is not None:
        compare = run(_serve(f"BENCH_COMPARE {COMPARE.name}", COMPARE, tmp, "compare"))
    return _Lineup(noop, host, quiet, compare)


def _measure(lineup: _Lineup) -> None:
    for server in lineup.every:
        server.wait_ready()
        server.warm_up()
    for _ in range(ROUNDS):  # the servers take turns, so a noisy moment hits every one
        for server in lineup.every:
            server.saturate()
    # One offered rate for every durable host: half the slowest saturation, so latencies compare.
    lineup.half = max(1.0, min(host.best.tps for host in lineup.durable) / 2)
    for _ in range(ROUNDS):
        for host in lineup.durable:
            host.pace(lineup.half)


def _line(name: str, r: BenchResult) -> str:
    pct = "  ".join(f"p{p:g} {r.percentile(p) * 1000:6.2f} ms" for p in (50, 90, 99, 99.9))
    codes = ",".join(f"{k}:{v}" for k, v in sorted(r.codes.items()))
    ok = "all answered" if r.complete else f"INCOMPLETE ({r.sent - r.answered} missing)"
    return f"{name:30s} {r.tps:9,.0f} tps   {pct}   [{codes}; {ok}]"


def _verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def _per_round(values: list[float], fmt: str) -> str:
    return ", ".join(format(v, fmt) for v in values)


def _print_rounds(server: _Server) -> None:
    print(f"--- {server.label}")
    for i, r in enumerate(server.rounds, 1):
        cpu = f"{r.us_per_approval:4.0f} µs CPU/approval ({r.busy})"
        print(_line(f"saturation round {i} (c={CONCURRENCY})", r.result), cpu)
    print(f"best {server.best.tps:,.0f} tps of {len(server.rounds)} rounds x {SECONDS:g} s")


def _print_against_noop(host: _Server, noop: _Server) -> None:
    ratios = [h.tps / n.tps for h, n in zip(host.rounds, noop.rounds, strict=True)]
    best = host.best.tps / noop.best.tps
    print(
        f"durable / no-op: {best:.3f}x best of {host.best.tps:,.0f} over {noop.best.tps:,.0f} "
        f"(per round: {_per_round(ratios, '.3f')}; target >= {NOOP_RATIO_TARGET:g}x)",
        _verdict(best >= NOOP_RATIO_TARGET),
    )


def _print_cpu(host: _Server) -> None:
    per_round = [r.us_per_approval for r in host.rounds]
    best = min(per_round)
    print(
        f"CPU per approval: {best:.0f} µs best (per round: {_per_round(per_round, '.0f')} µs; "
        f"target <= {CPU_TARGET_US:g} µs)",
        _verdict(best <= CPU_TARGET_US),
    )


def _print_latency(host: _Server, half: float) -> None:
    for i, r in enumerate(host.paced, 1):
        print(_line(f"at {half:,.0f} tps round {i}", r))
    p99 = min(r.percentile(99) for r in host.paced) * 1000
    print(
        f"best p99 at {half:,.0f} tps: {p99:.2f} ms (target < {P99_TARGET_MS:g} ms)",
        _verdict(p99 < P99_TARGET_MS),
    )


def _print_logging_cost(on: _Server, off: _Server) -> None:
    ratios = [b.tps / a.tps for a, b in zip(on.rounds, off.rounds, strict=True)]
    ratio = off.best.tps / on.best.tps
    cost = 1 - on.best.tps / off.best.tps
    print(
        f"transaction log off / on: {ratio:.3f}x best (per round: {_per_round(ratios, '.3f')}); "
        f"logging costs {cost:.1%} of the throughput (target <= {LOG_COST_TARGET:.0%})",
        _verdict(cost <= LOG_COST_TARGET),
    )


def _report(lineup: _Lineup) -> None:
    _print_rounds(lineup.noop)
    for host in lineup.durable:
        _print_rounds(host)
        _print_against_noop(host, lineup.noop)
        _print_cpu(host)
        _print_latency(host, lineup.half)
    _print_rounds(lineup.quiet)
    _print_logging_cost(lineup.host, lineup.quiet)
    if lineup.compare is not None:
        this, other = lineup.host, lineup.compare
        ratios = [a.tps / b.tps for a, b in zip(this.rounds, other.rounds, strict=True)]
        print(
            f"this tree / BENCH_COMPARE saturation: {this.best.tps / other.best.tps:.2f}x best "
            f"(per round: {_per_round(ratios, '.2f')})"
        )


def main() -> None:
    # the stack stops every server started (each even when another's stop fails), then the
    # temporary directory with the databases goes
    with (
        tempfile.TemporaryDirectory(prefix="isopace-bench-host-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        lineup = _start(Path(tmp), stack)
        _measure(lineup)
    _report(lineup)


if __name__ == "__main__":
    main()
