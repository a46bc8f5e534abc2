"""Interrupting awaits when the run's deadline passes, and shielding work from cancellation.

The deadline timer does what ``asyncio.timeout_at`` does, with less machinery (one timer handle,
no context manager), and is armed only when there is something to interrupt: a run of
plain-function stages never suspends, so its deadline is only checked and arms no timer.

When the timer fires it cancels the task; the ``CancelledError`` that comes out of the awaited
stage is turned into a timeout (``Expiry.consume()`` returns True) unless the task was also
cancelled from outside: then the cancellation propagates, as with ``asyncio.timeout``.

``shielded(aw)`` runs what must finish even when the run's task is cancelled (the rollback, the
idempotency store's complete / release) in a task of its own, waits for it through any number
of cancellations, and reports whether one arrived so that the caller re-raises it afterwards.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

from isopace._cardtext import error_text

T = TypeVar("T")


class Expiry:
    """A timer that cancels ``task`` at ``deadline``; see :func:`arm`."""

    __slots__ = ("cancelling", "fired", "handle", "task")

    def __init__(self, task: asyncio.Task[object], deadline: float) -> None:
        self.task = task
        self.cancelling = task.cancelling()
        self.fired = False
        self.handle = asyncio.get_running_loop().call_at(deadline, self._fire)

    def _fire(self) -> None:
        self.fired = True
        self.task.cancel()

    def consume(self) -> bool:
        """For a ``CancelledError`` just caught: True if it is this timer's (a timeout), False
        if it must propagate (not fired, or also cancelled from outside)."""
        if not self.fired:
            return False
        self.fired = False
        return self.task.uncancel() <= self.cancelling

    def disarm(self) -> None:
        """Stop the timer; if it fired but its cancellation never came out (a stage swallowed
        it), take the cancellation request back."""
        self.handle.cancel()
        if self.fired:
            self.fired = False
            self.task.uncancel()


def arm(deadline: float) -> Expiry | None:
    """A timer interrupting the current task at ``deadline``; None outside a task."""
    task = asyncio.current_task()
    return None if task is None else Expiry(task, deadline)


async def until(deadline: float, aw: Awaitable[T]) -> T:
    """Await ``aw``; if ``deadline`` (loop clock) passes first, interrupt it and raise
    ``TimeoutError``. Outside a task there is nothing to interrupt: ``aw`` is simply awaited."""
    expiry = arm(deadline)
    if expiry is None:
        return await aw
    try:
        return await aw
    except asyncio.CancelledError:
        if expiry.consume():
            raise TimeoutError() from None
        raise
    finally:
        expiry.disarm()


async def shielded(aw: Coroutine[Any, Any, None] | Awaitable[None]) -> bool:
    """Run ``aw`` to completion even if this task is cancelled meanwhile; True if it was."""
    task = asyncio.ensure_future(aw)
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait((task,))
        except asyncio.CancelledError:
            cancelled = True
    if not task.cancelled() and (exc := task.exception()) is not None:
        logging.getLogger("isopace.flow").error(
            "flow: shielded step failed\n%s", error_text(exc, traceback=True)
        )
    return cancelled
