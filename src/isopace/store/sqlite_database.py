"""One SQLite file shared by a process's ledger, journal and idempotency store, written inline.

Why: a write handed to a writer thread costs a thread round trip (queue, wake-up, hand-back to
the event loop), and on a small virtual machine that round trip costs more CPU than the write.
A transaction touches the ledger, the journal and the idempotency store six or seven times in a
row, so round trips, not the disk, bounded the host. Here every write runs inline on the event
loop (tens of microseconds: WAL, and no fsync at commit). The writes made during one iteration of
the loop share one SQLite transaction, each in a SAVEPOINT of its own or, a write of one
statement, in that statement's own (a write that fails is undone alone), committed at the start
of the next iteration, or, while an fdatasync runs, when it ends (nothing they hold could reach
the disk before the next sync anyway): fewer commits, and a page several writes touch goes to
the WAL once. Deferring the commit to the sync's end took the host's CPU per approval from 465
to 390 µs (host bench, one run, both trees).
Durability is a separate, shared step: ``await database.synced()`` returns once everything
written before the call is on disk. One sync thread makes that true with one ``fdatasync`` of
the WAL file for every commit made meanwhile (group commit), so a transaction pays one thread
round trip, however many writes it made.

Why this is durable and consistent:

- Every write of the process goes through one connection into one WAL, a single ordered log. A
  crash of the process loses nothing committed (the data is in the kernel's page cache). A power
  loss keeps a prefix of the log: SQLite's WAL recovery stops at the first frame that is missing
  or torn, so a later write never survives without the earlier ones. The journal's BEGIN is
  therefore on disk whenever a reservation made after it is, and recovery sees a consistent state.
- ``synced()`` fdatasyncs the WAL file: the writes it covers are on disk in the WAL, or already
  copied to the database file by a checkpoint, which syncs the WAL before and the database after.
- So the rule for a caller is: await ``synced()`` before anything outside the database depends on
  what was written (a response leaves). The idempotency store's ``complete``, which precedes every
  answer of an idempotent transaction, does.

The connection runs ``synchronous=NORMAL`` (no fsync inside a commit; the sync thread does it);
``synchronous`` here says whether ``synced()`` syncs: ``FULL`` (fdatasync) or ``EXTRA`` (fsync,
metadata too) for durability against power loss, ``NORMAL`` for durability against a process crash
only (``synced()`` returns at once). Checkpoints are SQLite's own, run by the commit that takes
the WAL past ``checkpoint_pages`` pages: inline too, so they catch up completely and the next write
starts the WAL over (a checkpoint running beside a busy writer never catches up, and a WAL that
only grows makes every page lookup slower); one costs the loop about a millisecond.
A failed fdatasync fails every waiter and every later call: after a failed fsync the kernel may
have dropped the dirty pages, so nothing written since can be trusted to reach the disk. A failed
COMMIT does the same: its writes were undone after their callers had gone on with their results;
so does a write after which SQLite rolled the whole batch back (as it may on a full disk).
Either way the process must restart, and recovery finishes what was in flight from the disk.

One event loop uses a database; a write blocks that loop for its duration (it waits up to
``timeout`` seconds if another process holds the file's write lock).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from isopace._cardtext import error_text
from isopace.store._sqlite_open import open_wal
from isopace.store.errors import StoreError

__all__ = ["SqliteDatabase"]

log = logging.getLogger("isopace.store")
T = TypeVar("T")


class SqliteDatabase:
    """One SQLite file, written inline on the event loop, made durable by ``await synced()``."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "FULL",
        timeout: float = 10.0,
        checkpoint_pages: int = 1000,
    ) -> None:
        mode = synchronous.upper()
        if mode not in ("NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be NORMAL, FULL or EXTRA, not {synchronous!r}")
        self.path = os.fspath(path)
        self.synchronous = mode
        parent = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(parent, exist_ok=True)
            self.conn = open_wal(
                self.path,
                timeout=timeout,
                synchronous="NORMAL",
                pragmas={"wal_autocheckpoint": checkpoint_pages, "foreign_keys": "ON"},
                check_same_thread=False,
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"database {self.path}: cannot open: {exc}") from exc
        #: commits made (loop thread only) and the count known to be on disk
        self.commits = 0
        self._synced = 0
        self._batch_open = False
        #: an fdatasync is running: the open batch commits when it ends (see `commit`)
        self._syncing = False
        self._failed: BaseException | None = None
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._sync_wanted = threading.Event()
        self.syncs = 0
        self._thread = threading.Thread(target=self._sync_thread, name="isopace-sync", daemon=True)
        self._thread.start()

    # -- writing and reading (inline, on the loop) ----------------------------------------------

    def write(self, fn: Callable[..., T], *args: Any, single: bool = False) -> T:
        """Run ``fn(conn, *args)`` as one write and return its result (not yet committed).

        The writes of one event loop iteration share one transaction, committed at the start
        of the next iteration (`commit`): each write is a SAVEPOINT in it, so one that fails
        is rolled back alone. Raises `StoreError` (the cause attached) when the database fails;
        an exception of ``fn`` itself rolls its write back and propagates unchanged.

        ``single=True`` says that ``fn`` changes the database with one statement at most (the
        others only read) and does not fail after it: SQLite undoes a statement that fails,
        its triggers' changes with it, and nothing else, so such a write needs no SAVEPOINT of
        its own (two statements fewer: a journal record, an idempotency claim or answer)."""
        self._check()
        conn = self.conn
        if not self._batch_open:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreError(f"database {self.path}: {exc}") from exc
            self._batch_open = True
            try:
                asyncio.get_running_loop().call_soon(self._next_iteration)
            except RuntimeError:  # no loop: commit at once
                self._batch_open = False
                return self._single(conn, fn, args)
        if not single:
            conn.execute("SAVEPOINT write")
        try:
            result = fn(conn, *args)
        except BaseException as exc:
            if not conn.in_transaction:
                # SQLite rolled the whole batch back (it may, on a full disk or an I/O error):
                # the writes before this one are gone although their callers have their results
                self._batch_open = False
                self._fail(exc)
            elif not single:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK TO write")
                    conn.execute("RELEASE write")
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"database {self.path}: {exc}") from exc
            raise
        if not single:
            conn.execute("RELEASE write")
        return result

    def _single(self, conn: sqlite3.Connection, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        try:
            result = fn(conn, *args)
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"database {self.path}: {exc}") from exc
            raise
        self.commits += 1
        return result

    def commit(self, *, now: bool = True) -> None:
        """Commit the open batch (the loop asks at the start of the next iteration, with
        ``now=False``).

        With ``now=False`` a batch opened while an fdatasync runs stays open until that sync
        ends (`_on_synced` commits it): nothing it holds can be on disk before the next sync
        anyway, and the writes of the iterations meanwhile then share one commit, a page they
        all touch (an account's, an index's) going to the WAL once instead of once an
        iteration. Other processes see those writes a sync later; one that writes waits for
        the write lock meanwhile, as it waits for any open batch.

        A failed commit undoes writes whose callers already went on with their results, so,
        as after a failed sync, the database refuses every later call (restart the process;
        recovery then finishes what was in flight from what is on disk)."""
        if not self._batch_open or (self._syncing and not now):
            return
        self._batch_open = False
        try:
            self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")
            self._fail(exc)
            log.error("database %s: commit failed: %s", self.path, error_text(exc))
            return
        self.commits += 1
        if self._waiters:
            self._sync_wanted.set()

    def _next_iteration(self) -> None:
        self.commit(now=False)

    def setup(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` outside any batch: for schema set-up and migrations, which
        begin and commit their own transactions (the open batch is committed first)."""
        self.commit()
        self._check()
        try:
            result = fn(self.conn, *args)
        except sqlite3.Error as exc:
            raise StoreError(f"database {self.path}: {exc}") from exc
        self.commits += 1
        return result

    def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)``; it sees every write, committed or in the open batch."""
        self._check()
        try:
            return fn(self.conn, *args)
        except sqlite3.Error as exc:
            raise StoreError(f"database {self.path}: {exc}") from exc

    async def call(
        self, fn: Callable[..., T], *args: Any, durable: bool = False, single: bool = False
    ) -> T:
        """`write` (``single`` as there), then, with ``durable``, wait until the write is on
        disk (`synced`)."""
        result = self.write(fn, *args, single=single)
        if durable:
            await self.synced()
        return result

    @property
    def failed(self) -> bool:
        """True once a commit or sync failed (see the module docstring): nothing written since
        can be trusted, and the process should answer no more approvals and restart."""
        return self._failed is not None

    def _check(self) -> None:
        if self._closed:
            raise StoreError(f"database {self.path} is closed")
        if self._failed is not None:
            raise StoreError(
                f"database {self.path}: a commit or sync failed earlier ({self._failed}); "
                "writes may have been lost: restart to recover from what is on disk"
            ) from self._failed

    def _fail(self, error: BaseException) -> None:
        """Refuse every later call, and fail the waiters of `synced`."""
        self._failed = error
        err = StoreError(f"database {self.path}: {error}")
        waiters, self._waiters = self._waiters, []
        for _, fut in waiters:
            if not fut.done():
                fut.set_exception(err)

    # -- durability -----------------------------------------------------------------------------

    async def synced(self) -> None:
        """Return once every commit made before this call is on disk (see the module docs)."""
        self._check()
        # the open batch holds writes made before this call: it counts once committed
        target = self.commits + self._batch_open
        if self._synced >= target or self.synchronous == "NORMAL":
            return
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif loop is not self._loop:
            raise StoreError(f"database {self.path} is used from another event loop")
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.append((target, fut))
        if not self._batch_open:  # else `commit` asks for the sync
            self._sync_wanted.set()
        await fut

    def _on_synced(self, target: int, error: BaseException | None) -> None:
        """On the loop: settle the waiters the sync covered; ask for another if some remain."""
        self._syncing = False
        if error is not None:
            self._fail(error)
            return
        self._synced = max(self._synced, target)
        self.commit()  # the batch that waited for this sync (it asks for the next one)
        remaining = []
        for item in self._waiters:
            wanted, fut = item
            if fut.done():
                continue
            if wanted <= self._synced:
                fut.set_result(None)
            else:
                remaining.append(item)
        self._waiters = remaining
        if remaining and not self._batch_open:  # else `commit` asks for the next sync
            self._sync_wanted.set()

    def _sync_thread(self) -> None:
        # fdatasync (data, and the metadata needed to read it back); fsync where asked for, or
        # where the platform has no fdatasync
        sync = getattr(os, "fdatasync", os.fsync) if self.synchronous != "EXTRA" else os.fsync
        wal_fd: int | None = None
        try:
            while True:
                self._sync_wanted.wait()
                self._sync_wanted.clear()
                if self._closed and not self._waiters:
                    return
                target = self.commits  # every commit counted here finished before the sync
                self._syncing = True
                error: BaseException | None = None
                try:
                    if wal_fd is None:
                        wal_fd = os.open(self.path + "-wal", os.O_RDONLY)
                        self._sync_directory()  # the WAL file's own directory entry
                    sync(wal_fd)
                    self.syncs += 1
                except OSError as exc:
                    error = exc
                loop = self._loop
                if loop is not None:
                    with contextlib.suppress(RuntimeError):  # the loop is closed
                        loop.call_soon_threadsafe(self._on_synced, target, error)
                if error is not None:
                    log.error("database %s: sync failed: %s", self.path, error_text(error))
                    return
        finally:
            if wal_fd is not None:
                os.close(wal_fd)

    def _sync_directory(self) -> None:
        fd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- life cycle -----------------------------------------------------------------------------

    async def close(self) -> None:
        """Sync what was committed, stop the threads, close the connection."""
        if self._closed:
            return
        self.commit()
        with contextlib.suppress(StoreError):
            await self.synced()
        self._closed = True
        self._sync_wanted.set()
        await asyncio.to_thread(self._thread.join)
        self.conn.close()
