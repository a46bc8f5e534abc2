"""The host's durable stores, opened one way for ``isopace serve`` and every operator command.

Why: the ledger, the journal and the idempotency store are opened by the host at start-up and by
``isopace journal``, ``recover``, ``ledger`` and ``keys`` while it is stopped (or beside it). What
makes them the host's stores is not the constructors but the rules around them, and those must
not drift apart between the host and the commands:

- With SQLite the three live in ONE file (`isopace.store.SqliteDatabase`, one connection, one
  WAL), opened once by whichever store comes first. Its directory is made 0700 and the file 0600
  before SQLite creates anything (`isopace.host.datadir`), and the three files of an earlier
  isopace are refused rather than silently left behind. A journal opened with no database open
  (``isopace journal`` beside a running host) reads the file through a connection of its own.
- With PostgreSQL (and Redis for the idempotency store) each store has its pool; the node names
  this host in the rows it writes.
- Keys never come from a database (`isopace.host.keys`): the card keys are resolved when the
  ledger opens (an earlier version's key is moved out of ``ledger_meta`` once it is safe in its
  key file; a missing or world-readable key file refuses the start), the journal keys when the
  journal opens, from its own key file or, with PostgreSQL and none configured, derived from the
  card keys. An operator command that only reads passes
  ``create_keys=False``: it never makes a key file, and it opens the journal without keys when
  none can be found unless it needs them (a search by card).
- The SQLite data belongs to one process at a time: `lock_data` takes an exclusive lock on
  ``<name>.lock`` beside the database, which the kernel drops when the process dies (even on
  kill -9), so a second host on the same data fails with a one-line error instead of corrupting
  the first's recovery.

Each step that fails raises a one-line `StartupError` naming the store; whatever was opened
before it is closed by `Stores.close` (`isopace.host.closers`: reverse opening order).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Protocol, Self

from isopace.flow import IdempotencyStore
from isopace.host.closers import Closers
from isopace.host.config import HostConfig
from isopace.host.datadir import lock_path, prepare_data
from isopace.host.errors import ConfigError, HostError, StartupError, one_line
from isopace.host.keys import card_keys, journal_keys
from isopace.host.ledger import Ledger, PostgresLedger, SeedCard, SqliteLedger
from isopace.store import SqliteDatabase

if TYPE_CHECKING:
    from isopace.flow import Event, Exchange
    from isopace.store import InDoubt, JournalRecord
    from isopace.store.keys import KeyRing, KeyUsage, StoreKeys

__all__ = ["HostIdempotencyStore", "HostJournal", "Stores", "lock_data"]


class HostJournal(Protocol):
    """What the host and the operator commands use of a journal (`isopace.store.SqliteJournal`,
    `isopace.store.PostgresJournal`): the flow's `isopace.flow.Journal`, recovery's
    ``in_doubt``, retention, keys, and the operators' queries."""

    keys: StoreKeys

    async def record(self, ex: Exchange, event: Event) -> None: ...

    async def in_doubt(
        self, *, all_nodes: bool = False, older_than: float | None = None
    ) -> Sequence[InDoubt]: ...

    async def prune(self, before: datetime) -> int: ...

    async def sample_fingerprint(self) -> str | None: ...

    async def key_usage(self) -> KeyUsage: ...

    async def rekey(self) -> int: ...

    async def by_id(self, tx_id: str) -> list[JournalRecord]: ...

    async def by_pan(self, pan: str, *, limit: int = ...) -> list[JournalRecord]: ...

    async def by_time(
        self, start: datetime, end: datetime, *, limit: int = ...
    ) -> list[JournalRecord]: ...

    async def counts(self) -> dict[str, int]: ...

    async def close(self) -> None: ...


class HostIdempotencyStore(IdempotencyStore, Protocol):
    """The flow's `isopace.flow.IdempotencyStore`, closed with the host."""

    async def close(self) -> None: ...


def lock_data(db: str) -> Callable[[], None]:
    """Take the SQLite data's exclusive lock (module docstring) and return its release; a
    `StartupError` naming the holder's pid when another host has it. Not POSIX: no lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        return lambda: None
    path = lock_path(db)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.fchmod(fd, 0o600)  # whatever the umask (see isopace.host.datadir)
    except OSError as exc:
        raise StartupError(f"lock {path}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StartupError(
            f"{db}: in use by another isopace host (pid {holder}); one host per SQLite "
            "database (use PostgreSQL to run several)"
        ) from exc
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return lambda: os.close(fd)  # closing the file releases the lock


class Stores:
    """The stores of the host a `HostConfig` describes: ``await Stores(cfg).open(...)`` (or the
    ``open_*`` steps one by one) ... ``await stores.close()``, or ``async with``.

    Each part is None until opened. ``node`` defaults to the configuration's (see "Nodes" in
    `isopace.host.app`)."""

    def __init__(self, config: HostConfig, *, node: str | None = None) -> None:
        self.config = config
        self.node = node if node is not None else config.node_name
        self.database: SqliteDatabase | None = None
        self.ledger: Ledger | None = None
        self.journal: HostJournal | None = None
        self.idempotency: HostIdempotencyStore | None = None
        self.card_keys: KeyRing | None = None
        self.journal_keys: KeyRing | None = None
        #: the demo cards `open` created in an empty ledger
        self.seeded: list[SeedCard] = []
        self._closers = Closers()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(
        self,
        *,
        lock: bool = False,
        seed: Sequence[SeedCard] = (),
        journal: bool = False,
        idempotency: bool = False,
    ) -> Self:
        """Open the ledger, then (as asked) take the SQLite data's lock, create ``seed`` in an
        empty ledger, open the journal and the idempotency store: the order ``isopace serve``
        uses. On failure what was opened is closed before the error propagates."""
        try:
            ledger = await self.open_ledger()
            if lock:
                self.lock()
            if seed and not await ledger.accounts():
                self.seeded = await ledger.seed(seed)
            if journal:
                await self.open_journal()
            if idempotency:
                await self.open_idempotency()
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        """Close what was opened, in reverse order (a failure is logged, the rest still close)."""
        await self._closers.close()

    def lock(self) -> None:
        """`lock_data` on the SQLite database, released on close; nothing with PostgreSQL (its
        nodes share the database)."""
        if not self.config.postgres:
            self._closers.add(lock_data(self.config.db))

    # -- the shared SQLite database -----------------------------------------------------------

    async def shared_database(self) -> SqliteDatabase:
        """The one SQLite file of the ledger, the journal and the idempotency store, opened on
        first use (module docstring)."""
        if self.database is not None:
            return self.database
        cfg = self.config
        legacy = [p for p in cfg.legacy_paths if os.path.exists(p)]
        if legacy:
            raise StartupError(
                f"{legacy[0]}: a journal or idempotency file of an earlier isopace, which kept "
                f"them apart from {cfg.db}; finish its transactions with that version "
                "(isopace recover), then move these files away"
            )
        prepare_data(cfg.db)  # 0700 / 0600 before SQLite creates anything
        try:
            database = await asyncio.to_thread(SqliteDatabase, cfg.db, synchronous=cfg.synchronous)
        except Exception as exc:  # a StoreError names the database
            raise StartupError(one_line(exc)) from exc
        self.database = database
        self._closers.add(database.close)
        return database

    # -- the stores ------------------------------------------------------------------------------

    async def open_ledger(self) -> Ledger:
        """The ledger (SQLite, or PostgreSQL) with the card keys."""
        cfg = self.config
        ledger: Ledger
        if cfg.postgres:
            ledger = PostgresLedger(cfg.postgres, schema=cfg.postgres_schema)
        else:
            ledger = SqliteLedger.on(await self.shared_database())
        try:
            await ledger.open()
        except HostError as exc:
            raise StartupError(one_line(exc)) from exc
        except Exception as exc:
            raise StartupError(f"ledger: {one_line(exc)}") from exc
        self._closers.add(ledger.close)
        try:
            legacy = await ledger.legacy_card_key()
            sample = await ledger.sample_pan_ref()
        except Exception as exc:
            raise StartupError(f"ledger: {one_line(exc)}") from exc
        self.card_keys = card_keys(cfg, sample=sample, legacy=legacy)
        ledger.use_keys(self.card_keys)
        if legacy is not None:  # safe in its key file now
            try:
                await ledger.drop_legacy_card_key()
            except Exception as exc:
                raise StartupError(f"ledger: {one_line(exc)}") from exc
        self.ledger = ledger
        return ledger

    async def open_journal(
        self, *, create_keys: bool = True, keys_needed: bool = True
    ) -> HostJournal:
        """The journal with its keys (module docstring). ``create_keys=False``: never make a
        key file; ``keys_needed=False``: open without keys when none can be found."""
        cfg = self.config
        journal: HostJournal
        try:
            if cfg.postgres:
                from isopace.store import PostgresJournal

                pg = PostgresJournal(
                    cfg.postgres,
                    schema=cfg.postgres_schema,
                    node=self.node,
                    wait_final=cfg.journal_wait_final,
                )
                await pg.open()
                journal = pg
            else:
                from isopace.store import SqliteJournal

                if self.database is not None:
                    journal = SqliteJournal.on(
                        self.database, node=self.node, wait_final=cfg.journal_wait_final
                    )
                else:  # nothing else open: a reader beside a running host
                    journal = SqliteJournal(cfg.db, node=self.node)
        except Exception as exc:
            raise StartupError(f"journal: {one_line(exc)}") from exc
        self._closers.add(journal.close)
        card = self.card_keys
        if card is None and cfg.postgres:  # the journal keys may be derived from the card keys
            with contextlib.suppress(ConfigError):
                card = card_keys(cfg, sample=None, create=False)
        try:
            sample = await journal.sample_fingerprint()
        except Exception as exc:
            raise StartupError(f"journal: {one_line(exc)}") from exc
        try:
            self.journal_keys = journal_keys(cfg, card, sample=sample, create=create_keys)
        except ConfigError:
            if keys_needed:
                raise
        else:
            journal.keys.use(self.journal_keys)
        self.journal = journal
        return journal

    async def open_idempotency(self) -> HostIdempotencyStore:
        """The idempotency store: Redis when configured, else PostgreSQL, else the shared SQLite
        database (one process per node: it takes over a crashed run's claims at once)."""
        cfg = self.config
        store: HostIdempotencyStore
        try:
            if cfg.redis:
                from isopace.store import RedisIdempotencyStore

                redis = RedisIdempotencyStore(
                    cfg.redis,
                    prefix=cfg.redis_prefix,
                    ttl=cfg.idempotency_ttl,
                    lease=cfg.idempotency_lease,
                    node=self.node,
                )
                opener = getattr(redis, "open", None)
                if opener is not None:
                    await opener()
                else:
                    await redis.ping()
                store = redis
            elif cfg.postgres:
                from isopace.store import PostgresIdempotencyStore

                pg = PostgresIdempotencyStore(
                    cfg.postgres,
                    schema=cfg.postgres_schema,
                    ttl=cfg.idempotency_ttl,
                    lease=cfg.idempotency_lease,
                    node=self.node,
                )
                await pg.open()
                store = pg
            else:
                from isopace.store import SqliteIdempotencyStore

                store = SqliteIdempotencyStore.on(
                    await self.shared_database(),
                    ttl=cfg.idempotency_ttl,
                    lease=cfg.idempotency_lease,
                    # one process per node (it owns the port): claims left by a crashed run
                    # of this node are taken over at once, not after their lease
                    node=self.node,
                    exclusive_node=True,
                )
        except Exception as exc:
            raise StartupError(f"idempotency store: {one_line(exc)}") from exc
        self._closers.add(store.close)
        self.idempotency = store
        return store
