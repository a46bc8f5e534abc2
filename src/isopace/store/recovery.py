"""Crash recovery: ``await recover(flow, journal)`` at start-up, before serving.

Every transaction the journal shows as begun and not finished (no COMMITTED / ABORTED) is
finished from what the journal kept: its id, the protected request (card data removed), the
properties stages set with ``durable=True``, and the response decided before commit.

- **COMMITTING journalled** (the decision was to commit): ``recover(ex, committing=True)`` is called
  on each stage that joined, by name, in prepare order, then COMMITTED is journalled.
- **No COMMITTING** (the process died before the decision, possibly in the middle of the prepare
  pass): the transaction is aborted. The journal does not know which stages prepared, so
  ``recover(ex, committing=False)`` is called on EVERY stage of the flow that has a recover hook,
  in reverse order of ``flow.stages()``, then ABORTED is journalled.

Design choice for reservations made by a prepare that crashed mid-pass: reservations are keyed by
the transaction id (``ex.id``), and each stage's ``recover`` must be idempotent and a no-op when it
holds nothing for that id. The alternative, a journalled JOINED record per reserving stage, costs
one more durable write (an fsync, or a slot in a group commit) per reserving stage per
transaction on the hot path, and still leaves a window between the reservation and the JOINED
record where the reservation is unknown; keying by transaction id costs nothing at run time and
has no window: whatever a stage reserved, it can find again by the id.

Idempotent: a transaction is journalled COMMITTED / ABORTED only after every hook succeeded, after
which it is no longer in doubt; a crash during recovery leaves it in doubt and the next recovery
calls the (idempotent) hooks again. A hook that raises leaves its transaction in doubt, is logged
and named in the report; the other transactions are still recovered.

Stages that joined a committing transaction but have no recover hook (or are no longer in the
flow) are listed in :attr:`RecoveryReport.unrecoverable_stages` and logged; the transaction is still
journalled COMMITTED because the decision was taken.

Only this node's transactions are recovered by default (journals shared by several nodes record
each row's node); ``all_nodes=True`` takes over every node's, for a node that will not come back.

Idempotency claims: a crashed run's claim expires with its lease, and a duplicate arriving after
that would be processed again although the original committed. Give ``idempotency=`` (the flow's
store) and ``key=`` (its key function) and recovery stores the response of every transaction it
commits under its key, through the claim protocol only: it claims the key, which waits until the
crashed owner's lease expires (so start-up takes up to one lease longer; the claims are made
concurrently), then completes it with the journalled response (protected: a replay re-fills the
card data from the duplicate), or with no response when none was decided (the flow stores a
committed outcome either way, and its duplicate is replayed, not run again), and with the
request's fingerprint the flow kept as a durable property (``FINGERPRINT_PROPERTY``), so a
request that merely reuses the key is still told apart. A key already completed is left as it
is. The key function sees
the exchange rebuilt from the journal (protected request: no card data); a key it cannot compute
(it raises or returns None) is skipped and logged. Aborted transactions need nothing: their claims
expire and a duplicate is processed afresh, which is right since nothing was done.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from isopace._cardtext import error_text
from isopace.flow import FINGERPRINT_PROPERTY
from isopace.store.errors import StoreError
from isopace.store.records import InDoubt, RecoveryReport

if TYPE_CHECKING:
    from isopace.flow import Event, Exchange, Flow, IdempotencyStore, KeyFunc

__all__ = ["RecoverableJournal", "RecoveredAbortError", "recover"]

log = logging.getLogger("isopace.store")


class RecoveredAbortError(StoreError):
    """The abort cause journalled for a transaction that recovery rolled back."""

    def __init__(self, tx_id: str) -> None:
        super().__init__(
            f"transaction {tx_id!r} aborted by recovery: the process stopped before the commit "
            "decision"
        )
        self.tx_id = tx_id


class RecoverableJournal(Protocol):
    """What recovery needs from a journal."""

    async def record(self, ex: Exchange, event: Event) -> None: ...

    async def in_doubt(
        self, *, all_nodes: bool = False, older_than: float | None = None
    ) -> Sequence[InDoubt]: ...


def _rebuild(tx: InDoubt) -> Exchange:
    from isopace.flow import Exchange

    try:
        request = tx.request
    except Exception as exc:
        log.warning("recovery: transaction %r: request unreadable: %s", tx.tx_id, error_text(exc))
        request = None
    try:
        response = tx.response
    except Exception:
        response = None
    return Exchange.restore(
        tx.tx_id,
        request,  # type: ignore[arg-type]
        durable=tx.durable,
        joined=tx.joined,
        response=response,
    )


async def _call(hook: Any, ex: Exchange, committing: bool) -> None:
    result = hook(ex, committing)
    if inspect.isawaitable(result):
        await result


async def recover(
    flow: Flow,
    journal: RecoverableJournal,
    *,
    all_nodes: bool = False,
    older_than: float | None = None,
    idempotency: IdempotencyStore | None = None,
    key: KeyFunc | None = None,
) -> RecoveryReport:
    """Finish every transaction in doubt in ``journal`` through ``flow``'s recover hooks.

    Run it at start-up, before serving: a transaction still running looks in doubt too.
    ``older_than`` (seconds) only takes transactions whose last event is older, for running it
    on a live node (e.g. to take over a dead node's transactions with ``all_nodes=True``).
    ``idempotency`` and ``key``: store the committed transactions' responses under their
    idempotency keys (see the module docstring); the keys stored are in
    ``report.completed_keys``.
    """
    if (idempotency is None) != (key is None):
        raise ValueError("recover: give both idempotency= and key=, or neither")
    from isopace.flow import Event, EventKind

    stages = flow.stages()
    order = list(stages)
    report = RecoveryReport()
    if older_than is None:
        in_doubt = await journal.in_doubt(all_nodes=all_nodes)
    else:
        in_doubt = await journal.in_doubt(all_nodes=all_nodes, older_than=older_than)
    committed: list[Exchange] = []
    for tx in in_doubt:
        ex = _rebuild(tx)
        if tx.committing:
            names = list(tx.joined)
            missing = [n for n in names if getattr(stages.get(n), "recover", None) is None]
        else:
            names = list(reversed(order))
            missing = []
        try:
            for name in names:
                hook = getattr(stages.get(name), "recover", None)
                if hook is not None:
                    await _call(hook, ex, tx.committing)
        except Exception as exc:
            text = error_text(exc)
            report.failed[tx.tx_id] = text
            log.error(
                "recovery: transaction %r left in doubt: a recover hook failed: %s",
                tx.tx_id,
                text,
                extra={"tx_id": tx.tx_id, "committing": tx.committing, "error": text},
            )
            continue
        if missing:
            report.unrecoverable_stages[tx.tx_id] = missing
            log.warning(
                "recovery: transaction %r committed; stages without a recover hook: %s",
                tx.tx_id,
                ", ".join(missing),
                extra={"tx_id": tx.tx_id, "stages": missing},
            )
        if tx.committing:
            event = Event(EventKind.COMMITTED)
        else:
            cause = RecoveredAbortError(tx.tx_id)
            ex.abort(cause)
            event = Event(EventKind.ABORTED, error=cause)
        try:
            await journal.record(ex, event)
        except Exception as exc:
            text = error_text(exc)
            report.failed[tx.tx_id] = f"journal: {text}"
            log.error(
                "recovery: transaction %r left in doubt: journalling %s failed: %s",
                tx.tx_id,
                event.kind.name,
                text,
                extra={"tx_id": tx.tx_id, "error": text},
            )
            continue
        (report.committed if tx.committing else report.aborted).append(tx.tx_id)
        if tx.committing:
            committed.append(ex)
        log.info(
            "recovery: transaction %r %s",
            tx.tx_id,
            "committed" if tx.committing else "aborted",
            extra={"tx_id": tx.tx_id, "committing": tx.committing},
        )
    if idempotency is not None and key is not None and committed:
        await _complete_claims(idempotency, key, committed, report)
    if report.total:
        log.warning("%s", report, extra={"committed": len(report.committed)})
    return report


async def _complete_claims(
    store: IdempotencyStore, key_func: KeyFunc, exchanges: list[Exchange], report: RecoveryReport
) -> None:
    async def complete(ex: Exchange) -> None:
        try:
            key = key_func(ex)
        except Exception as exc:
            log.warning(
                "recovery: transaction %r: no idempotency key (%s)",
                ex.id,
                error_text(exc),
                extra={"tx_id": ex.id},
            )
            return
        if key is None:
            return
        fingerprint = ex.get(FINGERPRINT_PROPERTY)
        if not isinstance(fingerprint, str):
            fingerprint = None
        try:
            if await store.claim(key) is None:  # waits for the crashed owner's lease
                await store.complete(key, ex.response, fingerprint)
                report.completed_keys.append(key)
        except Exception as exc:
            text = error_text(exc)
            log.error(
                "recovery: transaction %r: storing its response under its idempotency key "
                "failed: %s",
                ex.id,
                text,
                extra={"tx_id": ex.id, "error": text},
            )

    await asyncio.gather(*(complete(ex) for ex in exchanges))
