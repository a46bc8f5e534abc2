"""Every durable idempotency store keeps an answer with or without a response, and with the
request's fingerprint: a real SQLite file (a store of its own, and the shared database), the real
PostgreSQL (a schema per test) and the real Redis (a key prefix per test). Each is exercised
through the claim protocol and through a flow: a committed run without a response is replayed,
never run again (its commits run once), and a request reusing the key with another fingerprint
is neither replayed nor run."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from isopace.flow import Exchange, FingerprintMismatchError, Flow, Outcome, Stored
from isopace.iso8583 import Message
from isopace.store import SqliteDatabase, SqliteIdempotencyStore
from tests.store.helpers import PAN, REDIS_URL, pg_dsn, request

OTHER_PAN = "5555555555554444"
#: what the host stores: a keyed hash, no card number
FINGERPRINT = "020|1a2b3c4d:q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80|000000|000000002500"


@pytest.fixture(params=["sqlite", "sqlite-shared", "postgres", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    kind = request.param
    if kind == "sqlite":
        async with SqliteIdempotencyStore(tmp_path / "i.db", lease=2.0) as s:
            yield s
    elif kind == "sqlite-shared":
        database = SqliteDatabase(tmp_path / "d.db")
        try:
            async with SqliteIdempotencyStore.on(database, lease=2.0) as s:
                yield s
        finally:
            await database.close()
    elif kind == "postgres":
        import asyncpg

        from isopace.store import PostgresIdempotencyStore

        dsn = await pg_dsn()
        schema = f"t_{uuid.uuid4().hex[:12]}"
        try:
            async with PostgresIdempotencyStore(dsn, schema=schema, lease=2.0, max_size=3) as s:
                yield s
        finally:
            conn = await asyncpg.connect(dsn)
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            await conn.close()
    else:
        import redis.asyncio as aioredis

        from isopace.store import RedisIdempotencyStore

        prefix = f"isopace-test:{uuid.uuid4().hex[:12]}:"
        try:
            async with RedisIdempotencyStore(REDIS_URL, prefix=prefix, lease=2.0) as s:
                yield s
        finally:
            client = aioredis.Redis.from_url(REDIS_URL)
            keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
            if keys:
                await client.delete(*keys)
            await client.aclose()


async def test_an_answer_without_a_response_is_found(store: Any) -> None:
    assert await store.claim("none") is None
    await store.complete("none", None)
    assert await store.claim("none") == Stored(None, None)
    assert await store.claim("none-fp") is None
    await store.complete("none-fp", None, FINGERPRINT)
    assert await store.claim("none-fp") == Stored(None, FINGERPRINT)
    assert await store.claim("full") is None
    await store.complete("full", Message("0210", {2: PAN, 39: "00", 38: "ABC123"}), FINGERPRINT)
    got = await store.claim("full")
    assert got is not None and got.fingerprint == FINGERPRINT
    assert got.response is not None and got.response[38] == "ABC123" and 2 in got.response.redacted


async def test_a_waiter_is_answered_by_a_completion_without_response(store: Any) -> None:
    assert await store.claim("k") is None
    waiter = asyncio.create_task(store.claim("k"))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await store.complete("k", None, FINGERPRINT)
    assert await asyncio.wait_for(waiter, 3) == Stored(None, FINGERPRINT)


class Ledger:
    """Moves money in commit, builds a response only when ``respond``."""

    name = "ledger"

    def __init__(self, respond: bool) -> None:
        self.respond = respond
        self.commits = 0
        self.balance = 100_000

    async def prepare(self, ex: Exchange) -> None:
        await asyncio.sleep(0.01)
        if self.respond:
            ex.response = ex.request.reply().set(38, "APPR01").set(39, "00")

    def commit(self, ex: Exchange) -> None:
        self.commits += 1
        self.balance -= int(ex.request[4])


def key(ex: Exchange) -> str:
    return f"{ex.request[41]}|{ex.request[11]}"


def fingerprint(ex: Exchange) -> str:
    m = ex.request
    return f"{m.mti[:3]}|{m[2][-4:]}|{m[3]}|{m[4]}"  # last 4 digits: no card number in clear


async def test_flow_replays_a_committed_run_without_response(store: Any) -> None:
    ledger = Ledger(respond=False)
    flow = Flow(idempotency=store, key=key, fingerprint=fingerprint).group("main", ledger)
    exchanges = [Exchange(f"t{i}", request(7)) for i in range(10)]
    outcomes = await asyncio.gather(*(flow.run(ex, timeout=10) for ex in exchanges))
    assert outcomes.count(Outcome.COMMITTED) == 1 and outcomes.count(Outcome.REPLAYED) == 9
    late = Exchange("late", request(7))
    assert await flow.run(late) is Outcome.REPLAYED and late.response is None
    assert ledger.commits == 1 and ledger.balance == 100_000 - 2500


async def test_flow_refuses_the_same_key_for_another_request(store: Any) -> None:
    ledger = Ledger(respond=True)
    flow = Flow(idempotency=store, key=key, fingerprint=fingerprint).group("main", ledger)
    first = Exchange("first", request(8, amount=100))
    assert await flow.run(first) is Outcome.COMMITTED
    other = Exchange("other", request(8, amount=200_000, pan=OTHER_PAN))
    assert await flow.run(other) is Outcome.ABORTED
    assert isinstance(other.error, FingerprintMismatchError) and other.response is None
    again = Exchange("again", request(8, amount=100))
    assert await flow.run(again) is Outcome.REPLAYED
    assert again.response is not None and again.response[38] == "APPR01"
    assert again.response[2] == PAN  # refilled from the retransmission itself
    assert ledger.commits == 1 and ledger.balance == 100_000 - 100


async def test_sqlite_table_of_version_1_gains_the_fingerprint_column(tmp_path: Path) -> None:
    """A file made before fingerprints: its answers are still replayed, new ones keep theirs."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        """CREATE TABLE idempotency_migrations (
               version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at REAL NOT NULL);
           CREATE TABLE idempotency_keys (key TEXT PRIMARY KEY, state TEXT NOT NULL
               CHECK (state IN ('claimed', 'done')), owner TEXT, lease_until_us INTEGER,
               response TEXT, expires_us INTEGER) WITHOUT ROWID;
           INSERT INTO idempotency_migrations VALUES (1, 'idempotency_keys', 0);"""
    )
    old = Message("0210", {39: "00"}).to_json()
    conn.execute(
        "INSERT INTO idempotency_keys VALUES ('old', 'done', NULL, NULL, ?, 9999999999999999)",
        (old,),
    )
    conn.commit()
    conn.close()
    async with SqliteIdempotencyStore(path) as s:
        got = await s.claim("old")
        assert got is not None and got.fingerprint is None and got.response is not None
        assert await s.claim("new") is None
        await s.complete("new", None, FINGERPRINT)
        assert await s.claim("new") == Stored(None, FINGERPRINT)
    conn = sqlite3.connect(path)
    versions = [r[0] for r in conn.execute("SELECT version FROM idempotency_migrations")]
    conn.close()
    assert versions == [1, 2]


async def test_redis_reads_an_answer_of_the_earlier_format(redis_prefix: tuple[str, str]) -> None:
    import redis.asyncio as aioredis

    from isopace.store import RedisIdempotencyStore

    url, prefix = redis_prefix
    client = aioredis.Redis.from_url(url)
    await client.set(f"{prefix}k:old", "R" + Message("0210", {39: "05"}).to_json(), px=60_000)
    await client.aclose()
    async with RedisIdempotencyStore(url, prefix=prefix) as s:
        got = await s.claim("old")
        assert got is not None and got.fingerprint is None
        assert got.response is not None and got.response[39] == "05"
        # a fingerprint holding the separator is read back whole
        assert await s.claim("odd") is None
        await s.complete("odd", Message("0210", {39: "00"}), "a:b:{c}")
        got = await s.claim("odd")
        assert got is not None and got.fingerprint == "a:b:{c}" and got.response is not None
