"""SqliteJournal: rows, protection, group commit, queries, schema migration, bad conditions."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from isopace.flow import CONTINUE, Event, EventKind, Exchange, Flow, Outcome
from isopace.store import SCHEMA_VERSION, JournalError, SchemaError, SqliteJournal, recover
from isopace.store.sqlite_journal import migrate
from tests.store.helpers import PAN, Ledger, approve, ledger_flow, request


def _approve_stage(ex: Exchange) -> object:
    approve(ex)
    return CONTINUE


async def test_rows_protected_and_queries(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    async with SqliteJournal(path, hmac_key="k") as journal:
        flow = Flow(journal=journal).group("main", _Stage("approve", _approve_stage))
        ex = Exchange("tx-1", request())
        assert await flow.run(ex) is Outcome.COMMITTED
        records = await journal.by_id("tx-1")
        assert [r.kind for r in records] == ["BEGIN", "COMMITTING", "COMMITTED"]
        assert records[1].joined == ("approve",)
        assert records[0].pan_masked == "476173******0010"
        assert records[0].request is not None and records[0].request[4] == "000000002500"
        assert records[2].response is not None and records[2].response[39] == "00"
        assert [r.tx_id for r in await journal.by_pan(PAN)] == ["tx-1"] * 3
        now = datetime.now(UTC)
        assert len(await journal.by_time(now - timedelta(minutes=1), now + timedelta(1))) == 3
        assert await journal.by_time(now + timedelta(1), now + timedelta(2)) == []
        counts = await journal.counts()
        assert counts["COMMITTED"] == 1 and counts["IN_DOUBT"] == 0
        assert await journal.in_doubt() == []
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert PAN.encode() not in raw  # no card number anywhere in the files
    assert bytes.fromhex("0123456789ABCDEF").hex().encode() not in raw.lower()


class _Stage:
    def __init__(self, name: str, fn: object) -> None:
        self.name = name
        self.prepare = fn


async def test_group_commit_batches_concurrent_records(tmp_path: Path) -> None:
    async with SqliteJournal(tmp_path / "g.db") as journal:
        flow = Flow(journal=journal).group("main", _Stage("approve", _approve_stage))
        outcomes = await asyncio.gather(
            *(flow.run(Exchange(f"t{i}", request(i))) for i in range(200))
        )
        assert set(outcomes) == {Outcome.COMMITTED}
        await journal.flush()
        stats = journal.stats
        assert stats["rows"] == 600
        assert stats["batches"] < 100  # many records per transaction
        assert (await journal.counts())["COMMITTED"] == 200


async def test_one_fsync_per_event_mode(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with SqliteJournal(path, group_commit=False) as journal:
        flow = Flow(journal=journal).group("main", _Stage("approve", _approve_stage))
        await asyncio.gather(*(flow.run(Exchange(f"t{i}", request(i))) for i in range(20)))
        assert journal.stats == {"rows": 60, "batches": 60}


async def test_record_after_close_and_unserialisable_property(tmp_path: Path) -> None:
    journal = SqliteJournal(tmp_path / "c.db")
    ex = Exchange("x", request())
    ex.set("bad", {1, 2})  # not durable: not journalled
    await journal.record(ex, Event(EventKind.BEGIN))
    await journal.close()
    with pytest.raises(JournalError, match="closed"):
        await journal.record(ex, Event(EventKind.BEGIN))


V1_DDL = """
CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, description TEXT NOT NULL,
    applied_at TEXT NOT NULL);
CREATE TABLE journal (seq INTEGER PRIMARY KEY AUTOINCREMENT, tx_id TEXT NOT NULL,
    kind TEXT NOT NULL, at TEXT NOT NULL, joined TEXT NOT NULL DEFAULT '[]', request TEXT,
    response TEXT, error TEXT);
CREATE INDEX journal_tx ON journal(tx_id);
INSERT INTO schema_migrations VALUES (1, 'journal table', '2026-01-01T00:00:00+00:00');
"""


async def test_migration_from_version_1_file(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    req = '{"mti":"0200","fields":{"4":"000000001000","41":"TERM0001"},"redacted":[2]}'
    conn = sqlite3.connect(path)
    conn.executescript(V1_DDL)
    rows = [
        ("a", "BEGIN", "2026-01-01T10:00:00+00:00", "[]", req),
        ("a", "COMMITTING", "2026-01-01T10:00:01+00:00", '["ledger"]', None),
        ("a", "COMMITTED", "2026-01-01T10:00:02+00:00", '["ledger"]', None),
        ("b", "BEGIN", "2026-01-01T11:00:00+00:00", "[]", req),
        ("c", "BEGIN", "2026-01-01T12:00:00+00:00", "[]", req),
        ("c", "COMMITTING", "2026-01-01T12:00:01+00:00", '["ledger"]', None),
    ]
    conn.executemany(
        "INSERT INTO journal (tx_id, kind, at, joined, request) VALUES (?, ?, ?, ?, ?)", rows
    )
    conn.commit()
    conn.close()

    async with SqliteJournal(path) as journal:
        assert journal.schema_version == SCHEMA_VERSION == 3
        doubt = {d.tx_id: d for d in await journal.in_doubt()}
        assert set(doubt) == {"b", "c"}
        assert not doubt["b"].committing and doubt["c"].committing
        assert doubt["c"].joined == ("ledger",)
        assert doubt["b"].request is not None and doubt["b"].request[4] == "000000001000"
        a = await journal.by_id("a")
        assert a[0].at == datetime(2026, 1, 1, 10, tzinfo=UTC)
        t0 = datetime(2026, 1, 1, 10, 30, tzinfo=UTC)
        assert [r.tx_id for r in await journal.by_time(t0, t0 + timedelta(hours=2))] == [
            "b",
            "c",
            "c",
        ]
        ledger = Ledger(tmp_path / "ledger.db")
        ledger.reserve("b", 1000)
        ledger.reserve("c", 1000)
        report = await recover(ledger_flow(ledger, journal), journal)
        assert sorted(report.committed) == ["c"] and report.aborted == ["b"]
        assert ledger.balance() == 1000 and ledger.holds("released") == {"b": 1000}
        assert await journal.in_doubt() == []
    conn = sqlite3.connect(path)
    assert [r[0] for r in conn.execute("SELECT version FROM schema_migrations")] == [1, 2, 3]
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    # opening again changes nothing
    async with SqliteJournal(path) as journal:
        assert journal.schema_version == 3


_V2_INSERT = """INSERT INTO journal (tx_id, kind, at, at_us, node, joined, durable, request,
    response, pan_masked, pan_hmac, error) VALUES (?1, ?2,
    strftime('%Y-%m-%dT%H:%M:%f+00:00', ?3 / 1000000.0, 'unixepoch'), ?3, ?4, ?5, ?6, ?7, ?8,
    NULL, NULL, NULL)"""


async def test_migration_from_version_2_file(tmp_path: Path) -> None:
    """A version 2 file (every row with its text time, inflight rows holding copies of the
    request and response) opens as version 3: rows, in-doubt state and recovery carry over."""
    path = tmp_path / "v2.db"
    req = '{"mti":"0200","fields":{"4":"000000001000","41":"TERM0001"},"redacted":[2]}'
    resp = '{"mti":"0210","fields":{"39":"00"}}'
    t0 = 1_767_261_600_000_000  # 2026-01-01T10:00:00Z
    conn = sqlite3.connect(path, isolation_level=None)
    assert migrate(conn, upto=2) == 2
    journal_rows = [
        ("a", "BEGIN", t0, "n1", "[]", None, req, None),
        ("a", "COMMITTING", t0 + 1, "n1", '["ledger"]', '{"amount":1000}', None, resp),
        ("a", "COMMITTED", t0 + 2, "n1", '["ledger"]', None, None, resp),
        ("b", "BEGIN", t0 + 3, "n1", "[]", None, req, None),
        ("c", "BEGIN", t0 + 4, "n1", "[]", None, req, None),
        ("c", "COMMITTING", t0 + 5, "n1", '["ledger"]', '{"amount":1000}', None, resp),
        ("d", "BEGIN", t0 + 6, "other", "[]", None, req, None),
    ]
    conn.executemany(_V2_INSERT, journal_rows)
    conn.executemany(
        "INSERT INTO inflight VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            ("b", "began", "n1", t0 + 3, t0 + 3, "[]", None, req, None),
            ("c", "committing", "n1", t0 + 4, t0 + 5, '["ledger"]', '{"amount":1000}', None, resp),
            ("d", "began", "other", t0 + 6, t0 + 6, "[]", None, req, None),
        ],
    )
    conn.close()

    async with SqliteJournal(path, node="n1") as journal:
        assert journal.schema_version == 3
        doubt = {d.tx_id: d for d in await journal.in_doubt(all_nodes=True)}
        assert set(doubt) == {"b", "c", "d"}
        assert not doubt["b"].committing and doubt["c"].committing
        assert doubt["c"].joined == ("ledger",) and doubt["c"].durable == {"amount": 1000}
        assert doubt["c"].response is not None and doubt["c"].response[39] == "00"
        assert doubt["c"].request is not None and doubt["c"].request[4] == "000000001000"
        assert doubt["d"].node == "other"
        assert [d.tx_id for d in await journal.in_doubt()] == ["b", "c"]
        a = await journal.by_id("a")
        assert [r.kind for r in a] == ["BEGIN", "COMMITTING", "COMMITTED"]
        assert a[0].at == datetime(2026, 1, 1, 10, tzinfo=UTC)
        assert a[2].response is not None and a[2].response[39] == "00"
        counts = await journal.counts()
        assert counts["COMMITTED"] == 1 and counts["IN_DOUBT"] == 3
        ledger = Ledger(tmp_path / "ledger.db")
        ledger.reserve("b", 1000)
        ledger.reserve("c", 1000)
        report = await recover(ledger_flow(ledger, journal), journal)
        assert report.committed == ["c"] and report.aborted == ["b"]
        assert ledger.balance() == 1000 and ledger.holds("released") == {"b": 1000}
        assert [d.tx_id for d in await journal.in_doubt(all_nodes=True)] == ["d"]
        # new records after the migration keep the in-doubt state through the triggers
        flow = Flow(journal=journal).group("main", _Stage("approve", _approve_stage))
        assert await flow.run(Exchange("e", request())) is Outcome.COMMITTED
        assert [d.tx_id for d in await journal.in_doubt(all_nodes=True)] == ["d"]
    conn = sqlite3.connect(path)
    assert [r[0] for r in conn.execute("SELECT version FROM schema_migrations")] == [1, 2, 3]
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    seqs = [r[0] for r in conn.execute("SELECT seq FROM journal WHERE tx_id = 'a' ORDER BY seq")]
    assert seqs == [1, 2, 3]  # row identities kept
    conn.close()


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    SqliteJournal(path)._writer.close()
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO schema_migrations VALUES (99, 'future', 'x')")
    conn.commit()
    conn.close()
    with pytest.raises(SchemaError, match="version 99 is newer"):
        SqliteJournal(path)


async def test_disk_full_logged_flow_keeps_running_nothing_corrupted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "full.db"
    SqliteJournal(path)._writer.close()
    pages = sqlite3.connect(path).execute("PRAGMA page_count").fetchone()[0]
    journal = SqliteJournal(path, pragmas={"max_page_count": pages + 2})
    flow = Flow(journal=journal).group("main", _Stage("approve", _approve_stage))
    with caplog.at_level(logging.WARNING):
        outcomes = await asyncio.gather(
            *(flow.run(Exchange(f"t{i}", request(i))) for i in range(300))
        )
    assert set(outcomes) == {Outcome.COMMITTED}  # journal failures never abort
    assert "database or disk is full" in caplog.text
    big = Exchange("big", request())
    big.set("blob", "x" * 50_000, durable=True)  # needs new pages whatever space is left
    with pytest.raises(JournalError, match="database or disk is full"):
        await journal.record(big, Event(EventKind.BEGIN))
    await journal.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    async with SqliteJournal(path) as journal:  # space again: it works
        flow = Flow(journal=journal).group("main", _Stage("approve", _approve_stage))
        assert await flow.run(Exchange("after", request())) is Outcome.COMMITTED
        assert [r.kind for r in await journal.by_id("after")][-1] == "COMMITTED"


def _make_read_only(path: Path) -> None:
    if os.geteuid() == 0:  # root ignores permission bits: use the immutable attribute
        subprocess.run(["chattr", "+i", str(path)], check=True)
    else:
        path.chmod(0o444)
        path.parent.chmod(0o555)


def _make_writable(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        path.parent.chmod(0o755)
        path.chmod(0o644)


async def test_read_only_file_clear_error_flow_keeps_running(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "ro.db"
    async with SqliteJournal(path) as journal:
        flow = Flow(journal=journal).group("main", _Stage("approve", _approve_stage))
        await flow.run(Exchange("before", request()))
    _make_read_only(path)
    try:
        journal = SqliteJournal(path)
        flow = Flow(journal=journal).group("main", _Stage("approve", _approve_stage))
        with caplog.at_level(logging.WARNING):
            assert await flow.run(Exchange("during", request())) is Outcome.COMMITTED
        assert "readonly database" in caplog.text
        with pytest.raises(JournalError, match="readonly database"):
            await journal.record(Exchange("x", request()), Event(EventKind.BEGIN))
        assert [r.kind for r in await journal.by_id("before")][-1] == "COMMITTED"
        await journal.close()
    finally:
        _make_writable(path)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert conn.execute("SELECT count(*) FROM journal WHERE tx_id = 'during'").fetchone()[0] == 0
    conn.close()


async def test_cancelling_one_record_leaves_its_batch_mates_waiting(tmp_path: Path) -> None:
    """Records of one loop iteration share a batch (and its future): cancelling one of them
    cancels that record only; the others still return once the batch is durable."""
    async with SqliteJournal(tmp_path / "c.db") as journal:
        exchanges = [Exchange(f"t{i}", request(i)) for i in range(20)]
        tasks = [
            asyncio.create_task(journal.record(ex, Event(EventKind.BEGIN))) for ex in exchanges
        ]
        await asyncio.sleep(0)  # every task is now waiting on the same batch
        tasks[3].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(results[3], asyncio.CancelledError)
        assert [r for i, r in enumerate(results) if i != 3] == [None] * 19
        assert (await journal.counts())["BEGIN"] == 20  # the cancelled one's row is written too
        assert journal.stats["batches"] == 1


async def test_unawaited_final_records_are_written_by_close(tmp_path: Path) -> None:
    path = tmp_path / "n.db"
    journal = SqliteJournal(path, wait_final=False)
    flow = Flow(journal=journal).group("main", _Stage("approve", _approve_stage))
    assert await flow.run(Exchange("last", request())) is Outcome.COMMITTED
    await journal.close()  # COMMITTED was only queued: close writes it
    async with SqliteJournal(path) as journal:
        assert [r.kind for r in await journal.by_id("last")] == ["BEGIN", "COMMITTING", "COMMITTED"]
        assert await journal.in_doubt() == []


async def test_record_without_request_or_response(tmp_path: Path) -> None:
    async with SqliteJournal(tmp_path / "e.db") as journal:
        ex = Exchange("bare", None)  # type: ignore[arg-type]
        for kind in ("BEGIN", "COMMITTING", "COMMITTED"):
            await journal.record(ex, Event(EventKind[kind]))
        records = await journal.by_id("bare")
        assert [(r.request_json, r.response_json) for r in records] == [(None, None)] * 3
        assert await journal.in_doubt() == []
