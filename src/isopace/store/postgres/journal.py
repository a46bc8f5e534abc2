"""``PostgresJournal``: the flow's journal in PostgreSQL, for several nodes sharing one database.

It stores exactly what :class:`~isopace.store.SqliteJournal` stores (same rows, built by the same
:class:`~isopace.store.records.RowBuilder`: each message protected and stored once per transaction,
a COMMITTED row's NULL response read from its COMMITTING row; same card data protection and
operator queries); its ``inflight`` table keeps the in-doubt transactions' request, decision and
response. Group commit: one writer task takes every queued row and writes the batch with ONE
statement (atomic by itself: no BEGIN / COMMIT round trips): a multi-row ``INSERT ... SELECT FROM
unnest($1::text[], ...)`` for the journal with the ``inflight`` upsert and delete as data-modifying
CTEs (asyncpg prepares and caches it per connection); each ``record`` awaits its own batch's
commit; ``writers`` batches (default 3) are in flight at once, so the network round trips and the
server's commit overlap. The rows arriving until a writer takes them (at most ``max_batch``) form
one batch whose single future wakes them all (no future nor queue operation per row), as in
SqliteJournal. ``wait_final=False``: COMMITTED / ABORTED / IDEMPOTENT_HIT are queued without
waiting, as in SqliteJournal. ``group_commit=False`` commits each event alone.

Retention: ``prune(before)`` deletes the records of the transactions that ended before a date,
``PRUNE_BATCH`` transactions per statement, never one in doubt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg  # type: ignore[import-untyped]

from isopace._cardtext import error_text, mask_text
from isopace.store._writer import Batch
from isopace.store.errors import JournalError, StoreError
from isopace.store.keys import REKEY_BATCH, KeyRing, KeyUsage, StoreKeys, key_id_sql, rekey_value
from isopace.store.postgres.pool import Migration, PoolOwner
from isopace.store.protect import CardDataProtector
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
    from isopace.flow import Event, Exchange

__all__ = ["PRUNE_BATCH", "PostgresJournal"]

log = logging.getLogger("isopace.store")

_NO_WAIT = frozenset({"COMMITTED", "ABORTED", "IDEMPOTENT_HIT"})
#: Transactions one journal pruning statement deletes.
PRUNE_BATCH = 200

MIGRATIONS: tuple[Migration, ...] = (
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


class PostgresJournal(PoolOwner):
    """Durable, group-committed flow journal in PostgreSQL (see the module docstring)."""

    _migrations = MIGRATIONS

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
