"""What to undo when a host (or an operator command) stops, in one list closed backwards.

Why: the host opens a dozen things in an order that matters (the database before the ledger and
the journal that live in it, the stores before the server that writes to them, the server before
the tasks that read its figures), and start-up can fail after any of them. Registering each
closer the moment its resource exists, and closing the list in reverse, makes "close what was
opened, in reverse opening order" true after a full start, a start that failed half way, and a
command that opened only the ledger, with no bookkeeping of what got that far. One closer that
fails is logged and the rest still run: a database that is down must not keep the port open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from isopace.host.errors import one_line

__all__ = ["Closers"]

log = logging.getLogger("isopace.host")


class Closers:
    """Closers (plain or async callables) run by `close` in reverse order of `add`."""

    def __init__(self) -> None:
        self._closers: list[Callable[[], object]] = []

    def add(self, closer: Callable[[], object]) -> None:
        self._closers.append(closer)

    def add_task(self, task: asyncio.Task[None]) -> None:
        """Cancel ``task`` (a background job) on close, and wait for it to end."""

        async def stop() -> None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        self.add(stop)

    async def close(self) -> None:
        """Run every closer, last added first; a failure is logged as a WARNING. Closing twice
        runs each closer once."""
        closers, self._closers = self._closers, []
        for closer in reversed(closers):
            try:
                result = closer()
                if asyncio.iscoroutine(result):
                    await result
            except Exception as exc:  # keep closing the rest
                log.warning("close: %s", one_line(exc))
