"""The group-commit writer: one thread that owns a database connection and writes batches.

``record`` callers put their row into the batch being filled on their event loop and await that
batch's future. A batch is handed to the writer thread once, at the end of the loop iteration
in which its first row arrived (``loop.call_soon``): one hand-off per batch, not per row. The
thread takes every batch handed over meanwhile (up to ``max_batch`` rows, whole batches) and
writes them in ONE database transaction, so a single fsync makes all of them durable; then it
settles them with one ``call_soon_threadsafe`` per event loop, and each batch's future wakes all
of its records at once. While a batch is being written the next ones accumulate: the busier the
system, the bigger the batches, the fewer fsyncs per event. With ``group_commit=False`` each row
is its own batch and its own transaction (one fsync per event), which is what group commit is
measured against.

A batch's future is shared by its records, so a task cancelled while waiting must not cancel
it for the others: callers pass a ``CancelledError`` raised by ``await batch.future`` to
:meth:`Batch.resume`, which re-raises it only when it was aimed at the calling task.

A failed batch fails every record in it with the error; the writer keeps going and reconnects
when needed, so a transient condition (disk full, then space freed) heals by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from isopace._cardtext import error_text, mask_text
from isopace.store.errors import JournalError

T = TypeVar("T")
C = TypeVar("C")

log = logging.getLogger("isopace.store")


class Batch(Generic[T]):
    """Rows written together; ``future`` settles when they are durable (or failed)."""

    __slots__ = ("done", "error", "future", "loop", "rows", "waiters")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.rows: list[T] = []
        self.future: asyncio.Future[None] = loop.create_future()
        self.done = False
        self.error: BaseException | None = None
        self.waiters: list[asyncio.Future[None]] | None = None

    def settle(self, error: BaseException | None) -> None:
        """Called on the batch's loop once the batch is written (error None) or failed."""
        self.done = True
        self.error = error
        futures = [self.future]
        if self.waiters:
            futures += self.waiters
        for fut in futures:
            if fut.done():
                continue
            if error is None:
                fut.set_result(None)
            else:  # the shared future's waiters copy it (see SqliteJournal.record)
                fut.set_exception(error if fut is self.future else _copy_error(error))

    async def resume(self, cancelled: asyncio.CancelledError) -> None:
        """After ``await batch.future`` raised ``cancelled``: re-raise it when the calling task
        is being cancelled; otherwise another waiter's cancellation cancelled the shared future,
        so wait for the batch on a future of this task's own."""
        task = asyncio.current_task()
        if not self.future.cancelled() or task is None or task.cancelling():
            raise cancelled
        if self.done:
            if self.error is not None:
                raise _copy_error(self.error)
            return
        fut: asyncio.Future[None] = self.loop.create_future()
        if self.waiters is None:
            self.waiters = []
        self.waiters.append(fut)
        await fut


def _copy_error(error: BaseException) -> BaseException:
    """One exception object per waiter (a shared one would collect every task's traceback)."""
    copy = JournalError(str(error))
    copy.__cause__ = error.__cause__
    return copy


def _settle(batches: list[Batch[Any]], error: BaseException | None) -> None:
    for batch in batches:
        batch.settle(error)


class GroupWriter(Generic[T, C]):
    """A writer thread that applies batches of ``T`` through a connection ``C``."""

    def __init__(
        self,
        *,
        connect: Callable[[], C],
        apply: Callable[[C, list[T]], None],
        disconnect: Callable[[C], None],
        describe: Callable[[BaseException], str],
        group_commit: bool = True,
        max_batch: int = 1024,
        name: str = "isopace-journal-writer",
    ) -> None:
        self._connect = connect
        self._apply = apply
        self._disconnect = disconnect
        self._describe = describe
        self._group_commit = group_commit
        self._max_batch = max_batch if group_commit else 1
        self._queue: queue.SimpleQueue[Batch[T] | None] = queue.SimpleQueue()
        #: per event loop, the batch being filled during the current loop iteration
        self._filling: dict[asyncio.AbstractEventLoop, Batch[T]] = {}
        self._conn: C | None = None
        self._closed = False
        self._stopped = False  # the thread no longer takes batches
        self._lock = threading.Lock()
        self.batches = 0
        self.rows = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _batch(self) -> Batch[T]:
        loop = asyncio.get_running_loop()
        batch = self._filling.get(loop)
        if batch is None:
            batch = self._filling[loop] = Batch(loop)
            loop.call_soon(self._hand_over, loop)
        return batch

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        batch = self._filling.pop(loop, None)
        if batch is not None:
            self._put(batch)

    def _put(self, batch: Batch[T]) -> None:
        with self._lock:
            if not self._stopped:
                self._queue.put(batch)
                return
        batch.settle(JournalError("journal is closed"))

    def seal(self) -> None:
        """Hand the running loop's batch over now (call on the loop before ``close``)."""
        with contextlib.suppress(RuntimeError):
            self._hand_over(asyncio.get_running_loop())

    def submit(self, row: T) -> Batch[T]:
        """Add ``row`` to this loop's batch; await ``batch.wait()`` for its durability."""
        if self._closed:
            raise JournalError("journal is closed")
        if not self._group_commit:
            batch: Batch[T] = Batch(asyncio.get_running_loop())
            batch.rows.append(row)
            self._put(batch)
            return batch
        batch = self._batch()
        batch.rows.append(row)
        return batch

    def barrier(self) -> asyncio.Future[None]:
        """A future settled once everything submitted before it has been written."""
        if self._closed:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            fut.set_result(None)
            return fut
        batch = self._batch() if self._group_commit else Batch(asyncio.get_running_loop())
        if not self._group_commit:
            self._put(batch)
        # a waiter of its own: cancelling a flush must not cancel the batch's shared future
        fut = batch.loop.create_future()
        if batch.waiters is None:
            batch.waiters = []
        batch.waiters.append(fut)
        return fut

    def submit_nowait(self, row: T) -> None:
        """Queue ``row`` without waiting for it: written with the next batch, failures logged."""
        self.submit(row)

    def close(self) -> None:
        """Write what was handed over, then stop the thread (blocking). Call :meth:`seal` on
        the loop first so that the rows of its current iteration are written too; a batch
        handed over later fails with "journal is closed"."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
        self._thread.join()

    @property
    def closed(self) -> bool:
        return self._closed

    def _run(self) -> None:
        stop = False
        while not stop:
            item = self._queue.get()
            if item is None:
                break
            batches = [item]
            size = len(item.rows)
            while size < self._max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batches.append(nxt)
                size += len(nxt.rows)
            self._write(batches)
        with self._lock:
            self._stopped = True
        rest: list[Batch[T]] = []
        with contextlib.suppress(queue.Empty):
            while True:
                item = self._queue.get_nowait()
                if item is not None:
                    rest.append(item)
        if rest:
            self._write(rest)
        if self._conn is not None:
            try:
                self._disconnect(self._conn)
            except Exception as exc:  # pragma: no cover - closing a broken connection
                log.error(
                    "journal: closing the connection failed\n%s", error_text(exc, traceback=True)
                )
            self._conn = None

    def _write(self, batches: list[Batch[T]]) -> None:
        error: BaseException | None = None
        rows = batches[0].rows if len(batches) == 1 else [r for b in batches for r in b.rows]
        try:
            if rows:
                if self._conn is None:
                    self._conn = self._connect()
                self._apply(self._conn, rows)
                self.batches += 1
                self.rows += len(rows)
        except Exception as exc:
            error = JournalError(mask_text(self._describe(exc)))
            error.__cause__ = exc
            text = error_text(error)
            log.warning(
                "journal: batch of %d rows failed: %s",
                len(rows),
                text,
                extra={"rows": len(rows), "error": text},
            )
            conn, self._conn = self._conn, None
            if conn is not None:
                with contextlib.suppress(Exception):
                    self._disconnect(conn)
        by_loop: dict[asyncio.AbstractEventLoop, list[Batch[T]]] = {}
        for batch in batches:
            by_loop.setdefault(batch.loop, []).append(batch)
        for loop, items in by_loop.items():
            # RuntimeError: the loop is closed, nobody is waiting any more
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, items, error)


_Call = tuple[Callable[..., Any], tuple[Any, ...], asyncio.AbstractEventLoop, "asyncio.Future[Any]"]


def _settle_results(items: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for fut, result, error in items:
        if fut.done():
            continue
        if error is None:
            fut.set_result(result)
        else:
            fut.set_exception(error)


class BatchExecutor(Generic[C]):
    """One thread, one connection: calls queued meanwhile run together in ONE transaction.

    Each call is ``fn(conn, *args)`` (it must not begin or end transactions); every caller gets
    its own result. Used by the SQLite idempotency store so that 100 concurrent claims cost one
    fsync, not 100. A failed transaction fails every call in it with ``wrap(exc)``.
    """

    def __init__(
        self,
        *,
        connect: Callable[[], C],
        begin: Callable[[C], object],
        commit: Callable[[C], object],
        rollback: Callable[[C], object],
        disconnect: Callable[[C], None],
        wrap: Callable[[BaseException], BaseException],
        max_batch: int = 512,
        name: str = "isopace-store",
    ) -> None:
        self._connect = connect
        self._begin = begin
        self._commit = commit
        self._rollback = rollback
        self._disconnect = disconnect
        self._wrap = wrap
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._conn: C | None = None
        self._closed = False
        self._stopped = False  # the thread no longer takes batches
        self._lock = threading.Lock()
        self.batches = 0
        self.calls = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def open(self) -> None:
        """Connect now, raising the connection error (call before the first ``call``)."""
        if self._conn is None:
            self._conn = self._connect()

    def call(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        if self._closed:
            raise self._wrap(RuntimeError("closed"))
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._queue.put((fn, args, loop, fut))
        return fut

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        stop = False
        while not stop:
            item = self._queue.get()
            if item is None:
                break
            batch = [item]
            while len(batch) < self._max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._execute([b for b in batch if b[2] is not None])
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._disconnect(self._conn)
            self._conn = None

    def _execute(self, batch: list[_Call]) -> None:
        if not batch:
            return
        results: list[Any] = []
        error: BaseException | None = None
        try:
            if self._conn is None:
                self._conn = self._connect()
            conn = self._conn
            self._begin(conn)
            try:
                for fn, args, _, _ in batch:
                    results.append(fn(conn, *args))
                self._commit(conn)
            except BaseException:
                with contextlib.suppress(Exception):
                    self._rollback(conn)
                raise
            self.batches += 1
            self.calls += len(batch)
        except Exception as exc:
            error = self._wrap(exc)
            conn_, self._conn = self._conn, None
            if conn_ is not None:
                with contextlib.suppress(Exception):
                    self._disconnect(conn_)
        by_loop: dict[
            asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any, BaseException | None]]
        ] = {}
        for i, (_, _, loop, fut) in enumerate(batch):
            result = results[i] if error is None else None
            by_loop.setdefault(loop, []).append((fut, result, error))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle_results, items)
