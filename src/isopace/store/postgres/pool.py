"""One asyncpg pool per store, opened once, with its schema migrated before anyone uses it.

Every PostgreSQL store (the journal, the idempotency store, and the host's ledger) needs the same
three things before its first statement: a pool (made from a DSN, or one the caller already has),
its schema created, and its tables migrated exactly once even when several nodes start together.
`PostgresPool` does that in one place: the migration runs in one transaction that first takes a
transaction-level advisory lock on the schema's name, so the second node to start waits for the
first and then finds nothing left to do. What a migration is belongs to the store: `versioned`
gives the journal and idempotency store their ``<schema>.schema_migrations`` table of applied
versions; the ledger brings its own (a version row of its own table).

`PoolOwner` is the journal's and the idempotency store's shared life cycle on top of it: a lazy
``open`` (the first operation opens), ``async with``, a ``_started`` hook for the background tasks
a store runs, and ``close``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Self

import asyncpg  # type: ignore[import-untyped]

from isopace.store.errors import StoreError
from isopace.store.postgres import check_schema

__all__ = ["PG_ERRORS", "Migration", "PoolOwner", "PostgresPool", "versioned"]

log = logging.getLogger("isopace.store")

#: (version, description, statements with ``{s}`` for the schema)
Migration = tuple[int, str, tuple[str, ...]]
#: what a dropped, refused or timed-out connection raises
PG_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    asyncio.TimeoutError,
)


def versioned(migrations: tuple[Migration, ...]) -> Callable[[Any, str], Awaitable[None]]:
    """A migration step that applies what ``<schema>.schema_migrations`` does not list yet."""

    async def migrate(conn: Any, schema: str) -> None:
        await conn.execute(
            f"""CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (
                version INTEGER PRIMARY KEY, description TEXT NOT NULL,
                applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"""
        )
        done = {r[0] for r in await conn.fetch(f"SELECT version FROM {schema}.schema_migrations")}
        for version, description, statements in migrations:
            if version in done:
                continue
            for statement in statements:
                await conn.execute(statement.format(s=schema))
            await conn.execute(
                f"INSERT INTO {schema}.schema_migrations (version, description) VALUES ($1, $2)",
                version,
                description,
            )
            log.info("postgres %s: applied schema migration %d (%s)", schema, version, description)

    return migrate


class PostgresPool:
    """A pool made (or given) once, its schema created and migrated under an advisory lock.

    ``migrate(conn, schema)`` runs inside the locked transaction, after ``CREATE SCHEMA``.
    ``error(text)`` makes the caller's own exception, so a failure names the store it belongs to.
    ``opened`` runs once after the migration (a store's background tasks), still under the
    open lock, so concurrent first operations wait for it.
    """

    def __init__(
        self,
        dsn_or_pool: str | asyncpg.Pool,
        *,
        schema: str,
        migrate: Callable[[Any, str], Awaitable[None]],
        error: Callable[[str], Exception],
        min_size: int = 2,
        max_size: int = 10,
        server_settings: dict[str, str] | None = None,
        connect_timeout: float = 60.0,
        opened: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.schema = check_schema(schema)
        if isinstance(dsn_or_pool, str):
            self._dsn: str | None = dsn_or_pool
            self._pool: asyncpg.Pool | None = None
        else:
            self._dsn = None
            self._pool = dsn_or_pool
        self._owns_pool = self._pool is None
        self._migrate = migrate
        self._error = error
        self._min_size = min_size
        self._max_size = max_size
        self._server_settings = server_settings
        self._connect_timeout = connect_timeout
        self._on_open = opened
        self.is_open = False
        self.closed = False
        self._lock: asyncio.Lock | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise self._error("not open: await open() first")
        return self._pool

    async def open(self) -> asyncpg.Pool:
        """Make the pool (when given a DSN) and migrate the schema; safe to call again."""
        if self.is_open:
            return self._pool
        if self.closed:
            raise self._error("closed")
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self.is_open:
                return self._pool
            if self._pool is None:
                try:
                    self._pool = await asyncpg.create_pool(
                        self._dsn,
                        min_size=self._min_size,
                        max_size=self._max_size,
                        server_settings=self._server_settings,
                        timeout=self._connect_timeout,
                    )
                except PG_ERRORS as exc:
                    raise self._error(f"cannot connect to PostgreSQL: {exc}") from exc
            try:
                async with self._pool.acquire() as conn, conn.transaction():
                    await conn.execute(
                        "SELECT pg_advisory_xact_lock(hashtext($1))", f"isopace:{self.schema}"
                    )
                    await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema}")
                    await self._migrate(conn, self.schema)
            except BaseException as exc:
                if self._owns_pool:  # a pool nobody will use: do not leave its connections open
                    pool, self._pool = self._pool, None
                    await pool.close()
                if isinstance(exc, PG_ERRORS):
                    raise self._error(f"cannot create the schema {self.schema}: {exc}") from exc
                raise
            if self._on_open is not None:
                await self._on_open()
            self.is_open = True
        return self._pool

    async def close(self) -> None:
        """Close the pool if this object made it (a given pool stays its owner's)."""
        self.closed = True
        self.is_open = False
        if self._owns_pool and self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()


class PoolOwner:
    """The journal's and the idempotency store's life cycle on a `PostgresPool`."""

    _migrations: tuple[Migration, ...] = ()

    def __init__(
        self,
        dsn_or_pool: str | asyncpg.Pool,
        *,
        schema: str,
        min_size: int,
        max_size: int,
    ) -> None:
        self._db = PostgresPool(
            dsn_or_pool,
            schema=schema,
            migrate=versioned(self._migrations),
            error=self._error,
            min_size=min_size,
            max_size=max_size,
            opened=self._started,
        )
        self.schema = self._db.schema
        self._closed = False

    @property
    def pool(self) -> asyncpg.Pool:
        return self._db.pool

    @property
    def _opened(self) -> bool:
        return self._db.is_open

    async def open(self) -> Self:
        """Create the pool (when given a DSN) and migrate the schema; safe to call again."""
        if self._closed:
            raise self._error("closed")
        await self._db.open()
        return self

    def _error(self, text: str) -> StoreError:
        return StoreError(f"postgres {self.schema}: {text}")

    async def _started(self) -> None:
        pass

    async def _close_pool(self) -> None:
        self._closed = True
        await self._db.close()

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._close_pool()
