"""A host killed with SIGKILL under load and restarted on ANOTHER port.

SQLite: the data belongs to one host process at a time (a second one is refused while the first
runs), so the restarted host recovers every transaction the crashed run left, whatever its port or
node name was. PostgreSQL: recovery stays per node; the restarted host under a new default node
(hostname:port) warns with the count of the old node's transactions in doubt and names
``isopace recover --all-nodes``, which then ends them.
"""

from __future__ import annotations

import asyncio
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

from isopace.iso8583 import Message

from .conftest import PG_DSN, REDIS_URL, HostProcess, _env, cli, cli_json, free_port
from .test_crash import load_then_kill


def _captured(db: str, approved: list[tuple[Message, Message]]) -> list[object]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [
            conn.execute(
                "SELECT state FROM holds WHERE terminal = ? AND stan = ? AND tx_time = ?",
                (m[41], m[11], m[7]),
            ).fetchone()
            for m, _ in approved
        ]
    finally:
        conn.close()


def _leave_in_doubt(db: str, node: str) -> list[str]:
    """Run tests/host/in_doubt_child.py and kill it with SIGKILL once it is ready."""
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("in_doubt_child.py")), db, node],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ids = []
        for line in proc.stdout:
            if line.strip() == "ready":
                break
            ids.append(line.strip())
        else:
            raise AssertionError(f"the child ended early: {proc.wait()} {proc.stderr.read()}")  # type: ignore[union-attr]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert len(ids) == 2, ids
    return ids


def test_sqlite_restart_on_another_port_recovers(tmp_path: Path) -> None:
    db = str(tmp_path / "data" / "host.db")
    args = ["--db", db, "--log-level", "WARNING"]
    first = HostProcess(free_port(), args, tmp_path / "serve-0.log").start()
    # a second host on the same data is refused while the first serves it
    second = cli("serve", "--port", str(free_port()), *args, timeout=30)
    assert second.returncode == 2
    assert "in use by another isopace host" in second.stderr, second.stderr
    offline = cli("recover", "--db", db, timeout=30)  # so is the offline recovery
    assert offline.returncode == 2
    assert "in use by another isopace host" in offline.stderr, offline.stderr
    approved = asyncio.run(load_then_kill(first, 6, 1.0))
    assert approved
    # and a run of another node killed in the middle of two transactions
    doubt = _leave_in_doubt(db, "crashed-node:1")
    in_doubt = cli("journal", "--db", db, "--in-doubt", "--json", check=True).stdout
    assert all(tx in in_doubt for tx in doubt), in_doubt
    restarted = HostProcess(free_port(), args, tmp_path / "serve-1.log").start()
    try:
        recovered = re.search(r"recovery: (\d+) committed, (\d+) aborted", restarted.output)
        assert recovered, restarted.output
        assert int(recovered[1]) >= 1 and int(recovered[2]) >= 1, recovered[0]
        for tx_id, outcome in zip(doubt, ("committed", "aborted"), strict=True):
            records = cli("journal", "--db", db, "--id", tx_id, "--json", check=True).stdout
            assert f'"{outcome}"' in records.lower(), records
        in_doubt = cli("journal", "--db", db, "--in-doubt", "--json", check=True).stdout
        assert in_doubt.strip() == "", in_doubt
        ledger = cli_json("ledger", "--db", db)
        assert ledger["ok"], ledger["problems"]
        assert ledger["pending"] == 0
        assert set(_captured(db, approved)) == {("captured",)}
    finally:
        assert restarted.stop() == 0, restarted.output
        first.stop()


def test_postgres_restart_on_another_port_warns_and_recover_all_nodes_ends_them(
    tmp_path: Path, pg_schema: str, pg_card_key: str, redis_prefix: str
) -> None:
    store = ["--postgres", PG_DSN, "--postgres-schema", pg_schema, "--card-key-file", pg_card_key]
    args = [*store, "--redis", REDIS_URL, "--redis-prefix", redis_prefix,
            "--log-level", "WARNING", "--timeout", "1", "--idempotency-lease", "1"]  # fmt: skip
    first = HostProcess(free_port(), args, tmp_path / "serve-0.log").start()
    approved = asyncio.run(load_then_kill(first, 7, 1.0))
    assert approved
    left = cli("journal", *store, "--in-doubt", "--json", check=True).stdout.strip().splitlines()
    assert left
    # the warning counts transactions in doubt for longer than twice the deadline (2 s here)
    import time

    time.sleep(2.5)
    restarted = HostProcess(free_port(), args, tmp_path / "serve-1.log").start()
    try:
        time.sleep(0.5)
        warning = re.search(
            r"(\d+) transaction\(s\) of other node\(s\) \(([^)]*)\)", restarted.output
        )
        assert warning is not None, restarted.output
        assert int(warning.group(1)) == len(left)
        assert f":{first.port}" in warning.group(2)
        assert "isopace recover --all-nodes" in restarted.output
        # per node: the new node did not touch the old node's transactions
        still = cli("journal", *store, "--in-doubt", "--json", check=True).stdout
        assert len(still.strip().splitlines()) == len(left)
    finally:
        assert restarted.stop() == 0, restarted.output
        first.stop()
    # an age filter longer than the transactions' age leaves them alone
    young = cli("recover", *store, "--all-nodes", "--older-than", "3600", check=True)
    assert "recovery: 0 committed, 0 aborted" in young.stdout, young.stdout
    assert len(cli("journal", *store, "--in-doubt", "--json", check=True).stdout.split()) > 0
    cli("recover", *store, "--all-nodes", check=True)
    assert cli("journal", *store, "--in-doubt", "--json", check=True).stdout.strip() == ""
    ledger = cli_json("ledger", *store)
    assert ledger["ok"], ledger["problems"]
    assert ledger["pending"] == 0
