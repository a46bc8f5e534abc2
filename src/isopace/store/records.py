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
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
from typing import TYPE_CHECKING, Any, Final

from isopace._cardtext import mask_json, may_hold_card_number
from isopace.store.errors import JournalError
from isopace.store.protect import CardDataProtector, scrub_text

if TYPE_CHECKING:
    from isopace.flow import Event, Exchange
    from isopace.iso8583 import Message

__all__ = [
    "FINAL_KINDS",
    "NO_RESPONSE",
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


#: One journal row, protected and serialised, ready for any backend: a plain tuple in the
#: column order of the journal's INSERT (so a batch goes to the database as it is):
#: ``(tx_id, kind, at_us, node, joined, durable, request, response, pan_masked, pan_hmac,
#: error)`` with ``at_us`` the UTC time in microseconds since the epoch, ``joined`` a JSON array
#: of stage names, ``durable`` a JSON object, ``request`` / ``response`` protected message JSON.
Row = tuple[
    str, str, int, str, str | None, str | None, str | None, str | None, str | None, str | None,
    str | None,
]  # fmt: skip
#: Positions in a :data:`Row`.
TX_ID: Final = 0
KIND: Final = 1
AT_US: Final = 2
NODE: Final = 3
JOINED: Final = 4
DURABLE: Final = 5
REQUEST: Final = 6
RESPONSE: Final = 7
PAN_MASKED: Final = 8
PAN_HMAC: Final = 9
ERROR: Final = 10

#: The ``response`` of a COMMITTED row whose transaction had a response at COMMITTING and has
#: none any more (NULL there means "the COMMITTING row's response").
NO_RESPONSE = "null"


def row_time(row: Row) -> datetime:
    """The UTC time of a row."""
    return datetime.fromtimestamp(row[AT_US] / 1_000_000, UTC)


def _protect(
    protector: CardDataProtector, message: object, pan: bool = True
) -> tuple[str, str | None, str | None] | None:
    """``(json, pan_masked, pan_hmac)`` of a message (None for None); ``pan=False``: no PAN
    columns (responses: the fingerprint is kept with the request)."""
    if message is None:
        return None
    to_json = getattr(message, "to_json", None)
    if to_json is None:
        return json.dumps({"repr": scrub_text(repr(message))}), None, None
    return protector.protect_fields(message, pan)  # type: ignore[arg-type]


def _error_text(error: BaseException | None) -> str | None:
    if error is None:
        return None
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    if isinstance(error, BaseExceptionGroup):
        inner = "; ".join(f"{type(e).__name__}: {e}" for e in error.exceptions)
        text = f"{text} [{inner}]"
    return scrub_text(text)


_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
if c_make_encoder is not None:
    # the C encoder json.dumps builds for every call, built once (durable properties are
    # checked JSON values when set, so no circular-reference markers are needed)
    _C_ENCODE = c_make_encoder(
        None, None, encode_basestring, None, ":", ",", False, False, True
    )  # fmt: skip

    def _encode_json(value: object) -> str:
        return "".join(_C_ENCODE(value, 0))
else:  # pragma: no cover - CPython without the _json accelerator

    def _encode_json(value: object) -> str:
        return _ENCODE(value)


def _encode(props: dict[str, object]) -> str:
    """Durable properties as stored: JSON, card numbers masked (:func:`mask_json`, the shared
    masker). Recovery reads them back, so a stage that needs a card for recovery keeps a
    reference to it (the ledger's ``pan_ref``), never the number.

    JSON writes digits, spaces and dashes as they are, so a card number in any value is in
    the JSON text too: properties whose JSON has no run of 13 digits (a hold id, a flag: the
    common case) are stored as encoded, without walking them."""
    try:
        text = _encode_json(props)
    except (TypeError, ValueError):  # not plain JSON values: mask_json turns them into text
        return _encode_json(mask_json(props))
    if may_hold_card_number(text):
        return _encode_json(mask_json(props))
    return text


#: Event kind (a ``StrEnum`` value) -> the name journals store.
_KIND_NAMES = {
    "begin": "BEGIN",
    "committing": "COMMITTING",
    "committed": "COMMITTED",
    "aborted": "ABORTED",
    "idempotent_hit": "IDEMPOTENT_HIT",
}


class RowBuilder:
    """Builds protected rows; shared by the journal backends.

    What each event's row carries (every message protected and serialised once per transaction):

    - BEGIN: the request (and the PAN's masked form and fingerprint), durable properties if any;
    - COMMITTING: the joined stages, the durable properties and the response decided (what
      recovery needs to finish the transaction);
    - COMMITTED: the joined stages, the commit errors if any, and the response only when it is
      not the one journalled with COMMITTING (NULL: see the COMMITTING row; readers fill it in);
    - ABORTED: the joined stages, durable properties, response and the abort cause;
    - IDEMPOTENT_HIT: the duplicate's request (with PAN columns) and the replayed response.

    Caches what repeats: the JSON of a joined-stage tuple, and the response of a transaction
    between its COMMITTING record and its final one.
    """

    __slots__ = ("_joined", "_node", "_protector", "_responses")

    def __init__(self, protector: CardDataProtector, node: str) -> None:
        self._protector = protector
        self._node = node
        self._joined: dict[tuple[str, ...], str] = {(): "[]"}
        #: tx id -> (the response journalled with COMMITTING, the joined stages' JSON)
        self._responses: dict[str, tuple[object, str]] = {}

    def _joined_json(self, joined: tuple[str, ...]) -> str:
        text = self._joined.get(joined)
        if text is None:
            text = _ENCODE(list(joined))
            if len(self._joined) < 4096:
                self._joined[joined] = text
        return text

    def forget(self, tx_id: str) -> None:
        """The COMMITTING record of ``tx_id`` was not written: its COMMITTED row must carry the
        response itself."""
        self._responses.pop(tx_id, None)

    def build(self, ex: Exchange, event: Event) -> Row:
        """The protected row for ``event`` of ``ex`` (raises JournalError if it cannot be)."""
        kind = _KIND_NAMES.get(event.kind) or event.kind.name
        tx_id = ex.id if type(ex.id) is str else str(ex.id)
        at_us = time.time_ns() // 1000
        try:
            if kind == "BEGIN" or kind == "IDEMPOTENT_HIT":
                begin_props = ex.durable()
                req = _protect(self._protector, ex.request) or _NO_MESSAGE
                resp = None
                if kind == "IDEMPOTENT_HIT":
                    resp = _protect(self._protector, ex.response, False)
                return (
                    tx_id, kind, at_us, self._node, None,
                    _encode(begin_props) if begin_props else None, req[0],
                    resp[0] if resp is not None else None, req[1], req[2], None,
                )  # fmt: skip
            response = ex.response
            if kind == "COMMITTING":
                joined = self._joined_json(ex.joined)
                decided = ex.durable()
                resp = _protect(self._protector, response, False)
                responses = self._responses
                if len(responses) > 100_000:  # runs that never finished: do not grow for ever
                    responses.clear()
                responses[tx_id] = (response, joined)
                return (
                    tx_id, kind, at_us, self._node, joined,
                    _encode(decided) if decided else None, None,
                    resp[0] if resp is not None else None, None, None, None,
                )  # fmt: skip
            error = event.error
            if kind == "COMMITTED":
                # the durable properties are on the COMMITTING row already, and the joined
                # stages cannot change after it
                props: dict[str, object] | None = None
                at_committing = self._responses.pop(tx_id, None)
                if at_committing is None:
                    joined = self._joined_json(ex.joined)
                    at_committing = (_MISSING, joined)
                else:
                    joined = at_committing[1]
                if at_committing[0] is response and response is not None:
                    text: str | None = None  # the COMMITTING row's response
                else:
                    resp = _protect(self._protector, response, False)
                    text = resp[0] if resp is not None else NO_RESPONSE
            else:
                self._responses.pop(tx_id, None)
                joined = self._joined_json(ex.joined)
                props = ex.durable()
                resp = _protect(self._protector, response, False)
                text = resp[0] if resp is not None else None
                if error is None and kind == "ABORTED":
                    error = ex.error
        except (TypeError, ValueError) as exc:
            raise JournalError(f"transaction {ex.id!r}: cannot journal {kind}: {exc}") from exc
        return (
            tx_id, kind, at_us, self._node, joined, _encode(props) if props else None, None, text,
            None, None, _error_text(error) if error is not None else None,
        )  # fmt: skip


_MISSING = object()
_NO_MESSAGE: tuple[str | None, str | None, str | None] = (None, None, None)


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
    #: idempotency keys whose claims recovery completed with the committed response.
    completed_keys: list[str] = field(default_factory=list)

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
