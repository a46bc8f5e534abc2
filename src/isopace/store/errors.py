"""Errors of the durable stores: every one derives from :class:`isopace.IsopaceError`."""

from __future__ import annotations

from isopace.errors import IsopaceError


class StoreError(IsopaceError):
    """Base class of the errors raised by :mod:`isopace.store`."""


class JournalError(StoreError):
    """A journal record could not be made durable (disk full, read-only file, database down...)."""


class SchemaError(StoreError):
    """The database schema is newer than this code, or a migration failed."""


class IdempotencyError(StoreError):
    """The idempotency store could not claim, complete or release a key (backend down...)."""


class LeaseLostError(IdempotencyError):
    """The claim on a key expired and another run took it before this one finished."""

    def __init__(self, key: str) -> None:
        super().__init__(f"idempotency key {key!r}: the claim's lease expired and was taken over")
        self.key = key


class RecoveryError(StoreError):
    """Recovery could not finish a transaction found in doubt (a stage's recover hook failed)."""
