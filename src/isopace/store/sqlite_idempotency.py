"""Idempotency claims in a SQLite file, atomic across every process that shares the file.

Table ``idempotency_keys``: one row per key, either *claimed* (by an owner token, until
``lease_until``) or *done* (the answer, until ``expires`` = completion + ``ttl``: the response,
protected by :func:`isopace.store.protect.stored_json`, or NULL for a run that committed without
one, which is still an answer found; and the request's ``fingerprint`` as the flow gave it, or
NULL). Each claim is one ``BEGIN IMMEDIATE`` transaction:
SQLite's write lock makes read-check-write atomic across processes. The common cases take one
statement: a claim of a new key is an ``INSERT ... ON CONFLICT DO NOTHING`` (the row is read only
when the key exists), a completion by the claim's owner an ``UPDATE`` guarded by the owner token.

Operations from concurrent runs are batched: one thread owns the connection and runs every
claim / complete / release queued meanwhile in ONE transaction (one fsync for all of them).

- ``claim``: takes the key if it is free, its claim's lease expired, or its answer expired ->
  None (the caller owns it). A live answer -> a ``Stored`` (replay), with or without a response.
  A live claim -> wait, then try again. Waiters in the same process are woken at once by
  ``complete`` / ``release``; SQLite has no cross-process notification, so waiters also re-check
  with a capped exponential back-off (``poll`` = first and last delay), never beyond the
  holder's lease.
- ``exclusive_node=True`` declares that only one process at a time runs as ``node`` (e.g. a host
  named by its address and port): a claim still leased to an earlier run of the node, which can
  only be a run that crashed, is taken over at once instead of waiting out its lease, so crash
  recovery and retransmissions after a restart do not wait. Each store's owner tokens are the
  node, a random per-store prefix and a counter.
- While a process holds claims, a background task renews their leases (every ``lease / 3``), so
  a live run never loses its claim however long it takes, and a crashed one's claim frees itself
  ``lease`` seconds after the crash. The same task deletes expired rows every ``purge_interval``.
- ``complete`` stores the answer unless another run has meanwhile taken the key over (then
  :class:`LeaseLostError`); ``release`` deletes the owner's claim.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

from isopace._cardtext import error_text
from isopace.store._answer import stored_answer
from isopace.store._owners import OwnerTokens
from isopace.store._sqlite_open import open_wal
from isopace.store._writer import BatchExecutor
from isopace.store.errors import IdempotencyError, LeaseLostError, StoreError
from isopace.store.protect import stored_json
from isopace.store.records import default_node

if TYPE_CHECKING:
    from isopace.flow import Stored
    from isopace.iso8583 import Message
    from isopace.store.sqlite_database import SqliteDatabase

__all__ = ["SqliteIdempotencyStore"]

log = logging.getLogger("isopace.store")
T = TypeVar("T")

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS idempotency_migrations (
        version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS idempotency_keys (
        key TEXT PRIMARY KEY,
        state TEXT NOT NULL CHECK (state IN ('claimed', 'done')),
        owner TEXT,
        lease_until_us INTEGER,
        response TEXT,
        expires_us INTEGER,
        fingerprint TEXT
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS idempotency_keys_expires ON idempotency_keys(expires_us)",
    "INSERT OR IGNORE INTO idempotency_migrations VALUES (1, 'idempotency_keys', unixepoch())",
)
#: Version 2: the request's fingerprint beside the answer (a table made by version 1 gains it).
_FINGERPRINT_MIGRATION = (
    "INSERT OR IGNORE INTO idempotency_migrations VALUES (2, 'fingerprint column', unixepoch())"
)


#: expired rows deleted per statement by a purge
_PURGE_CHUNK = 500


def _create_schema(conn: sqlite3.Connection) -> None:
    for statement in _SCHEMA:
        conn.execute(statement)
    columns = {row[1] for row in conn.execute("PRAGMA table_info(idempotency_keys)")}
    if "fingerprint" not in columns:
        conn.execute("ALTER TABLE idempotency_keys ADD COLUMN fingerprint TEXT")
    conn.execute(_FINGERPRINT_MIGRATION)


def _now_us() -> int:
    return time.time_ns() // 1000


class SqliteIdempotencyStore:
    """The flow's ``IdempotencyStore`` protocol on a SQLite file shared by several processes.

    ``SqliteIdempotencyStore.on(database, ...)`` keeps the keys in a shared
    :class:`SqliteDatabase` (the host's one file) instead of a file and thread of its own: every
    operation runs inline and commits in order with the process's other writes, and ``complete``
    returns once the response is on disk (``database.synced()``), which also makes every earlier
    write of the transaction durable; a claim or release is made durable by the next sync.
    """

    @classmethod
    def on(cls, database: SqliteDatabase, **options: Any) -> SqliteIdempotencyStore:
        """A store in the shared ``database``; ``options`` as for the constructor."""
        return cls(database.path, database=database, **options)

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        ttl: float = 24 * 3600.0,
        lease: float = 30.0,
        poll: tuple[float, float] = (0.005, 0.2),
        purge_interval: float = 60.0,
        synchronous: str = "FULL",
        timeout: float = 10.0,
        node: str | None = None,
        exclusive_node: bool = False,
        database: SqliteDatabase | None = None,
    ) -> None:
        if ttl <= 0 or lease <= 0:
            raise ValueError("ttl and lease must be positive")
        self.path = str(Path(path))
        self.ttl = ttl
        self.lease = lease
        self._poll = poll
        self._purge_interval = purge_interval
        self._sync = synchronous.upper()
        self._timeout = timeout
        self._node = node if node is not None else f"{default_node()}:{os.getpid()}"
        # Owner tokens: a random per-store prefix (unique across processes and restarts) and a
        # counter; a UUID per claim costs an os.urandom call (tens of microseconds on some VMs).
        self._owners = OwnerTokens(self._node)
        # exclusive_node: the claims of an earlier run of this node (its owner tokens, from
        # another prefix) belong to a process that is gone; they are taken over at once
        self._stale_owner = (
            re.compile(re.escape(self._node) + r":[0-9a-f]{16}:[0-9a-f]+").fullmatch
            if exclusive_node
            else None
        )
        self._held: dict[str, str] = {}
        self._wakeups: dict[str, asyncio.Event] = {}
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._database = database
        self._db: BatchExecutor[sqlite3.Connection] | None = None
        if database is not None:
            try:
                database.write(_create_schema)
            except StoreError as exc:
                message = f"idempotency store {self.path}: cannot open: {exc.__cause__ or exc}"
                raise IdempotencyError(message) from exc
            return
        self._db = BatchExecutor(
            connect=self._connect,
            begin=lambda c: c.execute("BEGIN IMMEDIATE"),
            commit=lambda c: c.execute("COMMIT"),
            rollback=lambda c: c.execute("ROLLBACK") if c.in_transaction else None,
            disconnect=lambda c: c.close(),
            wrap=self._wrap,
            name="isopace-idempotency",
        )
        try:
            self._db.open()
        except sqlite3.Error as exc:
            self._db.close()
            raise IdempotencyError(f"idempotency store {self.path}: cannot open: {exc}") from exc

    # -- database side (runs on the store's thread, inside its batch transaction) ---------------

    def _wrap(self, exc: BaseException) -> BaseException:
        err = IdempotencyError(f"idempotency store {self.path}: {exc}")
        err.__cause__ = exc
        return err

    def _connect(self) -> sqlite3.Connection:
        conn = open_wal(
            self.path, timeout=self._timeout, synchronous=self._sync, check_same_thread=False
        )
        try:
            conn.execute("BEGIN IMMEDIATE")
            _create_schema(conn)
            conn.execute("COMMIT")
        except BaseException:
            conn.close()
            raise
        return conn

    def _try_claim(
        self, conn: sqlite3.Connection, key: str, owner: str
    ) -> tuple[str, str | None, str | None, float]:
        """(status, response, fingerprint, seconds the holder's lease has left)."""
        now = _now_us()
        lease_until = now + int(self.lease * 1e6)
        # one statement below changes the database at most, and nothing fails after it: a
        # `single` write. The common case, a new key: one statement
        if conn.execute(
            "INSERT INTO idempotency_keys VALUES (?, 'claimed', ?, ?, NULL, NULL, NULL) "
            "ON CONFLICT (key) DO NOTHING",
            (key, owner, lease_until),
        ).rowcount:
            return "claimed", None, None, 0.0
        row = conn.execute(
            "SELECT state, lease_until_us, response, expires_us, owner, fingerprint "
            "FROM idempotency_keys WHERE key = ?",
            (key,),
        ).fetchone()
        if row is not None:
            state, held_until, response, expires, holder, fingerprint = row
            if state == "done" and expires > now:
                return "done", response, fingerprint, 0.0
            if state == "claimed" and held_until > now and not self._stale(holder):
                return "held", None, None, (held_until - now) / 1e6
        conn.execute(
            "INSERT OR REPLACE INTO idempotency_keys VALUES (?, 'claimed', ?, ?, NULL, NULL, NULL)",
            (key, owner, lease_until),
        )
        return "claimed", None, None, 0.0

    def _stale(self, holder: str | None) -> bool:
        """A claim made by an earlier run of this (exclusive) node: its process is gone."""
        return (
            self._stale_owner is not None
            and holder is not None
            and not holder.startswith(self._owners.prefix)
            and self._stale_owner(holder) is not None
        )

    def _complete(
        self,
        conn: sqlite3.Connection,
        key: str,
        owner: str | None,
        text: str | None,
        fingerprint: str | None,
    ) -> bool:
        now = _now_us()
        expires = now + int(self.ttl * 1e6)
        # a `single` write too; the common case, the owner's live claim: one statement
        if (
            owner is not None
            and conn.execute(
                "UPDATE idempotency_keys SET state = 'done', owner = NULL, lease_until_us = NULL, "
                "response = ?, expires_us = ?, fingerprint = ? "
                "WHERE key = ? AND state = 'claimed' AND owner = ?",
                (text, expires, fingerprint, key, owner),
            ).rowcount
        ):
            return True
        row = conn.execute(
            "SELECT state, owner, lease_until_us FROM idempotency_keys WHERE key = ?", (key,)
        ).fetchone()
        if row is not None and row[0] == "claimed" and row[1] != owner and row[2] > now:
            return False
        conn.execute(
            "INSERT OR REPLACE INTO idempotency_keys VALUES (?, 'done', NULL, NULL, ?, ?, ?)",
            (key, text, expires, fingerprint),
        )
        return True

    def _release(self, conn: sqlite3.Connection, key: str, owner: str | None) -> None:
        conn.execute(
            "DELETE FROM idempotency_keys WHERE key = ? AND state = 'claimed' AND owner = ?",
            (key, owner),
        )

    def _renew(self, conn: sqlite3.Connection, held: list[tuple[str, str]]) -> None:
        until = _now_us() + int(self.lease * 1e6)
        conn.executemany(
            "UPDATE idempotency_keys SET lease_until_us = ? "
            "WHERE key = ? AND state = 'claimed' AND owner = ?",
            [(until, k, o) for k, o in held],
        )

    def _purge(self, conn: sqlite3.Connection) -> int:
        """Delete up to `_PURGE_CHUNK` expired rows (a day's keys expire together at a steady
        rate; one unbounded DELETE would hold the write lock, or the event loop of a shared
        database, for as long as it takes)."""
        now = _now_us()
        cur = conn.execute(
            "DELETE FROM idempotency_keys WHERE key IN (SELECT key FROM idempotency_keys "
            "WHERE (state = 'done' AND expires_us <= ?) OR (state = 'claimed' AND "
            "lease_until_us <= ?) LIMIT ?)",
            (now, now, _PURGE_CHUNK),
        )
        return int(cur.rowcount)

    async def _run(
        self,
        what: str,
        key: str,
        fn: Callable[..., T],
        *args: Any,
        durable: bool = False,
        single: bool = False,
    ) -> T:
        """Run ``fn(conn, *args)`` in a write transaction; with ``durable``, return once it is
        on disk (a store of its own is always durable: every batch is fsynced); ``single``: on
        the shared database, ``fn`` changes one row with one statement at most (see
        `SqliteDatabase.write`)."""
        if self._closed:
            raise IdempotencyError(f"idempotency store {self.path} is closed")
        try:
            if self._db is not None:
                result: T = await self._db.call(fn, *args)
            else:
                assert self._database is not None
                result = await self._database.call(fn, *args, durable=durable, single=single)
        except StoreError as exc:
            cause = exc.__cause__ or exc
            raise IdempotencyError(
                f"idempotency store {self.path}: {what} of key {key!r} failed: {cause}"
            ) from cause
        return result

    # -- the IdempotencyStore protocol ----------------------------------------------------------

    async def claim(self, key: str) -> Stored | None:
        """Claim ``key`` (None: the caller owns it), or get the stored answer to replay."""
        self._ensure_task()
        delay = self._poll[0]
        while True:
            if key in self._held:  # another run of this process holds it: wait locally
                status, text, fingerprint, remaining = "held", None, None, self.lease
            else:
                owner = self._owners.next()
                status, text, fingerprint, remaining = await self._run(
                    "claim", key, self._try_claim, key, owner, single=True
                )
            if status == "claimed":
                self._held[key] = owner
                return None
            if status == "done":
                return stored_answer(text, fingerprint)
            wakeup = self._wakeups.setdefault(key, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wakeup.wait(), timeout=min(delay, remaining + 0.001))
            delay = min(delay * 2, self._poll[1])

    async def complete(
        self, key: str, response: Message | None, fingerprint: str | None = None
    ) -> None:
        """Store the answer for ``key`` (replayed until ``ttl`` passes) and wake its waiters."""
        owner = self._held.get(key)
        try:
            ok = await self._run(
                "complete",
                key,
                self._complete,
                key,
                owner,
                stored_json(response) if response is not None else None,
                fingerprint,
                durable=True,
                single=True,
            )
        finally:
            if self._held.get(key) == owner:
                self._held.pop(key, None)
            self._wake(key)
        if not ok:
            raise LeaseLostError(key)

    async def release(self, key: str) -> None:
        """Give the claim on ``key`` up; waiters try to claim it again."""
        owner = self._held.pop(key, None)
        try:
            if owner is not None:
                await self._run("release", key, self._release, key, owner, single=True)
        finally:
            self._wake(key)

    def _wake(self, key: str) -> None:
        event = self._wakeups.pop(key, None)
        if event is not None:
            event.set()

    # -- background maintenance -----------------------------------------------------------------

    def _ensure_task(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._maintain())

    async def _maintain(self) -> None:
        loop = asyncio.get_running_loop()
        renew_every = self.lease / 3
        next_purge = loop.time()
        while not self._closed:
            try:
                if self._held:
                    await self._run("renew", "*", self._renew, list(self._held.items()))
                if loop.time() >= next_purge:
                    purged = await self.purge()
                    next_purge = loop.time() + self._purge_interval
                    if purged:
                        log.debug("idempotency: purged %d expired keys", purged)
            except IdempotencyError as exc:
                log.warning("idempotency: maintenance failed: %s", error_text(exc))
            await asyncio.sleep(min(renew_every, self._purge_interval))

    async def purge(self) -> int:
        """Delete expired responses and claims now; return how many rows went."""
        total = 0
        while True:
            purged = await self._run("purge", "*", self._purge)
            total += purged
            if purged < _PURGE_CHUNK:
                return total
            await asyncio.sleep(0)  # let transactions in between chunks

    # -- life cycle -----------------------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._db is not None:
            await asyncio.to_thread(self._db.close)
        for event in self._wakeups.values():
            event.set()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
