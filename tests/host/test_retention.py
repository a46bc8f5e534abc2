"""Journal retention on a real host: ``isopace serve --journal-retention DAYS`` prunes ended
transactions in the background (SQLite and PostgreSQL; with PostgreSQL an older transaction of
another node, in doubt, is kept), and ``isopace journal --prune-before DATE`` does it by hand,
keeping the transactions a host killed with SIGKILL left in doubt. A bad date is a one-line
usage error."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from pathlib import Path
from typing import Any

from isopace.flow import Event, EventKind, Exchange
from isopace.iso8583 import ISO87_ASCII, Message
from isopace.net import Client

from .conftest import PAN_OK, PG_DSN, Backend, cli, cli_json, purchase
from .test_restart import _leave_in_doubt


async def _send(port: int, messages: list[Message]) -> list[str]:
    async with Client(ISO87_ASCII, port=port) as client:
        return [str((await client.request(m, timeout=15)).get(39)) for m in messages]


def _records(backend: Backend) -> int:
    return int(backend.fetch("SELECT count(*) FROM journal")[0][0])


def _leave_other_node_in_doubt(schema: str) -> None:
    from isopace.store import PostgresJournal

    async def run() -> None:
        journal = PostgresJournal(PG_DSN, schema=schema, node="gone-node")
        await journal.open()
        try:
            ex = Exchange("gone-1", purchase(PAN_OK, 100, 99, "TERMGONE"))
            await journal.record(ex, Event(EventKind.BEGIN))
        finally:
            await journal.close()

    asyncio.run(run())


def test_serve_prunes_ended_transactions(spawn: Any, backend: Backend) -> None:
    if backend.kind == "postgres":
        _leave_other_node_in_doubt(backend.schema)
    retention = 2.0 / 86400  # two seconds, in days
    host = spawn(
        *backend.serve,
        "--journal-retention",
        f"{retention:.10f}",
        "--journal-prune-interval",
        "0.2",
    )
    codes = asyncio.run(_send(host.port, [purchase(PAN_OK, 100, n, "TERMRET1") for n in (1, 2)]))
    assert codes == ["00", "00"]
    assert _records(backend) >= 6
    deadline = time.monotonic() + 20
    expected = 1 if backend.kind == "postgres" else 0  # the other node's BEGIN
    while _records(backend) > expected:
        assert time.monotonic() < deadline, f"not pruned: {_records(backend)} records"
        time.sleep(0.2)
    if backend.kind == "postgres":
        assert backend.fetch("SELECT tx_id FROM inflight") == [("gone-1",)]
        assert backend.fetch("SELECT tx_id, kind FROM journal") == [("gone-1", "BEGIN")]
    assert "journal: pruned" in host.output
    # the host goes on serving, and its ledger still balances
    assert asyncio.run(_send(host.port, [purchase(PAN_OK, 100, 3, "TERMRET1")])) == ["00"]
    host.stop()
    assert cli_json("ledger", *backend.store)["ok"]


def test_journal_prune_before_keeps_what_is_in_doubt(spawn: Any, backend: Backend) -> None:
    host = spawn(*backend.serve, "--journal-retention", "0")  # 0: the host never prunes
    codes = asyncio.run(_send(host.port, [purchase(PAN_OK, 100, n, "TERMRET2") for n in (1, 2)]))
    assert codes == ["00", "00"]
    host.stop()
    if backend.kind == "sqlite":
        in_doubt = _leave_in_doubt(backend.db, "killed-node")
    else:
        _leave_other_node_in_doubt(backend.schema)
        in_doubt = ["gone-1"]
    total = _records(backend)
    assert total >= 6 + len(in_doubt)

    yesterday = (dt.datetime.now(dt.UTC) - dt.timedelta(days=1)).date().isoformat()
    nothing = cli_json("journal", *backend.store, "--prune-before", yesterday)
    assert nothing["pruned"] == 0 and _records(backend) == total

    tomorrow = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).date().isoformat()
    out = cli("journal", *backend.store, "--prune-before", tomorrow, check=True).stdout
    assert "journal record(s) of transactions ended before" in out, out
    if backend.kind == "sqlite":  # with Redis, its answers expire by themselves
        assert "expired idempotency answer(s)" in out, out
    left = backend.fetch("SELECT DISTINCT tx_id FROM journal")
    assert sorted(r[0] for r in left) == sorted(in_doubt)
    doubt = cli("journal", *backend.store, "--in-doubt", "--json", check=True).stdout
    assert all(tx in doubt for tx in in_doubt), doubt

    bad = cli("journal", *backend.store, "--prune-before", "31/01/2026")
    assert bad.returncode == 2
    assert "not an ISO 8601 date" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_retention_is_a_flag_and_a_toml_key(tmp_path: Path) -> None:
    from isopace.host.config import load_config
    from isopace.host.errors import ConfigError

    assert load_config().journal_retention == 400.0
    toml = tmp_path / "host.toml"
    toml.write_text("journal_retention = 30\njournal_prune_interval = 60\n")
    cfg = load_config(str(toml))
    assert (cfg.journal_retention, cfg.journal_prune_interval) == (30.0, 60.0)
    assert load_config(str(toml), {"journal_retention": 7.5}).journal_retention == 7.5
    for bad in ("journal_retention = -1\n", "journal_prune_interval = 0\n"):
        toml.write_text(bad)
        try:
            load_config(str(toml))
        except ConfigError as exc:
            assert bad.split(" ")[0] in str(exc)
        else:
            raise AssertionError(f"{bad!r} accepted")
    bad_flag = cli("serve", "--journal-retention", "-3", "--port", "0")
    assert bad_flag.returncode == 2 and "journal_retention" in bad_flag.stderr, bad_flag.stderr
