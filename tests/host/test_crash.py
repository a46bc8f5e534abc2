"""Kill -9 the host under ``isopace bench`` load, restart it, and check (on SQLite, and on
PostgreSQL + Redis) that recovery leaves nothing in doubt, that every approval a client received
is captured (nothing lost), that the ledger balances (nothing doubled), and that an approved
request retransmitted after the crash is replayed with the same approval code.
"""

from __future__ import annotations

import asyncio
import collections
import random
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from isopace.iso8583 import ISO87_ASCII, Message
from isopace.net import Client

from .conftest import (
    PAN_BENCH,
    ROOT,
    Backend,
    HostProcess,
    _env,
    cli,
    cli_json,
    free_port,
    purchase,
)

ROUNDS = 3


async def load_then_kill(
    host: HostProcess, round_no: int, kill_after: float, unanswered: list[Message] | None = None
) -> list[tuple[Message, Message]]:
    """Eight client workers send purchases; the host is killed while they are in flight.
    Returns the approvals received; the requests left without an answer go to ``unanswered``."""
    approved: list[tuple[Message, Message]] = []
    stop = False

    async def worker(w: int, client: Client) -> None:
        stan = 0
        while not stop:
            stan += 1
            terminal, tx_time = f"K{round_no:01d}{w:06d}", f"11290{round_no}0000"
            message = purchase(PAN_BENCH, 100, stan, terminal, tx_time)
            try:
                response = await client.request(message, timeout=5)
            except Exception:
                if unanswered is not None:
                    unanswered.append(message)
                return
            if response[39] == "00":
                approved.append((message, response))

    async with Client(ISO87_ASCII, port=host.port, reconnect=False) as client:
        tasks = [asyncio.create_task(worker(w, client)) for w in range(8)]
        await asyncio.sleep(kill_after)
        await asyncio.to_thread(host.kill9)
        stop = True
        await asyncio.gather(*tasks)
    return approved


def test_kill9_under_bench_load_recovers(tmp_path: Path, backend: Backend) -> None:
    """On SQLite, and on PostgreSQL (ledger, journal) + Redis (idempotency)."""
    store = backend.store
    port = free_port()
    args = [*backend.serve, "--log-level", "WARNING", "--idempotency-lease", "1"]
    rng = random.Random(8583)
    bench = None
    approved: list[tuple[Message, Message]] = []
    unanswered: list[Message] = []
    logs = []
    try:
        for round_no in range(ROUNDS):
            host = HostProcess(port, args, tmp_path / f"serve-{round_no}.log").start()
            logs.append(host)
            if bench is None:  # one bench run across all the crashes and restarts
                bench = subprocess.Popen(
                    [sys.executable, "-m", "isopace", "bench", "--port", str(port),
                     "--concurrency", "16", "--duration", "60", "--timeout", "5", "--json"],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=ROOT,
                )  # fmt: skip
            got = asyncio.run(load_then_kill(host, round_no, rng.uniform(0.8, 1.6), unanswered))
            assert got, f"round {round_no}: no approval before the kill\n{host.output}"
            approved += got
        assert bench is not None
        bench.terminate()
        bench.wait(30)
        final = HostProcess(port, args, tmp_path / "serve-final.log").start()
        logs.append(final)
        # Every request sent again after the crashes (the claims of the dead runs have expired):
        # approvals are replayed with their approval code, and a request that was in flight at a
        # kill is either recognised (recovery committed it: same answer, no second debit) or
        # processed afresh (recovery rolled it back).
        time.sleep(1.5)
        before = cli_json("ledger", *store)

        async def resend(messages: list[Message]) -> list[Message]:
            async with Client(ISO87_ASCII, port=port) as client:
                return list(
                    await asyncio.gather(*(client.request(m, timeout=15) for m in messages))
                )

        again = asyncio.run(resend([m for m, _ in approved]))
        assert [r[38] for r in again] == [r[38] for _, r in approved]
        assert cli_json("ledger", *store)["accounts"] == before["accounts"]
        retried = asyncio.run(resend(unanswered))
        assert {r[39] for r in retried} <= {"00"}, {r[39] for r in retried}
        assert final.stop() == 0, final.output
    finally:
        if bench is not None and bench.poll() is None:
            bench.terminate()
            bench.wait(30)
        for host in logs:
            host.stop()

    recovered = [h.output for h in logs if "recovery:" in h.output]
    print(f"{len(approved)} approvals before kills; recovery ran on {len(recovered)} restarts")

    in_doubt = cli("journal", *store, "--in-doubt", "--json", check=True).stdout
    assert in_doubt.strip() == "", in_doubt
    counts = cli_json("journal", *store, "--counts")
    assert counts["IN_DOUBT"] == 0
    ledger = cli_json("ledger", *store)
    assert ledger["ok"], ledger["problems"]
    assert ledger["pending"] == 0
    # Nothing lost: every approval a client saw is captured in the ledger.
    holds = collections.defaultdict(list)
    for terminal, stan, tx_time, state in backend.fetch(
        "SELECT terminal, stan, tx_time, state FROM holds"
    ):
        holds[terminal, stan, tx_time].append(state)
    for message, _ in approved:
        states = holds[message[41], message[11], message[7]]
        assert states == ["captured"], (message[41], message[11], states)
    doubled = backend.fetch(
        "SELECT terminal, stan, tx_time, COUNT(*) FROM holds WHERE state = 'captured' "
        "GROUP BY terminal, stan, tx_time HAVING COUNT(*) > 1"
    )
    assert doubled == []  # nothing captured twice for one request
    retry_states = collections.Counter(tuple(sorted(holds[m[41], m[11], m[7]])) for m in unanswered)
    print("requests in flight at the kills, hold states after the retry:", dict(retry_states))
    ((captured,),) = backend.fetch(
        "SELECT COALESCE(SUM(amount), 0) FROM captures WHERE refunded_at IS NULL"
    )
    bench_account = next(a for a in ledger["accounts"] if a["id"] == "ACC-9000")
    assert bench_account["balance"] == bench_account["opening"] - captured


def test_offline_recover_command(tmp_path: Path) -> None:
    db = str(tmp_path / "data" / "host.db")
    port = free_port()
    host = HostProcess(port, ["--db", db, "--log-level", "WARNING"], tmp_path / "s.log").start()
    got = asyncio.run(load_then_kill(host, 7, 1.0))
    assert got
    proc = cli("recover", "--db", db, "--port", str(port), check=True)
    assert "recovery:" in proc.stdout
    assert "ledger balances" in proc.stdout
    assert cli("journal", "--db", db, "--in-doubt", "--json", check=True).stdout.strip() == ""
    again = cli("recover", "--db", db, "--port", str(port), check=True)  # idempotent
    assert "recovery: 0 committed, 0 aborted, 0 failed" in again.stdout
    ledger = cli_json("ledger", "--db", db)
    assert ledger["ok"] and ledger["pending"] == 0


def test_retransmissions_after_a_crash_do_not_wait_for_the_lease(tmp_path: Path) -> None:
    """With a long lease (60 s), requests retransmitted right after a kill -9 and restart are
    answered at once: the restarted host takes over the claims its crashed run left, recovery
    stores the responses of the transactions it committed, approvals are replayed with their
    approval code and nothing is captured twice."""
    db = str(tmp_path / "data" / "host.db")
    port = free_port()
    args = ["--db", db, "--log-level", "WARNING", "--idempotency-lease", "60"]
    host = HostProcess(port, args, tmp_path / "serve-0.log").start()
    unanswered: list[Message] = []
    approved = asyncio.run(load_then_kill(host, 5, 1.0, unanswered))
    assert approved
    final = HostProcess(port, args, tmp_path / "serve-1.log").start()
    try:

        async def resend(messages: list[Message]) -> tuple[list[Message], float]:
            t0 = time.monotonic()
            async with Client(ISO87_ASCII, port=port) as client:
                got = await asyncio.gather(*(client.request(m, timeout=20) for m in messages))
            return list(got), time.monotonic() - t0

        again, took = asyncio.run(resend([m for m, _ in approved] + unanswered))
        assert took < 15, f"retransmissions waited {took:.1f} s (the lease is 60 s)"
        assert [r[38] for r in again[: len(approved)]] == [r[38] for _, r in approved]
        assert {r[39] for r in again} <= {"00"}, {r[39] for r in again}
        assert final.stop() == 0, final.output
    finally:
        host.stop()
        final.stop()
    assert cli("journal", "--db", db, "--in-doubt", "--json", check=True).stdout.strip() == ""
    ledger = cli_json("ledger", "--db", db)
    assert ledger["ok"], ledger["problems"]
    assert ledger["pending"] == 0
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        doubled = conn.execute(
            "SELECT terminal, stan, tx_time, COUNT(*) FROM holds WHERE state = 'captured' "
            "GROUP BY terminal, stan, tx_time HAVING COUNT(*) > 1"
        ).fetchall()
    finally:
        conn.close()
    assert doubled == []
