"""Child of test_concurrent_open: waits for a shared start time, then opens a store on one
fresh path (``python -m tests.store.open_child KIND PATH START_AT``)."""

from __future__ import annotations

import asyncio
import sys
import time

from isopace.store import SqliteIdempotencyStore, SqliteJournal


async def main(kind: str, path: str, start_at: float) -> None:
    time.sleep(max(start_at - time.time(), 0.0))  # every child opens at the same instant
    if kind == "idempotency":
        await SqliteIdempotencyStore(path).close()
    else:
        journal = SqliteJournal(path)
        await journal.counts()
        await journal.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
