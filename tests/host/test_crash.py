"""Kill -9 the host under ``isopace bench`` load, restart it, and check (on SQLite, and on
PostgreSQL + Redis) that recovery leaves nothing in doubt, that every approval a client received
is captured (nothing lost: an authorization by its completion), that the ledger balances
(nothing doubled), and that an approved request retransmitted after the crash is replayed with
the same approval code.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
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
REFUND = "200000"
#: What a partial reversal of a 1.00 purchase of the mix leaves standing (DE 95).
STANDING = 40
#: What the completion (0220) of a 1.00 authorization of the mix captures (the rest released).
COMPLETED = 70


def partial_reversal(original: Message, stan: int) -> Message:
    """An 0400 of ``original`` (DE 90: its MTI, STAN, DE 7) leaving ``STANDING`` (DE 95)."""
    return purchase(PAN_BENCH, 100, stan, original[41], original[7], mti="0400").set_many(
        {
            90: f"0200{original[11]}{original[7]}" + "0" * 22,
            95: f"{STANDING:012d}" + "0" * 30,
        }
    )


def completion(original: Message, stan: int) -> Message:
    """An 0220 of the authorization ``original`` (DE 90: its MTI, STAN, DE 7) for
    ``COMPLETED``."""
    return purchase(PAN_BENCH, COMPLETED, stan, original[41], original[7], mti="0220").set(
        90, f"0100{original[11]}{original[7]}" + "0" * 22
    )


@dataclasses.dataclass
class Mix:
    """What the clients of the crash test saw: approvals, partial reversals and completions
    answered 00, and the requests of each kind left without an answer by a kill."""

    approved: list[tuple[Message, Message]] = dataclasses.field(default_factory=list)
    reversed: list[tuple[Message, Message]] = dataclasses.field(default_factory=list)
    completed: list[tuple[Message, Message]] = dataclasses.field(default_factory=list)
    unanswered: list[Message] = dataclasses.field(default_factory=list)
    unanswered_reversals: list[tuple[Message, Message]] = dataclasses.field(default_factory=list)
    unanswered_completions: list[tuple[Message, Message]] = dataclasses.field(default_factory=list)


async def load_then_kill(
    host: HostProcess, round_no: int, kill_after: float, mix: Mix | None = None
) -> list[tuple[Message, Message]]:
    """Eight client workers send purchases (two of them as repeats, 0201, whose original never
    came; two partially reverse each purchase approved); two send authorizations, 0100, and
    complete each one approved, 0220, for less; two send refunds, DE 3 = 20. The host is killed
    while they are in flight. Returns the approvals received; the rest goes to ``mix``."""
    approved: list[tuple[Message, Message]] = []
    stop = False

    async def worker(w: int, client: Client) -> None:
        stan = 0
        while not stop:
            stan += 1
            terminal, tx_time = f"K{round_no:01d}{w:06d}", f"11290{round_no}0000"
            mti = "0201" if w % 4 == 0 else "0100" if w % 4 == 2 and mix is not None else "0200"
            message = purchase(PAN_BENCH, 100, stan, terminal, tx_time, mti=mti)
            if w % 4 == 3 and mix is not None:
                message = message.set(3, REFUND)
            try:
                response = await client.request(message, timeout=5)
            except Exception:
                if mix is not None:
                    mix.unanswered.append(message)
                return
            if response[39] != "00":
                continue
            approved.append((message, response))
            if mix is None or w % 4 not in (1, 2):
                continue
            stan += 1
            if w % 4 == 2:
                advice = completion(message, stan)
                try:
                    answer = await client.request(advice, timeout=5)
                except Exception:
                    mix.unanswered_completions.append((message, advice))
                    return
                assert (answer[39], answer[38]) == ("00", response[38]), answer
                mix.completed.append((message, advice))
                continue
            reversal = partial_reversal(message, stan)
            try:
                answer = await client.request(reversal, timeout=5)
            except Exception:
                mix.unanswered_reversals.append((message, reversal))
                return
            assert answer[39] == "00", answer
            mix.reversed.append((message, reversal))

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
    mix = Mix()
    unanswered = mix.unanswered
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
            got = asyncio.run(load_then_kill(host, round_no, rng.uniform(0.8, 1.6), mix))
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
        again = asyncio.run(resend([r for _, r in mix.reversed]))
        assert {r[39] for r in again} <= {"00"}  # replayed: nothing reversed twice
        assert cli_json("ledger", *store)["accounts"] == before["accounts"]
        retried = asyncio.run(resend(unanswered))
        assert {r[39] for r in retried} <= {"00"}, {r[39] for r in retried}
        retried = asyncio.run(resend([r for _, r in mix.unanswered_reversals]))
        assert {r[39] for r in retried} <= {"00"}, {r[39] for r in retried}
        after_retries = cli_json("ledger", *store)
        again = asyncio.run(resend([c for _, c in mix.completed]))
        assert {r[39] for r in again} <= {"00"}  # replayed: nothing captured twice
        assert cli_json("ledger", *store)["accounts"] == after_retries["accounts"]
        retried = asyncio.run(resend([c for _, c in mix.unanswered_completions]))
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
    amounts = {}
    for terminal, stan, tx_time, state, amount in backend.fetch(
        "SELECT terminal, stan, tx_time, state, amount FROM holds"
    ):
        holds[terminal, stan, tx_time].append(state)
        amounts[terminal, stan, tx_time] = amount
    for message, _ in approved:
        states = holds[message[41], message[11], message[7]]
        expected = "credited" if message[3] == REFUND else "captured"
        assert states == [expected], (message[41], message[11], states)
    # every partial reversal answered (before the kills, or retried after) applied once
    for message, _ in mix.reversed + mix.unanswered_reversals:
        assert amounts[message[41], message[11], message[7]] == STANDING, message[11]
    # every completion answered (before the kills, or retried after) captured its
    # authorization once, at its amount, the rest released (held is checked by ``ok``)
    for message, _ in mix.completed + mix.unanswered_completions:
        key = message[41], message[11], message[7]
        assert (holds[key], amounts[key]) == (["captured"], COMPLETED), message[11]
    # no completion was posted as a stand-in capture of its own: each found its authorization
    assert backend.fetch("SELECT txn_id FROM holds WHERE mti = '0220'") == []
    repeats = sum(1 for m, _ in approved if m.mti == "0201")
    refunds = sum(1 for m, _ in approved if m[3] == REFUND)
    print(
        f"{repeats} repeats, {refunds} refunds approved, {len(mix.reversed)} partial reversals, "
        f"{len(mix.completed)} completions ({len(mix.unanswered_completions)} unanswered)"
    )
    assert repeats and refunds and mix.reversed and mix.completed
    doubled = backend.fetch(
        "SELECT terminal, stan, tx_time, COUNT(*) FROM holds "
        "WHERE state IN ('captured', 'credited') "
        "GROUP BY terminal, stan, tx_time HAVING COUNT(*) > 1"
    )
    assert doubled == []  # nothing captured or credited twice for one request
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
    mix = Mix()
    approved = asyncio.run(load_then_kill(host, 5, 1.0, mix))
    unanswered = mix.unanswered
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
