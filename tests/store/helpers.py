"""Shared pieces of the store tests: messages, a ledger stage, service locations."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from isopace.flow import CONTINUE, Exchange, Flow
from isopace.iso8583 import Message

PG_HOST = "127.0.0.1"
REDIS_URL = "redis://127.0.0.1:6379/0"
PAN = "4761739001010010"

_dsn: str | None = None


async def pg_dsn() -> str:
    """A DSN that works on this machine (user postgres, else root; trust auth, db ``test``)."""
    global _dsn
    if _dsn is not None:
        return _dsn
    import asyncpg

    errors = []
    for user in ("postgres", "root"):
        dsn = f"postgresql://{user}@{PG_HOST}:5432/test"
        try:
            conn = await asyncpg.connect(dsn, timeout=5)
        except Exception as exc:
            errors.append(f"{user}: {exc}")
            continue
        await conn.close()
        _dsn = dsn
        return dsn
    raise RuntimeError(f"PostgreSQL is not reachable at {PG_HOST}:5432: {'; '.join(errors)}")


def request(stan: int = 1, amount: int = 2500, pan: str = PAN) -> Message:
    return Message(
        "0200",
        {
            2: pan,
            3: "000000",
            4: f"{amount:012d}",
            11: f"{stan % 1_000_000:06d}",
            35: f"{pan}=25121010000000000",
            41: "TERM0001",
            52: bytes.fromhex("0123456789ABCDEF"),
            55: bytes.fromhex("5A08" + pan + "9F0206000000002500" + "9F2608AABBCCDDEEFF0011"),
        },
    )


def approve(ex: Exchange) -> None:
    ex.response = Message("0210", {4: ex.request[4], 11: ex.request[11], 39: "00", 2: PAN})


class Ledger:
    """Holds keyed by transaction id in their own SQLite file; the balance moves on capture."""

    def __init__(self, path: str | Path) -> None:
        self.conn = sqlite3.connect(str(path), isolation_level=None, timeout=30)
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = FULL")
        self.conn.execute("BEGIN IMMEDIATE")
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS holds (tx_id TEXT PRIMARY KEY, amount INTEGER NOT NULL, "
            "state TEXT NOT NULL)"
        )
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS account (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL)"
        )
        self.conn.execute("INSERT OR IGNORE INTO account VALUES (1, 0)")
        self.conn.execute("COMMIT")

    def reserve(self, tx_id: str, amount: int) -> None:
        self.conn.execute("INSERT OR IGNORE INTO holds VALUES (?, ?, 'held')", (tx_id, amount))

    def capture(self, tx_id: str) -> None:
        self.conn.execute("BEGIN IMMEDIATE")
        cur = self.conn.execute(
            "UPDATE holds SET state = 'captured' WHERE tx_id = ? AND state = 'held'", (tx_id,)
        )
        if cur.rowcount:
            self.conn.execute(
                "UPDATE account SET balance = balance + "
                "(SELECT amount FROM holds WHERE tx_id = ?) WHERE id = 1",
                (tx_id,),
            )
        self.conn.execute("COMMIT")

    def release(self, tx_id: str) -> None:
        self.conn.execute(
            "UPDATE holds SET state = 'released' WHERE tx_id = ? AND state = 'held'", (tx_id,)
        )

    def balance(self) -> int:
        return int(self.conn.execute("SELECT balance FROM account WHERE id = 1").fetchone()[0])

    def holds(self, state: str) -> dict[str, int]:
        rows = self.conn.execute("SELECT tx_id, amount FROM holds WHERE state = ?", (state,))
        return dict(rows.fetchall())

    def close(self) -> None:
        self.conn.close()


class LedgerStage:
    """Reserve in prepare, capture in commit, release in abort; recover by transaction id."""

    name = "ledger"

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    async def prepare(self, ex: Exchange) -> object:
        amount = int(ex.request[4])
        self.ledger.reserve(ex.id, amount)
        ex.set("amount", amount, durable=True)
        await asyncio.sleep(0)  # a window between the reservation and the decision
        return CONTINUE

    async def commit(self, ex: Exchange) -> None:
        await asyncio.sleep(0)
        self.ledger.capture(ex.id)

    def abort(self, ex: Exchange) -> None:
        self.ledger.release(ex.id)

    def recover(self, ex: Exchange, committing: bool) -> None:
        if committing:
            self.ledger.capture(ex.id)
        else:
            self.ledger.release(ex.id)


class Responder:
    """Approves, or declines (abort with a response) amounts divisible by 7."""

    name = "respond"

    def prepare(self, ex: Exchange) -> object:
        approve(ex)
        if int(ex.request[4]) % 7 == 0:
            assert ex.response is not None
            ex.response = ex.response.set(39, "51")
            ex.abort()
        return CONTINUE


def ledger_flow(ledger: Ledger, journal: object) -> Flow:
    return Flow(journal=journal).group("main", LedgerStage(ledger), Responder())  # type: ignore[arg-type]
