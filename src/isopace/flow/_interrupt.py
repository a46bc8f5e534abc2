"""Interrupting awaits when the run's deadline passes, and shielding work from cancellation.

The deadline timer does what ``asyncio.timeout_at`` does, with less machinery (one timer handle,
no context manager), and is armed only when there is something to interrupt: a run of
plain-function stages never suspends, so its deadline is only checked and arms no timer.

A run's deadline comes to its prepare passes as a :class:`Deadline` (a run without one gets
:data:`NO_DEADLINE`, whose methods do nothing). The passes iterate their stages through
:meth:`Deadline.steps`, which checks the clock before handing out each stage and once more after
the last (the decision point), and arms the timer before the first stage whose prepare is a
coroutine; so the loops hold no test of their own for whether there is a deadline, and a run
without one pays nothing per stage.

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
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from operator import attrgetter
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


_PREPARES_ASYNC = attrgetter("prepare_async")
"""Whether a stage of the work list has a prepare to await."""


class NoDeadline:
    """A run without a deadline: never late, nothing to arm."""

    __slots__ = ("expiry", "late")

    def __init__(self) -> None:
        self.late = False
        """Whether :meth:`steps` stopped because the deadline had passed."""
        self.expiry: Expiry | None = None
        """The armed timer, if any."""

    steps: Callable[..., Iterator[Any]] = staticmethod(iter)
    """``steps(items[, is_async])``: ``items``, for as long as the deadline has not passed.
    Without a deadline, all of them as they come: the builtin ``iter`` (the general prepare
    pass hands in an iterator, which ``iter`` returns as it is), no Python frame."""

    def passed(self) -> bool:
        """Whether the deadline has passed by now."""
        return False

    def arm(self) -> None:
        """Arm the timer (for an await that :meth:`steps` could not foresee)."""

    def consume(self) -> bool:
        """For a ``CancelledError`` just caught: True if it is the deadline's (a timeout)."""
        return False

    def disarm(self) -> None:
        """Stop the timer at the end of the prepare pass (commits are never cut short)."""


NO_DEADLINE = NoDeadline()


class Deadline(NoDeadline):
    """A run's deadline ``at`` (loop clock), as its prepare passes keep it."""

    __slots__ = ("at", "now")

    def __init__(self, at: float) -> None:
        self.late = False
        self.expiry = None
        self.at = at
        self.now = _clock_of(asyncio.get_running_loop())

    def steps(
        self, items: Iterable[T], is_async: Callable[[T], bool] = _PREPARES_ASYNC
    ) -> Iterator[T]:
        """``items`` while the deadline has not passed, checked before each and after the last
        (then :attr:`late` says why the iteration stopped); the timer is armed before the first
        item ``is_async`` says will be awaited, and disarmed when the items end."""
        at = self.at
        now = self.now
        for item in items:
            if now() >= at:
                self.late = True
                break
            if self.expiry is None and is_async(item):
                self.arm()
            yield item
        else:
            self.late = now() >= at
        # The pass is over (a pass that leaves the loop early disarms the timer itself).
        self.disarm()

    def passed(self) -> bool:
        return self.now() >= self.at

    def arm(self) -> None:
        if self.expiry is None:
            self.expiry = arm(self.at)

    def consume(self) -> bool:
        return self.expiry is not None and self.expiry.consume()

    def disarm(self) -> None:
        if self.expiry is not None:
            self.expiry.disarm()
            self.expiry = None


def _clock_of(loop: asyncio.AbstractEventLoop) -> Callable[[], float]:
    """The loop's clock as a function. asyncio's own loops read ``time.monotonic()``: then that
    builtin itself, a Python frame less on every check (other loops, uvloop's, keep theirs)."""
    if type(loop).time is asyncio.BaseEventLoop.time:
        return time.monotonic
    return loop.time


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
