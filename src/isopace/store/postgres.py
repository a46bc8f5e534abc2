"""PostgreSQL journal and idempotency store (asyncpg), for several nodes sharing one database.

``asyncpg`` is imported here only: install ``isopace[postgres]``.

Both classes take a DSN (they then own a connection pool) or an existing ``asyncpg.Pool``, and a
``schema`` (created if missing) holding their tables. They connect lazily (or on ``await open()``
/ ``async with``); the schema is versioned in ``<schema>.schema_migrations`` and migrated on open
under a transaction-level advisory lock, so nodes starting together migrate once.

``PostgresJournal`` stores exactly what :class:`~isopace.store.SqliteJournal` stores (same rows,
built by the same :class:`~isopace.store.records.RowBuilder`: each message protected and stored
once per transaction, a COMMITTED row's NULL response read from its COMMITTING row; same card
data protection and operator queries); its ``inflight`` table keeps the in-doubt transactions'
request, decision and response. Group commit: one writer task takes every queued row and writes
the batch with ONE statement (atomic by itself: no BEGIN / COMMIT round trips): a multi-row
``INSERT ... SELECT FROM unnest($1::text[], ...)`` for the journal with the ``inflight`` upsert and
delete as data-modifying CTEs (asyncpg prepares and caches it per connection); each ``record``
awaits its own batch's commit; ``writers`` batches (default 3) are in flight at once, so the
network round trips and the server's commit overlap. The rows arriving until a writer takes
them (at most ``max_batch``) form one batch whose single future wakes them all (no future nor
queue operation per row), as in SqliteJournal. ``wait_final=False``: COMMITTED / ABORTED /
IDEMPOTENT_HIT are queued without waiting, as in SqliteJournal. ``group_commit=False`` commits
each event alone.

``PostgresIdempotencyStore``: the claim is one atomic statement, ``INSERT ... ON CONFLICT (key) DO
UPDATE ... WHERE <the existing claim's lease or response expired> RETURNING``; two nodes can
never both get it. Claims (and completions) from concurrent runs are batched: the keys queued
while a statement runs go together into the next one (``unnest`` arrays, keys in sorted order so
two nodes lock rows in the same order), with ``batchers`` statements in flight at once.
``complete`` and ``release`` notify in the same statement
(``pg_notify(channel, key)``, delivered at commit); waiters LISTEN on one dedicated connection per
store and re-check when their key is notified; a re-check also happens at the holder's lease
expiry and every ``recheck`` seconds as a safety net if the listening connection was lost (it
reconnects by itself). Live claims' leases are renewed in the background; expired rows purged.
A done row keeps the answer: the protected response (NULL for a run that committed without one,
still an answer that is replayed) and the request's fingerprint (NULL without one).

Retention: ``PostgresJournal.prune(before)`` deletes the records of the transactions that ended
before a date, ``PRUNE_BATCH`` transactions per statement, never one in doubt; the idempotency
store purges expired keys ``PURGE_BATCH`` at a time.

A dropped connection (server restart, ``pg_terminate_backend``) fails the operations running on
it with :class:`JournalError` / :class:`IdempotencyError`; the pool replaces the connection and
the next operations succeed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import asyncpg  # type: ignore[import-untyped]

from isopace._cardtext import error_text, mask_text
from isopace.store._answer import stored_answer
from isopace.store._background import stop_tasks
from isopace.store._owners import OwnerTokens
from isopace.store._writer import Batch
from isopace.store.errors import IdempotencyError, JournalError, LeaseLostError, StoreError
from isopace.store.keys import REKEY_BATCH, KeyRing, KeyUsage, StoreKeys, key_id_sql, rekey_value
from isopace.store.protect import CardDataProtector, stored_json
from isopace.store.records import (
    AT_US,
    KIND,
    NO_RESPONSE,
    TX_ID,
    InDoubt,
    JournalRecord,
    Row,
    RowBuilder,
    default_node,
    loads_durable,
    loads_joined,
    row_time,
)

if TYPE_CHECKING:
    from isopace.flow import Event, Exchange, Stored
    from isopace.iso8583 import Message

__all__ = ["PostgresIdempotencyStore", "PostgresJournal"]

log = logging.getLogger("isopace.store")

_NO_WAIT = frozenset({"COMMITTED", "ABORTED", "IDEMPOTENT_HIT"})
#: Transactions one journal pruning statement deletes, expired keys one purge statement deletes.
PRUNE_BATCH = 200
PURGE_BATCH = 500
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,40}$")

_JOURNAL_MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (
        1,
        "journal and inflight tables",
        (
            """CREATE TABLE IF NOT EXISTS {s}.journal (
                seq BIGSERIAL PRIMARY KEY,
                tx_id TEXT NOT NULL,
                kind TEXT NOT NULL,
                at TIMESTAMPTZ NOT NULL,
                node TEXT NOT NULL DEFAULT '',
                joined TEXT NOT NULL DEFAULT '[]',
                durable TEXT,
                request TEXT,
                response TEXT,
                pan_masked TEXT,
                pan_hmac TEXT,
                error TEXT
            )""",
            "CREATE INDEX IF NOT EXISTS journal_tx ON {s}.journal (tx_id)",
            "CREATE INDEX IF NOT EXISTS journal_at ON {s}.journal (at)",
            """CREATE INDEX IF NOT EXISTS journal_pan ON {s}.journal (pan_hmac)
               WHERE pan_hmac IS NOT NULL""",
            """CREATE TABLE IF NOT EXISTS {s}.inflight (
                tx_id TEXT PRIMARY KEY,
                state TEXT NOT NULL,
                node TEXT NOT NULL,
                began_at TIMESTAMPTZ NOT NULL,
                updated_at TIMESTAMPTZ NOT NULL,
                joined TEXT NOT NULL DEFAULT '[]',
                durable TEXT,
                request TEXT,
                response TEXT
            )""",
        ),
    ),
)

_IDEMPOTENCY_MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
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

_PG_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    asyncio.TimeoutError,
)


def _check_schema(schema: str) -> str:
    if not _IDENT.match(schema):
        raise ValueError(f"schema must be a plain SQL identifier, not {schema!r}")
    return schema


async def _migrate(
    pool: asyncpg.Pool,
    schema: str,
    migrations: tuple[tuple[int, str, tuple[str, ...]], ...],
) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"isopace:{schema}")
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        await conn.execute(
            f"""CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (
                version INTEGER PRIMARY KEY, description TEXT NOT NULL,
                applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"""
        )
        done = {r[0] for r in await conn.fetch(f"SELECT version FROM {schema}.schema_migrations")}
        for version, description, statements in migrations:
            if version in done:
                continue
            for statement in statements:
                await conn.execute(statement.format(s=schema))
            await conn.execute(
                f"INSERT INTO {schema}.schema_migrations (version, description) VALUES ($1, $2)",
                version,
                description,
            )
            log.info("postgres %s: applied schema migration %d (%s)", schema, version, description)


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


class _PoolOwner:
    """Lazy pool creation and schema migration shared by the journal and the store."""

    _migrations: tuple[tuple[int, str, tuple[str, ...]], ...] = ()

    def __init__(
        self,
        dsn_or_pool: str | asyncpg.Pool,
        *,
        schema: str,
        min_size: int,
        max_size: int,
    ) -> None:
        self.schema = _check_schema(schema)
        if isinstance(dsn_or_pool, str):
            self._dsn: str | None = dsn_or_pool
            self._pool: asyncpg.Pool | None = None
        else:
            self._dsn = None
            self._pool = dsn_or_pool
        self._owns_pool = self._pool is None
        self._min_size = min_size
        self._max_size = max_size
        self._opened = False
        self._open_lock: asyncio.Lock | None = None
        self._closed = False

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreError("not open: await open() first")
        return self._pool

    async def open(self) -> Self:
        """Create the pool (when given a DSN) and migrate the schema; safe to call again."""
        if self._opened:
            return self
        if self._closed:
            raise StoreError(f"postgres {self.schema}: closed")
        if self._open_lock is None:
            self._open_lock = asyncio.Lock()
        async with self._open_lock:
            if self._opened:
                return self
            try:
                if self._pool is None:
                    self._pool = await asyncpg.create_pool(
                        self._dsn, min_size=self._min_size, max_size=self._max_size
                    )
                await _migrate(self._pool, self.schema, self._migrations)
            except _PG_ERRORS as exc:
                raise self._error(f"cannot open: {exc}") from exc
            await self._started()
            self._opened = True
        return self

    def _error(self, text: str) -> StoreError:
        return StoreError(f"postgres {self.schema}: {text}")

    async def _started(self) -> None:
        pass

    async def _close_pool(self) -> None:
        self._closed = True
        if self._owns_pool and self._pool is not None:
            await self._pool.close()

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._close_pool()


class PostgresJournal(_PoolOwner):
    """Durable, group-committed flow journal in PostgreSQL (see the module docstring)."""

    _migrations = _JOURNAL_MIGRATIONS

    def __init__(
        self,
        dsn_or_pool: str | asyncpg.Pool,
        *,
        schema: str = "isopace",
        hmac_key: KeyRing | bytes | str | None = None,
        node: str | None = None,
        group_commit: bool = True,
        max_batch: int = 1024,
        min_size: int = 2,
        max_size: int = 10,
        wait_final: bool = True,
        writers: int = 3,
    ) -> None:
        super().__init__(dsn_or_pool, schema=schema, min_size=min_size, max_size=max_size)
        self._wait_final = wait_final
        self.node = node if node is not None else default_node()
        self._protector = CardDataProtector()
        self.keys = StoreKeys(self._protector)
        self.keys.use(hmac_key)
        self._rows = RowBuilder(self._protector, self.node)
        self._group_commit = group_commit
        self._max_batch = max_batch if group_commit else 1
        #: batches to write; a batch is queued when its first row arrives and filled until a
        #: writer takes it (everything on the event loop's thread)
        self._queue: asyncio.Queue[Batch[Row] | None] = asyncio.Queue()
        self._filling: Batch[Row] | None = None
        self._writers: list[asyncio.Task[None]] = []
        self._nwriters = max(1, writers)
        self._batches_running: set[asyncio.Future[None]] = set()
        self.batches = 0
        self.rows = 0
        s = self.schema
        # One statement per batch (atomic on its own, so no BEGIN / COMMIT round trips): the
        # rows, then inflight: upsert the last BEGIN / COMMITTING of each transaction not
        # finished in the batch, delete the transactions it finishes.
        self._sql_write = f"""WITH r AS (
                SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[],
                    $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[],
                    $11::text[]) WITH ORDINALITY AS u(t, k, a, n, j, d, rq, rs, pm, ph, e, o)
            ), ins AS (
                INSERT INTO {s}.journal (tx_id, kind, at, node, joined, durable, request,
                    response, pan_masked, pan_hmac, error)
                SELECT t, k, a, n, COALESCE(j, '[]'), d, rq, rs, pm, ph, e FROM r ORDER BY o
            ), fin AS (
                SELECT DISTINCT t FROM r WHERE k IN ('COMMITTED', 'ABORTED')
            ), up AS (
                SELECT DISTINCT ON (t) t, k, a, n, j, d, rq, rs FROM r
                WHERE k IN ('BEGIN', 'COMMITTING') AND t NOT IN (SELECT t FROM fin)
                ORDER BY t, o DESC
            ), ups AS (
                INSERT INTO {s}.inflight AS f (tx_id, state, node, began_at, updated_at, joined,
                    durable, request, response)
                SELECT t, CASE WHEN k = 'BEGIN' THEN 'began' ELSE 'committing' END, n, a, a,
                    COALESCE(j, '[]'), d, rq, rs FROM up
                ON CONFLICT (tx_id) DO UPDATE SET state = excluded.state,
                    updated_at = excluded.updated_at, joined = excluded.joined,
                    durable = excluded.durable, response = excluded.response,
                    node = CASE WHEN excluded.state = 'began' THEN excluded.node ELSE f.node END,
                    began_at = CASE WHEN excluded.state = 'began' THEN excluded.began_at
                                    ELSE f.began_at END,
                    request = CASE WHEN excluded.state = 'began' THEN excluded.request
                                   ELSE f.request END
            )
            DELETE FROM {s}.inflight WHERE tx_id IN (SELECT t FROM fin)"""
        self._columns = self._COLUMNS.format(s=s)
        self._sql_prune = f"""DELETE FROM {s}.journal WHERE tx_id IN (
                SELECT f.tx_id FROM {s}.journal f
                WHERE f.at < $1 AND f.kind IN ('COMMITTED', 'ABORTED', 'IDEMPOTENT_HIT')
                  AND NOT EXISTS (SELECT 1 FROM {s}.inflight i WHERE i.tx_id = f.tx_id)
                LIMIT $2)"""

    def _error(self, text: str) -> StoreError:
        return JournalError(f"postgres journal {self.schema}: {text}")

    async def _started(self) -> None:
        loop = asyncio.get_running_loop()
        self._writers = [loop.create_task(self._write_loop()) for _ in range(self._nwriters)]

    # -- the Journal protocol ------------------------------------------------------------------

    async def record(self, ex: Exchange, event: Event) -> None:
        """Journal ``event`` of ``ex``; returns once its batch is committed (or JournalError)."""
        row = self._rows.build(ex, event)
        if not self._opened:
            await self.open()
        if self._closed:
            raise JournalError(f"postgres journal {self.schema}: closed")
        batch = self._batch()
        batch.rows.append(row)
        if not self._wait_final and row[KIND] in _NO_WAIT:
            return  # see SqliteJournal: recovery re-derives it
        try:
            try:
                await batch.future  # shared by the batch's records: one wake-up for all
            except asyncio.CancelledError as cancelled:
                await batch.resume(cancelled)
        except JournalError as exc:
            if row[KIND] == "COMMITTING":
                self._rows.forget(row[TX_ID])
            raise JournalError(str(exc)) from exc.__cause__

    def _batch(self) -> Batch[Row]:
        batch = self._filling
        if batch is None or len(batch.rows) >= self._max_batch:
            batch = self._filling = Batch(asyncio.get_running_loop())
            self._queue.put_nowait(batch)
        return batch

    def _seal(self, batch: Batch[Row]) -> Batch[Row]:
        if batch is self._filling:
            self._filling = None
        return batch

    async def flush(self) -> None:
        """Wait until every record queued so far is written (queries do this first)."""
        if not self._writers or self._closed:
            return
        running = list(self._batches_running)  # batches taken by writers, still being written
        batch = self._batch()
        fut: asyncio.Future[None] = batch.loop.create_future()
        if batch.waiters is None:
            batch.waiters = []
        batch.waiters.append(fut)
        with contextlib.suppress(JournalError):
            await fut
        if running:
            await asyncio.wait(running)

    async def _write_loop(self) -> None:
        stop = False
        while not stop:
            item = await self._queue.get()
            if item is None:
                break
            batches = [self._seal(item)]
            size = len(item.rows)
            while size < self._max_batch and not self._queue.empty():
                nxt = self._queue.get_nowait()
                if nxt is None:
                    stop = True
                    break
                batches.append(self._seal(nxt))
                size += len(nxt.rows)
            error: BaseException | None = None
            rows = [row for b in batches for row in b.rows]
            running: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._batches_running.add(running)
            try:
                if rows:
                    await self._write(rows)
                    self.batches += 1
                    self.rows += len(rows)
            except Exception as exc:  # never let the writer die: fail the batch instead
                error = JournalError(
                    f"postgres journal {self.schema}: write failed: {mask_text(str(exc))}"
                )
                error.__cause__ = exc
                log.warning("journal: batch of %d rows failed: %s", len(rows), error_text(error))
            self._batches_running.discard(running)
            running.set_result(None)
            for b in batches:
                b.settle(error)

    async def _write(self, rows: list[Row]) -> None:
        columns: list[list[Any]] = [list(c) for c in zip(*rows, strict=True)]
        columns[AT_US] = [row_time(r) for r in rows]
        async with self.pool.acquire() as conn:
            await conn.execute(self._sql_write, *columns)

    @property
    def stats(self) -> dict[str, int]:
        return {"rows": self.rows, "batches": self.batches}

    async def close(self) -> None:
        """Write what is queued, stop the writer, close the pool (when this journal made it)."""
        if self._closed:
            return
        self._closed = True
        for _ in self._writers:
            self._queue.put_nowait(None)
        if self._writers:
            await asyncio.gather(*self._writers)
        await self._close_pool()

    # -- queries ---------------------------------------------------------------------------------

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        await self.open()
        await self.flush()
        try:
            return list(await self.pool.fetch(sql, *args))
        except Exception as exc:
            raise StoreError(f"postgres journal {self.schema}: query failed: {exc}") from exc

    #: A COMMITTED row's NULL response is its transaction's COMMITTING response (written once).
    _COLUMNS = """j.seq, j.tx_id, j.kind, j.at, j.node, j.joined, j.durable, j.request,
        CASE WHEN j.response IS NULL AND j.kind = 'COMMITTED' THEN
            (SELECT c.response FROM {s}.journal c WHERE c.tx_id = j.tx_id
             AND c.kind = 'COMMITTING' AND c.seq < j.seq ORDER BY c.seq DESC LIMIT 1)
        ELSE j.response END, j.pan_masked, j.pan_hmac, j.error"""

    @staticmethod
    def _record(r: Any) -> JournalRecord:
        return JournalRecord(
            seq=int(r[0]),
            tx_id=r[1],
            kind=r[2],
            at=r[3],
            node=r[4],
            joined=loads_joined(r[5]),
            durable=loads_durable(r[6]),
            request_json=r[7],
            response_json=r[8] if r[8] != NO_RESPONSE else None,
            pan_masked=r[9],
            pan_hmac=r[10],
            error=r[11],
        )

    async def by_id(self, tx_id: str) -> list[JournalRecord]:
        """Every record of one transaction, oldest first."""
        rows = await self._fetch(
            f"""SELECT {self._columns} FROM {self.schema}.journal j WHERE j.tx_id = $1
                ORDER BY j.seq""",
            tx_id,
        )
        return [self._record(r) for r in rows]

    async def by_time(
        self, start: datetime, end: datetime, *, kind: str | None = None, limit: int = 10_000
    ) -> list[JournalRecord]:
        """Records with ``start <= time < end`` (aware datetimes), oldest first."""
        rows = await self._fetch(
            f"""SELECT {self._columns} FROM {self.schema}.journal j
                WHERE j.at >= $1 AND j.at < $2 AND ($3::text IS NULL OR j.kind = $3)
                ORDER BY j.at, j.seq LIMIT $4""",
            start,
            end,
            kind,
            limit,
        )
        return [self._record(r) for r in rows]

    async def by_pan(self, pan: str, *, limit: int = 10_000) -> list[JournalRecord]:
        """Records of the transactions of one card, by its keyed fingerprint under any of the
        keys (needs ``hmac_key``; the fingerprint is on the records that carry the request;
        `key_usage` tells what was made under keys this journal does not have)."""
        forms = self.keys.forms(pan, f"postgres journal {self.schema}")
        rows = await self._fetch(
            f"""SELECT {self._columns} FROM {self.schema}.journal j WHERE j.tx_id IN
                (SELECT p.tx_id FROM {self.schema}.journal p WHERE p.pan_hmac = ANY($1))
                ORDER BY j.seq LIMIT $2""",
            forms,
            limit,
        )
        return [self._record(r) for r in rows]

    # -- keys (isopace.store.keys) -------------------------------------------------------------

    async def sample_fingerprint(self) -> str | None:
        """One stored fingerprint (None: the journal protects no card yet)."""
        rows = await self._fetch(
            f"SELECT pan_hmac FROM {self.schema}.journal WHERE pan_hmac IS NOT NULL LIMIT 1"
        )
        return str(rows[0][0]) if rows else None

    async def key_usage(self) -> KeyUsage:
        """Records with a fingerprint per key id (None: made before key ids)."""
        rows = await self._fetch(
            f"SELECT {key_id_sql('pan_hmac')}, count(*) FROM {self.schema}.journal "
            "WHERE pan_hmac IS NOT NULL GROUP BY 1"
        )
        return KeyUsage({r[0]: int(r[1]) for r in rows})

    async def rekey(self, batch: int = REKEY_BATCH) -> int:
        """Move every fingerprint to the current key, ``batch`` rows per transaction (other
        nodes may be writing meanwhile); returns the rows re-keyed."""
        ring = self.keys.require_ring(f"postgres journal {self.schema}")
        moved, after = 0, ""
        while stale := await self._fetch(
            f"""SELECT pan_hmac, min(pan_masked) FROM {self.schema}.journal
                WHERE pan_hmac IS NOT NULL AND {key_id_sql("pan_hmac")} IS DISTINCT FROM $1
                AND pan_hmac > $2 GROUP BY pan_hmac ORDER BY pan_hmac LIMIT $3""",
            ring.current.id,
            after,
            batch,
        ):
            for old, masked in stale:
                new = rekey_value(ring, old, masked)
                while new is not None:
                    result = await self.pool.execute(
                        f"""UPDATE {self.schema}.journal SET pan_hmac = $1 WHERE seq IN
                            (SELECT seq FROM {self.schema}.journal WHERE pan_hmac = $2
                             LIMIT $3)""",
                        new,
                        old,
                        batch,
                    )
                    n = int(result.split()[-1])
                    moved += n
                    if n < batch:
                        break
            after = stale[-1][0]
        return moved

    async def in_doubt(
        self, *, all_nodes: bool = False, older_than: float | None = None
    ) -> list[InDoubt]:
        """Transactions begun and not finished (this node's unless ``all_nodes``), oldest first."""
        rows = await self._fetch(
            f"""SELECT tx_id, state, began_at, node, joined, durable, request, response
                FROM {self.schema}.inflight
                WHERE ($1 OR node = $2)
                  AND ($3::float8 IS NULL OR updated_at < now() - $3 * interval '1 second')
                ORDER BY began_at""",
            all_nodes,
            self.node,
            older_than,
        )
        return [
            InDoubt(
                tx_id=r[0],
                committing=r[1] == "committing",
                began_at=r[2],
                node=r[3],
                joined=loads_joined(r[4]),
                durable=loads_durable(r[5]),
                request_json=r[6],
                response_json=r[7],
            )
            for r in rows
        ]

    async def prune(self, before: datetime, *, batch: int = PRUNE_BATCH) -> int:
        """Delete the records of the transactions that ended (COMMITTED, ABORTED, or answered
        from the idempotency store) before ``before``; return how many records went. Never a
        transaction in doubt (in ``inflight``, or with no final record). One statement (its own
        transaction) per ``batch`` transactions, so no lock is held for long; nodes pruning at
        once only delete the same rows twice."""
        if batch < 1:
            raise ValueError(f"batch must be at least 1, not {batch}")
        await self.open()
        total = 0
        while True:
            try:
                status = await self.pool.execute(self._sql_prune, before, batch)
            except Exception as exc:
                raise JournalError(
                    f"postgres journal {self.schema}: prune failed: {mask_text(str(exc))}"
                ) from exc
            deleted = int(str(status).rsplit(" ", 1)[-1])
            total += deleted
            if not deleted:
                return total
            await asyncio.sleep(0)

    async def counts(
        self, start: datetime | None = None, end: datetime | None = None
    ) -> dict[str, int]:
        """Records per event kind in a time range (all by default), plus ``IN_DOUBT``."""
        rows = await self._fetch(
            f"""SELECT kind, count(*) FROM {self.schema}.journal
                WHERE ($1::timestamptz IS NULL OR at >= $1)
                  AND ($2::timestamptz IS NULL OR at < $2) GROUP BY kind""",
            start,
            end,
        )
        result = {str(r[0]): int(r[1]) for r in rows}
        (n,) = (await self._fetch(f"SELECT count(*) FROM {self.schema}.inflight"))[0]
        result["IN_DOUBT"] = int(n)
        return result


class PostgresIdempotencyStore(_PoolOwner):
    """The flow's ``IdempotencyStore`` protocol on PostgreSQL (see the module docstring)."""

    _migrations = _IDEMPOTENCY_MIGRATIONS

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
            except _PG_ERRORS as exc:
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
