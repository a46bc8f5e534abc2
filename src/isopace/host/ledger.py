"""The host's ledger: accounts, cards, holds keyed by transaction id, and captures.

Two backends with one interface (`Ledger`): `SqliteLedger` (standard library, the default) and
`PostgresLedger` (asyncpg, the ``postgres`` extra) for several host processes sharing one database.

Money model (amounts in minor units, integers):

- ``accounts``: ``opening`` (the balance when the account was created), ``balance`` (posted) and
  ``held`` (the sum of open holds). Available funds are ``balance - held``; the database refuses
  any row where that goes negative (a CHECK constraint), as a last line of defence.
- ``holds``: one row per transaction id (the flow's exchange id), the reservation made in the
  prepare pass. States: ``pending`` (prepared, outcome not known yet), ``authorized`` (an 0100
  committed: the funds stay held), ``captured`` (an 0200 committed: posted to the balance),
  ``released`` (aborted or an authorization reversed) and ``refunded`` (a captured transaction
  reversed).
- ``captures``: one row per captured transaction (the posting), with ``refunded_at`` once reversed.

Concurrency: a hold is taken by one conditional statement, ``UPDATE accounts SET held = held +
:amount WHERE id = :account AND balance - held >= :amount``, in the same database transaction as
the hold's INSERT (on PostgreSQL a single ``WITH ... UPDATE ... INSERT`` statement). Two holds
racing for the last funds cannot both succeed: the database serialises the row update and re-checks
the condition.

Idempotency: ``capture``, ``authorize``, ``release`` and ``refund`` are conditional state
transitions (``UPDATE holds ... WHERE txn_id = ? AND state IN (...)``); running one twice, as crash
recovery may, changes nothing the second time. ``reserve`` of a transaction id that already has a
hold returns the existing outcome instead of holding twice.

Card numbers are never stored in clear: cards are keyed by an HMAC-SHA256 of the PAN under a key
kept in the ``ledger_meta`` table (generated on first start; a production issuer keeps it in an
HSM or KMS), with the masked PAN (first 6 / last 4) for display.

The SQLite backend runs every operation on one writer thread that batches whatever is queued into
one SQLite transaction (group commit, ``synchronous=FULL`` by default); when an operation fails,
the batch is rolled back and run again with each operation inside its own SAVEPOINT, so one
failure does not affect its neighbours. Operations apply in the order they
were submitted, so a release queued after a reserve always sees the hold.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import datetime as _dt
import enum
import hashlib
import hmac
import logging
import os
import queue
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from isopace.host.errors import LedgerError

if TYPE_CHECKING:
    import asyncpg  # type: ignore[import-untyped]

__all__ = [
    "Account",
    "Card",
    "Hold",
    "HoldState",
    "Ledger",
    "LedgerCheck",
    "PostgresLedger",
    "ReserveResult",
    "ReserveStatus",
    "SeedCard",
    "SqliteLedger",
    "mask_pan",
]

log = logging.getLogger("isopace.host")

#: Version 1: accounts, cards, holds, captures. Version 2: holds.idem_key and
#: holds.approval_code, with a unique index on the live holds' keys. Version 3: holds.pan_ref,
#: the card's keyed hash, which a reversal must match (upgrades are applied on open).
SCHEMA_VERSION = 3
T = TypeVar("T")


class HoldState(enum.StrEnum):
    """The life of a hold (see the module docstring)."""

    PENDING = "pending"
    AUTHORIZED = "authorized"
    CAPTURED = "captured"
    RELEASED = "released"
    REFUNDED = "refunded"


OPEN_STATES = (HoldState.PENDING.value, HoldState.AUTHORIZED.value)


class ReserveStatus(enum.Enum):
    """What `Ledger.reserve` decided."""

    APPROVED = "approved"
    INSUFFICIENT_FUNDS = "insufficient_funds"
    NO_ACCOUNT = "no_account"
    DUPLICATE = "duplicate"
    """A live hold already carries this idempotency key: ``ReserveResult.original``."""


@dataclasses.dataclass(frozen=True, slots=True)
class ReserveResult:
    """The outcome of a reservation and the funds available after it."""

    status: ReserveStatus
    available: int | None = None
    original: Hold | None = None

    @property
    def approved(self) -> bool:
        return self.status is ReserveStatus.APPROVED


@dataclasses.dataclass(frozen=True, slots=True)
class Card:
    """A card as the ledger knows it: no clear PAN, only its keyed hash and masked form."""

    pan_ref: str
    masked_pan: str
    account_id: str
    status: str

    @property
    def blocked(self) -> bool:
        return self.status != "active"


@dataclasses.dataclass(frozen=True, slots=True)
class Account:
    """An account's figures in minor units."""

    id: str
    currency: str
    opening: int
    balance: int
    held: int

    @property
    def available(self) -> int:
        return self.balance - self.held


@dataclasses.dataclass(frozen=True, slots=True)
class Hold:
    """A reservation, keyed by the transaction id that made it."""

    txn_id: str
    account_id: str
    amount: int
    state: str
    mti: str | None = None
    terminal: str | None = None
    stan: str | None = None
    tx_time: str | None = None
    rrn: str | None = None
    idem_key: str | None = None
    approval_code: str | None = None
    pan_ref: str | None = None
    """The card's keyed hash (None on holds made before schema version 3)."""


@dataclasses.dataclass(frozen=True, slots=True)
class SeedCard:
    """A demo card with its account, created on first start."""

    pan: str
    account_id: str
    balance: int
    currency: str = "840"
    status: str = "active"
    label: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class LedgerCheck:
    """The result of `Ledger.check`: every invariant that failed, and the holds still pending."""

    accounts: int
    holds: int
    pending: int
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def mask_pan(pan: str) -> str:
    """First 6 and last 4 digits, the rest replaced by ``*`` (short numbers are fully masked)."""
    if len(pan) < 13:
        return "*" * len(pan)
    return pan[:6] + "*" * (len(pan) - 10) + pan[-4:]


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="microseconds")


class Ledger(abc.ABC):
    """The operations the host's stages need; every method is a coroutine (see the module doc)."""

    _pan_key: bytes = b""

    def pan_ref(self, pan: str) -> str:
        """The keyed hash that identifies a card without storing its number."""
        return hmac.new(self._pan_key, pan.encode(), hashlib.sha256).hexdigest()

    def derived_key(self, purpose: str) -> str:
        """A secret for another use (``"journal"``: the journal's PAN fingerprints on PostgreSQL),
        derived from the ledger's card key with HMAC-SHA256 under a per-purpose label, so every
        host sharing the ledger derives the same one and no second secret has to be distributed.
        The ledger must be open."""
        if not self._pan_key:
            raise LedgerError("ledger: not open")
        label = b"isopace derived key: " + purpose.encode()
        return hmac.new(self._pan_key, label, hashlib.sha256).hexdigest()

    async def __aenter__(self) -> Ledger:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect, create or upgrade the schema, load the card key."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections and threads (pending operations finish first)."""

    @abc.abstractmethod
    async def seed(self, cards: Iterable[SeedCard]) -> list[SeedCard]:
        """Create the cards and accounts that do not exist yet; returns the ones created."""

    #: Seconds a card looked up stays cached in this process (0: no cache). A card blocked by
    #: another process is seen within this time; one blocked through this ledger at once.
    card_cache_ttl: float = 2.0
    _card_cache: dict[str, tuple[float, Card | None]]

    async def card(self, pan: str) -> Card | None:
        """The card with this PAN, or None (cached for `card_cache_ttl` seconds)."""
        ref = self.pan_ref(pan)
        if self.card_cache_ttl <= 0:
            return await self._fetch_card(ref)
        cache: dict[str, tuple[float, Card | None]] = self.__dict__.setdefault("_card_cache", {})
        now = time.monotonic()
        hit = cache.get(ref)
        if hit is not None and hit[0] > now:
            return hit[1]
        card = await self._fetch_card(ref)
        if len(cache) >= 100_000:
            cache.clear()
        cache[ref] = (now + self.card_cache_ttl, card)
        return card

    def _forget_card(self, pan: str) -> None:
        self.__dict__.get("_card_cache", {}).pop(self.pan_ref(pan), None)

    @abc.abstractmethod
    async def _fetch_card(self, pan_ref: str) -> Card | None:
        """The card with this keyed PAN hash, from the database."""

    @abc.abstractmethod
    async def set_card_status(self, pan: str, status: str) -> bool:
        """Block (``"blocked"``) or unblock (``"active"``) a card; False when unknown."""

    @abc.abstractmethod
    async def account(self, account_id: str) -> Account | None:
        """One account's figures."""

    @abc.abstractmethod
    async def accounts(self) -> list[Account]:
        """Every account, by id."""

    @abc.abstractmethod
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
        """Hold ``amount`` on the account for this transaction, if the available funds allow.

        ``idem_key`` (the request's idempotency key) makes the ledger refuse a second live hold
        for the same request: it answers DUPLICATE with the original hold (and its
        ``approval_code``) instead. This catches a retransmission the idempotency store could not
        replay, e.g. one whose original was finished by crash recovery. ``pan_ref`` (the card's
        `pan_ref`) is kept on the hold so a reversal can be matched to the card."""

    @abc.abstractmethod
    async def authorize(self, txn_id: str) -> bool:
        """pending -> authorized (an authorization committed; the funds stay held)."""

    @abc.abstractmethod
    async def capture(self, txn_id: str) -> bool:
        """pending/authorized -> captured: post the amount to the balance. Idempotent."""

    @abc.abstractmethod
    async def release(self, txn_id: str) -> bool:
        """pending/authorized -> released: free the held funds. Idempotent."""

    @abc.abstractmethod
    async def refund(self, txn_id: str) -> bool:
        """captured -> refunded: give the posted amount back. Idempotent."""

    @abc.abstractmethod
    async def hold(self, txn_id: str) -> Hold | None:
        """The hold made by this transaction, if any."""

    @abc.abstractmethod
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
        """The most recent hold of this terminal with this STAN (+ transmission time) or RRN.

        With ``pan_ref`` (the card's `pan_ref`) and ``amount``, only a hold of that card and that
        amount matches (a hold made before schema version 3, without a card reference, matches
        when the card belongs to the hold's account), so a reversal cannot reach another card's
        transaction."""

    @abc.abstractmethod
    async def pending_holds(self) -> list[Hold]:
        """Holds whose transaction's outcome is not known to the ledger yet."""

    @abc.abstractmethod
    async def check(self) -> LedgerCheck:
        """Verify the ledger balances: balance = opening - live captures, held = open holds."""

    async def reverse(self, txn_id: str) -> str:
        """Undo a committed transaction: release an authorization, refund a capture.

        Returns the transition applied (``"released"``, ``"refunded"``) or ``"none"`` when the
        transaction was already reversed (a repeated reversal changes nothing).
        """
        if await self.release(txn_id):
            return "released"
        if await self.refund(txn_id):
            return "refunded"
        return "none"


# --------------------------------------------------------------------------------------------
# SQLite


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

_KEY_INDEX = """
CREATE UNIQUE INDEX IF NOT EXISTS holds_by_key ON holds (idem_key)
    WHERE idem_key IS NOT NULL AND state <> 'released'
"""

_HOLD_COLUMNS = (
    "txn_id, account_id, amount, state, mti, terminal, stan, tx_time, rrn, idem_key, approval_code,"
    " pan_ref"
)

_CHECK_SQL = """
SELECT a.id, a.opening, a.balance, a.held,
       COALESCE((SELECT SUM(amount) FROM captures c
                 WHERE c.account_id = a.id AND c.refunded_at IS NULL), 0),
       COALESCE((SELECT SUM(amount) FROM holds h
                 WHERE h.account_id = a.id AND h.state IN ('pending', 'authorized')), 0)
FROM accounts a ORDER BY a.id
"""

_CAPTURE_MISMATCH_SQL = """
SELECT COUNT(*) FROM holds h
WHERE (h.state IN ('captured', 'refunded'))
      <> EXISTS (SELECT 1 FROM captures c WHERE c.txn_id = h.txn_id)
"""


def _check_rows(
    rows: Sequence[Sequence[Any]], holds: int, pending: int, mismatched: int
) -> LedgerCheck:
    problems: list[str] = []
    for account_id, opening, balance, held, captured, open_holds in rows:
        if balance != opening - captured:
            problems.append(
                f"account {account_id}: balance {balance} != opening {opening}"
                f" - captures {captured}"
            )
        if held != open_holds:
            problems.append(f"account {account_id}: held {held} != open holds {open_holds}")
        if balance - held < 0:
            problems.append(f"account {account_id}: overdrawn (available {balance - held})")
    if mismatched:
        problems.append(f"{mismatched} hold(s) disagree with the captures table")
    return LedgerCheck(len(rows), holds, pending, tuple(problems))


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
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            conn.execute("PRAGMA busy_timeout=10000")
            conn.execute("PRAGMA foreign_keys=ON")
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
        conn.execute(_KEY_INDEX)
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
                    f"SELECT {_HOLD_COLUMNS} FROM holds WHERE txn_id = ?", (txn_id,)
                ).fetchall()
            else:
                rows = conn.execute(
                    f"SELECT {_HOLD_COLUMNS} FROM holds WHERE txn_id = ? "
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
                f"INSERT INTO holds ({_HOLD_COLUMNS}, created_at, updated_at) "
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
                f"SELECT {_HOLD_COLUMNS} FROM holds WHERE txn_id = ?", (txn_id,)
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
                sql = f"SELECT {_HOLD_COLUMNS} FROM holds WHERE terminal = ? AND stan = ?"
                args: tuple[Any, ...] = (terminal, stan)
                if tx_time is not None:
                    sql += " AND tx_time = ?"
                    args += (tx_time,)
                row = conn.execute(
                    sql + match + " ORDER BY created_at DESC LIMIT 1", args + match_args
                ).fetchone()
            if row is None and rrn is not None:
                row = conn.execute(
                    f"SELECT {_HOLD_COLUMNS} FROM holds WHERE terminal = ? AND rrn = ?"
                    + match
                    + " ORDER BY created_at DESC LIMIT 1",
                    (terminal, rrn, *match_args),
                ).fetchone()
            return Hold(*row) if row else None

        return await self._worker.call(op)

    async def pending_holds(self) -> list[Hold]:
        def op(conn: sqlite3.Connection) -> list[Hold]:
            rows = conn.execute(
                f"SELECT {_HOLD_COLUMNS} FROM holds WHERE state = 'pending' ORDER BY created_at"
            ).fetchall()
            return [Hold(*r) for r in rows]

        return await self._worker.call(op)

    async def check(self) -> LedgerCheck:
        def op(conn: sqlite3.Connection) -> LedgerCheck:
            rows = conn.execute(_CHECK_SQL).fetchall()
            (holds,) = conn.execute("SELECT COUNT(*) FROM holds").fetchone()
            (pending,) = conn.execute(
                "SELECT COUNT(*) FROM holds WHERE state = 'pending'"
            ).fetchone()
            (mismatched,) = conn.execute(_CAPTURE_MISMATCH_SQL).fetchone()
            return _check_rows(rows, holds, pending, mismatched)

        return await self._worker.call(op)


# --------------------------------------------------------------------------------------------
# PostgreSQL


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
"""

_PG_RESERVE = f"""
WITH acc AS (
    UPDATE accounts SET held = held + $3 WHERE id = $2 AND balance - held >= $3
    RETURNING id, balance - held AS available
)
INSERT INTO holds ({_HOLD_COLUMNS})
SELECT $1, id, $3, 'pending', $4, $5, $6, $7, $8, $9, $10, $11 FROM acc
RETURNING (SELECT available FROM acc)
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


class PostgresLedger(Ledger):
    """The ledger on PostgreSQL (asyncpg pool), for several host processes sharing one database.

    ``schema`` names the PostgreSQL schema holding the tables (created if missing), so several
    ledgers can share one database.
    """

    def __init__(
        self, dsn: str, *, schema: str = "public", min_size: int = 2, max_size: int = 10
    ) -> None:
        if not schema.replace("_", "").isalnum():
            raise ValueError(f"schema must be letters, digits and _: {schema!r}")
        self.dsn = dsn
        self.schema = schema
        self._min_size = min_size
        self._max_size = max_size
        self._pool: asyncpg.Pool | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise LedgerError("ledger: not open")
        return self._pool

    async def open(self) -> None:
        if self._pool is not None:
            return
        try:
            import asyncpg
        except ImportError as exc:  # pragma: no cover - depends on the installed extras
            raise LedgerError(
                "PostgreSQL needs the postgres extra: pip install isopace[postgres]"
            ) from exc
        try:
            conn = await asyncpg.connect(self.dsn, timeout=10)
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            raise LedgerError(f"ledger: cannot connect to PostgreSQL: {exc}") from exc
        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext('isopace.ledger'))")
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema}")
                await conn.execute(f"SET LOCAL search_path TO {self.schema}")
                await conn.execute(_PG_SCHEMA)
                version = await conn.fetchval(
                    "SELECT value FROM ledger_meta WHERE key = 'schema_version'"
                )
                if version is not None and int(version) > SCHEMA_VERSION:
                    raise LedgerError(
                        f"ledger: schema version {version} is newer than {SCHEMA_VERSION}"
                    )
                # Upgrade version 1 (no-op on new tables).
                await conn.execute(
                    "ALTER TABLE holds ADD COLUMN IF NOT EXISTS idem_key TEXT, "
                    "ADD COLUMN IF NOT EXISTS approval_code TEXT, "
                    "ADD COLUMN IF NOT EXISTS pan_ref TEXT"
                )
                await conn.execute(_KEY_INDEX)
                await conn.execute(
                    "INSERT INTO ledger_meta (key, value) VALUES ('schema_version', $1), "
                    "('pan_key', $2) ON CONFLICT (key) DO NOTHING",
                    str(SCHEMA_VERSION),
                    secrets.token_hex(32),
                )
                await conn.execute(
                    "UPDATE ledger_meta SET value = $1 WHERE key = 'schema_version'",
                    str(SCHEMA_VERSION),
                )
                key = await conn.fetchval("SELECT value FROM ledger_meta WHERE key = 'pan_key'")
        except asyncpg.PostgresError as exc:
            raise LedgerError(f"ledger: cannot create the schema {self.schema}: {exc}") from exc
        finally:
            await conn.close()
        self._pan_key = bytes.fromhex(key)
        self._pool = await asyncpg.create_pool(
            self.dsn,
            min_size=self._min_size,
            max_size=self._max_size,
            server_settings={"search_path": self.schema},
        )

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    async def seed(self, cards: Iterable[SeedCard]) -> list[SeedCard]:
        created = []
        async with self.pool.acquire() as conn, conn.transaction():
            for c in cards:
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
                    self.pan_ref(c.pan),
                    mask_pan(c.pan),
                    c.account_id,
                    c.status,
                )
                if ref is not None:
                    created.append(c)
        return created

    async def _fetch_card(self, ref: str) -> Card | None:
        row = await self.pool.fetchrow(
            "SELECT pan_ref, masked_pan, account_id, status FROM cards WHERE pan_ref = $1", ref
        )
        return Card(*row) if row else None

    async def set_card_status(self, pan: str, status: str) -> bool:
        self._forget_card(pan)
        result = await self.pool.execute(
            "UPDATE cards SET status = $1 WHERE pan_ref = $2", status, self.pan_ref(pan)
        )
        return bool(result == "UPDATE 1")

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
        import asyncpg

        if amount < 0:
            raise ValueError(f"amount must not be negative: {amount}")
        async with self.pool.acquire() as conn:
            if idem_key is not None:
                dup = await conn.fetchrow(
                    f"SELECT {_HOLD_COLUMNS} FROM holds "
                    "WHERE idem_key = $1 AND state <> 'released'",
                    idem_key,
                )
                if dup is not None and dup["txn_id"] != txn_id:
                    return ReserveResult(ReserveStatus.DUPLICATE, original=Hold(*dup))
            try:
                row = await conn.fetchrow(
                    _PG_RESERVE,
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
                )
            except asyncpg.UniqueViolationError:
                state = await conn.fetchval("SELECT state FROM holds WHERE txn_id = $1", txn_id)
                if state is not None:
                    ok = state != HoldState.RELEASED
                    return ReserveResult(
                        ReserveStatus.APPROVED if ok else ReserveStatus.INSUFFICIENT_FUNDS
                    )
                dup = await conn.fetchrow(
                    f"SELECT {_HOLD_COLUMNS} FROM holds "
                    "WHERE idem_key = $1 AND state <> 'released'",
                    idem_key,
                )
                if dup is None:  # released meanwhile: let the caller try again
                    raise
                return ReserveResult(ReserveStatus.DUPLICATE, original=Hold(*dup))
            if row is not None:
                return ReserveResult(ReserveStatus.APPROVED, row[0])
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

    async def hold(self, txn_id: str) -> Hold | None:
        row = await self.pool.fetchrow(
            f"SELECT {_HOLD_COLUMNS} FROM holds WHERE txn_id = $1", txn_id
        )
        return Hold(*row) if row else None

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
        def match(n: int) -> str:  # the card ($n) and the amount ($n+1), when given
            return (
                f" AND (${n}::text IS NULL OR pan_ref = ${n} OR (pan_ref IS NULL AND account_id"
                f" = (SELECT c.account_id FROM cards c WHERE c.pan_ref = ${n})))"
                f" AND (${n + 1}::bigint IS NULL OR amount = ${n + 1})"
            )

        row = None
        if stan is not None:
            row = await self.pool.fetchrow(
                f"SELECT {_HOLD_COLUMNS} FROM holds WHERE terminal = $1 AND stan = $2 "
                f"AND ($3::text IS NULL OR tx_time = $3){match(4)} "
                "ORDER BY created_at DESC LIMIT 1",
                terminal,
                stan,
                tx_time,
                pan_ref,
                amount,
            )
        if row is None and rrn is not None:
            row = await self.pool.fetchrow(
                f"SELECT {_HOLD_COLUMNS} FROM holds WHERE terminal = $1 AND rrn = $2{match(3)} "
                "ORDER BY created_at DESC LIMIT 1",
                terminal,
                rrn,
                pan_ref,
                amount,
            )
        return Hold(*row) if row else None

    async def pending_holds(self) -> list[Hold]:
        rows = await self.pool.fetch(
            f"SELECT {_HOLD_COLUMNS} FROM holds WHERE state = 'pending' ORDER BY created_at"
        )
        return [Hold(*r) for r in rows]

    async def check(self) -> LedgerCheck:
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            rows = await conn.fetch(_CHECK_SQL)
            holds = await conn.fetchval("SELECT COUNT(*) FROM holds")
            pending = await conn.fetchval("SELECT COUNT(*) FROM holds WHERE state = 'pending'")
            mismatched = await conn.fetchval(_CAPTURE_MISMATCH_SQL)
        return _check_rows([tuple(r) for r in rows], holds, pending, mismatched)
