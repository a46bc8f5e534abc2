"""With the SQLite database, the host answers an approval only once the transaction is on disk:
when the sync behind the idempotency store's ``complete`` fails (the flow logs that and goes on),
the host answers 96, and every transaction after it too (the database refuses writes)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from isopace.host import AuthorizationHost
from isopace.host.config import HostConfig
from isopace.host.ledger import HoldDetails
from isopace.iso8583 import Message
from isopace.store import StoreError

from .conftest import PAN_OK, purchase


async def test_no_approval_leaves_when_the_sync_fails(tmp_path: Path) -> None:
    config = HostConfig(port=0, db=str(tmp_path / "host.db"), log_transactions=False)
    async with AuthorizationHost(config) as host:
        database = host.database
        assert database is not None
        first = await host.handle(purchase(PAN_OK, 100, 1, "TERMSYNC"))
        assert first is not None and first[39] == "00"

        async def failing_sync() -> None:
            database._fail(OSError(5, "Input/output error"))  # what a failed fdatasync does
            raise StoreError(f"database {database.path}: sync failed")

        database.synced = failing_sync  # type: ignore[method-assign]
        second = await host.handle(purchase(PAN_OK, 100, 2, "TERMSYNC"))
        assert second is not None and second[39] == "96"
        third = await host.handle(purchase(PAN_OK, 100, 3, "TERMSYNC"))
        assert third is not None and third[39] == "96"


async def test_a_full_disk_never_leaves_an_approval_without_its_records(tmp_path: Path) -> None:
    """The database file may not grow (``max_page_count``), as on a full disk: transactions
    start failing part-way. Whatever each gets, an approval (00) always has its captured hold
    on disk, and after a restart (recovery) the ledger balances with nothing pending. (Journal
    records may be missing: by the flow's contract a journal that fails is logged, not fatal.)"""
    import sqlite3

    config = HostConfig(port=0, db=str(tmp_path / "host.db"), log_transactions=False)
    approved: list[Message] = []
    codes: set[str] = set()
    async with AuthorizationHost(config) as host:
        database = host.database
        assert database is not None and host.ledger is not None
        for stan in range(1, 6):
            response = await host.handle(purchase(PAN_OK, 100, stan, "TERMSYNC"))
            assert response is not None and response[39] == "00"
        database.commit()
        pages = database.conn.execute("PRAGMA page_count").fetchone()[0]
        database.conn.execute(f"PRAGMA max_page_count = {pages}")
        for stan in range(6, 400):
            response = await host.handle(purchase(PAN_OK, 100, stan, "TERMSYNC"))
            assert response is not None
            codes.add(response[39])
            if response[39] == "00":
                approved.append(response)
        assert codes - {"00"}, "the full disk never showed"
    # restarted with room to grow: recovery ends what was in flight, and the ledger balances
    async with AuthorizationHost(config) as restarted:
        assert restarted.ledger is not None
        check = await restarted.ledger.check()
        assert check.ok and check.pending == 0, check
    conn = sqlite3.connect(tmp_path / "host.db")
    try:
        for response in approved:
            hold = conn.execute(
                "SELECT state FROM holds WHERE terminal = ? AND stan = ?",
                (response[41], response[11]),
            ).fetchone()
            assert hold == ("captured",), (response[11], hold)
    finally:
        conn.close()


async def test_start_up_releases_pending_holds_no_journal_record_covers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A hold whose transaction's BEGIN failed to write (the flow logs a journal failure and
    goes on) and whose process then died is unknown to recovery: the next start releases it."""
    from isopace.host.ledger import SqliteLedger

    db = str(tmp_path / "host.db")
    config = HostConfig(port=0, db=db, log_transactions=False)
    async with AuthorizationHost(config) as host:  # creates and seeds the database
        assert host.ledger is not None
        card = await host.ledger.card(PAN_OK)
        assert card is not None
    ledger = SqliteLedger(db)  # what the dead process left: a hold, and no journal record
    await ledger.open()
    result = await ledger.reserve(
        "orphan-1", card.account_id, 700, HoldDetails(terminal="T", stan="000001")
    )
    assert result.approved
    await ledger.close()
    with caplog.at_level(logging.WARNING):
        async with AuthorizationHost(config) as restarted:
            assert restarted.ledger is not None
            hold = await restarted.ledger.hold("orphan-1")
            assert hold is not None and hold.state == "released"
            check = await restarted.ledger.check()
            assert check.ok and check.pending == 0, check
    assert any("released 1 pending hold(s)" in r.getMessage() for r in caplog.records)
