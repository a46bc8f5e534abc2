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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from isopace.flow import CONTINUE, Exchange, Flow, Outcome
from isopace.iso8583 import Message

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


async def _throughput(flow: Flow, n: int, tag: str) -> float:
    counter = iter(range(n))
    failures = 0

    async def worker() -> None:
        nonlocal failures
        for i in counter:
            outcome = await flow.run(Exchange(f"{tag}-{i}", _request(i)))
            if outcome is not Outcome.COMMITTED:
                failures += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    elapsed = time.perf_counter() - t0
    if failures:
        raise RuntimeError(f"{tag}: {failures} runs did not commit")
    return n / elapsed


def _flow(**kwargs: Any) -> Flow:
    return Flow(**kwargs).group("main", _Stage("s1"), _Stage("s2"), _Stage("s3"))


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
    from isopace.store import SqliteIdempotencyStore, SqliteJournal

    n = 5000
    rows: list[tuple[str, float, str]] = []

    def line(label: str, tps: float, note: str = "") -> None:
        rows.append((label, tps, note))
        print(f"  {label:<52} {tps:>9,.0f} tx/s  {note}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        await _throughput(_flow(), 500, "warm")
        base = await _throughput(_flow(), n, "base")
        line("no journal", base)

        async with SqliteJournal(d / "gc.db", hmac_key="bench") as j:
            gc = await _throughput(_flow(journal=j), n, "gc")
            stats = j.stats
        line(
            "SqliteJournal FULL, group commit",
            gc,
            f"{gc / base:.2f}x baseline (target >= 0.5x); "
            f"{stats['rows'] / max(stats['batches'], 1):.0f} events per fsync",
        )

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
