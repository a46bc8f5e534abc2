"""The PostgreSQL ledger (asyncpg, the ``postgres`` extra), for several host processes sharing
one database."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

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
from isopace.store.keys import KeyUsage, key_id_sql
from isopace.store.postgres import check_schema

if TYPE_CHECKING:
    import asyncpg  # type: ignore[import-untyped]

    from isopace.store.keys import KeyRing
    from isopace.store.postgres import PostgresPool


_PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS accounts (
    id TEXT PRIMARY KEY,
    currency TEXT NOT NULL,
    opening BIGINT NOT NULL,
    balance BIGINT NOT NULL,
    held BIGINT NOT NULL DEFAULT 0,
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
    amount BIGINT NOT NULL CHECK (amount >= 0),
    state TEXT NOT NULL,
    mti TEXT,
    terminal TEXT,
    stan TEXT,
    tx_time TEXT,
    rrn TEXT,
    idem_key TEXT,
    approval_code TEXT,
    pan_ref TEXT,
    original_amount BIGINT,
    kind TEXT,
    cash BIGINT NOT NULL DEFAULT 0,
    completed_by TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS holds_by_stan ON holds (terminal, stan, tx_time);
CREATE INDEX IF NOT EXISTS holds_by_rrn ON holds (terminal, rrn);
CREATE INDEX IF NOT EXISTS holds_pending ON holds (state) WHERE state = 'pending';
CREATE TABLE IF NOT EXISTS captures (
    txn_id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    amount BIGINT NOT NULL,
    captured_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    refunded_at TIMESTAMPTZ
);
CREATE TABLE IF NOT EXISTS early_reversals (
    txn_id TEXT PRIMARY KEY,
    terminal TEXT NOT NULL,
    stan TEXT,
    tx_time TEXT,
    rrn TEXT,
    pan_ref TEXT NOT NULL,
    amount BIGINT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX IF NOT EXISTS early_reversals_by_card ON early_reversals (terminal, pan_ref);
"""


def _pg_early(terminal: int, pan_ref: int, amount: int, stan: int, tx_time: int, rrn: int) -> str:
    """A remembered reversal of the transaction whose terminal, card, amount, STAN,
    transmission time and RRN are the query parameters of these numbers."""
    return (
        "SELECT 1 FROM early_reversals "
        f"WHERE terminal = ${terminal} AND pan_ref = ${pan_ref} AND amount = ${amount} "
        f"AND expires_at > now() AND ((stan = ${stan} AND (tx_time IS NULL OR tx_time = "
        f"${tx_time})) OR rrn = ${rrn})"
    )


_PG_RESERVE = f"""
WITH acc AS (
    UPDATE accounts SET held = held + $3 WHERE id = $2 AND balance - held >= $3
        AND NOT EXISTS ({_pg_early(5, 11, 3, 6, 7, 8)})
    RETURNING id, balance - held AS available
)
INSERT INTO holds ({HOLD_COLUMNS})
SELECT $1, id, $3, 'pending', $4, $5, $6, $7, $8, $9, $10, $11, NULL, $12, $13 FROM acc
RETURNING (SELECT available FROM acc)
"""

_PG_CASH_USED = f"""
SELECT COALESCE(SUM(cash), 0) FROM holds
WHERE pan_ref = $1 AND cash > 0 AND created_at >= date_trunc('day', now() AT TIME ZONE 'UTC')
    AT TIME ZONE 'UTC' AND state IN ({", ".join(repr(state) for state in CASH_STATES)})
"""

_PG_CREDIT = f"""
WITH h AS (
    INSERT INTO holds ({HOLD_COLUMNS})
    VALUES ($1, $2, $3, 'credited', $4, $5, $6, $7, $8, $9, $10, $11, NULL, 'refund', 0)
    ON CONFLICT DO NOTHING
    RETURNING txn_id, account_id, amount
), c AS (
    INSERT INTO captures (txn_id, account_id, amount) SELECT txn_id, account_id, -amount FROM h
    RETURNING txn_id
)
UPDATE accounts SET balance = balance + h.amount FROM h WHERE accounts.id = h.account_id
RETURNING accounts.id
"""

_PG_REDUCE = """
WITH old AS (
    SELECT txn_id, account_id, amount, state FROM holds
    WHERE txn_id = $1 AND amount > $2 AND state IN ('pending', 'authorized', 'captured')
    FOR UPDATE
), h AS (
    UPDATE holds SET original_amount = COALESCE(holds.original_amount, holds.amount),
        amount = $2, cash = LEAST(holds.cash, $2), updated_at = now()
    FROM old WHERE holds.txn_id = old.txn_id
    RETURNING old.account_id, old.amount - $2 AS less, old.state
), c AS (
    UPDATE captures SET amount = $2 FROM h WHERE captures.txn_id = $1 AND h.state = 'captured'
    RETURNING captures.txn_id
)
UPDATE accounts SET
    balance = balance + CASE WHEN h.state = 'captured' THEN h.less ELSE 0 END,
    held = held - CASE WHEN h.state = 'captured' THEN 0 ELSE h.less END
FROM h WHERE accounts.id = h.account_id
RETURNING accounts.id
"""

_PG_COMPLETE = """
WITH old AS (
    SELECT txn_id, account_id, amount, LEAST($2::bigint, amount) AS captured FROM holds
    WHERE completed_by = $1 AND state IN ('pending', 'authorized')
    FOR UPDATE
), h AS (
    UPDATE holds SET state = 'captured', amount = old.captured, updated_at = now(),
        original_amount = CASE WHEN old.captured < old.amount
            THEN COALESCE(holds.original_amount, old.amount) ELSE holds.original_amount END
    FROM old WHERE holds.txn_id = old.txn_id
    RETURNING old.txn_id, old.account_id, old.amount AS freed, old.captured
), a AS (
    UPDATE accounts SET balance = balance - h.captured, held = held - h.freed
    FROM h WHERE accounts.id = h.account_id RETURNING accounts.id
)
INSERT INTO captures (txn_id, account_id, amount) SELECT txn_id, account_id, captured FROM h
RETURNING txn_id
"""

#: One batch of the expiry sweep ($1 seconds, $2 holds); rows another node's sweep (or a
#: completion) has locked are skipped, not waited for.
_PG_EXPIRE = """
WITH h AS (
    UPDATE holds SET state = 'expired', updated_at = now()
    WHERE txn_id IN (
        SELECT txn_id FROM holds
        WHERE state = 'authorized' AND created_at < now() - make_interval(secs => $1)
          AND (completed_by IS NULL OR updated_at < now() - make_interval(secs => $1))
        ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED
    ) AND state = 'authorized'
    RETURNING account_id, amount
), freed AS (
    SELECT account_id, SUM(amount) AS amount, COUNT(*) AS n FROM h GROUP BY account_id
), a AS (
    UPDATE accounts SET held = held - freed.amount
    FROM freed WHERE accounts.id = freed.account_id RETURNING accounts.id
)
SELECT COALESCE(SUM(n), 0)::bigint FROM freed
"""

_PG_CAPTURE = """
WITH h AS (
    UPDATE holds SET state = 'captured', updated_at = now()
    WHERE txn_id = $1 AND state IN ('pending', 'authorized')
    RETURNING txn_id, account_id, amount
), a AS (
    UPDATE accounts SET balance = balance - h.amount, held = held - h.amount
    FROM h WHERE accounts.id = h.account_id RETURNING accounts.id
)
INSERT INTO captures (txn_id, account_id, amount) SELECT txn_id, account_id, amount FROM h
RETURNING txn_id
"""

_PG_RELEASE = """
WITH h AS (
    UPDATE holds SET state = 'released', updated_at = now()
    WHERE txn_id = $1 AND state IN ('pending', 'authorized')
    RETURNING account_id, amount
)
UPDATE accounts SET held = held - h.amount FROM h WHERE accounts.id = h.account_id
RETURNING accounts.id
"""

_PG_REFUND = """
WITH h AS (
    UPDATE holds SET state = 'refunded', updated_at = now()
    WHERE txn_id = $1 AND state = 'captured'
    RETURNING txn_id, account_id, amount
), c AS (
    UPDATE captures SET refunded_at = now() FROM h WHERE captures.txn_id = h.txn_id
    RETURNING captures.txn_id
)
UPDATE accounts SET balance = balance + h.amount FROM h WHERE accounts.id = h.account_id
RETURNING accounts.id
"""


async def _migrate(conn: Any, schema: str) -> None:
    """The ledger's tables at `SCHEMA_VERSION` (run by `PostgresPool` under its schema lock)."""
    await conn.execute(f"SET LOCAL search_path TO {schema}")
    await conn.execute(_PG_SCHEMA)
    version = await conn.fetchval("SELECT value FROM ledger_meta WHERE key = 'schema_version'")
    if version is not None and int(version) > SCHEMA_VERSION:
        raise LedgerError(f"ledger: schema version {version} is newer than {SCHEMA_VERSION}")
    # Upgrade version 1 (no-op on new tables).
    await conn.execute(
        "ALTER TABLE holds ADD COLUMN IF NOT EXISTS idem_key TEXT, "
        "ADD COLUMN IF NOT EXISTS approval_code TEXT, "
        "ADD COLUMN IF NOT EXISTS pan_ref TEXT, "
        "ADD COLUMN IF NOT EXISTS original_amount BIGINT, "
        "ADD COLUMN IF NOT EXISTS kind TEXT, "
        "ADD COLUMN IF NOT EXISTS cash BIGINT NOT NULL DEFAULT 0, "
        "ADD COLUMN IF NOT EXISTS completed_by TEXT"
    )
    await conn.execute(KEY_INDEX)
    for index in COMPLETION_INDEXES:
        await conn.execute(index)
    await conn.execute(
        "CREATE INDEX IF NOT EXISTS holds_cash ON holds (pan_ref, created_at) WHERE cash > 0"
    )
    await conn.execute(
        "INSERT INTO ledger_meta (key, value) VALUES ('schema_version', $1) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        str(SCHEMA_VERSION),
    )


class PostgresLedger(Ledger):
    """The ledger on PostgreSQL (asyncpg pool), for several host processes sharing one database.

    ``schema`` names the PostgreSQL schema holding the tables (created if missing), so several
    ledgers can share one database.
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "public",
        min_size: int = 2,
        max_size: int = 10,
        keys: KeyRing | None = None,
    ) -> None:
        if keys is not None:
            self.use_keys(keys)
        self.dsn = dsn
        self.schema = check_schema(schema)
        self._min_size = min_size
        self._max_size = max_size
        self._db: PostgresPool | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._db is None:
            raise LedgerError("ledger: not open")
        return self._db.pool

    async def open(self) -> None:
        if self._db is not None:
            return
        try:
            from isopace.store.postgres import PostgresPool
        except ImportError as exc:  # pragma: no cover - depends on the installed extras
            raise LedgerError(
                "PostgreSQL needs the postgres extra: pip install isopace[postgres]"
            ) from exc
        db = PostgresPool(
            self.dsn,
            schema=self.schema,
            migrate=_migrate,
            error=lambda text: LedgerError(f"ledger: {text}"),
            min_size=self._min_size,
            max_size=self._max_size,
            server_settings={"search_path": self.schema},
            connect_timeout=10,
        )
        await db.open()
        self._db = db

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()

    async def seed(self, cards: Iterable[SeedCard]) -> list[SeedCard]:
        created = []
        async with self.pool.acquire() as conn, conn.transaction():
            for c in cards:
                refs = self.pan_refs(c.pan)
                if await conn.fetchval("SELECT 1 FROM cards WHERE pan_ref = ANY($1)", refs):
                    continue  # already there, under an older key
                await conn.execute(
                    "INSERT INTO accounts (id, currency, opening, balance, held) "
                    "VALUES ($1, $2, $3, $3, 0) ON CONFLICT (id) DO NOTHING",
                    c.account_id,
                    c.currency,
                    c.balance,
                )
                ref = await conn.fetchval(
                    "INSERT INTO cards (pan_ref, masked_pan, account_id, status) "
                    "VALUES ($1, $2, $3, $4) ON CONFLICT (pan_ref) DO NOTHING RETURNING pan_ref",
                    refs[0],
                    mask_pan(c.pan),
                    c.account_id,
                    c.status,
                )
                if ref is not None:
                    created.append(c)
        return created

    async def _fetch_card(self, refs: Sequence[str]) -> Card | None:
        row = await self.pool.fetchrow(
            "SELECT c.pan_ref, c.masked_pan, c.account_id, c.status, a.currency FROM cards c "
            "JOIN accounts a ON a.id = c.account_id WHERE c.pan_ref = ANY($1) LIMIT 1",
            list(refs),
        )
        return Card(*row) if row else None

    async def set_card_status(self, pan: str, status: str) -> bool:
        self._forget_card(pan)
        result = await self.pool.execute(
            "UPDATE cards SET status = $1 WHERE pan_ref = ANY($2)", status, self.pan_refs(pan)
        )
        return bool(result == "UPDATE 1")

    # -- keys ------------------------------------------------------------------------------------

    async def legacy_card_key(self) -> bytes | None:
        value = await self.pool.fetchval("SELECT value FROM ledger_meta WHERE key = 'pan_key'")
        return bytes.fromhex(value) if value else None

    async def drop_legacy_card_key(self) -> None:
        await self.pool.execute("DELETE FROM ledger_meta WHERE key = 'pan_key'")
        # the deleted row stays in the table's file until vacuumed; VACUUM FULL rewrites the
        # (tiny) table into a new file and removes the old one
        await self.pool.execute("VACUUM FULL ledger_meta")

    async def sample_pan_ref(self) -> str | None:
        value = await self.pool.fetchval("SELECT pan_ref FROM cards LIMIT 1")
        return str(value) if value is not None else None

    async def key_usage(self) -> KeyUsage:
        return usage_of(await self.pool.fetch(KEY_USAGE_SQL))

    async def _stale_cards(self, current: str, after: str, limit: int) -> list[tuple[str, str]]:
        rows = await self.pool.fetch(
            "SELECT pan_ref, masked_pan FROM cards WHERE "
            f"{key_id_sql('pan_ref')} IS DISTINCT FROM $1 AND pan_ref > $2 "
            "ORDER BY pan_ref LIMIT $3",
            current,
            after,
            limit,
        )
        return [(str(r[0]), str(r[1])) for r in rows]

    async def _move_ref(self, old: str, new: str | None, batch: int) -> tuple[int, int]:
        if new is None:
            return 0, 0
        holds = 0
        while True:
            result = await self.pool.execute(
                "UPDATE holds SET pan_ref = $1 WHERE txn_id IN "
                "(SELECT txn_id FROM holds WHERE pan_ref = $2 LIMIT $3)",
                new,
                old,
                batch,
            )
            n = int(result.split()[-1])
            holds += n
            if n < batch:
                break
        result = await self.pool.execute(
            "UPDATE cards SET pan_ref = $1 WHERE pan_ref = $2", new, old
        )
        return int(result.split()[-1]), holds

    async def account(self, account_id: str) -> Account | None:
        row = await self.pool.fetchrow(
            "SELECT id, currency, opening, balance, held FROM accounts WHERE id = $1", account_id
        )
        return Account(*row) if row else None

    async def accounts(self) -> list[Account]:
        rows = await self.pool.fetch(
            "SELECT id, currency, opening, balance, held FROM accounts ORDER BY id"
        )
        return [Account(*r) for r in rows]

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
        args = (txn_id, account_id, amount, *details.columns(), kind.value, cash)
        pan_ref = details.pan_ref
        async with self.pool.acquire() as conn:
            if not (cash and cash_limit and pan_ref is not None):
                return await self._reserve(conn, args)
            async with conn.transaction():
                # one card's cash reserves in turn: the sum read is the one the limit allows
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", pan_ref)
                used = await conn.fetchval(_PG_CASH_USED, pan_ref)
                if used + cash > cash_limit:
                    return ReserveResult(ReserveStatus.OVER_CASH_LIMIT)
                return await self._reserve(conn, args)

    async def _reserve(self, conn: Any, args: tuple[Any, ...]) -> ReserveResult:
        """The reservation of `reserve`'s ``args`` (in `_PG_RESERVE`'s order) on ``conn``."""
        import asyncpg

        txn_id, account_id, amount, _, terminal, stan, tx_time, rrn, idem_key, _, pan_ref = args[
            :11
        ]
        if idem_key is not None:
            dup = await conn.fetchrow(
                f"SELECT {HOLD_COLUMNS} FROM holds WHERE idem_key = $1 AND state <> 'released'",
                idem_key,
            )
            if dup is not None and dup["txn_id"] != txn_id:
                return ReserveResult(ReserveStatus.DUPLICATE, original=Hold(*dup))
        try:
            if conn.is_in_transaction():  # a savepoint: the handler below still reads
                async with conn.transaction():
                    row = await conn.fetchrow(_PG_RESERVE, *args)
            else:
                row = await conn.fetchrow(_PG_RESERVE, *args)
        except asyncpg.UniqueViolationError:
            state = await conn.fetchval("SELECT state FROM holds WHERE txn_id = $1", txn_id)
            if state is not None:
                ok = state != HoldState.RELEASED
                return ReserveResult(
                    ReserveStatus.APPROVED if ok else ReserveStatus.INSUFFICIENT_FUNDS
                )
            dup = await conn.fetchrow(
                f"SELECT {HOLD_COLUMNS} FROM holds WHERE idem_key = $1 AND state <> 'released'",
                idem_key,
            )
            if dup is None:  # released meanwhile: let the caller try again
                raise
            return ReserveResult(ReserveStatus.DUPLICATE, original=Hold(*dup))
        if row is not None:
            return ReserveResult(ReserveStatus.APPROVED, row[0])
        reversed_early = await conn.fetchval(
            _pg_early(1, 2, 3, 4, 5, 6), terminal, pan_ref, amount, stan, tx_time, rrn
        )
        if reversed_early:
            return ReserveResult(ReserveStatus.REVERSED)
        available = await conn.fetchval(
            "SELECT balance - held FROM accounts WHERE id = $1", account_id
        )
        if available is None:
            return ReserveResult(ReserveStatus.NO_ACCOUNT)
        return ReserveResult(ReserveStatus.INSUFFICIENT_FUNDS, available)

    async def authorize(self, txn_id: str) -> bool:
        result = await self.pool.execute(
            "UPDATE holds SET state = 'authorized', updated_at = now() "
            "WHERE txn_id = $1 AND state = 'pending'",
            txn_id,
        )
        return bool(result == "UPDATE 1")

    async def capture(self, txn_id: str) -> bool:
        return await self.pool.fetchval(_PG_CAPTURE, txn_id) is not None

    async def release(self, txn_id: str) -> bool:
        return await self.pool.fetchval(_PG_RELEASE, txn_id) is not None

    async def refund(self, txn_id: str) -> bool:
        return await self.pool.fetchval(_PG_REFUND, txn_id) is not None

    async def credit(
        self,
        txn_id: str,
        account_id: str,
        amount: int,
        details: HoldDetails = NO_DETAILS,
    ) -> bool:
        if amount < 0:
            raise ValueError(f"amount must not be negative: {amount}")
        done = await self.pool.fetchval(_PG_CREDIT, txn_id, account_id, amount, *details.columns())
        return done is not None

    async def hold_by_key(self, idem_key: str) -> Hold | None:
        row = await self.pool.fetchrow(
            f"SELECT {HOLD_COLUMNS} FROM holds WHERE idem_key = $1 AND state <> 'released'",
            idem_key,
        )
        return Hold(*row) if row else None

    async def reduce(self, txn_id: str, amount: int) -> bool:
        if amount < 0:
            raise ValueError(f"amount must not be negative: {amount}")
        return await self.pool.fetchval(_PG_REDUCE, txn_id, amount) is not None

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
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "DELETE FROM early_reversals WHERE txn_id IN (SELECT txn_id FROM early_reversals "
                "WHERE expires_at <= now() LIMIT 100)"
            )
            done = await conn.fetchval(
                "INSERT INTO early_reversals (txn_id, terminal, stan, tx_time, rrn, pan_ref, "
                "amount, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, "
                "now() + make_interval(secs => $8)) ON CONFLICT (txn_id) DO NOTHING "
                "RETURNING txn_id",
                txn_id,
                terminal,
                stan,
                tx_time,
                rrn,
                pan_ref,
                amount,
                float(expires_in),
            )
        return done is not None

    async def forget_reversal(self, txn_id: str) -> bool:
        result = await self.pool.execute("DELETE FROM early_reversals WHERE txn_id = $1", txn_id)
        return bool(result == "DELETE 1")

    async def claim_completion(self, txn_id: str, by: str) -> bool:
        result = await self.pool.execute(
            "UPDATE holds SET completed_by = $2, updated_at = now() WHERE txn_id = $1 AND "
            "state IN ('pending', 'authorized') AND (completed_by IS NULL OR completed_by = $2)",
            txn_id,
            by,
        )
        return bool(result == "UPDATE 1")

    async def complete(self, by: str, amount: int) -> bool:
        if amount < 0:
            raise ValueError(f"amount must not be negative: {amount}")
        return await self.pool.fetchval(_PG_COMPLETE, by, amount) is not None

    async def unclaim_completion(self, by: str) -> bool:
        result = await self.pool.execute(
            "UPDATE holds SET completed_by = NULL WHERE completed_by = $1 "
            "AND state IN ('pending', 'authorized')",
            by,
        )
        return bool(result != "UPDATE 0")

    async def expire(self, older_than: float, *, batch: int = 100) -> int:
        if batch < 1:
            raise ValueError(f"batch must be at least 1, not {batch}")
        total = 0
        while True:
            expired = int(await self.pool.fetchval(_PG_EXPIRE, float(older_than), batch))
            total += expired
            if expired < batch:
                return total
            await asyncio.sleep(0)

    async def expired_holds(self, limit: int = 100) -> list[Hold]:
        rows = await self.pool.fetch(
            f"SELECT {HOLD_COLUMNS} FROM holds WHERE state = 'expired' "
            "ORDER BY updated_at DESC LIMIT $1",
            limit,
        )
        return [Hold(*r) for r in rows]

    async def hold(self, txn_id: str) -> Hold | None:
        row = await self.pool.fetchrow(
            f"SELECT {HOLD_COLUMNS} FROM holds WHERE txn_id = $1", txn_id
        )
        return Hold(*row) if row else None

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
        refs = None if pan_ref is None else refs_of(pan_ref)

        def match(n: int) -> str:  # the card's forms ($n) and the amount ($n+1), when given
            return (
                f" AND (${n}::text[] IS NULL OR pan_ref = ANY(${n}) OR (pan_ref IS NULL AND "
                f"account_id = (SELECT c.account_id FROM cards c WHERE c.pan_ref = ANY(${n}) "
                "LIMIT 1)))"
                f" AND (${n + 1}::bigint IS NULL OR COALESCE(original_amount, amount) = ${n + 1})"
            )

        row = None
        if stan is not None:
            row = await self.pool.fetchrow(
                f"SELECT {HOLD_COLUMNS} FROM holds WHERE terminal = $1 AND stan = $2 "
                f"AND ($3::text IS NULL OR tx_time = $3){match(4)} "
                "ORDER BY created_at DESC LIMIT 1",
                terminal,
                stan,
                tx_time,
                refs,
                amount,
            )
        if row is None and rrn is not None:
            row = await self.pool.fetchrow(
                f"SELECT {HOLD_COLUMNS} FROM holds WHERE terminal = $1 AND rrn = $2{match(3)} "
                "ORDER BY created_at DESC LIMIT 1",
                terminal,
                rrn,
                refs,
                amount,
            )
        if row is None and approval_code is not None:
            row = await self.pool.fetchrow(
                f"SELECT {HOLD_COLUMNS} FROM holds WHERE terminal = $1 AND approval_code = $2"
                f"{match(3)} ORDER BY created_at DESC LIMIT 1",
                terminal,
                approval_code,
                refs,
                amount,
            )
        return Hold(*row) if row else None

    async def pending_holds(self) -> list[Hold]:
        rows = await self.pool.fetch(
            f"SELECT {HOLD_COLUMNS} FROM holds WHERE state = 'pending' ORDER BY created_at"
        )
        return [Hold(*r) for r in rows]

    async def check(self) -> LedgerCheck:
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            rows = await conn.fetch(CHECK_SQL)
            holds = await conn.fetchval("SELECT COUNT(*) FROM holds")
            pending = await conn.fetchval("SELECT COUNT(*) FROM holds WHERE state = 'pending'")
            mismatched = await conn.fetchval(CAPTURE_MISMATCH_SQL)
            expired = await conn.fetchval("SELECT COUNT(*) FROM holds WHERE state = 'expired'")
        return check_rows([tuple(r) for r in rows], holds, pending, mismatched, expired)
