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

from isopace._cardtext import error_text
from isopace.flow.exchange import Exchange
from isopace.flow.idempotency import FINGERPRINT_PROPERTY
from isopace.flow.journal import (
    BEGIN_EVENT,
    COMMITTED_EVENT,
    COMMITTING_EVENT,
    Event,
    EventKind,
    Journal,
)


class Unrecorded:
    """No journal: every step is a no-op."""

    __slots__ = ()

    awaits = False
    """Whether recording may suspend (then the abort pass runs shielded from cancellation)."""

    async def record(self, ex: Exchange, event: Event) -> None:
        pass

    async def begin(self, ex: Exchange) -> None:
        pass

    async def committing(self, ex: Exchange, fingerprint: str | None) -> None:
        pass

    async def committed(self, ex: Exchange) -> None:
        pass

    async def aborted(self, ex: Exchange) -> None:
        pass


UNRECORDED = Unrecorded()


class Recorder(Unrecorded):
    """Records the steps on ``journal``; failures are logged on ``log``."""

    __slots__ = ("journal", "log")

    awaits = True

    def __init__(self, journal: Journal, log: logging.Logger) -> None:
        self.journal = journal
        self.log = log

    async def record(self, ex: Exchange, event: Event) -> None:
        try:
            await self.journal.record(ex, event)
        except Exception as exc:
            self.log.error(
                "flow: journal failed to record %s: %s",
                event.kind.value,
                error_text(exc),
                extra={"exchange_id": ex.id, "flow_event": event.kind.value},
            )

    async def begin(self, ex: Exchange) -> None:
        await self.record(ex, BEGIN_EVENT)

    async def committing(self, ex: Exchange, fingerprint: str | None) -> None:
        if fingerprint is not None:
            ex.set(FINGERPRINT_PROPERTY, fingerprint, durable=True)
        await self.record(ex, COMMITTING_EVENT)

    async def committed(self, ex: Exchange) -> None:
        error = ex.error
        await self.record(
            ex, COMMITTED_EVENT if error is None else Event(EventKind.COMMITTED, error)
        )

    async def aborted(self, ex: Exchange) -> None:
        await self.record(ex, Event(EventKind.ABORTED, ex.error))
