"""Child process of the crash tests: runs transactions until it is killed.

``python -m tests.store.crash_child <journal-spec> <ledger.db> <acks-file> <prefix>``; journal
specs: ``sqlite:<path>``, ``sqlite-nowait:<path>`` (``wait_final=False``),
``postgres:<dsn>#<schema>``. Prints ``ready`` once the flow is built, then runs batches of
concurrent transactions forever and appends the id of every transaction whose response was
returned (outcome COMMITTED) to the acks file, after ``run`` returned. ``zygote`` mode (see
:func:`zygote`) forks such children on demand.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
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
    print(f"ready {os.getpid()}", flush=True)
    n = 0

    async def one(i: int) -> None:
        ex = Exchange(f"{prefix}-{i}", request(i, amount=random.randint(1, 5000)))
        if await flow.run(ex) is Outcome.COMMITTED:
            os.write(acks, f"{ex.id}\n".encode())

    while True:
        await asyncio.gather(*(one(n + k) for k in range(25)))
        n += 25


def zygote() -> None:
    """Import everything once, then fork one load child per line read from stdin (the line holds
    ``main``'s four arguments); children print ``ready <pid>`` (or ``failed``). Forking from a
    process without an event loop is safe, and it spares each restart the interpreter start-up
    and imports, which keeps 20+ kills quick."""
    import traceback

    import isopace.store.postgres.journal  # noqa: F401  (preloaded for the children)

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps killed children
    print("zygote", flush=True)
    for line in sys.stdin:
        args = line.split()
        if os.fork() == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            random.seed()
            try:
                asyncio.run(main(*args))
            except BaseException:
                traceback.print_exc()
                print("failed", flush=True)
            finally:
                os._exit(1)


if __name__ == "__main__":
    if sys.argv[1:] == ["zygote"]:
        zygote()
    else:
        asyncio.run(main(*sys.argv[1:5]))
