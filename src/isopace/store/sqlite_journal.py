"""The embedded journal: SQLite (standard library ``sqlite3``), durable and group-committed.

``SqliteJournal(path)`` writes one row per flow event into the ``journal`` table (transaction id,
event kind, UTC time, node, the stages that joined, the durable exchange properties, the request
and response with card data protected by :mod:`isopace.store.protect`, the abort cause) and keeps
an ``inflight`` table of transactions that began and have not finished, in the same database
transaction, so finding what is in doubt never scans the whole journal.

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
one fsync for all of them.
``group_commit=False`` writes one transaction (one fsync) per event instead.

Schema: versioned in ``schema_migrations`` (version, description, applied time); the migrations
below are applied in order on open, inside ``BEGIN IMMEDIATE`` so processes opening the same file
at once apply them once. A file written by a newer version raises :class:`SchemaError`.
Version 1 was the first release's schema (journal rows only); version 2 adds the microsecond time
column, node, durable properties, PAN mask / fingerprint columns, indexes for operator queries and
the ``inflight`` table (back-filled from the version 1 rows).

Several processes may share one file (SQLite serialises the writers); each journals its ``node``
(default: the host name) and recovery only touches its own node's transactions.
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
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from isopace.store._writer import GroupWriter
from isopace.store.errors import JournalError, SchemaError, StoreError
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

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "SqliteJournal"]

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
)

SCHEMA_VERSION = MIGRATIONS[-1][0]

_INSERT = """INSERT INTO journal (tx_id, kind, at, at_us, node, joined, durable, request, response,
    pan_masked, pan_hmac, error) VALUES (?1, ?2,
    strftime('%Y-%m-%dT%H:%M:%f+00:00', ?3 / 1000000.0, 'unixepoch'), ?3,
    ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"""
_BEGIN = """INSERT INTO inflight (tx_id, state, node, began_us, updated_us, joined, durable,
    request, response) VALUES (?, 'began', ?, ?, ?, ?, ?, ?, NULL)
    ON CONFLICT (tx_id) DO UPDATE SET state = 'began', node = excluded.node,
    began_us = excluded.began_us, updated_us = excluded.updated_us, joined = excluded.joined,
    durable = excluded.durable, request = excluded.request, response = NULL"""
_COMMITTING = """INSERT INTO inflight (tx_id, state, node, began_us, updated_us, joined, durable,
    request, response) VALUES (?, 'committing', ?, ?, ?, ?, ?, NULL, ?)
    ON CONFLICT (tx_id) DO UPDATE SET state = 'committing', updated_us = excluded.updated_us,
    joined = excluded.joined, durable = excluded.durable, response = excluded.response"""
_FINISH = "DELETE FROM inflight WHERE tx_id = ?"
_FINAL = frozenset({"COMMITTED", "ABORTED"})
#: Records whose durability ``record`` need not wait for (see ``wait_final``).
_NO_WAIT = frozenset({"COMMITTED", "ABORTED", "IDEMPOTENT_HIT"})

_COLUMNS = """seq, tx_id, kind, at_us, node, joined, durable, request, response, pan_masked,
    pan_hmac, error"""


def _connect(
    path: str, *, synchronous: str, timeout: float, pragmas: Mapping[str, str | int] | None = None
) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
    for name, value in (pragmas or {}).items():
        if not name.isidentifier() or not str(value).replace("-", "").isalnum():
            raise ValueError(f"bad pragma {name!r} = {value!r}")
        conn.execute(f"PRAGMA {name} = {value}")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise JournalError(f"journal {path}: could not switch to WAL mode (got {mode!r})")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    return conn


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


def _apply(conn: sqlite3.Connection, rows: list[Row]) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.executemany(_INSERT, rows)
        # one event per transaction per batch (a run awaits each durable record before the
        # next), so the inflight changes can be grouped by kind
        begin = [r for r in rows if r.kind == "BEGIN"]
        if begin:
            conn.executemany(
                _BEGIN,
                [
                    (r.tx_id, r.node, r.at_us, r.at_us, r.joined, r.durable, r.request)
                    for r in begin
                ],
            )
        committing = [r for r in rows if r.kind == "COMMITTING"]
        if committing:
            conn.executemany(
                _COMMITTING,
                [
                    (r.tx_id, r.node, r.at_us, r.at_us, r.joined, r.durable, r.response)
                    for r in committing
                ],
            )
        finished = [(r.tx_id,) for r in rows if r.kind in _FINAL]
        if finished:
            conn.executemany(_FINISH, finished)
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
        response_json=row[8],
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
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        hmac_key: bytes | str | None = None,
        node: str | None = None,
        group_commit: bool = True,
        max_batch: int = 1024,
        synchronous: str = "FULL",
        timeout: float = 10.0,
        pragmas: Mapping[str, str | int] | None = None,
        wait_final: bool = True,
    ) -> None:
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError(f"synchronous must be FULL, NORMAL or EXTRA, not {synchronous!r}")
        self.path = str(Path(path))
        self.node = node if node is not None else default_node()
        self._protector = CardDataProtector(hmac_key)
        self._rows = RowBuilder(self._protector, self.node)
        self._sync = synchronous.upper()
        self._timeout = timeout
        self._pragmas = dict(pragmas or {})
        self._wait_final = wait_final
        try:
            conn = _connect(self.path, synchronous=self._sync, timeout=timeout)
            try:
                self.schema_version = migrate(conn, path=self.path)
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise JournalError(f"journal {self.path}: cannot open: {exc}") from exc
        self._reader: sqlite3.Connection | None = None
        self._reader_lock = threading.Lock()
        self._writer: GroupWriter[Row, sqlite3.Connection] = GroupWriter(
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
        if not self._wait_final and row.kind in _NO_WAIT:
            self._writer.submit_nowait(row)
            return
        await self._writer.submit(row)

    # -- life cycle ----------------------------------------------------------------------------

    @property
    def stats(self) -> dict[str, int]:
        """Rows written and transactions (batches) used: rows / batches is the group size."""
        return {"rows": self._writer.rows, "batches": self._writer.batches}

    async def close(self) -> None:
        """Write what is queued, stop the writer, close the connections."""
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
        with contextlib.suppress(JournalError):
            await self._writer.barrier()

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        await self.flush()
        return await asyncio.to_thread(self._query, sql, params)

    async def by_id(self, tx_id: str) -> list[JournalRecord]:
        """Every record of one transaction, oldest first."""
        rows = await self._fetch(
            f"SELECT {_COLUMNS} FROM journal WHERE tx_id = ? ORDER BY seq", (tx_id,)
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
        sql = f"SELECT {_COLUMNS} FROM journal WHERE at_us >= ? AND at_us < ?"
        params: list[Any] = [_us(start), _us(end)]
        if kind is not None:
            sql += " AND kind = ?"
            params.append(kind)
        sql += " ORDER BY at_us, seq LIMIT ?"
        params.append(limit)
        return [record_from_row(r) for r in await self._fetch(sql, params)]

    async def by_pan(self, pan: str, *, limit: int = 10_000) -> list[JournalRecord]:
        """Records of one card, found by its keyed fingerprint (needs ``hmac_key``)."""
        fingerprint = self._protector.fingerprint(pan)
        if fingerprint is None:
            raise StoreError(f"journal {self.path}: searching by PAN needs an hmac_key")
        rows = await self._fetch(
            f"SELECT {_COLUMNS} FROM journal WHERE pan_hmac = ? ORDER BY seq LIMIT ?",
            (fingerprint, limit),
        )
        return [record_from_row(r) for r in rows]

    async def in_doubt(
        self, *, all_nodes: bool = False, older_than: float | None = None
    ) -> list[InDoubt]:
        """Transactions that began and have no COMMITTED / ABORTED record, oldest first.

        By default only this journal's node (and rows migrated from version 1, which have none);
        ``older_than`` (seconds) leaves out transactions whose last event is more recent.
        """
        sql = """SELECT tx_id, state, began_us, node, joined, durable, request, response
                 FROM inflight WHERE 1 = 1"""
        params: list[Any] = []
        if not all_nodes:
            sql += " AND node IN (?, '')"
            params.append(self.node)
        if older_than is not None:
            sql += " AND updated_us < ?"
            params.append(int((datetime.now(UTC).timestamp() - older_than) * 1_000_000))
        sql += " ORDER BY began_us"
        return [
            InDoubt(
                tx_id=r[0],
                committing=r[1] == "committing",
                began_at=utc_from_us(int(r[2])),
                node=r[3],
                joined=loads_joined(r[4]),
                durable=loads_durable(r[5]),
                request_json=r[6],
                response_json=r[7],
            )
            for r in await self._fetch(sql, params)
        ]

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
