"""The embedded journal: SQLite (standard library ``sqlite3``), durable and group-committed.

``SqliteJournal(path)`` writes one row per flow event into the ``journal`` table (transaction id,
event kind, UTC time, node, the stages that joined, the durable exchange properties, the request
and response with card data protected by :mod:`isopace.store.protect`, the abort cause). Each
message is protected, serialised and stored once per transaction (the request with BEGIN, the
response with COMMITTING, or with the final record when it changed or there was no COMMITTING; see
:class:`isopace.store.records.RowBuilder`); queries fill a COMMITTED record's response in from its
COMMITTING row. Triggers keep an ``inflight`` table (transaction id -> its BEGIN row) of the
transactions that began and have not finished, in the same statement, so finding what is in doubt
never scans the whole journal: the COMMITTING decision is looked up by transaction id.

Durability: WAL mode with ``synchronous=FULL`` (the WAL is fsynced at every commit). ``record``
returns only once its row is durable. ``wait_final=False`` is an opt-in trade: COMMITTED /
ABORTED / IDEMPOTENT_HIT rows are then queued for the next batch without waiting for their fsync
(BEGIN, which precedes every reservation, and COMMITTING, the decision, are still awaited).
Losing such a row in a crash does not change the outcome: recovery finds the transaction in doubt
and ends it the same way (COMMITTING journalled -> commit, else abort) through the idempotent
recover hooks; what is lost is the detail of that record (a decline's cause, a commit error).
It saves one fsync wait per transaction; a failed write is logged.

Group commit: writes go through one writer thread (:class:`isopace.store._writer.GroupWriter`):
every event queued while a batch is being written goes into the next batch, one transaction and
one fsync for all of them. A batch is ONE multi-row ``INSERT`` run in autocommit mode: the rows,
the trigger work and the commit's fsync happen in a single ``sqlite3`` call, which releases the
GIL for all of it, so the event loop keeps running while the batch is written.
``group_commit=False`` writes one transaction (one fsync) per event instead.

Schema: versioned in ``schema_migrations`` (version, description, applied time); the migrations
below are applied in order on open, inside ``BEGIN IMMEDIATE`` so processes opening the same file
at once apply them once. A file written by a newer version raises :class:`SchemaError`.
Version 1 was the first release's schema (journal rows only); version 2 adds the microsecond time
column, node, durable properties, PAN mask / fingerprint columns, indexes for operator queries and
the ``inflight`` table (back-filled from the version 1 rows); version 3 drops the text time
column (``at_us`` is the time), makes ``joined`` optional and replaces ``inflight``'s copies of
the request and response with a pointer to the BEGIN row, kept by triggers (the table is rebuilt:
opening a large version 2 file once takes the time of copying it).

Several processes may share one file (SQLite serialises the writers); each journals its ``node``
(default: the host name) and recovery only touches its own node's transactions.

Retention: :meth:`SqliteJournal.prune` deletes the records of transactions that ended before a
date, a few hundred rows per statement, never those of a transaction in doubt (its ``inflight``
row protects it, and a transaction with no final record is never selected).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from itertools import chain
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from isopace.store._sqlite_open import open_wal
from isopace.store._writer import GroupWriter
from isopace.store.errors import JournalError, SchemaError, StoreError
from isopace.store.keys import (
    REKEY_BATCH,
    KeyRing,
    KeyUsage,
    StoreKeys,
    key_id_sql,
    rekey_value,
)
from isopace.store.protect import CardDataProtector
from isopace.store.records import (
    InDoubt,
    JournalRecord,
    Row,
    RowBuilder,
    default_node,
    loads_durable,
    loads_joined,
    utc_from_us,
)

if TYPE_CHECKING:
    from isopace.flow import Event, Exchange
    from isopace.store.sqlite_database import SqliteDatabase

__all__ = ["MIGRATIONS", "PRUNE_BATCH", "SCHEMA_VERSION", "SqliteJournal"]

log = logging.getLogger("isopace.store")

#: (version, description, statements). Never edit a released migration: add a new one.
MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (
        1,
        "journal table",
        (
            """CREATE TABLE journal (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                tx_id TEXT NOT NULL,
                kind TEXT NOT NULL,
                at TEXT NOT NULL,
                joined TEXT NOT NULL DEFAULT '[]',
                request TEXT,
                response TEXT,
                error TEXT
            )""",
            "CREATE INDEX journal_tx ON journal(tx_id)",
        ),
    ),
    (
        2,
        "time index, node, durable properties, PAN protection columns, inflight table",
        (
            "ALTER TABLE journal ADD COLUMN at_us INTEGER",
            "ALTER TABLE journal ADD COLUMN node TEXT NOT NULL DEFAULT ''",
            "ALTER TABLE journal ADD COLUMN durable TEXT",
            "ALTER TABLE journal ADD COLUMN pan_masked TEXT",
            "ALTER TABLE journal ADD COLUMN pan_hmac TEXT",
            """UPDATE journal SET at_us = CAST(strftime('%s', at) AS INTEGER) * 1000000
                + CASE WHEN substr(at, 20, 1) = '.' THEN CAST(substr(at, 21, 6) AS INTEGER)
                       ELSE 0 END
                WHERE at_us IS NULL""",
            "CREATE INDEX journal_at ON journal(at_us)",
            "CREATE INDEX journal_pan ON journal(pan_hmac) WHERE pan_hmac IS NOT NULL",
            """CREATE TABLE inflight (
                tx_id TEXT PRIMARY KEY,
                state TEXT NOT NULL,
                node TEXT NOT NULL,
                began_us INTEGER NOT NULL,
                updated_us INTEGER NOT NULL,
                joined TEXT NOT NULL DEFAULT '[]',
                durable TEXT,
                request TEXT,
                response TEXT
            )""",
            """INSERT OR REPLACE INTO inflight
                (tx_id, state, node, began_us, updated_us, joined, request, response)
               SELECT b.tx_id,
                      CASE WHEN c.seq IS NULL THEN 'began' ELSE 'committing' END,
                      '', b.at_us, COALESCE(c.at_us, b.at_us), COALESCE(c.joined, '[]'),
                      b.request, c.response
               FROM journal b
               LEFT JOIN journal c ON c.seq = (SELECT max(seq) FROM journal x
                                               WHERE x.tx_id = b.tx_id AND x.kind = 'COMMITTING')
               WHERE b.kind = 'BEGIN'
                 AND b.seq = (SELECT max(seq) FROM journal y
                              WHERE y.tx_id = b.tx_id AND y.kind = 'BEGIN')
                 AND NOT EXISTS (SELECT 1 FROM journal f WHERE f.tx_id = b.tx_id
                                 AND f.kind IN ('COMMITTED', 'ABORTED') AND f.seq > b.seq)""",
        ),
    ),
    (
        3,
        "rows without the text time column; inflight kept by triggers, pointing at BEGIN rows",
        (
            """CREATE TABLE journal_v3 (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                tx_id TEXT NOT NULL,
                kind TEXT NOT NULL,
                at_us INTEGER NOT NULL,
                node TEXT NOT NULL DEFAULT '',
                joined TEXT,
                durable TEXT,
                request TEXT,
                response TEXT,
                pan_masked TEXT,
                pan_hmac TEXT,
                error TEXT
            )""",
            """INSERT INTO journal_v3 (seq, tx_id, kind, at_us, node, joined, durable, request,
                response, pan_masked, pan_hmac, error)
               SELECT seq, tx_id, kind, COALESCE(at_us, 0), node, joined, durable, request,
                      response, pan_masked, pan_hmac, error FROM journal ORDER BY seq""",
            """CREATE TABLE inflight_v3 (
                tx_id TEXT PRIMARY KEY,
                seq INTEGER NOT NULL,
                node TEXT NOT NULL,
                began_us INTEGER NOT NULL
            ) WITHOUT ROWID""",
            """INSERT INTO inflight_v3 (tx_id, seq, node, began_us)
               SELECT i.tx_id, (SELECT max(b.seq) FROM journal b
                                WHERE b.tx_id = i.tx_id AND b.kind = 'BEGIN'), i.node, i.began_us
               FROM inflight i
               WHERE EXISTS (SELECT 1 FROM journal b
                             WHERE b.tx_id = i.tx_id AND b.kind = 'BEGIN')""",
            "DROP TABLE inflight",
            "DROP TABLE journal",
            "ALTER TABLE journal_v3 RENAME TO journal",
            "ALTER TABLE inflight_v3 RENAME TO inflight",
            "CREATE INDEX journal_tx ON journal(tx_id)",
            "CREATE INDEX journal_at ON journal(at_us)",
            "CREATE INDEX journal_pan ON journal(pan_hmac) WHERE pan_hmac IS NOT NULL",
            """CREATE TRIGGER journal_begin AFTER INSERT ON journal WHEN new.kind = 'BEGIN'
               BEGIN
                   INSERT OR REPLACE INTO inflight (tx_id, seq, node, began_us)
                   VALUES (new.tx_id, new.seq, new.node, new.at_us);
               END""",
            """CREATE TRIGGER journal_final AFTER INSERT ON journal
               WHEN new.kind IN ('COMMITTED', 'ABORTED')
               BEGIN
                   DELETE FROM inflight WHERE tx_id = new.tx_id;
               END""",
        ),
    ),
)

SCHEMA_VERSION = MIGRATIONS[-1][0]

_ROW_COLUMNS = (
    "tx_id, kind, at_us, node, joined, durable, request, response, pan_masked, pan_hmac, error"
)
_NCOLS = 11
#: Rows per INSERT statement (at most; fewer when SQLite allows fewer bound parameters).
_CHUNK = 128
_INSERTS: dict[int, str] = {}


def _insert_sql(n: int) -> str:
    """``INSERT INTO journal ... VALUES (...), (...)`` for ``n`` rows (cached per size)."""
    sql = _INSERTS.get(n)
    if sql is None:
        one = "(" + ",".join("?" * _NCOLS) + ")"
        sql = _INSERTS[n] = f"INSERT INTO journal ({_ROW_COLUMNS}) VALUES " + ",".join([one] * n)
    return sql


#: Transactions whose records one pruning statement deletes (at most; see ``prune``).
PRUNE_BATCH = 200

#: Up to ``?`` ended transactions (a final or IDEMPOTENT_HIT record before ``?``, nothing in
#: doubt) whose records one statement deletes, oldest first (by the time index).
_PRUNE = """DELETE FROM journal WHERE tx_id IN (
    SELECT f.tx_id FROM journal f
    WHERE f.at_us < ? AND f.kind IN ('COMMITTED', 'ABORTED', 'IDEMPOTENT_HIT')
      AND NOT EXISTS (SELECT 1 FROM inflight i WHERE i.tx_id = f.tx_id)
    LIMIT ?)"""


def _prune(conn: sqlite3.Connection, before_us: int, batch: int) -> int:
    return int(conn.execute(_PRUNE, (before_us, batch)).rowcount)


#: Records whose durability ``record`` need not wait for (see ``wait_final``).
_NO_WAIT = frozenset({"COMMITTED", "ABORTED", "IDEMPOTENT_HIT"})

#: A COMMITTED row's NULL response is its transaction's COMMITTING response (written once).
_RESPONSE = """CASE WHEN j.response IS NULL AND j.kind = 'COMMITTED' THEN
        (SELECT c.response FROM journal c WHERE c.tx_id = j.tx_id AND c.kind = 'COMMITTING'
         AND c.seq < j.seq ORDER BY c.seq DESC LIMIT 1) ELSE j.response END"""
_COLUMNS = f"""j.seq, j.tx_id, j.kind, j.at_us, j.node, j.joined, j.durable, j.request,
    {_RESPONSE}, j.pan_masked, j.pan_hmac, j.error"""


def _connect(
    path: str, *, synchronous: str, timeout: float, pragmas: Mapping[str, str | int] | None = None
) -> sqlite3.Connection:
    return open_wal(
        path,
        timeout=timeout,
        synchronous=synchronous,
        pragmas=pragmas,
        check_same_thread=False,
        cached_statements=_CHUNK + 32,
    )


def migrate(conn: sqlite3.Connection, *, path: str = "", upto: int | None = None) -> int:
    """Apply the missing migrations (up to ``upto``); return the resulting schema version.

    A file already at the current version is only read (so a read-only file opens, and its
    writes fail later with a clear error)."""
    has_table = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
    ).fetchone()
    if has_table:
        sql = "SELECT COALESCE(max(version), 0) FROM schema_migrations"
        version = int(conn.execute(sql).fetchone()[0])
        if version == SCHEMA_VERSION and upto is None:
            return version
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at TEXT NOT NULL)"""
        )
        sql = "SELECT COALESCE(max(version), 0) FROM schema_migrations"
        current = conn.execute(sql).fetchone()[0]
        if current > SCHEMA_VERSION:
            raise SchemaError(
                f"journal {path}: schema version {current} is newer than this isopace "
                f"supports ({SCHEMA_VERSION})"
            )
        for version, description, statements in MIGRATIONS:
            if version <= current or (upto is not None and version > upto):
                continue
            for statement in statements:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations VALUES (?, ?, ?)",
                (version, description, datetime.now(UTC).isoformat()),
            )
            log.info(
                "journal %s: applied schema migration %d (%s)",
                path,
                version,
                description,
                extra={"path": path, "version": version},
            )
            current = version
        conn.execute("COMMIT")
        return int(current)
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _insert(conn: sqlite3.Connection, rows: list[Row]) -> None:
    """INSERT ``rows``, as few multi-row statements as the bind limit allows (no transaction
    control: alone, a single statement is its own transaction)."""
    chunk = max(1, min(_CHUNK, conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // _NCOLS))
    for i in range(0, len(rows), chunk):
        part = rows[i : i + chunk]
        conn.execute(_insert_sql(len(part)), list(chain.from_iterable(part)))


#: The INSERT of one row per pattern of NULL columns (the columns that may be NULL: joined ..
#: error), with a NULL literal where the row has None.
_INSERTS_ONE: dict[tuple[bool, ...], str] = {}


def _insert_one(conn: sqlite3.Connection, row: Row) -> None:
    """INSERT one row, its NULL columns written as NULL literals, not bound: the sqlite3 module
    binds an int or a str at once, but tries adapters for None (a formatted AttributeError
    each), and a row has three to six of them (what the event does not carry)."""
    nulls = (
        row[4] is None, row[5] is None, row[6] is None, row[7] is None, row[8] is None,
        row[9] is None, row[10] is None,
    )  # fmt: skip
    sql = _INSERTS_ONE.get(nulls)
    if sql is None:
        values = ",".join(["?"] * 4 + ["NULL" if null else "?" for null in nulls])
        sql = _INSERTS_ONE[nulls] = f"INSERT INTO journal ({_ROW_COLUMNS}) VALUES ({values})"
    conn.execute(sql, [v for v in row if v is not None])


def _apply(conn: sqlite3.Connection, rows: list[Row]) -> None:
    """Write ``rows`` in one transaction: ONE multi-row INSERT in autocommit mode (the
    statement is its own transaction, so inserting, the triggers keeping ``inflight`` and the
    commit's fsync all happen in one call that releases the GIL), or, for more rows than one
    statement may bind, several INSERTs inside ``BEGIN IMMEDIATE`` / ``COMMIT``."""
    chunk = max(1, min(_CHUNK, conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // _NCOLS))
    if len(rows) <= chunk:
        _insert(conn, rows)
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        _insert(conn, rows)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def record_from_row(row: Sequence[Any]) -> JournalRecord:
    return JournalRecord(
        seq=int(row[0]),
        tx_id=row[1],
        kind=row[2],
        at=utc_from_us(int(row[3] or 0)),
        node=row[4] or "",
        joined=loads_joined(row[5]),
        durable=loads_durable(row[6]),
        request_json=row[7],
        response_json=row[8] if row[8] != "null" else None,
        pan_masked=row[9],
        pan_hmac=row[10],
        error=row[11],
    )


def _us(value: datetime) -> int:
    if value.tzinfo is None:
        raise ValueError("journal queries need timezone-aware datetimes (UTC)")
    return int(value.timestamp() * 1_000_000)


class SqliteJournal:
    """Durable, group-committed flow journal in a SQLite file.

    ``hmac_key`` keys the PAN fingerprints (see :mod:`isopace.store.protect`); ``node`` names this
    process's transactions (default: host name); ``group_commit=False`` gives one transaction and
    one fsync per event; ``pragmas`` are applied to the writer's connection (e.g.
    ``{"max_page_count": 100000}`` to cap the file size); ``synchronous`` may be lowered to
    ``"NORMAL"`` (durable against a process crash, not a power loss) where that trade-off is
    acceptable.

    ``SqliteJournal.on(database)`` journals into a shared :class:`SqliteDatabase` instead (the
    file of the host's ledger and idempotency store): each record is then written inline when
    ``record`` is called, committed in order with the process's other writes, and on disk once
    ``database.synced()`` has returned (see :mod:`isopace.store.sqlite_database` for why the
    single ordered WAL makes that safe); the writer thread, ``group_commit``, ``max_batch`` and
    ``pragmas`` do not apply.
    """

    @classmethod
    def on(
        cls,
        database: SqliteDatabase,
        *,
        hmac_key: KeyRing | bytes | str | None = None,
        node: str | None = None,
        wait_final: bool = True,
    ) -> SqliteJournal:
        """A journal in the shared ``database`` (see the class docstring)."""
        return cls(
            database.path,
            hmac_key=hmac_key,
            node=node,
            synchronous=database.synchronous,
            wait_final=wait_final,
            database=database,
        )

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        hmac_key: KeyRing | bytes | str | None = None,
        node: str | None = None,
        group_commit: bool = True,
        max_batch: int = 1024,
        synchronous: str = "FULL",
        timeout: float = 10.0,
        pragmas: Mapping[str, str | int] | None = None,
        wait_final: bool = True,
        database: SqliteDatabase | None = None,
    ) -> None:
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError(f"synchronous must be FULL, NORMAL or EXTRA, not {synchronous!r}")
        self.path = str(Path(path))
        self.node = node if node is not None else default_node()
        self._protector = CardDataProtector()
        self.keys = StoreKeys(self._protector)
        self.keys.use(hmac_key)
        self._rows = RowBuilder(self._protector, self.node)
        self._sync = synchronous.upper()
        self._timeout = timeout
        self._pragmas = dict(pragmas or {})
        self._wait_final = wait_final
        self._database = database
        self._inline_rows = 0
        try:
            if database is not None:
                self.schema_version = database.setup(lambda conn: migrate(conn, path=self.path))
            else:
                conn = _connect(self.path, synchronous=self._sync, timeout=timeout)
                try:
                    self.schema_version = migrate(conn, path=self.path)
                finally:
                    conn.close()
        except SchemaError:
            raise
        except (sqlite3.Error, StoreError) as exc:
            raise JournalError(f"journal {self.path}: cannot open: {exc}") from exc
        self._reader: sqlite3.Connection | None = None
        self._reader_lock = threading.Lock()
        self._writer: GroupWriter[Row, sqlite3.Connection] | None = None
        if database is not None:
            return
        self._writer = GroupWriter(
            connect=lambda: _connect(
                self.path, synchronous=self._sync, timeout=self._timeout, pragmas=self._pragmas
            ),
            apply=_apply,
            disconnect=lambda c: c.close(),
            describe=lambda exc: f"journal {self.path}: write failed: {exc}",
            group_commit=group_commit,
            max_batch=max_batch,
        )

    # -- the Journal protocol ------------------------------------------------------------------

    async def record(self, ex: Exchange, event: Event) -> None:
        """Journal ``event`` of ``ex``; returns once the row is durable (raises JournalError)."""
        row = self._rows.build(ex, event)
        if self._writer is None:
            self._write_inline(row)
            return
        if not self._wait_final and row[1] in _NO_WAIT:
            self._writer.submit_nowait(row)
            return
        batch = self._writer.submit(row)
        try:
            try:
                await batch.future  # shared by the batch's records: one wake-up for all
            except asyncio.CancelledError as cancelled:
                await batch.resume(cancelled)
        except JournalError as exc:
            if row[1] == "COMMITTING":
                self._rows.forget(row[0])
            raise JournalError(str(exc)) from exc.__cause__

    def _write_inline(self, row: Row) -> None:
        """Shared database: write the row now, in order with the process's other writes."""
        assert self._database is not None
        try:
            self._database.write(_insert_one, row, single=True)  # one INSERT (and its triggers)
        except StoreError as exc:
            if row[1] == "COMMITTING":
                self._rows.forget(row[0])
            cause = exc.__cause__ or exc
            raise JournalError(f"journal {self.path}: write failed: {cause}") from cause
        self._inline_rows += 1

    # -- life cycle ----------------------------------------------------------------------------

    @property
    def stats(self) -> dict[str, int]:
        """Rows written and transactions (batches) used: rows / batches is the group size."""
        if self._writer is None:
            return {"rows": self._inline_rows, "batches": self._inline_rows}
        return {"rows": self._writer.rows, "batches": self._writer.batches}

    async def close(self) -> None:
        """Write what is queued, stop the writer, close the connections (a shared database
        stays open: its owner closes it)."""
        if self._writer is not None:
            self._writer.seal()
            await asyncio.to_thread(self._writer.close)
        with self._reader_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- queries for operators (and recovery) --------------------------------------------------

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._reader_lock:
            if self._reader is None:
                self._reader = _connect(self.path, synchronous=self._sync, timeout=self._timeout)
            try:
                return self._reader.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"journal {self.path}: query failed: {exc}") from exc

    async def flush(self) -> None:
        """Wait until every record queued so far is written (queries do this first)."""
        if self._writer is None:  # shared database: commit its open batch
            assert self._database is not None
            self._database.commit()
            return
        with contextlib.suppress(JournalError):
            await self._writer.barrier()

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        await self.flush()
        return await asyncio.to_thread(self._query, sql, params)

    async def by_id(self, tx_id: str) -> list[JournalRecord]:
        """Every record of one transaction, oldest first."""
        rows = await self._fetch(
            f"SELECT {_COLUMNS} FROM journal j WHERE j.tx_id = ? ORDER BY j.seq", (tx_id,)
        )
        return [record_from_row(r) for r in rows]

    async def by_time(
        self,
        start: datetime,
        end: datetime,
        *,
        kind: str | None = None,
        limit: int = 10_000,
    ) -> list[JournalRecord]:
        """Records with ``start <= time < end`` (aware datetimes), oldest first."""
        sql = f"SELECT {_COLUMNS} FROM journal j WHERE j.at_us >= ? AND j.at_us < ?"
        params: list[Any] = [_us(start), _us(end)]
        if kind is not None:
            sql += " AND j.kind = ?"
            params.append(kind)
        sql += " ORDER BY j.at_us, j.seq LIMIT ?"
        params.append(limit)
        return [record_from_row(r) for r in await self._fetch(sql, params)]

    async def by_pan(self, pan: str, *, limit: int = 10_000) -> list[JournalRecord]:
        """Records of the transactions of one card, found by its keyed fingerprint under any of
        the keys (needs ``hmac_key``; the fingerprint is on the records that carry the request;
        `key_usage` tells what was made under keys this journal does not have)."""
        forms = self.keys.forms(pan, f"journal {self.path}")
        rows = await self._fetch(
            f"""SELECT {_COLUMNS} FROM journal j WHERE j.tx_id IN
                (SELECT p.tx_id FROM journal p WHERE p.pan_hmac IN
                 ({",".join("?" * len(forms))})) ORDER BY j.seq LIMIT ?""",
            (*forms, limit),
        )
        return [record_from_row(r) for r in rows]

    # -- keys (isopace.store.keys) -------------------------------------------------------------

    async def sample_fingerprint(self) -> str | None:
        """One stored fingerprint (None: the journal protects no card yet)."""
        rows = await self._fetch("SELECT pan_hmac FROM journal WHERE pan_hmac IS NOT NULL LIMIT 1")
        return str(rows[0][0]) if rows else None

    async def key_usage(self) -> KeyUsage:
        """Records with a fingerprint per key id (None: made before key ids)."""
        rows = await self._fetch(
            f"SELECT {key_id_sql('pan_hmac')}, count(*) FROM journal "
            "WHERE pan_hmac IS NOT NULL GROUP BY 1"
        )
        return KeyUsage({r[0]: int(r[1]) for r in rows})

    async def rekey(self, batch: int = REKEY_BATCH) -> int:
        """Move every fingerprint to the current key, ``batch`` rows per transaction, on a
        connection of its own (a host may be writing the file); returns the rows re-keyed."""
        ring = self.keys.require_ring(f"journal {self.path}")
        stale_sql = (
            "SELECT pan_hmac, min(pan_masked) FROM journal WHERE pan_hmac IS NOT NULL "
            f"AND {key_id_sql('pan_hmac')} IS NOT ? AND pan_hmac > ? "
            "GROUP BY pan_hmac ORDER BY pan_hmac LIMIT ?"
        )
        move_sql = (
            "UPDATE journal SET pan_hmac = ? WHERE seq IN "
            "(SELECT seq FROM journal WHERE pan_hmac = ? LIMIT ?)"
        )

        def run() -> int:
            conn = _connect(self.path, synchronous=self._sync, timeout=self._timeout)
            try:
                moved, after = 0, ""
                while stale := conn.execute(stale_sql, (ring.current.id, after, batch)).fetchall():
                    for old, masked in stale:
                        new = rekey_value(ring, old, masked)
                        while new is not None:
                            n = conn.execute(move_sql, (new, old, batch)).rowcount
                            moved += n
                            if n < batch:
                                break
                    after = stale[-1][0]
                return moved
            finally:
                conn.close()

        await self.flush()
        try:
            return await asyncio.to_thread(run)
        except sqlite3.Error as exc:
            raise JournalError(f"journal {self.path}: re-keying failed: {exc}") from exc

    async def in_doubt(
        self, *, all_nodes: bool = False, older_than: float | None = None
    ) -> list[InDoubt]:
        """Transactions that began and have no COMMITTED / ABORTED record, oldest first.

        By default only this journal's node (and rows migrated from version 1, which have none);
        ``older_than`` (seconds) leaves out transactions whose last event is more recent.
        """
        # the BEGIN row named by inflight, and the transaction's COMMITTING row after it, if any
        sql = """SELECT i.tx_id, c.seq IS NOT NULL, i.began_us, i.node,
                        CASE WHEN c.seq IS NULL THEN b.joined ELSE c.joined END,
                        CASE WHEN c.seq IS NULL THEN b.durable ELSE c.durable END,
                        b.request, c.response
                 FROM inflight i
                 JOIN journal b ON b.seq = i.seq
                 LEFT JOIN journal c ON c.seq = (
                     SELECT max(x.seq) FROM journal x
                     WHERE x.tx_id = i.tx_id AND x.kind = 'COMMITTING' AND x.seq > i.seq)
                 WHERE 1 = 1"""
        params: list[Any] = []
        if not all_nodes:
            sql += " AND i.node IN (?, '')"
            params.append(self.node)
        if older_than is not None:
            sql += " AND COALESCE(c.at_us, b.at_us) < ?"
            params.append(int((datetime.now(UTC).timestamp() - older_than) * 1_000_000))
        sql += " ORDER BY i.began_us"
        return [
            InDoubt(
                tx_id=r[0],
                committing=bool(r[1]),
                began_at=utc_from_us(int(r[2])),
                node=r[3],
                joined=loads_joined(r[4]),
                durable=loads_durable(r[5]),
                request_json=r[6],
                response_json=r[7] if r[7] != "null" else None,
            )
            for r in await self._fetch(sql, params)
        ]

    async def prune(self, before: datetime, *, batch: int = PRUNE_BATCH) -> int:
        """Delete the records of the transactions that ended (COMMITTED, ABORTED, or answered
        from the idempotency store) before ``before`` (aware datetime); return how many records
        went. A transaction in doubt (BEGIN or COMMITTING with no final record) is never
        touched, however old.

        Small batches (``batch`` transactions, a few hundred rows, per statement), each its own
        transaction: on the shared database each is one inline write followed by a yield to
        the event loop (its commit comes with the next loop turn, beside the transactions
        served meanwhile), on a file of its own each runs on a worker thread; either way the
        write lock is never held for long."""
        cut = _us(before)
        if batch < 1:
            raise ValueError(f"batch must be at least 1, not {batch}")
        total = 0
        while True:
            if self._database is not None:
                try:
                    deleted = self._database.write(_prune, cut, batch)
                except StoreError as exc:
                    cause = exc.__cause__ or exc
                    raise JournalError(f"journal {self.path}: prune failed: {cause}") from cause
            else:
                deleted = await asyncio.to_thread(self._prune_own, cut, batch)
            total += deleted
            if not deleted:
                return total
            await asyncio.sleep(0)  # one batch per loop turn

    def _prune_own(self, cut: int, batch: int) -> int:
        with self._reader_lock:
            if self._reader is None:
                self._reader = _connect(self.path, synchronous=self._sync, timeout=self._timeout)
            try:
                return _prune(self._reader, cut, batch)
            except sqlite3.Error as exc:
                raise JournalError(f"journal {self.path}: prune failed: {exc}") from exc

    async def counts(
        self, start: datetime | None = None, end: datetime | None = None
    ) -> dict[str, int]:
        """Number of records per event kind (COMMITTED, ABORTED, IDEMPOTENT_HIT...) in a time
        range (all time by default), plus ``IN_DOUBT``: transactions unfinished right now."""
        sql = "SELECT kind, count(*) FROM journal WHERE at_us >= ? AND at_us < ? GROUP BY kind"
        lo = _us(start) if start is not None else -(2**62)
        hi = _us(end) if end is not None else 2**62
        result = {str(k): int(n) for k, n in await self._fetch(sql, (lo, hi))}
        (n,) = (await self._fetch("SELECT count(*) FROM inflight"))[0]
        result["IN_DOUBT"] = int(n)
        return result
