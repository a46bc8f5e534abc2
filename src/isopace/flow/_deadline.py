"""Interrupting an await when the run's deadline passes.

``until(deadline, aw)`` is what ``asyncio.timeout_at`` does for one awaitable, with less
machinery on the way in and out (one timer handle, no context manager), which matters because a
host runs every transaction with a deadline. When the timer fires it cancels the task; the
``CancelledError`` that comes out of ``aw`` is turned into ``TimeoutError`` unless the task was
also cancelled from outside (then the cancellation propagates, as with ``asyncio.timeout``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


class _Expiry:
    __slots__ = ("cancelling", "fired", "task")

    def __init__(self, task: asyncio.Task[object]) -> None:
        self.task = task
        self.cancelling = task.cancelling()
        self.fired = False

    def fire(self) -> None:
        self.fired = True
        self.task.cancel()


async def until(deadline: float, aw: Awaitable[T]) -> T:
    """Await ``aw``; if ``deadline`` (loop clock) passes first, interrupt it and raise
    ``TimeoutError``. Outside a task there is nothing to interrupt: ``aw`` is simply awaited."""
    task = asyncio.current_task()
    if task is None:
        return await aw
    expiry = _Expiry(task)
    handle = asyncio.get_running_loop().call_at(deadline, expiry.fire)
    try:
        return await aw
    except asyncio.CancelledError:
        if expiry.fired:
            expiry.fired = False
            if task.uncancel() <= expiry.cancelling:
                raise TimeoutError() from None
        raise
    finally:
        handle.cancel()
        if expiry.fired:
            # It fired, but ``aw`` ended without the cancellation: take the request back.
            task.uncancel()
