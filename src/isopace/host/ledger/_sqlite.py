"""The SQLite ledger (standard library ``sqlite3``, the default backend).

The ledger runs on a :class:`isopace.store.SqliteDatabase`: every operation runs inline on the
event loop, in the order operations are called (so a release called after a reserve always sees
the hold), each write in a SAVEPOINT of the database's open transaction (a failed one is undone
alone; the transaction commits at the next loop iteration). ``SqliteLedger(path)`` opens a
database of its own and returns from a write only once it is on disk; ``SqliteLedger.on(database)``
shares the host's database with its journal and idempotency store, where a write is committed in
order with theirs and made durable by the database's next sync (the one the idempotency store's
``complete`` waits for before the response leaves; see :mod:`isopace.store.sqlite_database`).
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from isopace.host.errors import LedgerError
from isopace.host.ledger._common import (
    CAPTURE_MISMATCH_SQL,
    CASH_STATES,
    CHECK_SQL,
    COMPLETION_INDEXES,
    HOLD_COLUMNS,
    KEY_INDEX,
    KEY_USAGE_SQL,
    NO_DETAILS,
    OPEN_STATES,
    REDUCIBLE_STATES,
    SCHEMA_VERSION,
    Account,
    Card,
    Hold,
    HoldDetails,
    HoldState,
    Kind,
    Ledger,
    LedgerCheck,
    ReserveResult,
    ReserveStatus,
    SeedCard,
    check_rows,
    refs_of,
    usage_of,
)
from isopace.iso8583 import mask_pan
from isopace.store.errors import StoreError
from isopace.store.keys import KeyUsage, key_id_sql
from isopace.store.sqlite_database import SqliteDatabase

if TYPE_CHECKING:
    from isopace.store.keys import KeyRing

T = TypeVar("T")


def _now() -> str:
    """The time a hold row records: ``datetime.now(UTC).isoformat(timespec="microseconds")``
    (``2026-12-07T01:50:00.123456+00:00``), its date and second formatted once per second
    (``isoformat`` of an aware datetime costs more than the statement it goes into)."""
    us = time.time_ns() // 1000
    second, micro = divmod(us, 1_000_000)
    if second != _SECOND[0]:
        _SECOND[0] = second
        _SECOND[1] = _dt.datetime.fromtimestamp(second, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.")
    return f"{_SECOND[1]}{micro:06d}+00:00"


#: The second ``_now`` last formatted, and its text up to the microseconds.
_SECOND: list[Any] = [-1, ""]


def _midnight() -> str:
    """Today's start (UTC) in the format of ``created_at``: where a daily cash limit counts from."""
    today = _dt.datetime.now(_dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today.isoformat(timespec="microseconds")


CASH_INDEX = "CREATE INDEX IF NOT EXISTS holds_cash ON holds (pan_ref, created_at) WHERE cash > 0"
CASH_USED_SQL = (
    "SELECT COALESCE(SUM(cash), 0) FROM holds WHERE pan_ref = ? AND created_at >= ? AND cash > 0 "
    f"AND state IN ({', '.join(repr(state) for state in CASH_STATES)})"
)


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
    original_amount INTEGER,
    kind TEXT,
    cash INTEGER NOT NULL DEFAULT 0,
    completed_by TEXT,
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
CREATE TABLE IF NOT EXISTS early_reversals (
    txn_id TEXT PRIMARY KEY,
    terminal TEXT NOT NULL,
    stan TEXT,
    tx_time TEXT,
    rrn TEXT,
    pan_ref TEXT NOT NULL,
    amount INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS early_reversals_by_card ON early_reversals (terminal, pan_ref);
"""

#: A remembered reversal of the transaction being reserved: ``(terminal, pan_ref, amount, now,
#: stan, tx_time, rrn)``.
_EARLY_REVERSAL = """
SELECT txn_id FROM early_reversals
WHERE terminal = ? AND pan_ref = ? AND amount = ? AND expires_at > ?
  AND ((stan = ? AND (tx_time IS NULL OR tx_time = ?)) OR rrn = ?)
LIMIT 1
"""


class SqliteLedger(Ledger):
    """The embedded ledger: standard library ``sqlite3``, WAL, on a `SqliteDatabase`."""

    @classmethod
    def on(cls, database: SqliteDatabase, *, keys: KeyRing | None = None) -> SqliteLedger:
        """A ledger in the shared ``database`` (see the module docstring)."""
        return cls(database.path, database=database, keys=keys)

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "FULL",
        database: SqliteDatabase | None = None,
        keys: KeyRing | None = None,
    ) -> None:
        if keys is not None:
            self.use_keys(keys)
        if synchronous.upper() not in {"NORMAL", "FULL", "EXTRA"}:
            raise ValueError(f"synchronous must be NORMAL, FULL or EXTRA, not {synchronous!r}")
        self.path = os.fspath(path)
        self._synchronous = synchronous.upper()
        self._shared = database is not None
        self._db = database
        self._opened = False
        # whether early_reversals may hold a row: this process is the file's only writer (the
        # host's lock), so while none was ever remembered a reserve skips looking there
        self._early_reversals = False

    async def _write(self, fn: Callable[[sqlite3.Connection], T], *, durable: bool = False) -> T:
        """Run a write; a ledger of its own waits for the disk, a shared one when ``durable``."""
        try:
            return await self._database().call(fn, durable=durable or not self._shared)
        except StoreError as exc:
            raise LedgerError(f"ledger {self.path}: {exc.__cause__ or exc}") from exc

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return self._database().read(fn)
        except StoreError as exc:
            raise LedgerError(f"ledger {self.path}: {exc.__cause__ or exc}") from exc

    def _database(self) -> SqliteDatabase:
        if self._db is None or not self._opened:
            raise LedgerError(f"ledger {self.path}: not open")
        return self._db

    def _init(self, conn: sqlite3.Connection) -> None:
        row = conn.execute("SELECT value FROM ledger_meta WHERE key = 'schema_version'").fetchone()
        if row is not None and int(row[0]) > SCHEMA_VERSION:
            raise LedgerError(
                f"schema version {row[0]} is newer than this isopace ({SCHEMA_VERSION})"
            )
        # Upgrade a version 1 file (no-op on a new one, whose tables already have the columns).
        columns = {r[1] for r in conn.execute("PRAGMA table_info(holds)")}
        for column, kind in (
            ("idem_key", "TEXT"),
            ("approval_code", "TEXT"),
            ("pan_ref", "TEXT"),
            ("original_amount", "INTEGER"),
            ("kind", "TEXT"),
            ("cash", "INTEGER NOT NULL DEFAULT 0"),
            ("completed_by", "TEXT"),
        ):
            if column not in columns:
                conn.execute(f"ALTER TABLE holds ADD COLUMN {column} {kind}")
        conn.execute(KEY_INDEX)
        conn.execute(CASH_INDEX)
        for index in COMPLETION_INDEXES:
            conn.execute(index)
        conn.execute(
            "INSERT INTO ledger_meta (key, value) VALUES ('schema_version', ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (str(SCHEMA_VERSION),),
        )

    async def open(self) -> None:
        if self._opened:
            return
        try:
            if self._db is None:
                self._db = await asyncio.to_thread(
                    SqliteDatabase, self.path, synchronous=self._synchronous
                )
            # executescript commits as it goes: the tables first, then the rest in one transaction
            self._db.setup(lambda conn: conn.executescript(_SQLITE_SCHEMA))
            self._db.write(self._init)
        except StoreError as exc:
            if not self._shared and self._db is not None:
                await self._db.close()
                self._db = None
            raise LedgerError(f"ledger {self.path}: cannot open: {exc.__cause__ or exc}") from exc
        self._early_reversals = (
            self._db.read(
                lambda conn: conn.execute("SELECT 1 FROM early_reversals LIMIT 1").fetchone()
            )
            is not None
        )
        self._opened = True

    async def close(self) -> None:
        if self._opened:
            self._opened = False
            if not self._shared and self._db is not None:
                await self._db.close()
                self._db = None

    async def seed(self, cards: Iterable[SeedCard]) -> list[SeedCard]:
        todo = [(c, self.pan_refs(c.pan)) for c in cards]

        def op(conn: sqlite3.Connection) -> list[SeedCard]:
            created = []
            for c, refs in todo:
                ref = refs[0]
                marks = ",".join("?" * len(refs))
                if conn.execute(f"SELECT 1 FROM cards WHERE pan_ref IN ({marks})", refs).fetchone():
                    continue  # already there, under an older key
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

        return await self._write(op, durable=True)

    async def _fetch_card(self, refs: Sequence[str]) -> Card | None:
        sql = (
            "SELECT c.pan_ref, c.masked_pan, c.account_id, c.status, a.currency FROM cards c "
            "JOIN accounts a ON a.id = c.account_id "
            f"WHERE c.pan_ref IN ({','.join('?' * len(refs))}) LIMIT 1"
        )

        def op(conn: sqlite3.Connection) -> Card | None:
            row = conn.execute(sql, tuple(refs)).fetchone()
            return Card(*row) if row else None

        return await self._read(op)

    async def set_card_status(self, pan: str, status: str) -> bool:
        refs = self.pan_refs(pan)
        self._forget_card(pan)
        sql = f"UPDATE cards SET status = ? WHERE pan_ref IN ({','.join('?' * len(refs))})"
        return await self._write(
            lambda conn: conn.execute(sql, (status, *refs)).rowcount == 1, durable=True
        )

    # -- keys ------------------------------------------------------------------------------------

    async def legacy_card_key(self) -> bytes | None:
        row = await self._read(
            lambda conn: conn.execute(
                "SELECT value FROM ledger_meta WHERE key = 'pan_key'"
            ).fetchone()
        )
        return bytes.fromhex(row[0]) if row else None

    async def drop_legacy_card_key(self) -> None:
        def op(conn: sqlite3.Connection) -> None:
            # secure_delete overwrites the deleted row's bytes in its page, so no copy of the
            # key is left in the file's free space
            conn.execute("PRAGMA secure_delete = ON")
            try:
                conn.execute("DELETE FROM ledger_meta WHERE key = 'pan_key'")
            finally:
                conn.execute("PRAGMA secure_delete = OFF")

        await self._write(op, durable=True)
        # the pages that held the key may still be in the WAL: copy the WAL into the database
        # (over the old pages) and empty it
        self._database().setup(lambda conn: conn.execute("PRAGMA wal_checkpoint(TRUNCATE)"))

    async def sample_pan_ref(self) -> str | None:
        row = await self._read(
            lambda conn: conn.execute("SELECT pan_ref FROM cards LIMIT 1").fetchone()
        )
        return str(row[0]) if row else None

    async def key_usage(self) -> KeyUsage:
        return usage_of(await self._read(lambda conn: conn.execute(KEY_USAGE_SQL).fetchall()))

    async def _stale_cards(self, current: str, after: str, limit: int) -> list[tuple[str, str]]:
        sql = (
            "SELECT pan_ref, masked_pan FROM cards WHERE "
            f"{key_id_sql('pan_ref')} IS NOT ? AND pan_ref > ? ORDER BY pan_ref LIMIT ?"
        )
        rows = await self._read(lambda conn: conn.execute(sql, (current, after, limit)).fetchall())
        return [(str(r[0]), str(r[1])) for r in rows]

    async def _move_ref(self, old: str, new: str | None, batch: int) -> tuple[int, int]:
        if new is None:
            return 0, 0
        holds = 0
        while True:
            n = await self._write(
                lambda conn: (
                    conn.execute(
                        "UPDATE holds SET pan_ref = ? WHERE rowid IN "
                        "(SELECT rowid FROM holds WHERE pan_ref = ? LIMIT ?)",
                        (new, old, batch),
                    ).rowcount
                ),
                durable=True,
            )
            holds += n
            if n < batch:
                break
        cards = await self._write(
            lambda conn: (
                conn.execute("UPDATE cards SET pan_ref = ? WHERE pan_ref = ?", (new, old)).rowcount
            ),
            durable=True,
        )
        return cards, holds

    async def account(self, account_id: str) -> Account | None:
        def op(conn: sqlite3.Connection) -> Account | None:
            row = conn.execute(
                "SELECT id, currency, opening, balance, held FROM accounts WHERE id = ?",
                (account_id,),
            ).fetchone()
            return Account(*row) if row else None

        return await self._read(op)

    async def accounts(self) -> list[Account]:
        def op(conn: sqlite3.Connection) -> list[Account]:
            rows = conn.execute(
                "SELECT id, currency, opening, balance, held FROM accounts ORDER BY id"
            ).fetchall()
            return [Account(*r) for r in rows]

        return await self._read(op)

    async def reserve(
        self,
        txn_id: str,
        account_id: str,
        amount: int,
        details: HoldDetails = NO_DETAILS,
        *,
        kind: Kind = Kind.PURCHASE,
        cash: int = 0,
        cash_limit: int = 0,
    ) -> ReserveResult:
        if amount < 0 or cash < 0:
            raise ValueError(f"amounts must not be negative: {amount}, {cash}")
        terminal, stan, tx_time, rrn = details.terminal, details.stan, details.tx_time, details.rrn
        idem_key, pan_ref = details.idem_key, details.pan_ref

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
            if self._early_reversals and terminal is not None and pan_ref is not None:
                early = conn.execute(
                    _EARLY_REVERSAL, (terminal, pan_ref, amount, _now(), stan, tx_time, rrn)
                ).fetchone()
                if early is not None:
                    return ReserveResult(ReserveStatus.REVERSED)
            if cash and cash_limit and pan_ref is not None:
                (used,) = conn.execute(CASH_USED_SQL, (pan_ref, _midnight())).fetchone()
                if used + cash > cash_limit:
                    return ReserveResult(ReserveStatus.OVER_CASH_LIMIT)
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
                "VALUES (?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?, ?, ?)",
                (txn_id, account_id, amount, *details.columns(), kind.value, cash, now, now),
            )
            return ReserveResult(ReserveStatus.APPROVED, held[0][0])

        return await self._write(op)

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
        return await self._write(
            self._transition(txn_id, (HoldState.PENDING.value,), HoldState.AUTHORIZED, "")
        )

    async def capture(self, txn_id: str) -> bool:
        return await self._write(
            self._transition(
                txn_id,
                OPEN_STATES,
                HoldState.CAPTURED,
                "UPDATE accounts SET balance = balance - ?, held = held - ? WHERE id = ?",
            )
        )

    async def release(self, txn_id: str) -> bool:
        return await self._write(
            self._transition(
                txn_id,
                OPEN_STATES,
                HoldState.RELEASED,
                "UPDATE accounts SET held = held - ? WHERE id = ?",
            )
        )

    async def refund(self, txn_id: str) -> bool:
        return await self._write(
            self._transition(
                txn_id,
                (HoldState.CAPTURED.value,),
                HoldState.REFUNDED,
                "UPDATE accounts SET balance = balance + ? WHERE id = ?",
            )
        )

    async def credit(
        self,
        txn_id: str,
        account_id: str,
        amount: int,
        details: HoldDetails = NO_DETAILS,
    ) -> bool:
        if amount < 0:
            raise ValueError(f"amount must not be negative: {amount}")

        def op(conn: sqlite3.Connection) -> bool:
            now = _now()
            # OR IGNORE: the transaction id, or the live holds' unique idempotency key
            done = conn.execute(
                f"INSERT OR IGNORE INTO holds ({HOLD_COLUMNS}, created_at, updated_at) "
                "VALUES (?, ?, ?, 'credited', ?, ?, ?, ?, ?, ?, ?, ?, NULL, 'refund', 0, ?, ?)",
                (txn_id, account_id, amount, *details.columns(), now, now),
            )
            if not done.rowcount:
                return False
            conn.execute(
                "INSERT INTO captures (txn_id, account_id, amount, captured_at) "
                "VALUES (?, ?, ?, ?)",
                (txn_id, account_id, -amount, now),
            )
            conn.execute(
                "UPDATE accounts SET balance = balance + ? WHERE id = ?", (amount, account_id)
            )
            return True

        return await self._write(op)

    async def hold_by_key(self, idem_key: str) -> Hold | None:
        def op(conn: sqlite3.Connection) -> Hold | None:
            row = conn.execute(
                f"SELECT {HOLD_COLUMNS} FROM holds WHERE idem_key = ? AND state <> 'released'",
                (idem_key,),
            ).fetchone()
            return Hold(*row) if row else None

        return await self._read(op)

    async def reduce(self, txn_id: str, amount: int) -> bool:
        if amount < 0:
            raise ValueError(f"amount must not be negative: {amount}")

        def op(conn: sqlite3.Connection) -> bool:
            marks = ", ".join("?" * len(REDUCIBLE_STATES))
            row = conn.execute(
                f"SELECT account_id, amount, state FROM holds WHERE txn_id = ? AND amount > ? "
                f"AND state IN ({marks})",
                (txn_id, amount, *REDUCIBLE_STATES),
            ).fetchone()
            if row is None:
                return False
            account_id, standing, state = row
            less = standing - amount
            conn.execute(
                "UPDATE holds SET original_amount = COALESCE(original_amount, amount), "
                "amount = ?, cash = MIN(cash, ?), updated_at = ? WHERE txn_id = ?",
                (amount, amount, _now(), txn_id),
            )
            if state == HoldState.CAPTURED:
                conn.execute("UPDATE captures SET amount = ? WHERE txn_id = ?", (amount, txn_id))
                conn.execute(
                    "UPDATE accounts SET balance = balance + ? WHERE id = ?", (less, account_id)
                )
            else:
                conn.execute("UPDATE accounts SET held = held - ? WHERE id = ?", (less, account_id))
            return True

        return await self._write(op)

    async def remember_reversal(
        self,
        txn_id: str,
        *,
        terminal: str,
        stan: str | None,
        tx_time: str | None,
        rrn: str | None,
        pan_ref: str,
        amount: int,
        expires_in: float,
    ) -> bool:
        now = _dt.datetime.now(_dt.UTC)
        created = now.isoformat(timespec="microseconds")
        expires = (now + _dt.timedelta(seconds=expires_in)).isoformat(timespec="microseconds")

        def op(conn: sqlite3.Connection) -> bool:
            conn.execute(
                "DELETE FROM early_reversals WHERE rowid IN "
                "(SELECT rowid FROM early_reversals WHERE expires_at <= ? LIMIT 100)",
                (created,),
            )
            done = conn.execute(
                "INSERT INTO early_reversals (txn_id, terminal, stan, tx_time, rrn, pan_ref, "
                "amount, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (txn_id) DO NOTHING",
                (txn_id, terminal, stan, tx_time, rrn, pan_ref, amount, created, expires),
            )
            if done.rowcount:
                self._early_reversals = True
            return bool(done.rowcount)

        return await self._write(op)

    async def forget_reversal(self, txn_id: str) -> bool:
        return await self._write(
            lambda conn: bool(
                conn.execute("DELETE FROM early_reversals WHERE txn_id = ?", (txn_id,)).rowcount
            )
        )

    async def claim_completion(self, txn_id: str, by: str) -> bool:
        return await self._write(
            lambda conn: bool(
                conn.execute(
                    "UPDATE holds SET completed_by = ?, updated_at = ? WHERE txn_id = ? "
                    "AND state IN (?, ?) AND (completed_by IS NULL OR completed_by = ?)",
                    (by, _now(), txn_id, *OPEN_STATES, by),
                ).rowcount
            )
        )

    async def complete(self, by: str, amount: int) -> bool:
        if amount < 0:
            raise ValueError(f"amount must not be negative: {amount}")

        def op(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT txn_id, account_id, amount FROM holds WHERE completed_by = ? "
                "AND state IN (?, ?)",
                (by, *OPEN_STATES),
            ).fetchone()
            if row is None:
                return False
            txn_id, account_id, held = row
            captured = min(amount, held)
            now = _now()
            conn.execute(
                "UPDATE holds SET state = 'captured', amount = ?, updated_at = ?, "
                "original_amount = CASE WHEN ? < amount THEN COALESCE(original_amount, amount) "
                "ELSE original_amount END WHERE txn_id = ?",
                (captured, now, captured, txn_id),
            )
            conn.execute(
                "UPDATE accounts SET balance = balance - ?, held = held - ? WHERE id = ?",
                (captured, held, account_id),
            )
            conn.execute(
                "INSERT INTO captures (txn_id, account_id, amount, captured_at) "
                "VALUES (?, ?, ?, ?)",
                (txn_id, account_id, captured, now),
            )
            return True

        return await self._write(op)

    async def unclaim_completion(self, by: str) -> bool:
        return await self._write(
            lambda conn: bool(
                conn.execute(
                    "UPDATE holds SET completed_by = NULL WHERE completed_by = ? "
                    "AND state IN (?, ?)",
                    (by, *OPEN_STATES),
                ).rowcount
            )
        )

    async def expire(self, older_than: float, *, batch: int = 100) -> int:
        if batch < 1:
            raise ValueError(f"batch must be at least 1, not {batch}")
        total = 0
        while True:
            now = _dt.datetime.now(_dt.UTC)
            cut = (now - _dt.timedelta(seconds=older_than)).isoformat(timespec="microseconds")

            def op(conn: sqlite3.Connection, cut: str = cut) -> int:
                rows = conn.execute(
                    "UPDATE holds SET state = 'expired', updated_at = ? WHERE txn_id IN "
                    "(SELECT txn_id FROM holds WHERE state = 'authorized' AND created_at < ? "
                    "AND (completed_by IS NULL OR updated_at < ?) ORDER BY created_at LIMIT ?) "
                    "RETURNING account_id, amount",
                    (_now(), cut, cut, batch),
                ).fetchall()
                freed: dict[str, int] = {}
                for account_id, amount in rows:
                    freed[account_id] = freed.get(account_id, 0) + amount
                for account_id, amount in freed.items():
                    conn.execute(
                        "UPDATE accounts SET held = held - ? WHERE id = ?", (amount, account_id)
                    )
                return len(rows)

            expired = await self._write(op)
            total += expired
            if expired < batch:
                return total
            await asyncio.sleep(0)  # one batch per loop turn

    async def expired_holds(self, limit: int = 100) -> list[Hold]:
        def op(conn: sqlite3.Connection) -> list[Hold]:
            rows = conn.execute(
                f"SELECT {HOLD_COLUMNS} FROM holds WHERE state = 'expired' "
                "ORDER BY updated_at DESC LIMIT ?",
                (limit,),
            ).fetchall()
            return [Hold(*r) for r in rows]

        return await self._read(op)

    async def hold(self, txn_id: str) -> Hold | None:
        def op(conn: sqlite3.Connection) -> Hold | None:
            row = conn.execute(
                f"SELECT {HOLD_COLUMNS} FROM holds WHERE txn_id = ?", (txn_id,)
            ).fetchone()
            return Hold(*row) if row else None

        return await self._read(op)

    async def find_original(
        self,
        *,
        terminal: str,
        stan: str | None = None,
        tx_time: str | None = None,
        rrn: str | None = None,
        pan_ref: str | Sequence[str] | None = None,
        amount: int | None = None,
        approval_code: str | None = None,
    ) -> Hold | None:
        match = ""  # the card and the amount, when given
        match_args: tuple[Any, ...] = ()
        if pan_ref is not None:
            refs = refs_of(pan_ref)
            marks = ",".join("?" * len(refs))
            match += (
                f" AND (pan_ref IN ({marks}) OR (pan_ref IS NULL AND account_id = "
                f"(SELECT c.account_id FROM cards c WHERE c.pan_ref IN ({marks}))))"
            )
            match_args += (*refs, *refs)
        if amount is not None:
            match += " AND COALESCE(original_amount, amount) = ?"
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
            if row is None and approval_code is not None:
                row = conn.execute(
                    f"SELECT {HOLD_COLUMNS} FROM holds WHERE terminal = ? AND approval_code = ?"
                    + match
                    + " ORDER BY created_at DESC LIMIT 1",
                    (terminal, approval_code, *match_args),
                ).fetchone()
            return Hold(*row) if row else None

        return await self._read(op)

    async def pending_holds(self) -> list[Hold]:
        def op(conn: sqlite3.Connection) -> list[Hold]:
            rows = conn.execute(
                f"SELECT {HOLD_COLUMNS} FROM holds WHERE state = 'pending' ORDER BY created_at"
            ).fetchall()
            return [Hold(*r) for r in rows]

        return await self._read(op)

    async def check(self) -> LedgerCheck:
        def op(conn: sqlite3.Connection) -> LedgerCheck:
            rows = conn.execute(CHECK_SQL).fetchall()
            (holds,) = conn.execute("SELECT COUNT(*) FROM holds").fetchone()
            (pending,) = conn.execute(
                "SELECT COUNT(*) FROM holds WHERE state = 'pending'"
            ).fetchone()
            (mismatched,) = conn.execute(CAPTURE_MISMATCH_SQL).fetchone()
            (expired,) = conn.execute(
                "SELECT COUNT(*) FROM holds WHERE state = 'expired'"
            ).fetchone()
            return check_rows(rows, holds, pending, mismatched, expired)

        return await self._read(op)
