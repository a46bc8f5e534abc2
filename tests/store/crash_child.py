"""Child process of the crash tests: runs transactions until it is killed.

``python -m tests.store.crash_child <journal-spec> <ledger.db> <acks-file> <prefix>``; journal
specs: ``sqlite:<path>``, ``sqlite-nowait:<path>`` (``wait_final=False``),
``postgres:<dsn>#<schema>``. Prints ``ready`` once the flow is built, then runs batches of
concurrent transactions forever and appends the id of every transaction whose response was
returned (outcome COMMITTED) to the acks file, after ``run`` returned.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys

from isopace.flow import Exchange, Outcome
from tests.store.helpers import Ledger, ledger_flow, request


def open_journal(spec: str) -> object:
    kind, _, rest = spec.partition(":")
    if kind in ("sqlite", "sqlite-nowait"):
        from isopace.store import SqliteJournal

        return SqliteJournal(rest, node="crash-test", wait_final=kind == "sqlite")
    if kind == "postgres":
        from isopace.store import PostgresJournal

        dsn, _, schema = rest.partition("#")
        return PostgresJournal(dsn, schema=schema, node="crash-test", min_size=1, max_size=4)
    raise ValueError(spec)


async def main(spec: str, ledger_path: str, acks_path: str, prefix: str) -> None:
    journal = open_journal(spec)
    open_ = getattr(journal, "open", None)
    if open_ is not None:
        await open_()
    ledger = Ledger(ledger_path)
    flow = ledger_flow(ledger, journal)
    acks = os.open(acks_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    print("ready", flush=True)
    n = 0

    async def one(i: int) -> None:
        ex = Exchange(f"{prefix}-{i}", request(i, amount=random.randint(1, 5000)))
        if await flow.run(ex) is Outcome.COMMITTED:
            os.write(acks, f"{ex.id}\n".encode())

    while True:
        await asyncio.gather(*(one(n + k) for k in range(25)))
        n += 25


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
