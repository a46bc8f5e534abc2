"""With the SQLite database, the host answers an approval only once the transaction is on disk:
when the sync behind the idempotency store's ``complete`` fails (the flow logs that and goes on),
the host answers 96, and every transaction after it too (the database refuses writes)."""

from __future__ import annotations

from pathlib import Path

from isopace.host import AuthorizationHost
from isopace.host.config import HostConfig
from isopace.iso8583 import Message
from isopace.store import StoreError

from .conftest import PAN_OK


def purchase(stan: int) -> Message:
    return Message(
        "0200",
        {2: PAN_OK, 3: "000000", 4: "000000000100", 7: "1129101010", 11: f"{stan:06d}",
         41: "TERMSYNC", 49: "840"},
    )  # fmt: skip


async def test_no_approval_leaves_when_the_sync_fails(tmp_path: Path) -> None:
    config = HostConfig(port=0, db=str(tmp_path / "host.db"), log_transactions=False)
    async with AuthorizationHost(config) as host:
        database = host.database
        assert database is not None
        first = await host.handle(purchase(1))
        assert first is not None and first[39] == "00"

        async def failing_sync() -> None:
            database._fail(OSError(5, "Input/output error"))  # what a failed fdatasync does
            raise StoreError(f"database {database.path}: sync failed")

        database.synced = failing_sync  # type: ignore[method-assign]
        second = await host.handle(purchase(2))
        assert second is not None and second[39] == "96"
        third = await host.handle(purchase(3))
        assert third is not None and third[39] == "96"
