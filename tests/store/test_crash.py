"""Crash tests: a child process runs transactions through a flow with a durable journal and a
ledger stage and is killed with SIGKILL at random points; after each kill, recovery runs and:
nothing is left in doubt, every transaction whose response was returned is journalled as
committed, and the ledger balance equals the sum of the committed captures (no hold left)."""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from isopace.store import recover
from tests.store.crash_child import open_journal
from tests.store.helpers import Ledger, ledger_flow

ROOT = Path(__file__).resolve().parents[2]
KILLS = 20


class Zygote:
    """A pre-imported process that forks a load child per request (see crash_child.zygote)."""

    def __init__(self) -> None:
        env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'src'}")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.store.crash_child", "zygote"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self._line(60) == "zygote"

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise AssertionError("crash child did not answer in time")
        return self.proc.stdout.readline().decode().strip()

    def spawn(self, *args: str) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write((" ".join(args) + "\n").encode())
        self.proc.stdin.flush()
        line = self._line(30)
        if not line.startswith("ready "):
            raise AssertionError(f"crash child failed to start: {line!r}")
        return int(line.split()[1])

    @staticmethod
    def kill(pid: int) -> None:
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.005)
        raise AssertionError(f"child {pid} survived SIGKILL")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


async def _check(journal: object, ledger: Ledger, acks: Path, committed_ids: set[str]) -> None:
    assert await journal.in_doubt(all_nodes=True) == []  # type: ignore[attr-defined]
    acked = set(acks.read_text().split()) if acks.exists() else set()
    missing = acked - committed_ids
    assert not missing, f"acknowledged but not journalled committed: {sorted(missing)[:5]}"
    captured = ledger.holds("captured")
    assert set(captured) == committed_ids, "ledger captures differ from committed transactions"
    assert ledger.holds("held") == {}, "a reservation was left behind"
    assert ledger.balance() == sum(captured.values())


async def _crash_loop(
    spec: str,
    tmp_path: Path,
    committed: callable,  # type: ignore[valid-type]
    kills: int = KILLS,
) -> None:
    ledger_path = tmp_path / "ledger.db"
    acks = tmp_path / "acks.txt"
    rng = random.Random(8583)
    total_recovered = 0
    zygote = Zygote()
    try:
        for round_ in range(kills):
            pid = zygote.spawn(spec, str(ledger_path), str(acks), f"r{round_}")
            time.sleep(rng.uniform(0.05, 0.4))
            zygote.kill(pid)
            journal = open_journal(spec)
            if hasattr(journal, "open"):
                await journal.open()
            ledger = Ledger(ledger_path)
            try:
                report = await recover(ledger_flow(ledger, journal), journal)
                assert not report.failed
                total_recovered += report.total
                again = await recover(ledger_flow(ledger, journal), journal)
                assert again.total == 0  # idempotent
                await _check(journal, ledger, acks, await committed(journal))
            finally:
                ledger.close()
                await journal.close()  # type: ignore[attr-defined]
    finally:
        zygote.close()
    assert acks.exists() and len(acks.read_text().split()) > kills  # real load ran
    assert total_recovered > 0  # some kills did land mid-transaction


@pytest.mark.parametrize("kind", ["sqlite", "sqlite-nowait"])
async def test_sqlite_crash_recovery(tmp_path: Path, kind: str) -> None:
    import sqlite3

    db = tmp_path / "journal.db"

    async def committed(journal: object) -> set[str]:
        conn = sqlite3.connect(db)
        try:
            rows = conn.execute("SELECT tx_id FROM journal WHERE kind = 'COMMITTED'").fetchall()
        finally:
            conn.close()
        return {r[0] for r in rows}

    # wait_final=False is the opt-in variant: fewer kills keep the suite short
    await _crash_loop(f"{kind}:{db}", tmp_path, committed, KILLS if kind == "sqlite" else 10)


async def test_postgres_crash_recovery(tmp_path: Path, pg: tuple[str, str]) -> None:
    dsn, schema = pg

    async def committed(journal: object) -> set[str]:
        rows = await journal.pool.fetch(  # type: ignore[attr-defined]
            f"SELECT tx_id FROM {schema}.journal WHERE kind = 'COMMITTED'"
        )
        return {r[0] for r in rows}

    await _crash_loop(f"postgres:{dsn}#{schema}", tmp_path, committed)
