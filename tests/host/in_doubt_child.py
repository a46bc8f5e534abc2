"""Child of test_restart: leaves two transactions in doubt in a host's SQLite data, the way a
host killed in the middle of them would, then waits to be killed with SIGKILL.

With the SQLite host a transaction's records and ledger writes are committed together unless a
stage suspends in between, so a kill under load rarely leaves anything in doubt. Here the real
flow runs against the real files, and the ledger stalls: one transaction inside its commit pass
(COMMITTING journalled, the hold open), one inside its prepare pass (BEGIN and the hold).

``python tests/host/in_doubt_child.py DB NODE``; prints the two transaction ids, then "ready".
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from isopace.flow import Exchange
from isopace.host.app import build_flow
from isopace.host.config import HostConfig
from isopace.host.keys import default_path
from isopace.host.ledger import SqliteLedger
from isopace.iso8583 import ISO87_ASCII, Message
from isopace.store import SqliteDatabase, SqliteJournal
from isopace.store.keys import KeyRing

PAN = "4000056655665556"


def purchase(stan: int) -> Message:
    return Message(
        "0200",
        {2: PAN, 3: "000000", 4: "000000000700", 7: "1129235959", 11: f"{stan:06d}",
         41: "DOUBT001", 49: "840"},
    )  # fmt: skip


async def main(db: str, node: str) -> None:
    database = SqliteDatabase(db)
    config = HostConfig(db=db)  # the host's key files, as `isopace serve` made them
    ledger = SqliteLedger.on(database, keys=KeyRing.from_file(default_path(config, "card")))
    await ledger.open()
    journal = SqliteJournal.on(
        database, hmac_key=KeyRing.from_file(default_path(config, "journal")), node=node
    )
    flow = build_flow(ledger, spec=ISO87_ASCII, journal=journal)
    stalled = asyncio.Event()

    async def stall(*_: Any) -> Any:
        stalled.set()
        await asyncio.Event().wait()

    reserve = ledger.reserve

    async def reserve_then_stall(*args: Any, **kwargs: Any) -> Any:
        await reserve(*args, **kwargs)
        await stall()

    tasks = []
    for n, (name, patch) in enumerate(
        [("capture", stall), ("reserve", reserve_then_stall)], start=1
    ):
        setattr(ledger, name, patch)
        stalled.clear()
        ex = Exchange(f"doubt-{node}-{n}", purchase(n))
        tasks.append(asyncio.create_task(flow.run(ex)))
        await stalled.wait()
        print(ex.id, flush=True)
    database.commit()
    await database.synced()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
