"""PostgreSQL stores (asyncpg), for several nodes sharing one database.

``asyncpg`` is imported by this package's modules only, and only when one of its classes is first
used: install ``isopace[postgres]``. This ``__init__`` itself needs nothing beyond the standard
library, so `check_schema` (the one rule for a schema name, also the host ledger's) can be used
where asyncpg is not installed.

- `pool`: `PostgresPool`, the pool every PostgreSQL store opens once, with its schema created and
  migrated under an advisory lock (nodes starting together migrate once).
- `journal`: `PostgresJournal`, the flow's journal, group-committed.
- `idempotency`: `PostgresIdempotencyStore`, claims and answers shared by every node.

Each store takes a DSN (it then owns a connection pool) or an existing ``asyncpg.Pool``, and a
``schema`` (created if missing) holding its tables. They connect lazily (or on ``await open()`` /
``async with``). A dropped connection (server restart, ``pg_terminate_backend``) fails the
operations running on it with :class:`~isopace.store.JournalError` /
:class:`~isopace.store.IdempotencyError`; the pool replaces the connection and the next
operations succeed.
"""

from __future__ import annotations

import importlib
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from isopace.store.postgres.idempotency import PostgresIdempotencyStore
    from isopace.store.postgres.journal import PostgresJournal
    from isopace.store.postgres.pool import PostgresPool

__all__ = ["PostgresIdempotencyStore", "PostgresJournal", "PostgresPool", "check_schema"]

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,40}$")
_LAZY = {
    "PostgresJournal": "isopace.store.postgres.journal",
    "PostgresIdempotencyStore": "isopace.store.postgres.idempotency",
    "PostgresPool": "isopace.store.postgres.pool",
}


def check_schema(schema: str) -> str:
    """``schema`` if it is a plain SQL identifier (it is written into SQL), else ValueError."""
    if not _IDENT.match(schema):
        raise ValueError(f"schema must be a plain SQL identifier, not {schema!r}")
    return schema


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
