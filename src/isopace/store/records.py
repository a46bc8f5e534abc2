"""What journals keep and give back: rows built from an exchange, records read for operators,
transactions found in doubt, and the report of a recovery.

Shared by every journal backend so SQLite and PostgreSQL store exactly the same thing.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple

from isopace.store.errors import JournalError
from isopace.store.protect import CardDataProtector, ProtectedMessage, scrub_text

if TYPE_CHECKING:
    from isopace.flow import Event, Exchange
    from isopace.iso8583 import Message

__all__ = [
    "FINAL_KINDS",
    "InDoubt",
    "JournalRecord",
    "RecoveryReport",
    "Row",
    "RowBuilder",
    "build_row",
    "default_node",
    "message_from_json",
]

#: Event kinds that end a transaction (it is no longer in doubt).
FINAL_KINDS = frozenset({"COMMITTED", "ABORTED"})
#: Event kinds that carry the request.
_REQUEST_KINDS = frozenset({"BEGIN", "IDEMPOTENT_HIT"})
#: Event kinds that carry the response.
_RESPONSE_KINDS = frozenset({"COMMITTING", "COMMITTED", "ABORTED", "IDEMPOTENT_HIT"})


def default_node() -> str:
    """The node name journals record by default: the host name (stable across restarts)."""
    return socket.gethostname()


class Row(NamedTuple):
    """One journal row, protected and serialised, ready for any backend (a tuple in the column
    order of the journal's INSERT, so a batch goes to ``executemany`` as it is)."""

    tx_id: str
    kind: str
    at_us: int  # UTC, microseconds since the epoch
    node: str
    joined: str  # JSON array of stage names
    durable: str | None  # JSON object
    request: str | None  # protected message JSON
    response: str | None
    pan_masked: str | None
    pan_hmac: str | None
    error: str | None

    @property
    def at(self) -> datetime:
        return datetime.fromtimestamp(self.at_us / 1_000_000, UTC)


def _protect(protector: CardDataProtector, message: object) -> ProtectedMessage | None:
    if message is None:
        return None
    to_json = getattr(message, "to_json", None)
    if to_json is None:
        text = json.dumps({"repr": scrub_text(repr(message))})
        return ProtectedMessage(text, None, None)
    return protector.protect(message)  # type: ignore[arg-type]


def _error_text(error: BaseException | None) -> str | None:
    if error is None:
        return None
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    if isinstance(error, BaseExceptionGroup):
        inner = "; ".join(f"{type(e).__name__}: {e}" for e in error.exceptions)
        text = f"{text} [{inner}]"
    return scrub_text(text)


_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class RowBuilder:
    """Builds protected rows; shared by the journal backends.

    Caches what repeats: the JSON of a joined-stage tuple, and the protected response of a
    transaction between its COMMITTING record and its final one (the same message object).
    """

    __slots__ = ("_joined", "_node", "_protector", "_responses")

    def __init__(self, protector: CardDataProtector, node: str) -> None:
        self._protector = protector
        self._node = node
        self._joined: dict[tuple[str, ...], str] = {(): "[]"}
        self._responses: dict[str, tuple[object, ProtectedMessage | None]] = {}

    def _joined_json(self, joined: tuple[str, ...]) -> str:
        text = self._joined.get(joined)
        if text is None:
            text = _ENCODE(list(joined))
            if len(self._joined) < 4096:
                self._joined[joined] = text
        return text

    def _response(self, tx_id: str, kind: str, message: object) -> ProtectedMessage | None:
        responses = self._responses
        if kind == "COMMITTING":
            protected = _protect(self._protector, message)
            if len(responses) > 100_000:  # runs that never finished: do not grow for ever
                responses.clear()
            responses[tx_id] = (message, protected)
            return protected
        cached = responses.pop(tx_id, None)
        if cached is not None and cached[0] is message:
            return cached[1]
        return _protect(self._protector, message)

    def build(self, ex: Exchange, event: Event) -> Row:
        """The protected row for ``event`` of ``ex`` (raises JournalError if it cannot be)."""
        kind = event.kind.name
        tx_id = str(ex.id)
        try:
            joined = self._joined_json(ex.joined)
            # COMMITTED: the durable properties are on the COMMITTING row already
            props = ex.durable() if kind != "COMMITTED" else None
            durable = _ENCODE(props) if props else None
            request = _protect(self._protector, ex.request) if kind in _REQUEST_KINDS else None
            response = self._response(tx_id, kind, ex.response) if kind in _RESPONSE_KINDS else None
        except (TypeError, ValueError) as exc:
            raise JournalError(f"transaction {ex.id!r}: cannot journal {kind}: {exc}") from exc
        error = event.error
        if error is None and kind == "ABORTED":
            error = ex.error
        pan = request or response
        return Row(
            tx_id,
            kind,
            time.time_ns() // 1000,
            self._node,
            joined,
            durable,
            request.json if request else None,
            response.json if response else None,
            pan.pan_masked if pan else None,
            pan.pan_hmac if pan else None,
            _error_text(error) if error is not None else None,
        )


def build_row(ex: Exchange, event: Event, protector: CardDataProtector, node: str) -> Row:
    """Build the protected row for ``event`` of ``ex`` (uncached; see :class:`RowBuilder`)."""
    return RowBuilder(protector, node).build(ex, event)


def message_from_json(text: str | None) -> Message | None:
    """Rebuild a protected message (``redacted`` names what was removed); None stays None."""
    if text is None:
        return None
    from isopace.iso8583 import Message

    data = json.loads(text)
    if isinstance(data, dict) and set(data) == {"repr"}:
        return None
    return Message.from_json(text)


@dataclass(frozen=True, slots=True)
class JournalRecord:
    """One journalled event as operators see it (card data protected)."""

    seq: int
    tx_id: str
    kind: str
    at: datetime
    node: str
    joined: tuple[str, ...]
    durable: dict[str, Any]
    request_json: str | None
    response_json: str | None
    pan_masked: str | None
    pan_hmac: str | None
    error: str | None

    @property
    def request(self) -> Message | None:
        return message_from_json(self.request_json)

    @property
    def response(self) -> Message | None:
        return message_from_json(self.response_json)


@dataclass(frozen=True, slots=True)
class InDoubt:
    """A transaction that began and has no COMMITTED / ABORTED record.

    ``committing`` is True when its COMMITTING record was journalled (the decision was to commit);
    ``joined`` and ``durable`` come from that record; ``request_json`` from BEGIN.
    """

    tx_id: str
    committing: bool
    began_at: datetime
    node: str
    joined: tuple[str, ...]
    durable: dict[str, Any]
    request_json: str | None
    response_json: str | None

    @property
    def request(self) -> Message | None:
        return message_from_json(self.request_json)

    @property
    def response(self) -> Message | None:
        return message_from_json(self.response_json)


@dataclass(slots=True)
class RecoveryReport:
    """What :func:`isopace.store.recover` did."""

    committed: list[str] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    #: tx id -> error text, for transactions left in doubt because a recover hook failed.
    failed: dict[str, str] = field(default_factory=dict)
    #: tx id -> joined stage names that have no recover hook (or are no longer in the flow).
    unrecoverable_stages: dict[str, list[str]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return len(self.committed) + len(self.aborted) + len(self.failed)

    def __str__(self) -> str:
        return (
            f"recovery: {len(self.committed)} committed, {len(self.aborted)} aborted, "
            f"{len(self.failed)} failed"
        )


def utc_from_us(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1_000_000, UTC)


def loads_joined(text: str | None) -> tuple[str, ...]:
    return tuple(json.loads(text)) if text else ()


def loads_durable(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    value = json.loads(text)
    return value if isinstance(value, dict) else {}
