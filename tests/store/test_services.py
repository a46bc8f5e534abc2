"""PostgreSQL journal / idempotency store and Redis idempotency store against the real services:
the protocol, queries, and bad conditions (connections dropped mid-run)."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from isopace.flow import CONTINUE, Event, EventKind, Exchange, Flow, Outcome
from isopace.iso8583 import Message
from isopace.store import (
    IdempotencyError,
    PostgresIdempotencyStore,
    PostgresJournal,
    RedisIdempotencyStore,
)
from tests.store.helpers import PAN, approve, request


class Approve:
    name = "approve"

    def __init__(self) -> None:
        self.runs = 0

    async def prepare(self, ex: Exchange) -> object:
        self.runs += 1
        await asyncio.sleep(0.002)
        approve(ex)
        return CONTINUE


async def _app_pool(dsn: str, app: str) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        dsn, min_size=2, max_size=8, server_settings={"application_name": app}
    )


async def _terminate(dsn: str, app: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = $1",
                app,
            )
        )
    finally:
        await conn.close()


async def test_postgres_journal_rows_and_queries(pg: tuple[str, str]) -> None:
    dsn, schema = pg
    async with PostgresJournal(dsn, schema=schema, hmac_key="k") as journal:
        flow = Flow(journal=journal).group("main", Approve())
        results = await asyncio.gather(
            *(flow.run(Exchange(f"t{i}", request(i))) for i in range(100))
        )
        assert set(results) == {Outcome.COMMITTED}
        await journal.flush()
        assert journal.stats["batches"] < journal.stats["rows"] == 300
        records = await journal.by_id("t7")
        assert [r.kind for r in records] == ["BEGIN", "COMMITTING", "COMMITTED"]
        assert records[0].pan_masked == "476173******0010"
        assert records[0].request is not None and 2 in records[0].request.redacted
        assert len(await journal.by_pan(PAN)) == 300
        now = datetime.now(UTC)
        assert len(await journal.by_time(now - timedelta(minutes=1), now, kind="COMMITTED")) == 100
        counts = await journal.counts()
        assert counts["COMMITTED"] == 100 and counts["IN_DOUBT"] == 0
        raw = await journal.pool.fetch(f"SELECT * FROM {schema}.journal")
        assert PAN not in repr([tuple(r) for r in raw])


async def test_postgres_connection_dropped_mid_run(
    pg: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    dsn, schema = pg
    app = f"isopace-test-{uuid.uuid4().hex[:8]}"
    pool = await _app_pool(dsn, app)
    journal = PostgresJournal(pool, schema=schema)
    store = PostgresIdempotencyStore(pool, schema=schema, lease=1.0)
    await journal.open()
    await store.open()
    stage = Approve()
    flow = Flow(journal=journal, idempotency=store, key=lambda ex: ex.id).group("main", stage)
    try:
        with caplog.at_level(logging.WARNING):
            load = asyncio.gather(
                *(flow.run(Exchange(f"a{i}", request(i))) for i in range(300)),
                return_exceptions=True,
            )
            await asyncio.sleep(0.05)
            killed = await _terminate(dsn, app)
            outcomes = await load
        assert killed >= 1
        assert not [o for o in outcomes if isinstance(o, BaseException)]  # the flow never raised
        # errors were clear, and afterwards everything works again
        assert "postgres" in caplog.text
        after = await asyncio.gather(*(flow.run(Exchange(f"b{i}", request(i))) for i in range(50)))
        assert set(after) == {Outcome.COMMITTED}
        for i in range(50):
            assert [r.kind for r in await journal.by_id(f"b{i}")][-1] == "COMMITTED"
        # a replay after the drop still works (the LISTEN connection came back)
        ex = Exchange("b3", request(3))
        assert await flow.run(ex) is Outcome.REPLAYED
        # claims whose outcome was lost with the connection are freed by their lease
        stuck = await journal.pool.fetch(
            f"SELECT key FROM {schema}.idempotency_keys WHERE state = 'claimed'"
        )
        assert all(r[0].startswith("a") for r in stuck)
        await asyncio.sleep(1.1)
        again = await asyncio.gather(*(flow.run(Exchange(r[0], request())) for r in stuck))
        assert set(again) <= {Outcome.COMMITTED, Outcome.REPLAYED}
    finally:
        await store.close()
        await journal.close()
        await pool.close()


async def test_postgres_claim_waiters_and_lease(pg: tuple[str, str]) -> None:
    dsn, schema = pg
    a = PostgresIdempotencyStore(dsn, schema=schema, lease=0.5, max_size=3)
    b = PostgresIdempotencyStore(dsn, schema=schema, lease=0.5, max_size=3)
    async with a, b:
        assert await a.claim("k") is None
        waiter = asyncio.create_task(b.claim("k"))
        await asyncio.sleep(0.1)
        assert not waiter.done()
        response = Message("0210", {39: "00", 2: PAN})
        await a.complete("k", response)
        got = await asyncio.wait_for(waiter, 2)
        assert got is not None and got.response is not None
        assert got.response[39] == "00" and 2 in got.response.redacted
        # release wakes a waiter, which then owns the key
        assert await a.claim("r") is None
        waiter = asyncio.create_task(b.claim("r"))
        await asyncio.sleep(0.05)
        await a.release("r")
        assert await asyncio.wait_for(waiter, 2) is None
        await b.release("r")
    # a crashed owner (closed without complete or release): its lease expires
    c = PostgresIdempotencyStore(dsn, schema=schema, lease=0.3, max_size=2)
    await c.open()
    assert await c.claim("crash") is None
    c._held.clear()  # stop renewing, as a dead process would
    await c.close()
    async with PostgresIdempotencyStore(dsn, schema=schema, lease=0.3, max_size=2) as d:
        t0 = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(d.claim("crash"), 3) is None
        assert asyncio.get_running_loop().time() - t0 < 1.5
        await d.release("crash")


async def test_redis_claim_protocol_and_lease(redis_prefix: tuple[str, str]) -> None:
    url, prefix = redis_prefix
    async with (
        RedisIdempotencyStore(url, prefix=prefix, lease=0.5) as a,
        RedisIdempotencyStore(url, prefix=prefix, lease=0.5) as b,
    ):
        assert await a.claim("k") is None
        waiter = asyncio.create_task(b.claim("k"))
        await asyncio.sleep(0.1)
        assert not waiter.done()
        await a.complete("k", Message("0210", {39: "00", 2: PAN}))
        got = await asyncio.wait_for(waiter, 2)
        assert got is not None and got.response is not None
        assert got.response[39] == "00" and 2 in got.response.redacted
        raw = await aioredis.Redis.from_url(url).get(f"{prefix}k:k")
        assert raw is not None and PAN.encode() not in raw
        # the lease is renewed while held
        assert await a.claim("long") is None
        await asyncio.sleep(0.8)
        waiter = asyncio.create_task(b.claim("long"))
        await asyncio.sleep(0.1)
        assert not waiter.done()
        await a.release("long")
        assert await asyncio.wait_for(waiter, 2) is None
        await b.release("long")


async def test_redis_connections_killed_mid_run(
    redis_prefix: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    url, prefix = redis_prefix
    admin = aioredis.Redis.from_url(url)
    store = RedisIdempotencyStore(url, prefix=prefix)
    stage = Approve()
    flow = Flow(idempotency=store, key=lambda ex: ex.id).group("main", stage)
    name = f"isopace-idem-{prefix.strip(':')}"
    try:
        assert await flow.run(Exchange("warm", request())) is Outcome.COMMITTED
        with caplog.at_level(logging.WARNING):
            load = asyncio.gather(
                *(flow.run(Exchange(f"a{i}", request(i))) for i in range(200)),
                return_exceptions=True,
            )
            await asyncio.sleep(0.02)
            clients = await admin.client_list()
            ids = [c["id"] for c in clients if c.get("name") == name]
            for cid in ids:
                await admin.execute_command("CLIENT", "KILL", "ID", cid)
            outcomes = await load
        assert ids
        assert not [o for o in outcomes if isinstance(o, BaseException)]
        assert set(outcomes) <= {Outcome.COMMITTED, Outcome.ABORTED}
        # afterwards: claims, replays and waiters work again (subscription re-established)
        after = await asyncio.gather(
            *(flow.run(Exchange(f"b{i % 10}", request(i))) for i in range(40))
        )
        assert after.count(Outcome.COMMITTED) == 10 and after.count(Outcome.REPLAYED) == 30
    finally:
        await store.close()
        await admin.aclose()


async def test_redis_down_is_a_clear_error() -> None:
    store = RedisIdempotencyStore("redis://127.0.0.1:1/0", prefix="nowhere:")
    try:
        with pytest.raises(IdempotencyError, match="claim of key 'k'"):
            await store.claim("k")
    finally:
        await store.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_redis(port: int, tmp: str) -> subprocess.Popen[bytes]:
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(
        ["redis-server", *args, "--dir", tmp],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.02)
    proc.kill()
    raise AssertionError("redis-server did not start")


async def test_redis_server_restarted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A private redis-server (so the shared one is not disturbed) is stopped and restarted."""
    port = _free_port()
    server = _start_redis(port, str(tmp_path))
    store = RedisIdempotencyStore(f"redis://127.0.0.1:{port}/0", prefix="restart:", recheck=0.2)
    flow = Flow(idempotency=store, key=lambda ex: ex.id).group("main", Approve())
    try:
        assert await flow.run(Exchange("before", request())) is Outcome.COMMITTED
        server.terminate()
        server.wait()
        with caplog.at_level(logging.WARNING):
            down = Exchange("down", request())
            assert await flow.run(down) is Outcome.ABORTED  # refused: no double processing
        assert isinstance(down.error, IdempotencyError)
        assert "claim of key 'down'" in str(down.error)
        server = _start_redis(port, str(tmp_path))
        assert await flow.run(Exchange("after", request())) is Outcome.COMMITTED
        # waiters are woken through the re-established subscription
        outcomes = await asyncio.gather(*(flow.run(Exchange("dup", request())) for _ in range(5)))
        assert sorted(o.name for o in outcomes) == ["COMMITTED"] + ["REPLAYED"] * 4
    finally:
        await store.close()
        server.terminate()
        server.wait()


async def test_postgres_in_doubt_states_and_committed_response(pg: tuple[str, str]) -> None:
    """The one-statement batch keeps inflight right: begun, committing, finished."""
    dsn, schema = pg
    async with PostgresJournal(dsn, schema=schema, node="n1") as journal:
        for tx, kinds in (
            ("t-began", ("BEGIN",)),
            ("t-committing", ("BEGIN", "COMMITTING")),
            ("t-done", ("BEGIN", "COMMITTING", "COMMITTED")),
            ("t-aborted", ("BEGIN", "ABORTED")),
        ):
            ex = Exchange.restore(tx, request(), durable={"hold": tx}, joined=["a"])
            ex.response = Message("0210", {39: "00"})
            for kind in kinds:
                await journal.record(ex, Event(EventKind[kind]))
        doubt = {d.tx_id: d for d in await journal.in_doubt()}
        assert set(doubt) == {"t-began", "t-committing"}
        assert doubt["t-committing"].committing and not doubt["t-began"].committing
        assert doubt["t-committing"].durable == {"hold": "t-committing"}
        assert doubt["t-committing"].response is not None
        assert doubt["t-began"].request is not None
        done = await journal.by_id("t-done")
        assert done[2].kind == "COMMITTED" and done[2].response is not None
        assert done[2].response[39] == "00"
        assert (await journal.counts())["IN_DOUBT"] == 2
