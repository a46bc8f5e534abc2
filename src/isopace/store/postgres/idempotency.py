"""``PostgresIdempotencyStore``: the flow's idempotency store in PostgreSQL, for several nodes.

The claim is one atomic statement, ``INSERT ... ON CONFLICT (key) DO UPDATE ... WHERE <the existing
claim's lease or response expired> RETURNING``; two nodes can never both get it. Claims (and
completions) from concurrent runs are batched: the keys queued while a statement runs go together
into the next one (``unnest`` arrays, keys in sorted order so two nodes lock rows in the same
order), with ``batchers`` statements in flight at once. ``complete`` and ``release`` notify in the
same statement (``pg_notify(channel, key)``, delivered at commit); waiters LISTEN on one dedicated
connection per store and re-check when their key is notified; a re-check also happens at the
holder's lease expiry and every ``recheck`` seconds as a safety net if the listening connection
was lost (it reconnects by itself). Live claims' leases are renewed in the background; expired
rows purged ``PURGE_BATCH`` at a time. A done row keeps the answer: the protected response (NULL
for a run that committed without one, still an answer that is replayed) and the request's
fingerprint (NULL without one).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import asyncpg  # type: ignore[import-untyped]

from isopace._cardtext import error_text
from isopace.store._answer import stored_answer
from isopace.store._background import stop_tasks
from isopace.store._owners import OwnerTokens
from isopace.store.errors import IdempotencyError, LeaseLostError, StoreError
from isopace.store.postgres.pool import PG_ERRORS, Migration, PoolOwner
from isopace.store.protect import stored_json
from isopace.store.records import default_node

if TYPE_CHECKING:
    from isopace.flow import Stored
    from isopace.iso8583 import Message

__all__ = ["PURGE_BATCH", "PostgresIdempotencyStore"]

log = logging.getLogger("isopace.store")

#: Expired keys one purge statement deletes.
PURGE_BATCH = 500

MIGRATIONS: tuple[Migration, ...] = (
    (
        101,
        "idempotency_keys table",
        (
            """CREATE TABLE IF NOT EXISTS {s}.idempotency_keys (
                key TEXT PRIMARY KEY,
                state TEXT NOT NULL CHECK (state IN ('claimed', 'done')),
                owner TEXT,
                lease_until TIMESTAMPTZ,
                response TEXT,
                expires TIMESTAMPTZ
            )""",
            "CREATE INDEX IF NOT EXISTS idempotency_expires ON {s}.idempotency_keys (expires)",
        ),
    ),
    (
        102,
        "idempotency_keys.fingerprint (the request's, beside its answer)",
        ("ALTER TABLE {s}.idempotency_keys ADD COLUMN IF NOT EXISTS fingerprint TEXT",),
    ),
)


class _Batcher:
    """Calls queued while a statement runs go together into the next one (each caller gets
    its own result). An item's first element is its key: a batch holds each key once, later
    duplicates wait for the next batch. Several ``work`` tasks overlap round trips."""

    def __init__(
        self,
        run: Callable[[list[tuple[Any, ...]]], Awaitable[list[tuple[Any, ...]]]],
        name: str,
        max_batch: int = 500,
    ) -> None:
        self._run = run
        self.name = name
        self._max_batch = max_batch
        self._pending: list[tuple[tuple[Any, ...], asyncio.Future[tuple[Any, ...]]]] = []
        self._wakeup = asyncio.Event()

    def call(self, item: tuple[Any, ...]) -> asyncio.Future[tuple[Any, ...]]:
        fut: asyncio.Future[tuple[Any, ...]] = asyncio.get_running_loop().create_future()
        self._pending.append((item, fut))
        self._wakeup.set()
        return fut

    def _take(self) -> list[tuple[tuple[Any, ...], asyncio.Future[tuple[Any, ...]]]]:
        Entry = tuple[tuple[Any, ...], asyncio.Future[tuple[Any, ...]]]
        batch: list[Entry] = []
        rest: list[Entry] = []
        seen: set[Any] = set()
        for entry in self._pending:
            key = entry[0][0]
            if key in seen or len(batch) >= self._max_batch or entry[1].done():
                if not entry[1].done():
                    rest.append(entry)
                continue
            seen.add(key)
            batch.append(entry)
        self._pending = rest
        if not rest:
            self._wakeup.clear()
        return batch

    async def work(self) -> None:
        while True:
            await self._wakeup.wait()
            batch = self._take()
            if not batch:
                continue
            try:
                results = await self._run([item for item, _ in batch])
            except Exception as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), result in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(result)


class PostgresIdempotencyStore(PoolOwner):
    """The flow's ``IdempotencyStore`` protocol on PostgreSQL (see the module docstring)."""

    _migrations = MIGRATIONS

    def __init__(
        self,
        dsn_or_pool: str | asyncpg.Pool,
        *,
        schema: str = "isopace",
        ttl: float = 24 * 3600.0,
        lease: float = 30.0,
        recheck: float = 1.0,
        purge_interval: float = 60.0,
        node: str | None = None,
        min_size: int = 2,
        max_size: int = 10,
        batchers: int = 3,
    ) -> None:
        super().__init__(dsn_or_pool, schema=schema, min_size=min_size, max_size=max_size)
        self._batchers = max(1, batchers)
        if ttl <= 0 or lease <= 0:
            raise ValueError("ttl and lease must be positive")
        self.ttl = ttl
        self.lease = lease
        self._recheck = recheck
        self._purge_interval = purge_interval
        self._node = node if node is not None else default_node()
        self._owners = OwnerTokens(self._node)
        self._channel = f"isopace_idem_{self.schema}"
        self._held: dict[str, str] = {}
        self._waiters: dict[str, list[asyncio.Event]] = {}
        self._listener: asyncpg.Connection | None = None
        self._tasks: list[asyncio.Task[None]] = []
        s = self.schema
        # keys sorted inside a statement: two nodes' batches lock rows in the same order
        self._sql_claim = f"""WITH req AS (
                SELECT * FROM unnest($1::text[], $2::text[]) AS r(key, owner)),
            ins AS (
                INSERT INTO {s}.idempotency_keys AS k
                    (key, state, owner, lease_until, response, expires)
                SELECT key, 'claimed', owner, clock_timestamp() + $3 * interval '1 second',
                    NULL, NULL FROM req ORDER BY key
                ON CONFLICT (key) DO UPDATE SET state = 'claimed', owner = excluded.owner,
                    lease_until = excluded.lease_until, response = NULL, expires = NULL,
                    fingerprint = NULL
                WHERE (k.state = 'claimed' AND k.lease_until <= clock_timestamp())
                   OR (k.state = 'done' AND k.expires <= clock_timestamp())
                RETURNING k.key)
            SELECT r.key, i.key IS NOT NULL, k.state, k.response,
                EXTRACT(EPOCH FROM (k.lease_until - clock_timestamp()))::float8, k.fingerprint
            FROM req r LEFT JOIN ins i ON i.key = r.key
                LEFT JOIN {s}.idempotency_keys k ON k.key = r.key"""
        self._sql_complete = f"""WITH req AS (
                SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $6::text[])
                    AS r(key, response, owner, fingerprint)),
            u AS (
                INSERT INTO {s}.idempotency_keys AS k
                    (key, state, owner, lease_until, response, expires, fingerprint)
                SELECT key, 'done', owner, NULL, response,
                    clock_timestamp() + $4 * interval '1 second', fingerprint
                FROM req ORDER BY key
                ON CONFLICT (key) DO UPDATE SET state = 'done', owner = NULL,
                    lease_until = NULL, response = excluded.response, expires = excluded.expires,
                    fingerprint = excluded.fingerprint
                WHERE k.state = 'done' OR k.owner = excluded.owner
                   OR k.lease_until <= clock_timestamp()
                RETURNING k.key)
            SELECT key, pg_notify($5, key) FROM u"""
        self._sql_release = f"""WITH d AS (
                DELETE FROM {s}.idempotency_keys
                WHERE key = $1 AND state = 'claimed' AND owner = $2 RETURNING key)
            SELECT pg_notify($3, key) FROM d"""

    def _error(self, text: str) -> StoreError:
        return IdempotencyError(f"postgres idempotency {self.schema}: {text}")

    async def _started(self) -> None:
        await self._listen()
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._maintain()))
        self._claims = _Batcher(self._claim_batch, "claim")
        self._completes = _Batcher(self._complete_batch, "complete")
        for _ in range(self._batchers):
            self._tasks.append(loop.create_task(self._claims.work()))
            self._tasks.append(loop.create_task(self._completes.work()))

    async def _claim_batch(self, items: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        rows = await self.pool.fetch(
            self._sql_claim, [i[0] for i in items], [i[1] for i in items], self.lease
        )
        found = {r[0]: r for r in rows}
        results: list[tuple[Any, ...]] = []
        for key, _ in items:
            r = found.get(key)
            if r is None or (not r[1] and r[2] is None):
                results.append(("retry",))
            elif r[1]:
                results.append(("claimed",))
            elif r[2] == "done":
                results.append(("done", r[3], r[5]))
            else:
                results.append(("held", max(float(r[4] or 0.0), 0.0)))
        return results

    async def _complete_batch(self, items: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        rows = await self.pool.fetch(
            self._sql_complete,
            [i[0] for i in items],
            [i[1] for i in items],
            [i[2] for i in items],
            self.ttl,
            self._channel,
            [i[3] for i in items],
        )
        done = {r[0] for r in rows}
        return [(key in done,) for key, _, _, _ in items]

    # -- notifications -------------------------------------------------------------------------

    async def _listen(self) -> None:
        conn: asyncpg.Connection = await self.pool.acquire()
        try:
            await conn.add_listener(self._channel, self._notified)
            conn.add_termination_listener(self._listener_lost)
        except BaseException:
            await self.pool.release(conn)
            raise
        self._listener = conn

    def _notified(self, conn: object, pid: int, channel: str, payload: object) -> None:
        for event in self._waiters.pop(str(payload), ()):
            event.set()

    def _listener_lost(self, conn: object) -> None:
        if self._closed:
            return
        log.warning("idempotency: the LISTEN connection was lost; reconnecting")
        self._listener = None
        for events in self._waiters.values():  # notifications may have been missed
            for event in events:
                event.set()
        self._waiters.clear()
        self._tasks.append(asyncio.get_running_loop().create_task(self._relisten()))

    async def _relisten(self) -> None:
        delay = 0.05
        while not self._closed and self._listener is None:
            try:
                await self._listen()
                log.info("idempotency: LISTEN connection re-established")
                return
            except PG_ERRORS as exc:
                log.warning("idempotency: LISTEN reconnect failed: %s", error_text(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    # -- the IdempotencyStore protocol ----------------------------------------------------------

    async def _call(self, what: str, key: str, method: str, sql: str, *args: Any) -> Any:
        await self.open()
        try:
            return await getattr(self.pool, method)(sql, *args)
        except Exception as exc:  # asyncpg also raises InternalClientError on a dropped link
            raise IdempotencyError(
                f"postgres idempotency {self.schema}: {what} of key {key!r} failed: {exc}"
            ) from exc

    async def _batched(
        self, batcher: _Batcher, what: str, key: str, item: tuple[Any, ...]
    ) -> tuple[Any, ...]:
        await self.open()
        if self._closed:
            raise IdempotencyError(f"postgres idempotency {self.schema}: closed")
        try:
            return await batcher.call(item)
        except Exception as exc:  # asyncpg also raises InternalClientError on a dropped link
            raise IdempotencyError(
                f"postgres idempotency {self.schema}: {what} of key {key!r} failed: {exc}"
            ) from exc

    async def claim(self, key: str) -> Stored | None:
        """Claim ``key`` (None: the caller owns it), or get the stored answer to replay."""
        await self.open()
        while True:
            if key in self._held:  # a run of this process holds it: wait for it locally
                event = asyncio.Event()
                self._waiters.setdefault(key, []).append(event)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), self._recheck)
                continue
            owner = self._owners.next()
            event = asyncio.Event()
            self._waiters.setdefault(key, []).append(event)  # before the check: no lost wake-up
            try:
                result = await self._batched(self._claims, "claim", key, (key, owner))
                if result[0] == "claimed":
                    self._held[key] = owner
                    return None
                if result[0] == "retry":
                    continue  # released meanwhile (or raced in this batch): try again at once
                if result[0] == "done":
                    return stored_answer(result[1], result[2])
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), min(result[1] + 0.01, self._recheck))
            finally:
                events = self._waiters.get(key)
                if events is not None and event in events:
                    events.remove(event)
                    if not events:
                        del self._waiters[key]

    async def complete(
        self, key: str, response: Message | None, fingerprint: str | None = None
    ) -> None:
        """Store the answer for ``key`` (for ``ttl``) and notify every node's waiters."""
        owner = self._held.get(key)
        text = stored_json(response) if response is not None else None
        try:
            (ok,) = await self._batched(
                self._completes, "complete", key, (key, text, owner, fingerprint)
            )
        finally:
            if self._held.get(key) == owner:
                self._held.pop(key, None)
            self._notified(None, 0, self._channel, key)
        if not ok:
            raise LeaseLostError(key)

    async def release(self, key: str) -> None:
        """Give the claim on ``key`` up; waiters (on any node) try to claim it again."""
        owner = self._held.pop(key, None)
        try:
            if owner is not None:
                await self._call(
                    "release", key, "fetch", self._sql_release, key, owner, self._channel
                )
        finally:
            self._notified(None, 0, self._channel, key)

    # -- background maintenance -----------------------------------------------------------------

    async def _maintain(self) -> None:
        loop = asyncio.get_running_loop()
        next_purge = loop.time()
        s = self.schema
        while not self._closed:
            try:
                if self._held:
                    keys, owners = zip(*self._held.items(), strict=True)
                    await self.pool.execute(
                        f"""UPDATE {s}.idempotency_keys AS k
                            SET lease_until = clock_timestamp() + $3 * interval '1 second'
                            FROM unnest($1::text[], $2::text[]) AS u(key, owner)
                            WHERE k.key = u.key AND k.owner = u.owner AND k.state = 'claimed'""",
                        list(keys),
                        list(owners),
                        self.lease,
                    )
                if loop.time() >= next_purge:
                    await self.purge()
                    next_purge = loop.time() + self._purge_interval
            except Exception as exc:
                log.warning("idempotency: maintenance failed: %s", error_text(exc))
            await asyncio.sleep(min(self.lease / 3, self._purge_interval))

    async def purge(self) -> int:
        """Delete expired responses and claims now; return how many rows went. At most
        ``PURGE_BATCH`` rows per statement (a day's keys expire together: one unbounded DELETE
        would hold its row locks and the table's vacuum back for as long as it takes)."""
        total = 0
        while True:
            status = await self._call(
                "purge",
                "*",
                "execute",
                f"""DELETE FROM {self.schema}.idempotency_keys WHERE key IN (
                    SELECT key FROM {self.schema}.idempotency_keys
                    WHERE (state = 'done' AND expires <= clock_timestamp())
                       OR (state = 'claimed' AND lease_until <= clock_timestamp())
                    LIMIT $1)""",
                PURGE_BATCH,
            )
            purged = int(str(status).rsplit(" ", 1)[-1])
            total += purged
            if purged < PURGE_BATCH:
                return total
            await asyncio.sleep(0)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await stop_tasks(self._tasks)
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.remove_listener(self._channel, self._notified)
            with contextlib.suppress(Exception):
                await self.pool.release(self._listener)
            self._listener = None
        for events in self._waiters.values():
            for event in events:
                event.set()
        await self._close_pool()
