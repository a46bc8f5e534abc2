"""The group-commit writer: one thread that owns a database connection and writes batches.

``record`` callers hand a row and a future to the writer and await the future. The thread takes
everything queued (up to ``max_batch``) and writes it in ONE database transaction, so a single
fsync makes a whole batch durable; then it settles each caller's future (one wake-up per event
loop per batch). While a batch is being written the next one accumulates: the busier the system,
the bigger the batches, the fewer fsyncs per event. With ``group_commit=False`` each row is its
own transaction (one fsync per event), which is what group commit is measured against.

A failed batch fails every future in it with the error; the writer keeps going and reconnects
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

from isopace.store.errors import JournalError

T = TypeVar("T")
C = TypeVar("C")

log = logging.getLogger("isopace.store")

_Item = tuple[T, "asyncio.AbstractEventLoop | None", "asyncio.Future[None] | None"]


def _settle(futures: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for fut in futures:
        if fut.done():
            continue
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)


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
        self._queue: queue.SimpleQueue[_Item[T] | None] = queue.SimpleQueue()
        self._conn: C | None = None
        self._closed = False
        self.batches = 0
        self.rows = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, row: T) -> asyncio.Future[None]:
        if self._closed:
            raise JournalError("journal is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._queue.put((row, loop, fut))
        return fut

    def barrier(self) -> asyncio.Future[None]:
        """A future settled once everything queued before it has been written."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        if self._closed:
            fut.set_result(None)
        else:
            self._queue.put((None, loop, fut))  # type: ignore[arg-type]
        return fut

    def submit_nowait(self, row: T) -> None:
        """Queue ``row`` without waiting for it: written with the next batch, failures logged."""
        if self._closed:
            raise JournalError("journal is closed")
        self._queue.put((row, None, None))

    def close(self) -> None:
        """Write what is queued, then stop the thread (blocking)."""
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
            self._write(batch)
        if self._conn is not None:
            try:
                self._disconnect(self._conn)
            except Exception:  # pragma: no cover - closing a broken connection
                log.exception("journal: closing the connection failed")
            self._conn = None

    def _write(self, batch: list[_Item[T]]) -> None:
        error: BaseException | None = None
        try:
            if self._conn is None:
                self._conn = self._connect()
            rows = [row for row, _, _ in batch if row is not None]  # None: a barrier
            if rows:
                self._apply(self._conn, rows)
                self.batches += 1
                self.rows += len(rows)
        except Exception as exc:
            error = JournalError(self._describe(exc))
            error.__cause__ = exc
            log.warning(
                "journal: batch of %d rows failed: %s",
                len(batch),
                error,
                extra={"rows": len(batch), "error": str(error)},
            )
            conn, self._conn = self._conn, None
            if conn is not None:
                with contextlib.suppress(Exception):
                    self._disconnect(conn)
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        for _, loop, fut in batch:
            if loop is not None and fut is not None:
                by_loop.setdefault(loop, []).append(fut)
        for loop, futures in by_loop.items():
            # RuntimeError: the loop is closed, nobody is waiting any more
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, futures, error)


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
