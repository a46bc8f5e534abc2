"""Idempotency as a wrapper of a run: claim the key, replay a stored answer, or run and store.

:class:`Idempotent` takes the run it wraps (a :data:`~isopace.flow._watch.RunFunc`) and the
store, key and fingerprint functions of the flow; what it stores and when, and what a duplicate
gets, is written down in :mod:`isopace.flow.flow` and :mod:`isopace.flow.idempotency`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from isopace._cardtext import error_text
from isopace.flow._interrupt import shielded, until
from isopace.flow._recorder import Unrecorded
from isopace.flow._watch import RunFunc
from isopace.flow.errors import FingerprintMismatchError
from isopace.flow.exchange import Exchange
from isopace.flow.idempotency import (
    FingerprintFunc,
    IdempotencyStore,
    KeyFunc,
    Stored,
    refill,
)
from isopace.flow.journal import BEGIN_EVENT, IDEMPOTENT_HIT_EVENT, Event, EventKind
from isopace.flow.result import Outcome

if TYPE_CHECKING:
    from isopace.flow._resolve import Plan

_REPLAYED = Outcome.REPLAYED


class Idempotent:
    """A run made idempotent by ``store`` under the key ``key(ex)``."""

    __slots__ = ("fingerprint", "inner", "journal", "key", "log", "matches", "store")

    def __init__(
        self,
        inner: RunFunc,
        store: IdempotencyStore,
        key: KeyFunc,
        fingerprint: FingerprintFunc | None,
        journal: Unrecorded,
        log: logging.Logger,
    ) -> None:
        self.inner = inner
        self.store = store
        self.key = key
        self.fingerprint = fingerprint
        self.matches = getattr(fingerprint, "matches", None)
        self.journal = journal
        self.log = log

    async def run(
        self, ex: Exchange, plan: Plan, deadline: float | None, fingerprint: str | None = None
    ) -> Outcome:
        """Run ``ex`` once per key (``fingerprint`` is taken here, once per run)."""
        # The functions kept in slots are read as attributes, then called: the interpreter's
        # fast attribute load (a method lookup on a slot is a slow one).
        key_of, fingerprint_of = self.key, self.fingerprint
        try:
            key = key_of(ex)
            if key is not None and fingerprint_of is not None:
                fingerprint = fingerprint_of(ex)
        except Exception as exc:
            return await self._refuse(ex, exc)
        if key is None:
            return await self.inner(ex, plan, deadline, None)
        store = self.store
        try:
            if deadline is None:
                stored = await store.claim(key)
            else:
                stored = await until(deadline, store.claim(key))
        except Exception as exc:
            if isinstance(exc, TimeoutError):
                exc = TimeoutError(f"flow: deadline passed waiting for the first run of {ex.id!r}")
            else:
                self.log.error(
                    "flow: idempotency store failed to claim: %s",
                    error_text(exc),
                    extra={"exchange_id": ex.id},
                )
            return await self._refuse(ex, exc)
        if stored is not None:
            if not self._same_request(ex, stored, fingerprint):
                return await self._refuse(ex, FingerprintMismatchError(key))
            response = stored.response
            ex.response = refill(response, ex.request) if response is not None else None
            journal = self.journal
            step = journal.step
            try:
                await step(ex, IDEMPOTENT_HIT_EVENT)
            except Exception as exc:
                journal.failed(ex, EventKind.IDEMPOTENT_HIT, exc)
            return _REPLAYED
        try:
            # The fingerprint becomes a durable property only where a journal keeps it.
            kept = fingerprint if self.journal.records else None
            outcome = await self.inner(ex, plan, deadline, kept)
        except BaseException:
            # Cancelled. Before the decision point the run was rolled back: give the key up.
            # During the commit pass the decision stands: keep the outcome for duplicates.
            await shielded(self._settle(ex, key, not ex.aborted, fingerprint))
            raise
        keep = outcome is Outcome.COMMITTED or (ex.response is not None and ex.declined)
        if await shielded(self._settle(ex, key, keep, fingerprint)):
            raise asyncio.CancelledError()
        return outcome

    def _same_request(self, ex: Exchange, stored: Stored, fingerprint: str | None) -> bool:
        """Whether ``stored`` answers ``ex``'s request (see "fingerprint" in the flow's doc)."""
        kept = stored.fingerprint
        if kept is None or fingerprint is None or kept == fingerprint:
            return True
        matches = self.matches
        if matches is None:
            return False
        try:
            return bool(matches(ex, kept))
        except Exception as exc:
            self.log.error(
                "flow: fingerprint matches() failed: %s",
                error_text(exc),
                extra={"exchange_id": ex.id},
            )
            return False

    async def _settle(self, ex: Exchange, key: str, keep: bool, fingerprint: str | None) -> None:
        """Store the run's answer under ``key`` (``keep``) or release the key."""
        try:
            if keep:
                await self.store.complete(key, ex.response, fingerprint)
            else:
                await self.store.release(key)
        except Exception as exc:
            self.log.error(
                "flow: idempotency store failed to %s: %s",
                "complete" if keep else "release",
                error_text(exc),
                extra={"exchange_id": ex.id},
            )

    async def _refuse(self, ex: Exchange, error: BaseException) -> Outcome:
        """End a run that could not start (no stage ran): BEGIN and ABORTED are journalled."""
        ex.fail(error)
        await self.journal.record(ex, BEGIN_EVENT)
        await self.journal.record(ex, Event(EventKind.ABORTED, error))
        return Outcome.ABORTED
