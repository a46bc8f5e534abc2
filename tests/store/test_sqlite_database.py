"""SqliteDatabase: inline writes batched per loop iteration, savepoints, group sync, failures,
and the shared journal / idempotency store / recovery on one file."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from isopace.flow import CONTINUE, Exchange, Flow, Outcome
from isopace.iso8583 import Message
from isopace.store import (
    IdempotencyError,
    JournalError,
    SqliteDatabase,
    SqliteIdempotencyStore,
    SqliteJournal,
    StoreError,
)
from tests.store.helpers import PAN, approve, request
from tests.store.test_crash import ROOT


def _table(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY, v INTEGER NOT NULL)")


def _put(conn: sqlite3.Connection, key: str, value: int | None = 1) -> int:
    return conn.execute("INSERT INTO t VALUES (?, ?)", (key, value)).rowcount


def _rows(path: Path) -> dict[str, int]:
    conn = sqlite3.connect(path)
    try:
        return dict(conn.execute("SELECT k, v FROM t").fetchall())
    finally:
        conn.close()


@pytest.fixture
async def db(tmp_path: Path) -> Any:
    database = SqliteDatabase(tmp_path / "d.db")
    database.setup(_table)
    yield database
    await database.close()


async def test_writes_of_one_iteration_share_a_transaction(db: SqliteDatabase) -> None:
    before = db.commits
    for key in "abc":
        db.write(_put, key)
    assert db.commits == before  # still open: another connection sees nothing yet
    assert _rows(Path(db.path)) == {}
    assert db.read(lambda c: c.execute("SELECT count(*) FROM t").fetchone()[0]) == 3
    await asyncio.sleep(0)  # the next iteration commits
    assert db.commits == before + 1
    assert _rows(Path(db.path)) == {"a": 1, "b": 1, "c": 1}


async def test_a_failing_write_is_rolled_back_alone(db: SqliteDatabase) -> None:
    db.write(_put, "a")
    with pytest.raises(StoreError, match="NOT NULL"):
        db.write(_put, "b", None)

    def half_then_fail(conn: sqlite3.Connection) -> None:
        _put(conn, "c")
        raise ValueError("the stage's own error")

    with pytest.raises(ValueError, match="own error"):
        db.write(half_then_fail)
    db.write(_put, "d")
    await asyncio.sleep(0)
    assert _rows(Path(db.path)) == {"a": 1, "d": 1}


def _put_many(conn: sqlite3.Connection, rows: list[tuple[str, int | None]]) -> int:
    sql = "INSERT INTO t VALUES " + ",".join(["(?, ?)"] * len(rows))
    return conn.execute(sql, [x for row in rows for x in row]).rowcount


async def test_a_failing_single_statement_write_is_undone_alone_without_a_savepoint(
    db: SqliteDatabase,
) -> None:
    """``single=True``: one statement, SQLite's own statement rollback (triggers included)."""
    db.setup(
        lambda c: c.executescript(
            "CREATE TABLE seen (k TEXT PRIMARY KEY);"
            "CREATE TRIGGER t_seen AFTER INSERT ON t BEGIN INSERT INTO seen VALUES (new.k); END;"
        )
    )
    statements: list[str] = []
    db.conn.set_trace_callback(statements.append)
    db.write(_put, "a")  # with a savepoint
    assert db.write(_put_many, [("b", 1), ("c", 1)], single=True) == 2
    with pytest.raises(StoreError, match="NOT NULL"):  # the 2nd row fails: the 1st is undone
        db.write(_put_many, [("d", 1), ("e", None)], single=True)
    with pytest.raises(StoreError, match="UNIQUE"):
        db.write(_put, "a", single=True)
    db.write(_put, "f", single=True)
    db.conn.set_trace_callback(None)
    assert sum("SAVEPOINT" in x for x in statements) == 1  # the first write's only
    await asyncio.sleep(0)
    assert _rows(Path(db.path)) == {"a": 1, "b": 1, "c": 1, "f": 1}
    seen = db.read(lambda c: sorted(k for (k,) in c.execute("SELECT k FROM seen")))
    assert seen == ["a", "b", "c", "f"]  # no trigger change of a failed statement is left


async def test_synced_waits_for_the_open_batch_and_groups_syncs(db: SqliteDatabase) -> None:
    db.write(_put, "first")
    await db.synced()
    assert db.syncs >= 1
    assert _rows(Path(db.path)) == {"first": 1}

    async def writer(n: int) -> None:
        await db.call(_put, f"k{n}", durable=True)

    syncs = db.syncs
    await asyncio.gather(*(writer(n) for n in range(200)))
    assert len(_rows(Path(db.path))) == 201
    assert db.syncs - syncs < 20  # 200 durable writes, a handful of fsyncs
    await db.synced()  # nothing new: returns at once


async def test_writes_made_while_a_sync_runs_share_one_commit_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch opened during an fdatasync commits when the sync ends, however many iterations
    its writes span: one commit, then one more sync for them; a waiter returns only then."""
    import threading

    entered, release = threading.Event(), threading.Event()
    real = os.fdatasync

    def held(fd: int) -> None:
        entered.set()
        release.wait(10)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", held)
    database = SqliteDatabase(tmp_path / "s.db")  # its sync thread uses `held`
    try:
        database.setup(_table)
        first = asyncio.ensure_future(database.call(_put, "first", durable=True))
        while not entered.is_set():
            await asyncio.sleep(0.001)
        commits = database.commits
        later = []
        for n in range(5):  # five iterations' writes while the sync is held
            later.append(asyncio.ensure_future(database.call(_put, f"k{n}", durable=True)))
            await asyncio.sleep(0)
        assert database.commits == commits  # kept open: nothing of them can be on disk yet
        assert _rows(tmp_path / "s.db") == {"first": 1}
        assert not any(f.done() for f in later)
        release.set()
        await first
        await asyncio.gather(*later)
        assert database.commits == commits + 1  # the five iterations, one commit
        assert len(_rows(tmp_path / "s.db")) == 6
    finally:
        release.set()
        await database.close()


async def test_normal_mode_never_syncs(tmp_path: Path) -> None:
    database = SqliteDatabase(tmp_path / "n.db", synchronous="NORMAL")
    try:
        database.setup(_table)
        await database.call(_put, "a", durable=True)
        assert database.syncs == 0
    finally:
        await database.close()


async def test_a_failed_sync_fails_the_waiters_and_every_later_call(
    db: SqliteDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    await db.call(_put, "a", durable=True)

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", broken)
    # the sync thread looked the function up when it started: start a new database
    database = SqliteDatabase(db.path)
    try:
        database.write(_put, "b")
        with pytest.raises(StoreError, match="Input/output error"):
            await database.synced()
        with pytest.raises(StoreError, match="restart to recover"):
            database.write(_put, "c")
    finally:
        await database.close()


async def test_a_failed_commit_fails_every_later_call(db: SqliteDatabase) -> None:
    class FailingCommit:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def execute(self, sql: str, *args: Any) -> Any:
            if sql == "COMMIT":
                raise sqlite3.OperationalError("disk I/O error")
            return self.conn.execute(sql, *args)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.conn, name)

    real = db.conn
    db.conn = FailingCommit(real)  # type: ignore[assignment]
    db.write(_put, "a")
    waiter = asyncio.ensure_future(db.synced())
    await asyncio.sleep(0)
    with pytest.raises(StoreError, match="disk I/O error"):
        await waiter
    with pytest.raises(StoreError, match="commit or sync failed"):
        db.write(_put, "b")
    db.conn = real
    assert _rows(Path(db.path)) == {}


async def test_setup_commits_the_open_batch_first(db: SqliteDatabase) -> None:
    db.write(_put, "a")
    db.setup(lambda c: c.executescript("CREATE TABLE u (x); INSERT INTO u VALUES (1);"))
    assert _rows(Path(db.path)) == {"a": 1}


async def test_closed_database_refuses_writes(tmp_path: Path) -> None:
    database = SqliteDatabase(tmp_path / "c.db")
    database.setup(_table)
    database.write(_put, "a")
    await database.close()  # commits and syncs what was written
    assert _rows(tmp_path / "c.db") == {"a": 1}
    with pytest.raises(StoreError, match="closed"):
        database.write(_put, "b")


def test_without_a_loop_a_write_commits_at_once(tmp_path: Path) -> None:
    database = SqliteDatabase(tmp_path / "s.db")
    database.setup(_table)
    database.write(_put, "a")
    assert _rows(tmp_path / "s.db") == {"a": 1}
    asyncio.run(database.close())


def test_bad_path_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match=r"sub/x.db: cannot open"):
        SqliteDatabase(blocker / "sub" / "x.db")


async def test_shared_journal_and_store_on_one_file(tmp_path: Path) -> None:
    """A flow journalling and claiming keys in one shared file: same outcomes and records as
    with files of their own, one file on disk, and the PAN never in it."""
    database = SqliteDatabase(tmp_path / "one.db")
    journal = SqliteJournal.on(database, hmac_key="k" * 32, node="n1")
    store = SqliteIdempotencyStore.on(database, node="n1", exclusive_node=True)
    runs = 0

    class Approve:
        name = "approve"

        def prepare(self, ex: Exchange) -> object:
            nonlocal runs
            runs += 1
            approve(ex)
            return CONTINUE

        def commit(self, ex: Exchange) -> None:
            pass

    flow = Flow(journal=journal, idempotency=store, key=lambda ex: "k-" + ex.request[11])
    flow.group("main", Approve())
    try:
        outcomes = []
        for n in range(2):  # the second is a retransmission
            outcomes.append(await flow.run(Exchange(f"t{n}", request())))
        assert outcomes == [Outcome.COMMITTED, Outcome.REPLAYED] and runs == 1
        kinds = [r.kind for r in await journal.by_id("t0")]
        assert kinds == ["BEGIN", "COMMITTING", "COMMITTED"]
        assert (await journal.counts())["IDEMPOTENT_HIT"] == 1
        assert journal.stats["rows"] == 4
    finally:
        await store.close()
        await journal.close()
        await database.close()
    files = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(("-wal", "-shm")))
    assert files == ["one.db"]
    assert PAN.encode() not in (tmp_path / "one.db").read_bytes()


async def test_shared_stores_report_database_failures(tmp_path: Path) -> None:
    database = SqliteDatabase(tmp_path / "f.db")
    journal = SqliteJournal.on(database)
    store = SqliteIdempotencyStore.on(database)
    await database.close()
    with pytest.raises(JournalError, match="closed"):
        await journal.record(Exchange("x", request()), _begin())
    with pytest.raises(IdempotencyError, match=r"claim of key 'k' failed: .*closed"):
        await store.claim("k")
    await store.close()


def _begin() -> Any:
    from isopace.flow.journal import BEGIN_EVENT

    return BEGIN_EVENT


_CHILD = """
import asyncio, sys
from isopace.store import SqliteDatabase

async def main(path):
    db = SqliteDatabase(path)
    db.setup(lambda c: c.execute("CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY, v INTEGER)"))
    n = 0
    while True:
        n += 1
        await db.call(lambda c, k: c.execute("INSERT INTO t VALUES (?, 1)", (k,)), f"k{n}",
                      durable=True)
        print(n, flush=True)

asyncio.run(main(sys.argv[1]))
"""


def test_every_write_reported_durable_survives_a_kill(tmp_path: Path) -> None:
    path = tmp_path / "k.db"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path)], env=env, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    last = 0
    for line in proc.stdout:
        last = int(line)
        if last >= 300:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rows = _rows(path)
    assert all(f"k{n}" in rows for n in range(1, last + 1)), last


async def test_purge_of_a_shared_store_deletes_in_chunks(tmp_path: Path) -> None:
    database = SqliteDatabase(tmp_path / "p.db")
    store = SqliteIdempotencyStore.on(database, ttl=0.05)
    try:
        for n in range(1234):
            assert await store.claim(f"k{n}") is None
            await store.complete(f"k{n}", Message("0210", {39: "00"}))
        assert await store.claim("live") is None  # a live claim stays
        await asyncio.sleep(0.1)
        database.commit()
        writes = database.commits
        assert await store.purge() == 1234
        database.commit()
        assert database.commits - writes == 3  # 500 + 500 + 234, a commit between chunks
        assert await store.purge() == 0
        left = database.read(lambda c: c.execute("SELECT key FROM idempotency_keys").fetchall())
        assert left == [("live",)]
    finally:
        await store.close()
        await database.close()


@pytest.mark.parametrize("single", [False, True])
async def test_a_write_after_which_sqlite_dropped_the_batch_fails_the_database(
    db: SqliteDatabase, single: bool
) -> None:
    """SQLite may roll a whole transaction back on some errors (a full disk, an I/O error): the
    writes before in the batch are then gone, so the database refuses everything after."""
    db.write(_put, "a")

    def rolled_back_by_sqlite(conn: sqlite3.Connection) -> None:
        conn.execute("ROLLBACK")  # what SQLite does by itself on such an error
        raise sqlite3.OperationalError("database or disk is full")

    with pytest.raises(StoreError, match="disk is full"):
        db.write(rolled_back_by_sqlite, single=single)
    assert db.failed
    with pytest.raises(StoreError, match="commit or sync failed"):
        db.write(_put, "b")
    with pytest.raises(StoreError):
        await db.synced()
    await asyncio.sleep(0)
    assert _rows(Path(db.path)) == {}
