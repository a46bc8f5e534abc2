"""The journal as the run sees it: one call per lifecycle step, with a do-nothing default.

The run calls ``begin``, ``committing``, ``committed`` and ``aborted`` unconditionally; a flow
without a journal gets :data:`UNRECORDED`, whose methods return at once. :class:`Recorder` turns
each step into its :class:`~isopace.flow.journal.Event` and logs a journal that fails (a journal
failure never aborts a transaction by itself). What an event carries is decided here once: the
fingerprint becomes a durable property at ``committing`` (recovery needs it only for a
transaction it finishes), ``committed`` carries the group of failed commits, ``aborted`` the
cause.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Generator

from isopace._cardtext import error_text
from isopace.flow.exchange import Exchange
from isopace.flow.journal import Event, EventKind, Journal


class _Nothing:
    """An awaitable that is complete already: what a step without a journal hands out."""

    __slots__ = ()

    def __await__(self) -> Generator[None, None, None]:
        return
        yield


_NOTHING = _Nothing()


def _unrecorded(ex: Exchange, event: Event) -> Awaitable[None]:
    return _NOTHING


class Unrecorded:
    """No journal: every step is a no-op.

    :attr:`step` is what the run calls at ``BEGIN``, ``COMMITTING`` and ``COMMITTED``: here a
    function handing out an awaitable that is complete already, and in a :class:`Recorder` the
    journal's own ``record``, so a step costs the journal's call and no frame of ours (three
    frames a run, about 0.2 µs on the flow benchmark). The run awaits it itself and logs a
    failure with :meth:`failed`. :meth:`record` and :meth:`aborted` are coroutines that log on
    their own, for the paths that are not hot.
    """

    __slots__ = ("step",)

    records = False
    """Whether there is a journal (then recording may suspend, the abort pass runs shielded
    from cancellation, and the fingerprint is kept as a durable property)."""

    def __init__(self) -> None:
        self.step: Callable[[Exchange, Event], Awaitable[None]] = _unrecorded

    async def record(self, ex: Exchange, event: Event) -> None:
        pass

    async def aborted(self, ex: Exchange) -> None:
        pass

    def failed(self, ex: Exchange, kind: EventKind, exc: Exception) -> None:
        """Log a journal that failed to record an event of ``kind`` (the run goes on)."""


UNRECORDED = Unrecorded()


class Recorder(Unrecorded):
    """Records the steps on ``journal``; failures are logged on ``log``."""

    __slots__ = ("journal", "log")

    records = True

    def __init__(self, journal: Journal, log: logging.Logger) -> None:
        self.step = journal.record
        self.journal = journal
        self.log = log

    async def record(self, ex: Exchange, event: Event) -> None:
        try:
            await self.journal.record(ex, event)
        except Exception as exc:
            self.failed(ex, event.kind, exc)

    async def aborted(self, ex: Exchange) -> None:
        await self.record(ex, Event(EventKind.ABORTED, ex.error))

    def failed(self, ex: Exchange, kind: EventKind, exc: Exception) -> None:
        self.log.error(
            "flow: journal failed to record %s: %s",
            kind.value,
            error_text(exc),
            extra={"exchange_id": ex.id, "flow_event": kind.value},
        )
