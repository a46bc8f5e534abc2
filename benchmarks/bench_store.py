"""Store benchmark: flow throughput at 100 concurrent runs with durable journals.

- no journal (baseline) vs ``SqliteJournal`` (WAL, synchronous=FULL, group commit): target >= 0.5x
- ``SqliteJournal(group_commit=False)``: one transaction, one fsync per event
- ``PostgresJournal`` + ``PostgresIdempotencyStore`` vs the SQLite journal + idempotency store
  (needs PostgreSQL on 127.0.0.1:5432, db ``test``; skipped with a note when unreachable)

Each transaction: 3 stages (async prepare + commit), BEGIN / COMMITTING / COMMITTED journalled.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from isopace.flow import CONTINUE, Exchange, Flow, Outcome
from isopace.iso8583 import ISO87_ASCII, Message

CONCURRENCY = 100


class _Stage:
    def __init__(self, name: str) -> None:
        self.name = name

    async def prepare(self, ex: Exchange) -> object:
        if self.name == "s3":
            ex.response = Message("0210", {11: ex.request[11], 39: "00"})
        ex.set(self.name, 1, durable=True)
        return CONTINUE

    async def commit(self, ex: Exchange) -> None:
        pass


class _Validate:
    """Authorization-like work, part 1: validate the decoded request against the spec."""

    name = "validate"

    def prepare(self, ex: Exchange) -> object:
        if ISO87_ASCII.validate(ex.request):
            raise ValueError("invalid request")
        return CONTINUE


class _Authorize:
    name = "authorize"

    def prepare(self, ex: Exchange) -> object:
        ex.response = ex.request.reply().set_many({38: "123456", 39: "00"})
        ex.set("auth", "123456", durable=True)
        return CONTINUE

    def commit(self, ex: Exchange) -> None:
        pass


class _Encode:
    name = "encode"

    def prepare(self, ex: Exchange) -> object:
        assert ex.response is not None
        ex.set("wire", ISO87_ASCII.encode(ex.response))
        return CONTINUE


_WIRE: bytes | None = None


def _wire_request(i: int) -> Message:
    """A request as a server hands it over: decoded (lazily) from its wire bytes."""
    global _WIRE
    if _WIRE is None:
        _WIRE = ISO87_ASCII.encode(
            _request(1).set_many(
                {
                    7: "1129210000",
                    12: "210000",
                    13: "1129",
                    22: "051",
                    25: "00",
                    32: "123456",
                    35: "4761739001010010=25121010000000000",
                    37: "000000000001",
                    42: "MERCHANT0000001",
                    49: "978",
                }
            )
        )
    return ISO87_ASCII.decode(_WIRE)


def _request(i: int) -> Message:
    return Message(
        "0200",
        {
            2: "4761739001010010",
            3: "000000",
            4: "000000002500",
            11: f"{i % 1_000_000:06d}",
            41: "TERM0001",
        },
    )


async def _throughput(
    flow: Flow,
    n: int,
    tag: str,
    request: Callable[[int], Message] | None = None,
    concurrency: int = CONCURRENCY,
    answer: Callable[[], Awaitable[None]] | None = None,
) -> float:
    """Runs per second; ``answer`` is awaited after each run, before it counts as answered."""
    make = request or _request
    counter = iter(range(n))
    failures = 0

    async def worker() -> None:
        nonlocal failures
        for i in counter:
            outcome = await flow.run(Exchange(f"{tag}-{i}", make(i)))
            if answer is not None:
                await answer()
            if outcome is not Outcome.COMMITTED:
                failures += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    if failures:
        raise RuntimeError(f"{tag}: {failures} runs did not commit")
    return n / elapsed


class _NullJournal:
    async def record(self, ex: Exchange, event: object) -> None:
        return None


def _thread_cpu(thread: Any) -> float:
    """CPU seconds used by ``thread`` so far (NaN where the platform cannot tell)."""
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    except (AttributeError, OSError, TypeError):
        return float("nan")


def _flow(**kwargs: Any) -> Flow:
    return Flow(**kwargs).group("main", _Stage("s1"), _Stage("s2"), _Stage("s3"))


def _commit_latency(path: Path) -> float:
    import sqlite3
    import statistics

    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("CREATE TABLE t (x INTEGER)")
    samples = []
    for i in range(60):
        t0 = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t VALUES (?)", (i,))
        conn.execute("COMMIT")
        samples.append((time.perf_counter() - t0) * 1000)
    conn.close()
    return statistics.median(samples)


async def _pg_dsn() -> str | None:
    import asyncpg

    for user in ("postgres", "root"):
        dsn = f"postgresql://{user}@127.0.0.1:5432/test"
        try:
            conn = await asyncpg.connect(dsn, timeout=3)
        except Exception:
            continue
        await conn.close()
        return dsn
    return None


async def _run() -> None:
    from isopace.store import SqliteDatabase, SqliteIdempotencyStore, SqliteJournal

    n = 5000
    rows: list[tuple[str, float, str]] = []

    def line(label: str, tps: float, note: str = "") -> None:
        rows.append((label, tps, note))
        print(f"  {label:<52} {tps:>9,.0f} tx/s  {note}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        commit_ms = _commit_latency(d / "latency.db")
        print(
            f"  SQLite commit (synchronous=FULL, one fsync): median {commit_ms:.2f} ms -> at "
            f"{CONCURRENCY} concurrent runs, 3 awaited records per transaction cannot exceed "
            f"~{CONCURRENCY / (3 * commit_ms / 1000):,.0f} tx/s",
            flush=True,
        )
        await _throughput(_flow(), 500, "warm")
        base = await _throughput(_flow(), n, "base")
        line("no journal", base)
        null = await _throughput(_flow(journal=_NullJournal()), n, "null")
        line(
            "a journal that does nothing (the flow's journalled path)",
            null,
            f"{null / base:.2f}x baseline: the ceiling for any journal",
        )

        async with SqliteJournal(d / "gc.db", hmac_key="bench") as j:
            gc = await _throughput(_flow(journal=j), n, "gc")
            stats = j.stats
        line(
            "SqliteJournal FULL, group commit",
            gc,
            f"{gc / base:.2f}x baseline (target >= 0.5x); "
            f"{stats['rows'] / max(stats['batches'], 1):.0f} events per fsync",
        )

        shared = SqliteDatabase(d / "shared.db")
        try:
            j = SqliteJournal.on(shared, hmac_key="bench")
            sh = await _throughput(_flow(journal=j), n, "sh", answer=shared.synced)
            syncs = shared.syncs
        finally:
            await shared.close()
        line(
            "SqliteJournal.on(SqliteDatabase): inline, synced per answer",
            sh,
            f"{sh / base:.2f}x baseline (the host's way: records committed in order, one "
            f"fdatasync before answering; {n / max(syncs, 1):.0f} transactions per fsync)",
        )

        async with SqliteJournal(d / "nw.db", hmac_key="bench", wait_final=False) as j:
            nw = await _throughput(_flow(journal=j), n, "nw")
        line(
            "SqliteJournal FULL, group commit, wait_final=False",
            nw,
            f"{nw / base:.2f}x baseline (2 awaited fsyncs per transaction, not 3)",
        )

        base_k = await _throughput(_flow(), n, "base-k", concurrency=1000)
        async with SqliteJournal(d / "gck.db", hmac_key="bench") as j:
            gc_k = await _throughput(_flow(journal=j), n, "gc-k", concurrency=1000)
        line(
            "SqliteJournal FULL, group commit, 1000 concurrent",
            gc_k,
            f"{gc_k / base_k:.2f}x baseline at 1000 ({base_k:,.0f} tx/s)",
        )

        # CPU the journal costs per transaction (both threads), on top of the flow's own
        async with SqliteJournal(d / "cpu.db", hmac_key="bench") as j:
            c0 = time.process_time()
            w0 = _thread_cpu(j._writer._thread)
            await _throughput(_flow(journal=j), n, "cpu")
            await j.flush()
            with_journal = (time.process_time() - c0) / n * 1e6
            writer = (_thread_cpu(j._writer._thread) - w0) / n * 1e6
        c0 = time.process_time()
        await _throughput(_flow(), n, "cpu0")
        without = (time.process_time() - c0) / n * 1e6
        split = (
            f": {with_journal - writer - without:.0f} us on the event loop (protecting and "
            f"serialising the messages, awaiting 3 records), {writer:.0f} us in the writer "
            "thread (3 rows' INSERT, the inflight triggers, the commits)"
            if writer == writer
            else ""
        )
        print(
            f"  CPU per transaction: {without:.1f} us without journal, {with_journal:.1f} us "
            f"with SqliteJournal (the journal costs {with_journal - without:.0f} us{split})",
            flush=True,
        )

        def auth_flow(**kwargs: Any) -> Flow:
            return Flow(**kwargs).group("main", _Validate(), _Authorize(), _Encode())

        auth = await _throughput(auth_flow(), n, "auth0", _wire_request)
        line("authorization-like stages (validate, reply, encode)", auth)
        async with SqliteJournal(d / "auth.db", hmac_key="bench") as j:
            auth_j = await _throughput(auth_flow(journal=j), n, "auth", _wire_request)
        line("  same + SqliteJournal FULL, group commit", auth_j, f"{auth_j / auth:.2f}x")

        m = 600
        async with SqliteJournal(d / "one.db", hmac_key="bench", group_commit=False) as j:
            one = await _throughput(_flow(journal=j), m, "one")
        line(
            "SqliteJournal FULL, one fsync per event",
            one,
            f"{one / base:.3f}x baseline; group commit is {gc / one:.1f}x faster",
        )

        key: Callable[[Exchange], str] = lambda ex: ex.id  # noqa: E731
        async with (
            SqliteJournal(d / "sj.db", hmac_key="bench") as j,
            SqliteIdempotencyStore(d / "si.db") as s,
        ):
            sq = await _throughput(_flow(journal=j, idempotency=s, key=key), n // 2, "sqi")
        line("SqliteJournal + SqliteIdempotencyStore", sq, f"{sq / base:.2f}x baseline")

        dsn = await _pg_dsn()
        if dsn is None:
            print("  PostgreSQL not reachable on 127.0.0.1:5432: PostgreSQL rows skipped")
            return
        from isopace.store import PostgresIdempotencyStore, PostgresJournal

        schema = f"bench_{uuid.uuid4().hex[:10]}"
        try:
            async with PostgresJournal(dsn, schema=schema, hmac_key="bench") as pj:
                pgj = await _throughput(_flow(journal=pj), n, "pgj")
            line("PostgresJournal", pgj, f"{pgj / gc:.2f}x SqliteJournal")
            async with (
                PostgresJournal(dsn, schema=schema, hmac_key="bench") as pj,
                PostgresIdempotencyStore(dsn, schema=schema, max_size=20) as ps,
            ):
                pgi = await _throughput(_flow(journal=pj, idempotency=ps, key=key), n // 2, "pgi")
            line(
                "PostgresJournal + PostgresIdempotencyStore",
                pgi,
                f"{pgi / sq:.2f}x SQLite journal + idempotency",
            )
        finally:
            import asyncpg

            conn = await asyncpg.connect(dsn)
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            await conn.close()


def main() -> None:
    print(f"flow throughput, {CONCURRENCY} concurrent runs, 3 stages (prepare + commit)")
    asyncio.run(_run())


if __name__ == "__main__":
    main()
