"""Journalling the lifecycle of transactions.

A run records, in order: ``BEGIN``; then either ``COMMITTING`` (after the last prepare, before the
first commit: the decision point recovery needs) and ``COMMITTED``, or ``ABORTED`` (its
``error`` is the cause). A duplicate answered from the idempotency store records only
``IDEMPOTENT_HIT``. ``record`` runs inline on the run's task and a journal reads the exchange at
record time (``ex.id``, ``ex.joined``, ``ex.durable()``, ``ex.request``, ``ex.response``,
``ex.error``); a journal that raises is logged and never aborts a transaction by itself.

``MemoryJournal`` keeps entries in memory (optionally only the newest ``max_entries``);
``LoggingJournal`` writes one structured log record per event with card data masked.

Free text (error messages, durable values, ids) is masked with ``isopace._cardtext.mask_text``,
the masker every layer shares (re-exported by ``isopace.iso8583``): a 13-19 digit run passing
Luhn keeps its first six and last four digits, and the track data following it (``=2512...``,
``^DOE/JOHN^2512...``) becomes ``****``. ``mask_text`` stays importable from here.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, Protocol

from isopace._cardtext import error_text
from isopace._cardtext import mask_json as _mask_json
from isopace._cardtext import mask_text as mask_text
from isopace.flow.exchange import Exchange


class EventKind(StrEnum):
    """The lifecycle events of a transaction."""

    BEGIN = "begin"
    COMMITTING = "committing"
    COMMITTED = "committed"
    ABORTED = "aborted"
    IDEMPOTENT_HIT = "idempotent_hit"


@dataclass(frozen=True, slots=True)
class Event:
    """One journalled event; ``error`` is the abort cause for ``ABORTED`` (and the group of
    commit errors for a ``COMMITTED`` whose commits failed)."""

    kind: EventKind
    error: BaseException | None = None


BEGIN_EVENT: Final = Event(EventKind.BEGIN)
COMMITTING_EVENT: Final = Event(EventKind.COMMITTING)
COMMITTED_EVENT: Final = Event(EventKind.COMMITTED)
IDEMPOTENT_HIT_EVENT: Final = Event(EventKind.IDEMPOTENT_HIT)


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """A stored record: the exchange id and the event."""

    id: str
    event: Event


class Journal(Protocol):
    """Where a flow records lifecycle events. Must be safe for concurrent runs."""

    async def record(self, ex: Exchange, event: Event) -> None: ...


class MemoryJournal:
    """Keeps entries in memory, for tests and inspection. ``max_entries`` bounds it (oldest
    entries are dropped first); unbounded by default."""

    def __init__(self, max_entries: int | None = None) -> None:
        if max_entries is not None and max_entries < 1:
            raise ValueError("flow: MemoryJournal max_entries must be at least 1")
        self._entries: deque[tuple[str, Event]] = deque(maxlen=max_entries)

    async def record(self, ex: Exchange, event: Event) -> None:
        self._entries.append((ex.id, event))

    def entries(self) -> list[JournalEntry]:
        """A snapshot of the entries, oldest first."""
        return [JournalEntry(id, event) for id, event in self._entries]

    def kinds(self, id: str) -> list[EventKind]:
        """The kinds of the events recorded for exchange ``id``, in order."""
        return [event.kind for entry_id, event in self._entries if entry_id == id]

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class LoggingJournal:
    """Writes each event as one log record on ``logger`` (default ``isopace.flow.journal``).

    The record's message is ``"<kind> <id>"``; ``extra=`` carries ``flow_event``,
    ``exchange_id``, ``joined``, ``durable``, ``request``, ``response`` and ``error``. Messages
    are rendered with their masked view (``to_masked_dict()``), and every other text (error
    messages, durable values) goes through ``mask_text``: card numbers keep their first six and
    last four digits, track data after them is hidden. ``ABORTED`` logs at WARNING, the rest
    at INFO.
    """

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._logger = logger or logging.getLogger("isopace.flow.journal")

    async def record(self, ex: Exchange, event: Event) -> None:
        level = logging.WARNING if event.kind is EventKind.ABORTED else logging.INFO
        logger = self._logger
        if not logger.isEnabledFor(level):
            return
        error = event.error
        logger.log(
            level,
            "%s %s",
            event.kind.value,
            mask_text(ex.id),
            extra={
                "flow_event": event.kind.value,
                "exchange_id": mask_text(ex.id),
                "joined": list(ex.joined),
                "durable": _mask_json(ex.durable()),
                "request": masked_message(ex.request),
                "response": masked_message(ex.response),
                "error": None if error is None else error_text(error),
            },
        )


# -- masking ------------------------------------------------------------------------------------


def masked_message(message: object) -> dict[str, str] | str | None:
    """A message as its masked field dict; something else only by its type name."""
    if message is None:
        return None
    to_masked = getattr(message, "to_masked_dict", None)
    if callable(to_masked):
        masked: dict[str, str] = to_masked()
        return masked
    if isinstance(message, str):
        return mask_text(message)
    return f"<{type(message).__name__}>"
