"""The SQLite ledger (standard library ``sqlite3``, the default backend).

Every operation runs on one writer thread that batches whatever is queued into one SQLite
transaction (group commit, ``synchronous=FULL`` by default); when an operation fails, the batch is
rolled back and run again with each operation inside its own SAVEPOINT, so one failure does not
affect its neighbours. Operations apply in the order they were submitted, so a release queued
after a reserve always sees the hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import os
import queue
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from isopace.host.errors import LedgerError
from isopace.host.ledger._common import (
    CAPTURE_MISMATCH_SQL,
    CHECK_SQL,
    HOLD_COLUMNS,
    KEY_INDEX,
    OPEN_STATES,
    SCHEMA_VERSION,
    Account,
    Card,
    Hold,
    HoldState,
    Ledger,
    LedgerCheck,
    ReserveResult,
    ReserveStatus,
    SeedCard,
    check_rows,
    mask_pan,
)
from isopace.store._sqlite_open import open_wal

T = TypeVar("T")


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="microseconds")


_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS accounts (
    id TEXT PRIMARY KEY,
    currency TEXT NOT NULL,
    opening INTEGER NOT NULL,
    balance INTEGER NOT NULL,
    held INTEGER NOT NULL DEFAULT 0,
    CHECK (held >= 0),
    CHECK (balance - held >= 0)
);
CREATE TABLE IF NOT EXISTS cards (
    pan_ref TEXT PRIMARY KEY,
    masked_pan TEXT NOT NULL,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    status TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS holds (
    txn_id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    amount INTEGER NOT NULL CHECK (amount >= 0),
    state TEXT NOT NULL,
    mti TEXT,
    terminal TEXT,
    stan TEXT,
    tx_time TEXT,
    rrn TEXT,
    idem_key TEXT,
    approval_code TEXT,
    pan_ref TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS holds_by_stan ON holds (terminal, stan, tx_time);
CREATE INDEX IF NOT EXISTS holds_by_rrn ON holds (terminal, rrn);
CREATE INDEX IF NOT EXISTS holds_pending ON holds (state) WHERE state = 'pending';
CREATE TABLE IF NOT EXISTS captures (
    txn_id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    amount INTEGER NOT NULL,
    captured_at TEXT NOT NULL,
    refunded_at TEXT
);
"""


class _SqliteWorker:
    """One thread owning the connection; queued operations run in batches, one commit per batch."""

    _STOP = object()

    def __init__(self, path: str, synchronous: str, max_batch: int = 512) -> None:
        self._path = path
        self._synchronous = synchronous
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="isopace-ledger", daemon=True)

    def start(self, init: Callable[[sqlite3.Connection], None]) -> None:
        self._init = init
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if not self._thread.is_alive():
            raise LedgerError(f"ledger {self._path}: closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._queue.put((fn, fut, loop))
        return await fut

    def stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(self._STOP)
            self._thread.join()

    @staticmethod
    def _resolve(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    @classmethod
    def _resolve_all(cls, items: list[tuple[Any, Any, BaseException | None]]) -> None:
        for fut, result, error in items:
            cls._resolve(fut, result, error)

    def _deliver(self, done: list[tuple[Any, Any, Any, BaseException | None]]) -> None:
        # One wake-up per event loop per batch, not one per operation.
        by_loop: dict[Any, list[tuple[Any, Any, BaseException | None]]] = {}
        for fut, loop, result, error in done:
            by_loop.setdefault(loop, []).append((fut, result, error))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
                loop.call_soon_threadsafe(self._resolve_all, items)

    def _run(self) -> None:
        try:
            conn = open_wal(
                self._path,
                timeout=10.0,
                synchronous=self._synchronous,
                pragmas={"foreign_keys": "ON"},
                check_same_thread=False,
            )
            self._init(conn)
        except BaseException as exc:
            self._error = LedgerError(f"ledger {self._path}: cannot open: {exc}")
            self._ready.set()
            return
        self._ready.set()
        stopping = False
        try:
            while not stopping:
                batch = [self._queue.get()]
                while len(batch) < self._max_batch:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                items = []
                for item in batch:
                    if item is self._STOP:
                        stopping = True
                    else:
                        items.append(item)
                if items:
                    self._run_batch(conn, items)
        finally:
            conn.close()

    def _run_batch(self, conn: sqlite3.Connection, items: list[Any]) -> None:
        """Run ``items`` in one transaction. The common case, where no operation fails, runs them
        back to back; when one fails, the transaction is rolled back and the batch runs again
        with a SAVEPOINT around each operation, so the failure touches only its own operation
        (operations are functions of the database state, so running them again is safe)."""
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            err = LedgerError(f"ledger {self._path}: {exc}")
            self._deliver([(fut, loop, None, err) for _, fut, loop in items])
            return
        done: list[tuple[Any, Any, Any, BaseException | None]] = []
        try:
            for fn, fut, loop in items:
                done.append((fut, loop, fn(conn), None))
        except Exception:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            self._run_isolated(conn, items)
            return
        self._commit(conn, done)

    def _run_isolated(self, conn: sqlite3.Connection, items: list[Any]) -> None:
        done: list[tuple[Any, Any, Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            err = LedgerError(f"ledger {self._path}: {exc}")
            self._deliver([(fut, loop, None, err) for _, fut, loop in items])
            return
        for fn, fut, loop in items:
            conn.execute("SAVEPOINT op")
            try:
                result = fn(conn)
            except Exception as exc:
                conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
                error: BaseException = (
                    LedgerError(f"ledger {self._path}: {exc}")
                    if isinstance(exc, sqlite3.Error)
                    else exc
                )
                done.append((fut, loop, None, error))
            else:
                conn.execute("RELEASE op")
                done.append((fut, loop, result, None))
        self._commit(conn, done)

    def _commit(
        self, conn: sqlite3.Connection, done: list[tuple[Any, Any, Any, BaseException | None]]
    ) -> None:
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            err = LedgerError(f"ledger {self._path}: commit failed: {exc}")
            done = [(fut, loop, None, err) for fut, loop, _, _ in done]
        self._deliver(done)


class SqliteLedger(Ledger):
    """The embedded ledger: standard library ``sqlite3``, WAL, group commit on one thread."""

    def __init__(self, path: str | os.PathLike[str], *, synchronous: str = "FULL") -> None:
        if synchronous.upper() not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            raise ValueError(f"synchronous must be OFF, NORMAL, FULL or EXTRA, not {synchronous!r}")
        self.path = os.fspath(path)
        self._worker = _SqliteWorker(self.path, synchronous.upper())
        self._opened = False

    def _init(self, conn: sqlite3.Connection) -> None:
        conn.executescript(_SQLITE_SCHEMA)
        row = conn.execute("SELECT value FROM ledger_meta WHERE key = 'schema_version'").fetchone()
        if row is not None and int(row[0]) > SCHEMA_VERSION:
            raise LedgerError(
                f"schema version {row[0]} is newer than this isopace ({SCHEMA_VERSION})"
            )
        # Upgrade a version 1 file (no-op on a new one, whose tables already have the columns).
        columns = {r[1] for r in conn.execute("PRAGMA table_info(holds)")}
        for column in ("idem_key", "approval_code", "pan_ref"):
            if column not in columns:
                conn.execute(f"ALTER TABLE holds ADD COLUMN {column} TEXT")
        conn.execute(KEY_INDEX)
        conn.execute(
            "INSERT INTO ledger_meta (key, value) VALUES ('schema_version', ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (str(SCHEMA_VERSION),),
        )
        conn.execute(
            "INSERT OR IGNORE INTO ledger_meta (key, value) VALUES ('pan_key', ?)",
            (secrets.token_hex(32),),
        )
        (key,) = conn.execute("SELECT value FROM ledger_meta WHERE key = 'pan_key'").fetchone()
        self._pan_key = bytes.fromhex(key)

    async def open(self) -> None:
        if self._opened:
            return
        parent = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise LedgerError(f"ledger {self.path}: cannot create {parent}: {exc}") from exc
        await asyncio.to_thread(self._worker.start, self._init)
        self._opened = True

    async def close(self) -> None:
        if self._opened:
            await asyncio.to_thread(self._worker.stop)
            self._opened = False

    async def seed(self, cards: Iterable[SeedCard]) -> list[SeedCard]:
        todo = [(c, self.pan_ref(c.pan)) for c in cards]

        def op(conn: sqlite3.Connection) -> list[SeedCard]:
            created = []
            for c, ref in todo:
                conn.execute(
                    "INSERT OR IGNORE INTO accounts (id, currency, opening, balance, held) "
                    "VALUES (?, ?, ?, ?, 0)",
                    (c.account_id, c.currency, c.balance, c.balance),
                )
                cur = conn.execute(
                    "INSERT OR IGNORE INTO cards (pan_ref, masked_pan, account_id, status) "
                    "VALUES (?, ?, ?, ?)",
                    (ref, mask_pan(c.pan), c.account_id, c.status),
                )
                if cur.rowcount:
                    created.append(c)
            return created

        return await self._worker.call(op)

    async def _fetch_card(self, ref: str) -> Card | None:
        def op(conn: sqlite3.Connection) -> Card | None:
            row = conn.execute(
                "SELECT pan_ref, masked_pan, account_id, status FROM cards WHERE pan_ref = ?",
                (ref,),
            ).fetchone()
            return Card(*row) if row else None

        return await self._worker.call(op)

    async def set_card_status(self, pan: str, status: str) -> bool:
        ref = self.pan_ref(pan)
        self._forget_card(pan)
        return await self._worker.call(
            lambda conn: (
                conn.execute(
                    "UPDATE cards SET status = ? WHERE pan_ref = ?", (status, ref)
                ).rowcount
                == 1
            )
        )

    async def account(self, account_id: str) -> Account | None:
        def op(conn: sqlite3.Connection) -> Account | None:
            row = conn.execute(
                "SELECT id, currency, opening, balance, held FROM accounts WHERE id = ?",
                (account_id,),
            ).fetchone()
            return Account(*row) if row else None

        return await self._worker.call(op)

    async def accounts(self) -> list[Account]:
        def op(conn: sqlite3.Connection) -> list[Account]:
            rows = conn.execute(
                "SELECT id, currency, opening, balance, held FROM accounts ORDER BY id"
            ).fetchall()
            return [Account(*r) for r in rows]

        return await self._worker.call(op)

    async def reserve(
        self,
        txn_id: str,
        account_id: str,
        amount: int,
        *,
        mti: str | None = None,
        terminal: str | None = None,
        stan: str | None = None,
        tx_time: str | None = None,
        rrn: str | None = None,
        idem_key: str | None = None,
        approval_code: str | None = None,
        pan_ref: str | None = None,
    ) -> ReserveResult:
        if amount < 0:
            raise ValueError(f"amount must not be negative: {amount}")

        def op(conn: sqlite3.Connection) -> ReserveResult:
            # this transaction's hold, and a live hold of the same idempotency key, in one query
            if idem_key is None:
                rows = conn.execute(
                    f"SELECT {HOLD_COLUMNS} FROM holds WHERE txn_id = ?", (txn_id,)
                ).fetchall()
            else:
                rows = conn.execute(
                    f"SELECT {HOLD_COLUMNS} FROM holds WHERE txn_id = ? "
                    "OR (idem_key = ? AND state <> 'released')",
                    (txn_id, idem_key),
                ).fetchall()
            dup = None
            for row in rows:
                if row[0] == txn_id:
                    ok = row[3] != HoldState.RELEASED
                    return ReserveResult(
                        ReserveStatus.APPROVED if ok else ReserveStatus.INSUFFICIENT_FUNDS
                    )
                dup = row
            if dup is not None:
                return ReserveResult(ReserveStatus.DUPLICATE, original=Hold(*dup))
            held = conn.execute(
                "UPDATE accounts SET held = held + ? WHERE id = ? AND balance - held >= ? "
                "RETURNING balance - held",
                (amount, account_id, amount),
            ).fetchall()
            if not held:
                row = conn.execute(
                    "SELECT balance - held FROM accounts WHERE id = ?", (account_id,)
                ).fetchone()
                if row is None:
                    return ReserveResult(ReserveStatus.NO_ACCOUNT)
                return ReserveResult(ReserveStatus.INSUFFICIENT_FUNDS, row[0])
            now = _now()
            conn.execute(
                f"INSERT INTO holds ({HOLD_COLUMNS}, created_at, updated_at) "
                "VALUES (?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    txn_id,
                    account_id,
                    amount,
                    mti,
                    terminal,
                    stan,
                    tx_time,
                    rrn,
                    idem_key,
                    approval_code,
                    pan_ref,
                    now,
                    now,
                ),
            )
            return ReserveResult(ReserveStatus.APPROVED, held[0][0])

        return await self._worker.call(op)

    def _transition(
        self, txn_id: str, from_states: tuple[str, ...], to_state: str, account_sql: str
    ) -> Callable[[sqlite3.Connection], bool]:
        marks = ", ".join("?" for _ in from_states)

        def op(conn: sqlite3.Connection) -> bool:
            now = _now()
            rows = conn.execute(
                "UPDATE holds SET state = ?, updated_at = ? "
                f"WHERE txn_id = ? AND state IN ({marks}) RETURNING account_id, amount",
                (to_state, now, txn_id, *from_states),
            ).fetchall()
            if not rows:
                return False
            account_id, amount = rows[0]
            if account_sql:
                args = (
                    (amount, account_id)
                    if account_sql.count("?") == 2
                    else (amount, amount, account_id)
                )
                conn.execute(account_sql, args)
            if to_state == HoldState.CAPTURED:
                conn.execute(
                    "INSERT INTO captures (txn_id, account_id, amount, captured_at) "
                    "VALUES (?, ?, ?, ?)",
                    (txn_id, account_id, amount, now),
                )
            elif to_state == HoldState.REFUNDED:
                conn.execute("UPDATE captures SET refunded_at = ? WHERE txn_id = ?", (now, txn_id))
            return True

        return op

    async def authorize(self, txn_id: str) -> bool:
        return await self._worker.call(
            self._transition(txn_id, (HoldState.PENDING.value,), HoldState.AUTHORIZED, "")
        )

    async def capture(self, txn_id: str) -> bool:
        return await self._worker.call(
            self._transition(
                txn_id,
                OPEN_STATES,
                HoldState.CAPTURED,
                "UPDATE accounts SET balance = balance - ?, held = held - ? WHERE id = ?",
            )
        )

    async def release(self, txn_id: str) -> bool:
        return await self._worker.call(
            self._transition(
                txn_id,
                OPEN_STATES,
                HoldState.RELEASED,
                "UPDATE accounts SET held = held - ? WHERE id = ?",
            )
        )

    async def refund(self, txn_id: str) -> bool:
        return await self._worker.call(
            self._transition(
                txn_id,
                (HoldState.CAPTURED.value,),
                HoldState.REFUNDED,
                "UPDATE accounts SET balance = balance + ? WHERE id = ?",
            )
        )

    async def hold(self, txn_id: str) -> Hold | None:
        def op(conn: sqlite3.Connection) -> Hold | None:
            row = conn.execute(
                f"SELECT {HOLD_COLUMNS} FROM holds WHERE txn_id = ?", (txn_id,)
            ).fetchone()
            return Hold(*row) if row else None

        return await self._worker.call(op)

    async def find_original(
        self,
        *,
        terminal: str,
        stan: str | None = None,
        tx_time: str | None = None,
        rrn: str | None = None,
        pan_ref: str | None = None,
        amount: int | None = None,
    ) -> Hold | None:
        match = ""  # the card and the amount, when given
        match_args: tuple[Any, ...] = ()
        if pan_ref is not None:
            match += (
                " AND (pan_ref = ? OR (pan_ref IS NULL AND account_id = "
                "(SELECT c.account_id FROM cards c WHERE c.pan_ref = ?)))"
            )
            match_args += (pan_ref, pan_ref)
        if amount is not None:
            match += " AND amount = ?"
            match_args += (amount,)

        def op(conn: sqlite3.Connection) -> Hold | None:
            row = None
            if stan is not None:
                sql = f"SELECT {HOLD_COLUMNS} FROM holds WHERE terminal = ? AND stan = ?"
                args: tuple[Any, ...] = (terminal, stan)
                if tx_time is not None:
                    sql += " AND tx_time = ?"
                    args += (tx_time,)
                row = conn.execute(
                    sql + match + " ORDER BY created_at DESC LIMIT 1", args + match_args
                ).fetchone()
            if row is None and rrn is not None:
                row = conn.execute(
                    f"SELECT {HOLD_COLUMNS} FROM holds WHERE terminal = ? AND rrn = ?"
                    + match
                    + " ORDER BY created_at DESC LIMIT 1",
                    (terminal, rrn, *match_args),
                ).fetchone()
            return Hold(*row) if row else None

        return await self._worker.call(op)

    async def pending_holds(self) -> list[Hold]:
        def op(conn: sqlite3.Connection) -> list[Hold]:
            rows = conn.execute(
                f"SELECT {HOLD_COLUMNS} FROM holds WHERE state = 'pending' ORDER BY created_at"
            ).fetchall()
            return [Hold(*r) for r in rows]

        return await self._worker.call(op)

    async def check(self) -> LedgerCheck:
        def op(conn: sqlite3.Connection) -> LedgerCheck:
            rows = conn.execute(CHECK_SQL).fetchall()
            (holds,) = conn.execute("SELECT COUNT(*) FROM holds").fetchone()
            (pending,) = conn.execute(
                "SELECT COUNT(*) FROM holds WHERE state = 'pending'"
            ).fetchone()
            (mismatched,) = conn.execute(CAPTURE_MISMATCH_SQL).fetchone()
            return check_rows(rows, holds, pending, mismatched)

        return await self._worker.call(op)
