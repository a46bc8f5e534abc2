"""Open a SQLite connection in WAL mode, safely when several processes open one file at once.

Switching a file to WAL needs an exclusive lock, and SQLite may answer ``database is locked``
at once, without calling the busy handler, while another process is switching the same new
file or recovering its WAL. Giving up there would make a host that starts next to another one
fail at random; so the switch is retried, with short sleeps, until the busy timeout runs out.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Mapping
from typing import Any

_RETRY_SLEEP = 0.01


def open_wal(
    path: str,
    *,
    timeout: float,
    synchronous: str,
    pragmas: Mapping[str, str | int] | None = None,
    **connect: Any,
) -> sqlite3.Connection:
    """Connect with ``busy_timeout``, the extra ``pragmas``, WAL and ``synchronous`` set.

    Raises ``sqlite3.OperationalError`` when the file stays locked for ``timeout`` seconds, and
    ``ValueError`` for a pragma name or value that is not a plain word (they are not quoted)."""
    for name, value in (pragmas or {}).items():
        if not name.isidentifier() or not str(value).replace("-", "").isalnum():
            raise ValueError(f"bad pragma {name!r} = {value!r}")
    if not synchronous.isalnum():
        raise ValueError(f"bad synchronous mode {synchronous!r}")
    conn: sqlite3.Connection = sqlite3.connect(
        path, timeout=timeout, isolation_level=None, **connect
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        for name, value in (pragmas or {}).items():
            conn.execute(f"PRAGMA {name} = {value}")
        deadline = time.monotonic() + timeout
        while True:
            try:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(_RETRY_SLEEP)
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"could not switch to WAL mode (got {mode!r})")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
    except BaseException:
        conn.close()
        raise
    return conn
