"""Kill -9 the host under ``isopace bench`` load, restart it, and check that recovery leaves
nothing in doubt, that every approval a client received is captured (nothing lost), that the
ledger balances (nothing doubled), and that an approved request retransmitted after the crash is
replayed with the same approval code.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import subprocess
import sys
from pathlib import Path

from isopace.iso8583 import ISO87_ASCII, Message
from isopace.net import Client

from .conftest import PAN_BENCH, ROOT, HostProcess, _env, cli, cli_json, free_port

ROUNDS = 3


def purchase(stan: int, terminal: str, tx_time: str) -> Message:
    return Message(
        "0200",
        {
            2: PAN_BENCH,
            3: "000000",
            4: "000000000100",
            7: tx_time,
            11: f"{stan:06d}",
            41: terminal,
            49: "840",
        },
    )


async def load_then_kill(
    host: HostProcess, round_no: int, kill_after: float
) -> list[tuple[Message, Message]]:
    """Eight client workers send purchases; the host is killed while they are in flight."""
    approved: list[tuple[Message, Message]] = []
    stop = False

    async def worker(w: int, client: Client) -> None:
        stan = 0
        while not stop:
            stan += 1
            message = purchase(stan, f"K{round_no:01d}{w:06d}", f"11290{round_no}0000")
            try:
                response = await client.request(message, timeout=5)
            except Exception:
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


def test_kill9_under_bench_load_recovers(tmp_path: Path) -> None:
    db = str(tmp_path / "data" / "host.db")
    port = free_port()
    args = ["--db", db, "--log-level", "WARNING"]
    rng = random.Random(8583)
    bench = None
    approved: list[tuple[Message, Message]] = []
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
            got = asyncio.run(load_then_kill(host, round_no, rng.uniform(0.8, 1.6)))
            assert got, f"round {round_no}: no approval before the kill\n{host.output}"
            approved += got
        assert bench is not None
        bench.terminate()
        bench.wait(30)
        final = HostProcess(port, args, tmp_path / "serve-final.log").start()
        logs.append(final)
        # An approved request sent again after the crash: replayed from the durable store.
        message, response = approved[0]
        before = cli_json("ledger", "--db", db)

        async def resend() -> Message:
            async with Client(ISO87_ASCII, port=port) as client:
                return await client.request(message, timeout=10)

        again = asyncio.run(resend())
        assert again[39] == "00"
        assert again[38] == response[38]
        assert cli_json("ledger", "--db", db)["accounts"] == before["accounts"]
        assert final.stop() == 0, final.output
    finally:
        if bench is not None and bench.poll() is None:
            bench.terminate()
            bench.wait(30)
        for host in logs:
            host.stop()

    recovered = [h.output for h in logs if "recovery:" in h.output]
    print(f"{len(approved)} approvals before kills; recovery ran on {len(recovered)} restarts")

    in_doubt = cli("journal", "--db", db, "--in-doubt", "--json", check=True).stdout
    assert in_doubt.strip() == "", in_doubt
    counts = cli_json("journal", "--db", db, "--counts")
    assert counts["IN_DOUBT"] == 0
    ledger = cli_json("ledger", "--db", db)
    assert ledger["ok"], ledger["problems"]
    assert ledger["pending"] == 0
    # Nothing lost: every approval a client saw is captured in the ledger.
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        for message, _ in approved:
            row = conn.execute(
                "SELECT state FROM holds WHERE terminal = ? AND stan = ? AND tx_time = ?",
                (message[41], message[11], message[7]),
            ).fetchone()
            assert row == ("captured",), (message[41], message[11], row)
        (captured,) = conn.execute(
            "SELECT COALESCE(SUM(amount), 0) FROM captures WHERE refunded_at IS NULL"
        ).fetchone()
    finally:
        conn.close()
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
