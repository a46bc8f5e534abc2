"""Owner tokens of idempotency claims, shared by the SQLite, PostgreSQL and Redis stores."""

from __future__ import annotations

import itertools
import secrets


class OwnerTokens:
    """Tokens ``node:random-prefix:counter``: unique per claim and cheap (``uuid4`` per claim costs
    tens of microseconds of ``os.urandom`` on some machines). ``prefix`` tells this store's
    claims from those of earlier runs of the same node."""

    __slots__ = ("_count", "prefix")

    def __init__(self, node: str) -> None:
        self.prefix = f"{node}:{secrets.token_hex(8)}:"
        self._count = itertools.count(1)

    def next(self) -> str:
        return f"{self.prefix}{next(self._count):x}"
