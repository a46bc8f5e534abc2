"""The authorization host: the reference flow wired to a ledger, a journal, an idempotency store,
the TCP server and the metrics endpoint.

`build_flow` assembles the flow from the stages of `isopace.host.stages` (the part users copy);
`AuthorizationHost` is the composition root: it owns the resources and their start-up order,
and every part it starts is a public piece the operator commands use too:

1. the TLS context and the ports (bad files, a port in use, fail before anything is opened);
2. the stores (`isopace.host.stores.Stores`): the ledger (SQLite, or PostgreSQL) with its card
   keys, the SQLite data's lock, the demo cards in an empty ledger, the journal with its keys
   and the idempotency store (PostgreSQL and/or Redis when configured). With SQLite the three
   share ONE file, one connection and one WAL (`isopace.store.SqliteDatabase`): their writes
   run inline on the event loop and commit in order, and a response leaves only once they are
   on disk, after one group fsync shared with every transaction answered meanwhile;
3. crash recovery (`isopace.host.startup.RecoveryPolicy`): every transaction in doubt that is
   this host's (see "Nodes" below) is committed or rolled back through the stages' ``recover``
   hooks before the port opens; with the SQLite idempotency store the response of each
   transaction recovery commits is stored under its idempotency key;
4. the ISO 8583 server, the background housekeeping (the journal's retention,
   ``journal_retention``, and the expiry of authorizations nobody completed, ``hold_expiry``),
   then the metrics endpoint. While it runs, the host re-reads its key files every
   `KEY_RELOAD_INTERVAL` seconds, so ``isopace keys rotate`` takes effect without a restart.

Everything is closed in reverse order (`isopace.host.closers`), after a full start or a start
that failed half way.

Each transaction gets a fresh id (a random per-start prefix and a counter: unique across nodes
sharing a journal and across restarts); the idempotency key is the MTI class (``020`` for
0200/0201) plus DE 41, DE 11, DE 7 by default (DE 37, else DE 12 + 13, where DE 7 is absent; DE 32
added when present: `isopace.host.idempotency`), so a retransmission is answered from the store
and never applied twice. The stored answer keeps the request's fingerprint (a keyed hash of the
MTI class, card number, DE 3, 4, 49, 41, 42), and a request that reuses a key with another
fingerprint is declined 94 (duplicate transmission): no stage runs, no money moves, nothing of the
other transaction's answer (its approval code) is sent. Network management (08xx) is not
idempotent. A transaction that ends without a response (a stage failed, the deadline passed) is
answered 96.

Nodes (whose transactions start-up recovery ends; the rules are `RecoveryPolicy`'s):

- SQLite: the data belongs to one host process at a time (`isopace.host.stores.lock_data`: a
  second ``isopace serve`` on the same data fails with a one-line error). The node defaults to
  the machine's host name, and start-up recovery ends every node's transactions in the file
  (whoever left them is gone: the lock says so), so a host restarted after a crash with another
  ``--port``, or another ``--node``, still finishes what the crashed run left.
- PostgreSQL: several hosts share the database, so the node defaults to ``hostname:port`` and
  recovery ends only this node's transactions (another node's may still be in flight). At start-up
  the host warns with the count of other nodes' transactions in doubt for longer than twice the
  transaction deadline and names ``isopace recover --all-nodes``, to be run once those nodes are
  gone for good (a node restarted under its old name recovers its own at start-up).
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import secrets
import socket
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from isopace.flow import Exchange, FingerprintMismatchError, Flow, Outcome
from isopace.host import stages
from isopace.host.closers import Closers
from isopace.host.config import HostConfig
from isopace.host.conversion import Rates
from isopace.host.errors import HostError, StartupError, one_line
from isopace.host.extensions import apply_extensions
from isopace.host.idempotency import DEFAULT_KEY_FIELDS, IdempotencyKey, RequestFingerprint
from isopace.host.keys import derived_journal_keys
from isopace.host.ledger import Ledger, SeedCard
from isopace.host.metrics import Metrics, MetricsServer
from isopace.host.startup import RecoveryPolicy
from isopace.host.stores import HostIdempotencyStore, HostJournal, Stores
from isopace.iso8583 import (
    Iso8583Error,
    card_number,
    error_reply,
    format_amount,
    is_approval,
    response_code_for,
)
from isopace.iso8583 import response_codes as rc
from isopace.store import SqliteDatabase, SqliteIdempotencyStore
from isopace.store.keys import KeyFileError, KeyRing

if TYPE_CHECKING:
    import ssl

    from isopace.flow import FlowListener, IdempotencyStore, Journal
    from isopace.iso8583 import Message, Spec
    from isopace.net import Handler, Server
    from isopace.store import RecoveryReport

__all__ = [
    "BENCH_PAN",
    "DEMO_CARDS",
    "AuthorizationHost",
    "build_flow",
    "build_server",
    "idempotency_key",
]

log = logging.getLogger("isopace.host")

#: Demo cards (Luhn-valid test numbers) created on the first start of an empty ledger.
DEMO_CARDS: tuple[SeedCard, ...] = (
    SeedCard("4111111111111111", "ACC-1001", 100_000, label="visa, active"),
    SeedCard("5555555555554444", "ACC-1002", 250_000, label="mastercard, active"),
    SeedCard("5105105105105100", "ACC-1003", 1_000, label="mastercard, low balance"),
    SeedCard("4012888888881881", "ACC-1004", 50_000, status="blocked", label="visa, blocked"),
    SeedCard("4000056655665556", "ACC-9000", 1_000_000_000, label="visa, for isopace bench"),
)
#: Seconds between two checks of the key files for a rotation (`AuthorizationHost.reload_keys`).
KEY_RELOAD_INTERVAL = 1.0
#: The card `isopace bench` uses by default.
BENCH_PAN = "4000056655665556"


def idempotency_key(fields: Sequence[int] = DEFAULT_KEY_FIELDS) -> IdempotencyKey:
    """The key function: MTI class + the given fields (with DE 7's stand-ins and DE 32 when
    present, see `isopace.host.idempotency`); None (not idempotent) for 08xx or when the key
    cannot be made (the parse stage declines such a request 30, naming what it lacks)."""
    return IdempotencyKey(fields)


def build_flow(
    ledger: Ledger,
    config: HostConfig | None = None,
    *,
    spec: Spec | None = None,
    journal: Journal | None = None,
    idempotency: IdempotencyStore | None = None,
    listener: FlowListener | None = None,
    profiler: bool = True,
) -> Flow:
    """The reference authorization flow (see `isopace.host.stages` for the picture); ``spec``
    (default ISO87_ASCII, the host's) is the one whose rules the parse stage checks. The
    configuration's extensions add their stages last (`isopace.host.extensions`), here, so the
    host, `isopace recover` and anyone building this flow get the same one."""
    from isopace.iso8583 import ISO87_ASCII

    config = config or HostConfig()
    velocity = stages.Velocity(
        config.velocity_window, config.velocity_max_count, config.velocity_max_amount
    )
    key = idempotency_key(config.idempotency_key)
    reserve = stages.Reserve(ledger, key=key, cash_limit=config.cash_daily_limit)
    flow = Flow(
        entry="main",
        journal=journal,
        idempotency=idempotency,
        key=key if idempotency is not None else None,
        # the card keys as the ledger holds them now (a rotation replaces the ring)
        fingerprint=RequestFingerprint(lambda: ledger.keys) if idempotency is not None else None,
        profiler=profiler,
        listener=listener,
    )
    parse = stages.Parse(spec if spec is not None else ISO87_ASCII, key)
    flow.group("main", parse, stages.Dispatch())
    flow.group("netmgmt", stages.NetworkManagement())
    flow.group(
        "authorize",
        stages.Risk(ledger, velocity),
        stages.TransactionType(
            stages.BinRoute(config.bins, config.unknown_bin_code), Rates(config.rates)
        ),
    )
    flow.group("refund", stages.Refund(ledger, key=key))
    flow.group("inquiry", stages.BalanceInquiry(ledger))
    for network in sorted(set(config.bins.values())):
        flow.group(network, reserve)
    flow.group(
        "reversal", stages.Reversal(ledger, config.early_reversal_window, Rates(config.rates))
    )
    flow.group("authorization-advice", stages.AuthorizationAdvice(ledger, key=key))
    flow.group("completion", stages.Completion(ledger, key=key))
    flow.group("respond", stages.Respond())
    apply_extensions(flow, ledger, config)  # the user's own stages (`isopace.host.extensions`)
    return flow


def build_server(
    cfg: HostConfig,
    spec: Spec,
    handler: Handler,
    *,
    port: int | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> Server:
    """The `Server` the host listens with for ``cfg`` (framing, address, limits), around
    ``handler``; ``port`` overrides ``cfg.port``. Also what the host benchmark's no-op host is
    built with, so that the two differ only in what answers."""
    from isopace.net import Framing, LengthHeader, Server

    return Server(
        spec,
        handler,
        framing=Framing(header=LengthHeader(cfg.framing)),
        host=cfg.host,
        port=cfg.port if port is None else port,
        ssl=ssl_context,
        max_in_flight=cfg.max_in_flight,
        # 0 in the configuration: no limit
        idle_timeout=cfg.idle_timeout or None,
        frame_timeout=cfg.frame_timeout or None,
        max_connections=cfg.max_connections,
        max_buffered_bytes=cfg.max_buffered_bytes or None,
    )


class AuthorizationHost:
    """Runs the host described by a `HostConfig`: ``await host.start()`` ... ``await host.close()``
    (or ``async with``). ``host.handle(message)`` is the server's handler, usable directly.

    The stores are `host.stores` (`isopace.host.stores.Stores`, opened as every operator command
    opens them); ``ledger``, ``journal``, ``idempotency``, ``database`` and the key rings are
    read through to it."""

    def __init__(self, config: HostConfig, *, spec: Spec | None = None) -> None:
        self.config = config
        # the wire format (``spec`` / ``spec_file``): the server decodes requests and encodes
        # answers with it, and the flow's checks read its rules; what the stores keep is the
        # fields' values, not bytes, so nothing stored is decoded with another spec later
        self.spec: Spec = spec if spec is not None else config.wire_spec()
        # see "Nodes" in the module docstring
        self.node = config.node_name
        self.metrics = Metrics()
        self.stores = Stores(config, node=self.node)
        self.flow: Flow | None = None
        self.server: Server | None = None
        self.metrics_server: MetricsServer | None = None
        self.recovery: RecoveryReport | None = None
        self._closers = Closers()
        # Transaction ids: a random per-start prefix (unique across nodes and restarts) and a
        # counter; cheaper than a UUID per transaction.
        self._id_prefix = secrets.token_hex(8)
        self._ids = itertools.count(1)
        self._sync_before_reply: SqliteDatabase | None = None
        self._key_problem = ""

    # -- properties ----------------------------------------------------------------------------

    @property
    def database(self) -> SqliteDatabase | None:
        return self.stores.database

    @property
    def ledger(self) -> Ledger | None:
        return self.stores.ledger

    @property
    def journal(self) -> HostJournal | None:
        return self.stores.journal

    @property
    def idempotency(self) -> HostIdempotencyStore | None:
        return self.stores.idempotency

    @property
    def card_keys(self) -> KeyRing | None:
        return self.stores.card_keys

    @property
    def journal_keys(self) -> KeyRing | None:
        return self.stores.journal_keys

    @property
    def seeded(self) -> list[SeedCard]:
        """The demo cards this start created in an empty ledger."""
        return self.stores.seeded

    @property
    def port(self) -> int:
        return self.server.port if self.server is not None else self.config.port

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_server.port if self.metrics_server is not None else None

    # -- life cycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> AuthorizationHost:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Open everything in order (module docstring); one-line `HostError` on failure."""
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise

    async def _start(self) -> None:
        cfg = self.config
        ssl_context = cfg.ssl_context()
        _check_bindable("port", cfg.host, cfg.port)  # fail fast, before opening any database
        if cfg.metrics_port:
            _check_bindable("metrics", cfg.metrics_host, cfg.metrics_port)
        stores = self.stores
        self._closers.add(stores.close)  # last to close
        await stores.open(
            lock=True, seed=DEMO_CARDS if cfg.seed_demo else (), journal=True, idempotency=True
        )
        assert stores.ledger is not None
        # A response may leave only once the transaction's writes are on disk. The SQLite
        # idempotency store's `complete`, the last write of every idempotent transaction, waits
        # for that; with another store the handler waits for the database itself.
        if stores.database is not None and not isinstance(
            stores.idempotency, SqliteIdempotencyStore
        ):
            self._sync_before_reply = stores.database
        self.flow = build_flow(
            stores.ledger,
            cfg,
            spec=self.spec,
            journal=stores.journal,
            idempotency=stores.idempotency,
            listener=self.metrics,
            # the per-stage profile is only read by the transaction log line
            profiler=cfg.log_transactions and log.isEnabledFor(logging.INFO),
        )
        policy = RecoveryPolicy.for_config(cfg)
        self.recovery = await policy.recover(self.flow, stores)
        if self.recovery.total:
            log.warning("%s", self.recovery, extra={"node": self.node})
        await policy.after_recovery(stores)
        await self._start_server(ssl_context)
        self._start_housekeeping()
        self._closers.add_task(asyncio.create_task(self._watch_keys(), name="isopace-keys"))
        if cfg.metrics_port is not None:
            self.metrics_server = MetricsServer(self.metrics, cfg.metrics_host, cfg.metrics_port)
            try:
                await self.metrics_server.start()
            except OSError as exc:
                self.metrics_server = None
                raise StartupError(
                    _bind_error("metrics", cfg.metrics_host, cfg.metrics_port, exc)
                ) from exc
            self._closers.add(self._close_metrics)

    def _start_housekeeping(self) -> None:
        """The host's periodic jobs, each a background task that runs it first at start-up,
        then every interval (`_every`):

        - retention (``journal_retention`` days, 0: off): the journal is pruned every
          ``journal_prune_interval`` seconds; an expired idempotency answer is purged by its
          store's own task;
        - hold expiry (``hold_expiry`` seconds, 0: off): authorizations nobody completed are
          released every ``hold_sweep_interval`` seconds (`Ledger.expire`). With PostgreSQL
          every node sweeps; a hold another node's sweep holds is skipped, not waited for.

        Both delete or update in small batches and yield between them, so the transactions
        being served are never held up for long."""
        cfg = self.config
        if cfg.journal_retention > 0:
            self._every("journal: pruning", cfg.journal_prune_interval, self._prune_journal)
        if cfg.hold_expiry > 0:
            self._every("ledger: hold expiry", cfg.hold_sweep_interval, self._expire_holds)

    def _every(self, what: str, interval: float, job: Callable[[], Any]) -> None:
        """Run ``job`` now and every ``interval`` seconds until the host closes; a failure (the
        database is down) is logged as a WARNING and the job runs again next time."""

        async def forever() -> None:
            while True:
                try:
                    await job()
                except Exception as exc:
                    log.warning("%s failed: %s", what, one_line(exc))
                await asyncio.sleep(interval)

        self._closers.add_task(asyncio.get_running_loop().create_task(forever()))

    async def _prune_journal(self) -> None:
        before = datetime.now(UTC) - timedelta(days=self.config.journal_retention)
        assert self.journal is not None
        pruned = await self.journal.prune(before)
        if pruned:
            log.info(
                "journal: pruned %d record(s) of transactions ended before %s",
                pruned,
                before.isoformat(timespec="seconds"),
                extra={"pruned": pruned},
            )

    async def _expire_holds(self) -> None:
        assert self.ledger is not None
        expired = await self.ledger.expire(self.config.hold_expiry)
        if expired:
            log.info(
                "ledger: %d authorization(s) nobody completed within %g s expired; their "
                "holds are released",
                expired,
                self.config.hold_expiry,
                extra={"expired": expired},
            )

    async def _close_metrics(self) -> None:
        if self.metrics_server is not None:
            await self.metrics_server.close()

    def reload_keys(self) -> bool:
        """Re-read the key files if they changed (``isopace keys rotate``); True when a ring
        changed. A file that cannot be read keeps the keys in use, with one WARNING per
        problem (not one per check)."""
        changed = False
        try:
            if self.card_keys is not None and self.card_keys.reload_if_changed():
                changed = True
                if self.ledger is not None:
                    self.ledger.use_keys(self.card_keys)
            ring = self.journal_keys
            if ring is not None and ring.parent is not None:
                before = ring.ids
                ring.replace(derived_journal_keys(ring.parent).keys)
                changed = changed or ring.ids != before
            elif ring is not None and ring.reload_if_changed():
                changed = True
            if changed and self.journal is not None and ring is not None:
                self.journal.keys.refresh()
            self._key_problem = ""
        except (KeyFileError, OSError) as exc:  # OSError: the file went away while read
            if str(exc) != self._key_problem:
                self._key_problem = str(exc)
                log.warning("keeping the keys in use: %s", exc)
        if changed:
            log.info(
                "keys reloaded: card %s, journal %s",
                ",".join(self.card_keys.ids) if self.card_keys else "-",
                ",".join(self.journal_keys.ids) if self.journal_keys else "-",
            )
        return changed

    async def _watch_keys(self) -> None:
        while True:
            await asyncio.sleep(KEY_RELOAD_INTERVAL)
            self.reload_keys()

    async def _start_server(self, ssl_context: ssl.SSLContext | None) -> None:
        cfg = self.config
        self.server = build_server(cfg, self.spec, self.handle, ssl_context=ssl_context)
        try:
            await self.server.start()
        except OSError as exc:
            self.server = None
            raise StartupError(_bind_error("port", cfg.host, cfg.port, exc)) from exc
        self.metrics.port = self.server
        self._closers.add(self._close_server)

    async def _close_server(self) -> None:
        if self.server is not None:
            await self.server.close(timeout=self.config.timeout)

    async def close(self) -> None:
        """Stop accepting, finish in-flight transactions, close stores (reverse opening order)."""
        await self._closers.close()

    async def serve_forever(self) -> None:
        """Wait until cancelled (the CLI cancels on SIGINT / SIGTERM)."""
        await asyncio.Event().wait()

    # -- the handler -----------------------------------------------------------------------------

    async def handle(self, request: Message) -> Message | None:
        """Run one transaction through the flow and return its response."""
        flow = self.flow
        if flow is None:
            raise HostError("the host is not started")
        if asyncio.current_task() is None:
            # Called outside a task (a server that starts handlers eagerly): the flow's deadline
            # (asyncio.timeout) needs one, so suspend once and continue inside the task.
            await asyncio.sleep(0)
        ex = Exchange(f"{self._id_prefix}{next(self._ids):08x}", request)
        metrics = self.metrics
        metrics.in_flight += 1
        try:
            outcome = await flow.run(ex, timeout=self.config.timeout)
            if self._sync_before_reply is not None:
                await self._sync_before_reply.synced()
        finally:
            metrics.in_flight -= 1
        response = ex.response
        if response is None or (outcome is Outcome.ABORTED and is_approval(response.get(39))):
            # no answer (a stage raised, the deadline passed): the error's own code, 30 for a
            # request field that does not decode, 94 for a request reusing another's
            # idempotency key (nothing ran: see the module docstring), 96 for the rest
            error = ex.error
            if isinstance(error, FingerprintMismatchError):
                code = rc.DUPLICATE_TRANSMISSION
            elif error is not None:
                code = response_code_for(error)
            else:
                code = rc.SYSTEM_MALFUNCTION
            response = error_reply(request, code)
        elif self.database is not None and self.database.failed:
            # the flow logs a failed idempotency `complete` and goes on; with the SQLite
            # database that failure means the transaction may not be on disk: no approval
            response = error_reply(request, rc.SYSTEM_MALFUNCTION)
        if self.config.log_transactions and log.isEnabledFor(logging.INFO):
            self._log(ex, outcome, response)
        return response

    def _log(self, ex: Exchange, outcome: Outcome, response: Message | None) -> None:
        from isopace.iso8583 import mask_pan

        request = ex.request
        try:  # a field that does not decode was answered 30; it is logged as "-"
            pan = card_number(request)
        except Iso8583Error:
            pan = None
        masked = mask_pan(pan) if pan is not None else "-"
        code = response.get(39) if response is not None else None
        try:
            raw, currency = request.get(4), request.get(49)
        except Iso8583Error:
            raw = currency = None
        amount = (
            format_amount(int(raw), currency if isinstance(currency, str) else None)
            if isinstance(raw, str) and raw.isdigit()
            else "-"
        )
        cause = ""
        if ex.error is not None and outcome is Outcome.ABORTED:
            cause = " cause=" + one_line(ex.error)
        log.info(
            "txn %s %s pan=%s amount=%s rc=%s %s%s %s",
            ex.id,
            request.mti,
            masked,
            amount,
            code,
            outcome,
            cause,
            ex.profile(),
            extra={
                "tx_id": ex.id,
                "mti": request.mti,
                "pan": masked,
                "rc": code,
                "outcome": str(outcome),
            },
        )


def _check_bindable(what: str, host: str, port: int) -> None:
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"{what} {port} on {host}: cannot resolve: {exc.strerror}") from exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise StartupError(_bind_error(what, host, port, exc)) from exc


def _bind_error(what: str, host: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"{what} {port} on {host}: already in use"
    if exc.errno == errno.EACCES:
        return f"{what} {port} on {host}: permission denied"
    return f"{what} {port} on {host}: cannot listen: {exc.strerror or exc}"
