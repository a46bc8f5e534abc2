"""Operator commands on a host's stores: ``isopace journal``, ``recover``, ``ledger`` and
``keys``.

They open the same databases ``isopace serve`` would (same ``--config`` / ``--db`` /
``--postgres`` options) and work while the host is stopped; ``journal`` and ``ledger`` are safe
while it runs too (SQLite WAL readers, PostgreSQL).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from isopace.cli._output import Output, money
from isopace.cli._serve import add_config_flags, config_from_args
from isopace.host import RecoveryPolicy, Stores, build_flow
from isopace.host.config import HostConfig
from isopace.host.errors import ConfigError, one_line

if TYPE_CHECKING:
    from isopace.host import HostJournal
    from isopace.store.keys import KeyUsage

_STORE_OPTIONS = {
    "db",
    "postgres",
    "postgres_schema",
    "card_key_file",
    "journal_key_file",
    "node",
    "port",
    "synchronous",
    "redis",
    "redis_prefix",
    "bins",
    "idempotency_key",
}


def _command(
    body: Callable[[argparse.Namespace, HostConfig], Coroutine[Any, Any, int]],
    database: Callable[[HostConfig], str],
) -> Callable[[argparse.Namespace], int]:
    """A command's entry point: the configuration from the flags, the SQLite database the
    command reads (``database(cfg)``) checked to exist, then ``body`` run."""

    def run(args: argparse.Namespace) -> int:
        cfg = config_from_args(args)
        _check_sqlite_exists(cfg, database(cfg))
        return asyncio.run(body(args, cfg))

    return run


def _check_sqlite_exists(cfg: HostConfig, path: str) -> None:
    import os

    from isopace.host.errors import ConfigError

    if not cfg.postgres and not os.path.exists(path):
        raise ConfigError(f"{path}: no such database (start the host with --db first)")


# -- journal ---------------------------------------------------------------------------------------


def add_journal_parser(sub: Any) -> None:
    p = sub.add_parser(
        "journal",
        help="query the transaction journal",
        description=(
            "Query the journal of a host: counts per event kind (the default), the records of one "
            "transaction, the transactions in doubt, a time range, or one card's records; or "
            "prune the records of transactions ended before a date."
        ),
    )
    add_config_flags(p, only=_STORE_OPTIONS)
    q = p.add_mutually_exclusive_group()
    q.add_argument("--id", help="every record of one transaction id")
    q.add_argument(
        "--in-doubt", action="store_true", help="transactions begun and not finished (any node)"
    )
    q.add_argument("--counts", action="store_true", help="records per event kind (default)")
    q.add_argument(
        "--since", metavar="MINUTES", type=float, help="records of the last MINUTES minutes"
    )
    q.add_argument("--pan", help="records of one card (needs the journal key)")
    q.add_argument(
        "--prune-before",
        metavar="DATE",
        type=_utc_date,
        help=(
            "delete the records of transactions ended (committed, aborted, replayed) before DATE "
            "(ISO 8601, e.g. 2026-01-31 or 2026-01-31T12:00:00+00:00; UTC when no offset), and "
            "the idempotency answers past their TTL; never a transaction in doubt. Safe while "
            "the host runs (small batches); `isopace serve --journal-retention` does it by itself"
        ),
    )
    p.add_argument("--limit", type=int, default=100, help="most records to print (default: 100)")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    p.set_defaults(func=_command(_journal, lambda cfg: cfg.db))


def _utc_date(text: str) -> dt.datetime:
    """``--prune-before``: an ISO 8601 date or date-time, UTC unless it has an offset."""
    try:
        value = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 date (YYYY-MM-DD, or YYYY-MM-DDTHH:MM:SS)"
        ) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


async def _prune(args: argparse.Namespace, cfg: HostConfig, journal: HostJournal) -> int:
    """``--prune-before``: the journal's ended transactions, then the expired idempotency
    answers of the store the host uses (Redis expires its own)."""
    before: dt.datetime = args.prune_before
    pruned = await journal.prune(before)
    purged: int | None = None
    store: Any = None
    if cfg.postgres and not cfg.redis:
        from isopace.store import PostgresIdempotencyStore

        store = PostgresIdempotencyStore(cfg.postgres, schema=cfg.postgres_schema, min_size=1)
        await store.open()
    elif not cfg.postgres and not cfg.redis:
        from isopace.store import SqliteIdempotencyStore

        store = SqliteIdempotencyStore(cfg.db, synchronous=cfg.synchronous)
    if store is not None:
        try:
            purged = await store.purge()
        finally:
            await store.close()
    if args.json:
        print(json.dumps({"before": before.isoformat(), "pruned": pruned, "purged": purged}))
    else:
        line = (
            f"pruned {pruned} journal record(s) of transactions ended before "
            f"{before.isoformat()} (none in doubt)"
        )
        if purged is not None:
            line += f"; purged {purged} expired idempotency answer(s)"
        Output().line(line)
    return 0


async def _journal(args: argparse.Namespace, cfg: HostConfig) -> int:
    from isopace.host.errors import HostError

    out = Output()
    # a reader (no key file made), beside the host if it runs: its own connection to SQLite
    async with Stores(cfg) as stores:
        try:
            journal = await stores.open_journal(create_keys=False, keys_needed=bool(args.pan))
        except HostError:
            raise
        except Exception as exc:
            raise HostError(f"journal: {one_line(exc)}") from exc
        if args.prune_before is not None:
            return await _prune(args, cfg, journal)
        if args.in_doubt:
            rows = await journal.in_doubt(all_nodes=True)
            if args.json:
                for r in rows[: args.limit]:
                    print(
                        json.dumps(
                            {
                                "tx_id": r.tx_id,
                                "committing": r.committing,
                                "node": r.node,
                                "began_at": r.began_at.isoformat(),
                                "joined": list(r.joined),
                            }
                        )
                    )
            else:
                out.table(
                    f"{len(rows)} transaction(s) in doubt",
                    ["transaction", "began", "node", "decision", "joined"],
                    [
                        (
                            r.tx_id,
                            r.began_at.isoformat(timespec="seconds"),
                            r.node,
                            "commit" if r.committing else "none",
                            ",".join(r.joined),
                        )
                        for r in rows[: args.limit]
                    ],
                )
            return 0
        if args.id or args.since is not None or args.pan:
            if args.id:
                records = await journal.by_id(args.id)
            elif args.pan:
                records = await journal.by_pan(args.pan, limit=args.limit)
            else:
                end = dt.datetime.now(dt.UTC)
                start = end - dt.timedelta(minutes=args.since)
                records = await journal.by_time(start, end, limit=args.limit)
            _print_records(out, records[: args.limit], args.json)
            if args.pan:
                _report_unknown_keys(journal, await journal.key_usage())
            return 0
        counts = await journal.counts()
        if args.json:
            print(json.dumps(counts))
        else:
            out.table("journal records per kind", ["kind", "count"], sorted(counts.items()))
        return 0


def _report_unknown_keys(journal: HostJournal, usage: KeyUsage) -> None:
    """Say (on stderr, so ``--json`` output stays records only) how many records were made
    under keys the journal does not have: a search cannot find them, and silence would read as
    "no such card"."""
    ring = journal.keys.ring
    if ring is None:
        return
    unknown = usage.unknown(ring)
    if unknown:
        ids = ", ".join(f"{k} ({n})" for k, n in unknown.items())
        print(
            f"isopace: {sum(unknown.values())} record(s) were made under key(s) {ids} that "
            f"{ring.source} does not have: they cannot be searched by card",
            file=sys.stderr,
        )


def _code(record: Any) -> str:
    text = record.response_json
    if not text:
        return ""
    try:
        fields = json.loads(text)
    except ValueError:
        return ""
    if isinstance(fields, dict):
        inner = fields.get("fields", fields)
        if isinstance(inner, dict):
            value = inner.get("39", "")
            return value if isinstance(value, str) else ""
    return ""


def _print_records(out: Output, records: list[Any], as_json: bool) -> None:
    if as_json:
        for r in records:
            print(
                json.dumps(
                    {
                        "seq": r.seq,
                        "tx_id": r.tx_id,
                        "kind": r.kind,
                        "at": r.at.isoformat(),
                        "node": r.node,
                        "pan": r.pan_masked,
                        "rc": _code(r),
                        "joined": list(r.joined),
                        "durable": r.durable,
                        "error": r.error,
                    }
                )
            )
        return
    out.table(
        f"{len(records)} record(s)",
        ["at", "transaction", "kind", "card", "rc", "error"],
        [
            (
                r.at.isoformat(timespec="milliseconds"),
                r.tx_id,
                r.kind,
                r.pan_masked or "",
                _code(r),
                (r.error or "")[:60],
            )
            for r in records
        ],
    )


# -- recover ---------------------------------------------------------------------------------------


def add_recover_parser(sub: Any) -> None:
    p = sub.add_parser(
        "recover",
        help="finish the transactions a crashed host left in doubt",
        description=(
            "Run crash recovery without starting the host (``isopace serve`` also does this at "
            "start-up): each transaction in doubt is committed if its commit decision was "
            "journalled, else rolled back, through the flow's stages. Only this node's "
            "transactions (--node, default hostname:port) unless --all-nodes with PostgreSQL: do "
            "not run it while a host is serving the same node, and with --all-nodes only once "
            "the other nodes are stopped. With SQLite every node's transactions (one host per "
            "database: refused while a host serves it)."
        ),
    )
    # the host's flow, which checks requests under the host's wire format
    add_config_flags(p, only=_STORE_OPTIONS | {"spec", "spec_file"})
    p.add_argument(
        "--all-nodes", action="store_true", help="also take over other nodes' transactions"
    )
    p.add_argument(
        "--older-than",
        type=float,
        metavar="SECONDS",
        help=(
            "only transactions whose last event is older (default: all). With --all-nodes while "
            "other nodes may still serve, give more than their transaction deadline: a live "
            "node finishes every transaction within it"
        ),
    )
    p.set_defaults(func=_command(_recover, lambda cfg: cfg.db))


async def _recover(args: argparse.Namespace, cfg: HostConfig) -> int:
    spec = cfg.wire_spec()  # the host's flow checks requests under the host's wire format
    policy = RecoveryPolicy.for_config(cfg, all_nodes=args.all_nodes)
    out = Output()
    # opened as ``isopace serve`` opens them: with SQLite the data's lock (refused while a host
    # serves it); the idempotency store when recovery takes over the crashed claims
    stores = await Stores(cfg).open(lock=True, journal=True, idempotency=policy.takes_over)
    async with stores:
        ledger = stores.ledger
        assert ledger is not None
        flow = build_flow(ledger, cfg, spec=spec, journal=stores.journal)
        report = await policy.recover(flow, stores, older_than=args.older_than)
        out.line(str(report))
        for tx_id, text in report.failed.items():
            out.line(f"  left in doubt: {tx_id}: {text}")
        check = await ledger.check()
        out.line(
            "ledger balances"
            if check.ok
            else "ledger does NOT balance: " + "; ".join(check.problems)
        )
        return 0 if not report.failed and check.ok else 1


# -- ledger ----------------------------------------------------------------------------------------


def add_ledger_parser(sub: Any) -> None:
    p = sub.add_parser(
        "ledger",
        help="show the ledger's accounts and check that it balances",
        description=(
            "Print every account (balance, held, available), check the ledger's invariants "
            "(balance = opening - captures, held = open holds, nothing overdrawn), optionally "
            "list the authorizations that expired with nobody completing them (their holds "
            "released by the host's sweep), and block or unblock a card. Exit status 1 when "
            "the ledger does not balance."
        ),
    )
    add_config_flags(p, only={"db", "postgres", "postgres_schema", "synchronous", "card_key_file"})
    p.add_argument("--block", metavar="PAN", help="block this card (declined 05 from now on)")
    p.add_argument("--unblock", metavar="PAN", help="unblock this card")
    p.add_argument(
        "--expired",
        nargs="?",
        type=int,
        const=100,
        metavar="N",
        help="list the last N (default 100) authorizations that expired uncompleted",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_command(_ledger, lambda cfg: cfg.db))


async def _ledger(args: argparse.Namespace, cfg: HostConfig) -> int:
    from isopace.host.errors import ConfigError

    out = Output()
    async with await Stores(cfg).open() as stores:
        ledger = stores.ledger
        assert ledger is not None
        for pan, status in ((args.block, "blocked"), (args.unblock, "active")):
            if pan and not await ledger.set_card_status(pan, status):
                raise ConfigError("no such card in the ledger")
        accounts = await ledger.accounts()
        check = await ledger.check()
        expired = [] if args.expired is None else await ledger.expired_holds(max(args.expired, 0))
        if args.json:
            doc: dict[str, Any] = {
                "accounts": [
                    {
                        "id": a.id,
                        "currency": a.currency,
                        "opening": a.opening,
                        "balance": a.balance,
                        "held": a.held,
                        "available": a.available,
                    }
                    for a in accounts
                ],
                "holds": check.holds,
                "pending": check.pending,
                "expired": check.expired,
                "ok": check.ok,
                "problems": list(check.problems),
            }
            if args.expired is not None:
                doc["expired_holds"] = [
                    {
                        "txn_id": h.txn_id,
                        "account": h.account_id,
                        "amount": h.amount,
                        "mti": h.mti,
                        "terminal": h.terminal,
                        "stan": h.stan,
                        "tx_time": h.tx_time,
                        "rrn": h.rrn,
                        "approval_code": h.approval_code,
                    }
                    for h in expired
                ]
            print(json.dumps(doc))
        else:
            out.table(
                "accounts",
                ["account", "currency", "opening", "balance", "held", "available"],
                [
                    (
                        a.id,
                        a.currency,
                        money(a.opening, a.currency),
                        money(a.balance, a.currency),
                        money(a.held, a.currency),
                        money(a.available, a.currency),
                    )
                    for a in accounts
                ],
            )
            if args.expired is not None:
                out.table(
                    "expired authorizations",
                    ["transaction", "account", "amount", "terminal", "stan", "approval"],
                    [
                        (
                            h.txn_id,
                            h.account_id,
                            money(h.amount),
                            h.terminal or "-",
                            h.stan or "-",
                            h.approval_code or "-",
                        )
                        for h in expired
                    ],
                )
            out.line(f"{check.holds} hold(s), {check.pending} pending, {check.expired} expired")
            out.line("ledger balances" if check.ok else "ledger does NOT balance:")
            for problem in check.problems:
                out.line(f"  {problem}")
        return 0 if check.ok else 1


# -- keys ------------------------------------------------------------------------------------------


def add_keys_parser(sub: Any) -> None:
    p = sub.add_parser(
        "keys",
        help="show, rotate and re-key the card and journal keys",
        description=(
            "The keys of the card fingerprints (ledger) and of the journal's, which live in key "
            "files (or $ISOPACE_CARD_KEY / $ISOPACE_JOURNAL_KEY), never in the database. "
            "status: each key's id and the rows under it. rotate: a new key goes first in each "
            "key file (the old ones stay readable), running hosts take it within a second, "
            "every fingerprint is re-keyed in small transactions (the host keeps serving), and "
            "an old key is dropped from the file once no row references it. rekey: the re-keying "
            "and dropping again, to finish a rotation. With several PostgreSQL nodes, copy the "
            "new key file to every node before the re-keying ends (--wait)."
        ),
    )
    add_config_flags(p, only=_STORE_OPTIONS)
    p.add_argument("action", choices=["status", "rotate", "rekey"], help="what to do")
    p.add_argument(
        "--only",
        choices=["card", "journal"],
        help="rotate only these keys (default: both; journal keys derived from the card keys "
        "follow them)",
    )
    p.add_argument(
        "--wait",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help="after writing a new key, wait this long for running hosts to take it before "
        "re-keying (default: 3; hosts check their key files every second)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_command(_keys, lambda cfg: cfg.db))


async def _keys(args: argparse.Namespace, cfg: HostConfig) -> int:
    from isopace.host.keys import derived_journal_keys
    from isopace.store.keys import Key

    out = Output()
    async with await Stores(cfg).open(journal=True) as stores:
        ledger, journal = stores.ledger, stores.journal
        card, jring = stores.card_keys, stores.journal_keys
        assert ledger is not None and journal is not None
        assert card is not None and jring is not None
        status = 0
        if args.action == "rotate":
            rings = [("card", card), ("journal", jring)]
            if args.only:
                rings = [r for r in rings if r[0] == args.only]
            if args.only == "journal" and jring.parent is not None:
                raise ConfigError(
                    f"the journal keys are derived from the card keys ({card.source}): rotate "
                    "those (or give the journal a key file of its own: --journal-key-file)"
                )
            for kind, ring in rings:
                if ring.parent is not None:
                    continue  # follows its parent
                if ring.path is None:
                    raise ConfigError(
                        f"{kind} keys from {ring.source} cannot be rotated here: put a new key "
                        f"first in it on every node, restart them, then run isopace keys rekey"
                    )
                new = Key.generate()
                ring.save([new, *ring.keys])
                out.line(f"{kind} keys: new key {new.id} in {ring.path}")
            if jring.parent is not None:
                jring.replace(derived_journal_keys(card).keys)
            ledger.use_keys(card)
            journal.keys.refresh()
            await asyncio.sleep(max(0.0, args.wait))
        if args.action in ("rotate", "rekey"):
            done = await ledger.rekey()
            moved = await journal.rekey()
            out.line(f"re-keyed: {done.cards} card(s), {done.holds} hold(s), {moved} record(s)")
        usage = {"card": await ledger.key_usage(), "journal": await journal.key_usage()}
        if args.action in ("rotate", "rekey"):
            status = _drop_unused(out, card, jring, usage)
        report: dict[str, dict[str, Any]] = {
            kind: {
                "source": ring.source,
                "keys": list(ring.ids),
                "current": ring.current.id,
                "rows": {str(k or "none"): n for k, n in usage[kind].items()},
                "unknown": usage[kind].unknown(ring),
            }
            for kind, ring in (("card", card), ("journal", jring))
        }
        if args.json:
            print(json.dumps(report))
        else:
            for kind, item in report.items():
                out.line(
                    f"{kind} keys ({item['source']}): current {item['current']}, kept "
                    f"{', '.join(item['keys'][1:]) or 'none'}; rows per key: "
                    f"{usage[kind].describe()}"
                )
                if item["unknown"]:
                    out.line(f"  rows under keys not in {item['source']}: {item['unknown']}")
        return status  # the stores close on the way out


def _drop_unused(out: Output, card: Any, jring: Any, usage: dict[str, Any]) -> int:
    """Drop from their files the old keys no row references; 1 when some had to be kept."""
    from isopace.store.keys import Key

    kept_any = 0
    for kind, ring in (("card", card), ("journal", jring)):
        if ring.parent is not None:
            continue
        rows = usage[kind]
        derived: dict[str, Key] = {}
        if kind == "card" and jring.parent is ring:  # its derived keys protect journal rows
            derived = {k.id: k.derive("journal") for k in ring.keys}
        kept = []
        for key in ring.keys[1:]:
            n = rows.get(key.id, 0) + rows.get(None, 0)
            if key.id in derived:
                jrows = usage["journal"]
                n += jrows.get(derived[key.id].id, 0) + jrows.get(None, 0)
            if n:
                kept.append((key, n))
        if len(ring.keys) > 1 + len(kept):
            dropped = [k.id for k in ring.keys[1:] if k not in {c[0] for c in kept}]
            ring.save([ring.current, *(c[0] for c in kept)])
            out.line(f"{kind} keys: dropped {', '.join(dropped)} from {ring.path} (no row uses it)")
        for key, n in kept:
            kept_any = 1
            out.line(
                f"{kind} keys: kept {key.id}: {n} row(s) still under it or from before key ids "
                "(a number too long to recover, or written meanwhile by a node without the new "
                "key): run isopace keys rekey again"
            )
    return kept_any
