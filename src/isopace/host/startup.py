"""Start-up recovery: whose transactions a host (or ``isopace recover``) ends, and how.

Why one place: ``isopace serve`` recovers before its port opens and ``isopace recover`` does
the same without serving; if the two decided differently which node's transactions are theirs,
or whether recovery may store the answers it commits, one of them would end a live node's
transaction or leave a retransmission to be applied twice. `RecoveryPolicy` states the rules:

- **all nodes** -- with SQLite the data's lock (`isopace.host.stores.lock_data`) says that
  whoever left a transaction in the file is gone, so every node's transactions are ended: a host
  restarted after a crash under another ``--port`` or ``--node`` still finishes them. With
  PostgreSQL several hosts share the database, so only this node's, unless the operator runs
  ``isopace recover --all-nodes`` once the other nodes are gone for good.
- **takes over** -- with the SQLite idempotency store (no Redis, no PostgreSQL) a crashed run's
  claims are taken over at once (one process per node), so recovery also stores the response of
  each transaction it commits under its idempotency key and a retransmission after the restart is
  replayed. Elsewhere a claim would wait out the crashed run's lease, and the ledger's second-hold
  guard answers such a retransmission with the original approval instead. Not with
  ``--all-nodes``: another node's claims are not this store's to take over.

After recovery, serve does one more thing per case (`after_recovery`): with SQLite it releases
the holds no journal record covers; with PostgreSQL it warns about other nodes' transactions in
doubt for longer than twice the transaction deadline.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from isopace.host.errors import StartupError, one_line
from isopace.host.idempotency import IdempotencyKey
from isopace.store import recover

if TYPE_CHECKING:
    from isopace.flow import Flow
    from isopace.host.config import HostConfig
    from isopace.host.stores import Stores
    from isopace.store import RecoveryReport

__all__ = ["RecoveryPolicy"]

log = logging.getLogger("isopace.host")


@dataclass(frozen=True, slots=True)
class RecoveryPolicy:
    """Whose transactions recovery ends and whether it stores their answers (module
    docstring); `for_config` is the one way to make it."""

    #: every node's transactions, not only this node's
    all_nodes: bool
    #: the idempotency store takes over the crashed claims: store the committed answers
    takes_over: bool

    @classmethod
    def for_config(cls, config: HostConfig, *, all_nodes: bool = False) -> RecoveryPolicy:
        """The policy for ``config``; ``all_nodes``: the operator's ``--all-nodes``."""
        sqlite_idempotency = not config.redis and not config.postgres
        return cls(
            all_nodes=all_nodes or not config.postgres,
            takes_over=sqlite_idempotency and not all_nodes,
        )

    async def recover(
        self, flow: Flow, stores: Stores, *, older_than: float | None = None
    ) -> RecoveryReport:
        """End the transactions in doubt in ``stores.journal`` through ``flow``'s stages (with
        ``stores.idempotency``, open, when the policy takes over); a `StartupError` when
        recovery itself fails (a transaction whose hook fails is left in doubt, in the report)."""
        journal = stores.journal
        assert journal is not None, "open the journal first"
        try:
            if self.takes_over:
                assert stores.idempotency is not None, "open the idempotency store first"
                return await recover(
                    flow,
                    journal,
                    all_nodes=self.all_nodes,
                    older_than=older_than,
                    idempotency=stores.idempotency,
                    key=IdempotencyKey(stores.config.idempotency_key),
                )
            return await recover(flow, journal, all_nodes=self.all_nodes, older_than=older_than)
        except Exception as exc:
            raise StartupError(f"recovery failed: {one_line(exc)}") from exc

    async def after_recovery(self, stores: Stores) -> None:
        """What serve does once recovery ran (module docstring)."""
        if self.all_nodes:
            await _release_orphan_holds(stores)
        else:
            await _warn_other_nodes(stores)


async def _release_orphan_holds(stores: Stores) -> None:
    """SQLite: release the holds still pending after recovery.

    Nothing runs yet and this process owns the data (its lock), so a pending hold belongs
    to a transaction that never answered and that recovery did not know: its BEGIN record
    failed to write (the flow logs a journal failure and goes on) before the process died.
    Left alone, its funds would stay held for ever; released, a retransmission is processed
    afresh (a released hold does not count as a duplicate)."""
    ledger, journal = stores.ledger, stores.journal
    assert ledger is not None and journal is not None
    # a transaction recovery could not finish stays in doubt, and keeps its hold
    in_doubt = {tx.tx_id for tx in await journal.in_doubt(all_nodes=True)}
    orphans = [h for h in await ledger.pending_holds() if h.txn_id not in in_doubt]
    for hold in orphans:
        await ledger.release(hold.txn_id)
    if orphans:
        log.warning(
            "released %d pending hold(s) that no journal record covers: %s",
            len(orphans),
            ", ".join(h.txn_id for h in orphans[:20]) + (" ..." if len(orphans) > 20 else ""),
            extra={"node": stores.node, "released": len(orphans)},
        )


async def _warn_other_nodes(stores: Stores) -> None:
    """PostgreSQL: warn about other nodes' transactions in doubt (see "Nodes" in
    `isopace.host.app`)."""
    journal, node = stores.journal, stores.node
    assert journal is not None
    try:
        stale = await journal.in_doubt(all_nodes=True, older_than=2 * stores.config.timeout)
    except Exception as exc:
        log.warning("could not count other nodes' transactions in doubt: %s", one_line(exc))
        return
    others = sorted({r.node for r in stale if r.node not in (node, "")})
    count = sum(1 for r in stale if r.node in others)
    if count:
        log.warning(
            "%d transaction(s) of other node(s) (%s) in doubt; this node (%s) recovers only "
            "its own: if those nodes will not come back, run `isopace recover --all-nodes` "
            "(`--older-than SECONDS` leaves the transactions of live nodes alone)",
            count,
            ", ".join(others),
            node,
            extra={"node": node, "in_doubt": count, "nodes": others},
        )
