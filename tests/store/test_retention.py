"""Retention: ``prune(before)`` deletes the records of transactions that ended (committed,
aborted, replayed) before a date, in small batches, and never a transaction in doubt (BEGIN
only, or COMMITTING without a final record), however old; SQLite (a file of its own, and the
shared database, where batches yield to the event loop) and PostgreSQL. The PostgreSQL
idempotency store purges expired answers in batches too.

The cut-off is taken between two rounds of transactions, so the first round (and the in-doubt
ones, begun before it) is older than the cut-off and the second is not."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from isopace.flow import CONTINUE, Event, EventKind, Exchange, Flow, MemoryStore, Outcome
from isopace.store import PostgresIdempotencyStore, PostgresJournal, SqliteDatabase, SqliteJournal
from tests.store.helpers import request


class Answer:
    """Approves, or declines (aborts with a response) odd STANs above 1000."""

    name = "answer"

    def prepare(self, ex: Exchange) -> object:
        stan = int(ex.request[11])
        ex.response = ex.request.reply().set(39, "05" if stan > 1000 and stan % 2 else "00")
        if ex.response[39] == "05":
            ex.abort()
        return CONTINUE


async def _round(journal: Any, prefix: str, stan: int) -> dict[str, Outcome]:
    """A committed, an aborted and a replayed transaction; their ids -> outcomes."""
    store = MemoryStore()
    flow = Flow(journal=journal, idempotency=store, key=lambda ex: str(ex.request[11]))
    flow.group("main", Answer())
    outcomes = {}
    for n, s in enumerate((stan, stan + 1, stan)):  # committed, aborted, replayed
        ex = Exchange(f"{prefix}-{n}", request(stan=s))
        outcomes[ex.id] = await flow.run(ex)
    assert sorted(outcomes.values()) == sorted(
        [Outcome.COMMITTED, Outcome.ABORTED, Outcome.REPLAYED]
    )
    return outcomes


async def _in_doubt(journal: Any) -> None:
    await journal.record(Exchange("doubt-began", request(stan=7)), Event(EventKind.BEGIN))
    committing = Exchange("doubt-committing", request(stan=8))
    await journal.record(committing, Event(EventKind.BEGIN))
    committing.response = committing.request.reply().set(39, "00")
    await journal.record(committing, Event(EventKind.COMMITTING))


async def _check(journal: Any, *, batch: int) -> None:
    old = {}
    for i in range(5):
        old |= await _round(journal, f"old{i}", 1001 + 2 * i)
    await _in_doubt(journal)
    await asyncio.sleep(0.01)
    cut = datetime.now(UTC)
    await asyncio.sleep(0.01)
    new = await _round(journal, "new", 2001)
    before = await journal.counts()

    pruned = await journal.prune(cut, batch=batch)

    # 5 rounds: committed (BEGIN, COMMITTING, COMMITTED), aborted (BEGIN, ABORTED), replayed
    # (IDEMPOTENT_HIT)
    assert pruned == 5 * 6
    for tx in old:
        assert await journal.by_id(tx) == [], tx
    for tx in new:
        assert await journal.by_id(tx), tx
    doubt = {d.tx_id: d.committing for d in await journal.in_doubt(all_nodes=True)}
    assert doubt == {"doubt-began": False, "doubt-committing": True}
    assert [r.kind for r in await journal.by_id("doubt-committing")] == ["BEGIN", "COMMITTING"]
    after = await journal.counts()
    assert sum(after.values()) == sum(before.values()) - pruned
    # nothing left to prune; a cut-off in the future still spares what is in doubt
    assert await journal.prune(cut, batch=batch) == 0
    assert await journal.prune(datetime.now(UTC) + timedelta(days=1)) == 6
    assert {d.tx_id for d in await journal.in_doubt(all_nodes=True)} == set(doubt)
    with pytest.raises(ValueError):
        await journal.prune(cut, batch=0)


async def test_sqlite_journal_of_its_own(tmp_path: Path) -> None:
    journal = SqliteJournal(tmp_path / "journal.db")
    try:
        await _check(journal, batch=2)
    finally:
        await journal.close()


async def test_sqlite_shared_database_yields_between_batches(tmp_path: Path) -> None:
    database = SqliteDatabase(tmp_path / "host.db")
    journal = SqliteJournal.on(database)
    try:
        await _check(journal, batch=3)
        for i in range(40):
            await _round(journal, f"more{i}", 1001 + 2 * i)
        turns = 0
        stop = False

        async def ticker() -> None:
            nonlocal turns
            while not stop:
                turns += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        pruned = await journal.prune(datetime.now(UTC) + timedelta(days=1), batch=1)
        stop = True
        await task
        assert pruned == 40 * 6
        assert turns >= 40 * 3  # one batch (one transaction) per loop turn
        assert {d.tx_id for d in await journal.in_doubt(all_nodes=True)} == {
            "doubt-began",
            "doubt-committing",
        }
    finally:
        await journal.close()
        await database.close()


async def test_postgres_journal(pg: tuple[str, str]) -> None:
    dsn, schema = pg
    journal = PostgresJournal(dsn, schema=schema)
    await journal.open()
    try:
        await _check(journal, batch=2)
    finally:
        await journal.close()


async def test_postgres_idempotency_purge_in_batches(pg: tuple[str, str]) -> None:
    dsn, schema = pg
    store = PostgresIdempotencyStore(dsn, schema=schema, purge_interval=3600)
    await store.open()
    try:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(
                f"""INSERT INTO {schema}.idempotency_keys
                    SELECT 'old-' || i, 'done', NULL, NULL, '{{}}', now() - interval '1 hour'
                    FROM generate_series(1, 1234) i"""
            )
            await conn.execute(
                f"""INSERT INTO {schema}.idempotency_keys
                    VALUES ('live', 'done', NULL, NULL, '{{}}', now() + interval '1 hour'),
                           ('held', 'claimed', 'x', now() + interval '1 hour', NULL, NULL),
                           ('lost', 'claimed', 'x', now() - interval '1 hour', NULL, NULL)"""
            )
            assert await store.purge() == 1235
            left = {r[0] for r in await conn.fetch(f"SELECT key FROM {schema}.idempotency_keys")}
        finally:
            await conn.close()
    finally:
        await store.close()
    assert left == {"live", "held"}
