"""Two ``isopace serve`` processes on two ports sharing PostgreSQL (ledger, journal) and Redis
(idempotency): each duplicate sent to both is processed once, a reversal on one host refunds a
purchase made on the other, and a host killed with SIGKILL under load recovers its transactions on
restart while the other keeps serving. The services must be up (``.ci/run`` starts them): the test
fails, never skips, when they are not.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import time

from isopace.iso8583 import ISO87_ASCII, Message
from isopace.net import Client

from .conftest import (
    PAN_BENCH,
    PAN_LOW,
    PAN_MC,
    PG_DSN,
    REDIS_URL,
    ROOT,
    _env,
    cli,
    cli_json,
    free_port,
    purchase,
)


async def ask(port: int, messages: list[Message]) -> list[Message]:
    async with Client(ISO87_ASCII, port=port) as client:
        return list(await asyncio.gather(*(client.request(m, timeout=15) for m in messages)))


def test_two_hosts_share_postgres_and_redis(
    spawn, pg_schema: str, pg_card_key: str, redis_prefix: str
) -> None:  # type: ignore[no-untyped-def]
    store = ["--postgres", PG_DSN, "--postgres-schema", pg_schema, "--card-key-file", pg_card_key]
    shared = [
        *store,
        "--redis",
        REDIS_URL,
        "--redis-prefix",
        redis_prefix,
        "--log-level",
        "WARNING",
        "--idempotency-lease",
        "1",
    ]
    port_a = free_port()
    a = spawn(*shared, "--node", "node-a", port=port_a)
    b = spawn(*shared, "--node", "node-b")

    def ledger() -> dict[str, dict[str, int]]:
        data = cli_json("ledger", *store)
        assert data["ok"], data["problems"]
        return {acc["id"]: acc for acc in data["accounts"]}

    opening = ledger()
    assert set(opening) >= {"ACC-1001", "ACC-1002", "ACC-9000"}  # seeded once, by either host

    # Duplicates: 20 distinct purchases, each sent to both hosts at the same time.
    messages = [purchase(PAN_MC, 100, 100 + i, "TERMDUP1", "1129150000") for i in range(20)]

    async def both() -> tuple[list[Message], list[Message]]:
        ra, rb = await asyncio.gather(ask(a.port, messages), ask(b.port, messages))
        return ra, rb

    ra, rb = asyncio.run(both())
    assert [m[39] for m in ra] == ["00"] * 20
    assert [m[38] for m in ra] == [m[38] for m in rb]  # one processing, replayed to the other
    after = ledger()
    assert after["ACC-1002"]["balance"] == opening["ACC-1002"]["balance"] - 20 * 100
    assert after["ACC-1002"]["held"] == 0

    # Declines and a reversal across hosts.
    low = asyncio.run(ask(b.port, [purchase(PAN_LOW, 5000, 1, "TERMDUP2", "1129150101")]))
    assert low[0][39] == "51"
    original = purchase(PAN_MC, 700, 31, "TERMREVX", "1129150202")
    assert asyncio.run(ask(a.port, [original]))[0][39] == "00"
    reversal = Message(
        "0400",
        {
            2: PAN_MC,
            3: "000000",
            4: "000000000700",
            7: "1129150203",
            11: "000032",
            41: "TERMREVX",
            90: "0200" + "000031" + "1129150202" + "0" * 22,
        },
    )
    assert asyncio.run(ask(b.port, [reversal]))[0][39] == "00"
    assert asyncio.run(ask(a.port, [reversal]))[0][39] == "00"  # retransmitted to the other host
    assert ledger()["ACC-1002"]["balance"] == after["ACC-1002"]["balance"]

    # Kill -9 host A under bench load (host B keeps serving), restart it, recover.
    bench = subprocess.Popen(
        [sys.executable, "-m", "isopace", "bench", "--port", str(port_a), "--concurrency", "8",
         "--duration", "4", "--timeout", "5", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=ROOT,
    )  # fmt: skip
    approved: list[Message] = []
    unanswered: list[Message] = []

    async def load_and_kill() -> None:
        stop = False

        async def worker(w: int, port: int, host: int) -> None:
            stan = 0
            async with Client(ISO87_ASCII, port=port, reconnect=False) as client:
                while not stop:
                    stan += 1
                    m = purchase(PAN_BENCH, 100, stan, f"KP{host:02d}{w:04d}", "1129160000")
                    try:
                        response = await client.request(m, timeout=10)
                    except Exception:
                        unanswered.append(m)
                        return
                    if response[39] == "00":
                        approved.append(m)

        # terminals differ per host and worker: the retransmission below sends them all at once
        tasks = [
            asyncio.create_task(worker(w, p, host))
            for w in range(4)
            for host, p in enumerate((a.port, b.port))
        ]
        await asyncio.sleep(random.uniform(1.0, 1.5))
        await asyncio.to_thread(a.kill9)
        await asyncio.sleep(0.5)
        stop = True
        await asyncio.gather(*tasks)

    asyncio.run(load_and_kill())
    bench.wait(60)
    restarted = spawn(*shared, "--node", "node-a", port=port_a)
    # Quiesce: host B's own transactions finish; node A's in-doubt ones were recovered at start.
    assert asyncio.run(ask(restarted.port, [purchase(PAN_MC, 1, 1, "TERMLAST", "1129170000")]))
    in_doubt = cli("journal", *store, "--in-doubt", "--json", check=True).stdout
    assert in_doubt.strip() == "", in_doubt
    data = cli_json("ledger", *store)
    assert data["ok"], data["problems"]
    assert data["pending"] == 0
    assert approved

    async def states() -> list[str]:
        import asyncpg

        conn = await asyncpg.connect(PG_DSN)
        try:
            rows = await conn.fetch(
                f"SELECT terminal, stan FROM {pg_schema}.holds WHERE state = 'captured' "
                "AND tx_time = '1129160000'"
            )
        finally:
            await conn.close()
        captured = {(r["terminal"], r["stan"]) for r in rows}
        return [f"{m[41]}/{m[11]}" for m in approved if (m[41], m[11]) not in captured]

    assert asyncio.run(states()) == []  # every approval a client saw is captured

    # Everything sent again to host B after A's claims expired: nothing is captured twice.
    time.sleep(1.5)
    retried = asyncio.run(ask(b.port, approved + unanswered))
    assert {r[39] for r in retried} <= {"00"}

    async def doubled() -> list[object]:
        import asyncpg

        conn = await asyncpg.connect(PG_DSN)
        try:
            return list(
                await conn.fetch(
                    f"SELECT terminal, stan FROM {pg_schema}.holds WHERE state = 'captured' "
                    "AND tx_time = '1129160000' GROUP BY terminal, stan HAVING COUNT(*) > 1"
                )
            )
        finally:
            await conn.close()

    assert asyncio.run(doubled()) == []
    assert cli_json("ledger", *store)["ok"]
