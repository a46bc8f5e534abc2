"""isopace.store: durable journals, idempotency stores and crash recovery.

- :class:`SqliteJournal` / :class:`SqliteIdempotencyStore`: the embedded default (standard
  library ``sqlite3``): WAL, ``synchronous=FULL``, group commit, versioned schema; each in a
  file of its own, or ``.on(database)`` in one :class:`SqliteDatabase` shared with the host's
  ledger (written inline, made durable by one group fsync).
- :class:`PostgresJournal` / :class:`PostgresIdempotencyStore` (``isopace[postgres]``, asyncpg) and
  :class:`RedisIdempotencyStore` (``isopace[redis]``) for several nodes; imported lazily, so
  ``import isopace.store`` needs neither package.
- :func:`recover`: finish every transaction a crash left in doubt, through the stages'
  ``recover(ex, committing)`` hooks.
- Card data in records is protected by :class:`CardDataProtector` (PAN first 6 / last 4 plus a
  keyed HMAC-SHA256; track data, PIN block and EMV card tags removed); every message a store
  keeps (journal request and response, idempotency answer) is :func:`stored_json`, which also
  masks a card number found in any other field (see :mod:`isopace.store.protect`). The keys live
  outside every database, in key files or the environment, each fingerprint naming its key's id
  (:mod:`isopace.store.keys`, which also re-keys fingerprints for a rotation).

Journals answer operators' queries: ``by_id``, ``by_time``, ``by_pan``, ``in_doubt``, ``counts``,
and ``prune(before)`` deletes the transactions that ended before a date (never one in doubt).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from isopace.store.errors import (
    IdempotencyError,
    JournalError,
    LeaseLostError,
    RecoveryError,
    SchemaError,
    StoreError,
)
from isopace.store.protect import CardDataProtector, mask_pan, scrub_text, stored_json
from isopace.store.records import InDoubt, JournalRecord, RecoveryReport
from isopace.store.recovery import RecoverableJournal, RecoveredAbortError, recover
from isopace.store.sqlite_database import SqliteDatabase
from isopace.store.sqlite_idempotency import SqliteIdempotencyStore
from isopace.store.sqlite_journal import SCHEMA_VERSION, SqliteJournal

if TYPE_CHECKING:
    from isopace.store.postgres.idempotency import PostgresIdempotencyStore
    from isopace.store.postgres.journal import PostgresJournal
    from isopace.store.redis import RedisIdempotencyStore

__all__ = [
    "SCHEMA_VERSION",
    "CardDataProtector",
    "IdempotencyError",
    "InDoubt",
    "JournalError",
    "JournalRecord",
    "LeaseLostError",
    "PostgresIdempotencyStore",
    "PostgresJournal",
    "RecoverableJournal",
    "RecoveredAbortError",
    "RecoveryError",
    "RecoveryReport",
    "RedisIdempotencyStore",
    "SchemaError",
    "SqliteDatabase",
    "SqliteIdempotencyStore",
    "SqliteJournal",
    "StoreError",
    "mask_pan",
    "recover",
    "scrub_text",
    "stored_json",
]

_LAZY = {
    "PostgresJournal": "isopace.store.postgres.journal",
    "PostgresIdempotencyStore": "isopace.store.postgres.idempotency",
    "RedisIdempotencyStore": "isopace.store.redis",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'isopace.store' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
