"""SqliteIdempotencyStore: claim / complete / release, waiters, leases, purge, errors."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from isopace.flow import CONTINUE, Exchange, Flow, Outcome
from isopace.iso8583 import Message
from isopace.store import IdempotencyError, SqliteIdempotencyStore
from tests.store.helpers import PAN, approve, request


async def test_claim_complete_replay_release(tmp_path: Path) -> None:
    async with SqliteIdempotencyStore(tmp_path / "i.db") as store:
        assert await store.claim("k") is None
        await store.complete("k", Message("0210", {2: PAN, 39: "00"}))
        got = await store.claim("k")
        assert got is not None and got.response is not None
        assert got.response[39] == "00" and got.response.redacted == frozenset({2})
        assert await store.claim("r") is None
        await store.release("r")
        assert await store.claim("r") is None
    assert PAN.encode() not in (tmp_path / "i.db").read_bytes()


async def test_concurrent_duplicates_in_one_process_run_once(tmp_path: Path) -> None:
    runs = 0

    class Once:
        name = "once"

        async def prepare(self, ex: Exchange) -> object:
            nonlocal runs
            runs += 1
            await asyncio.sleep(0.01)
            approve(ex)
            return CONTINUE

    async with SqliteIdempotencyStore(tmp_path / "i.db") as store:
        flow = Flow(idempotency=store, key=lambda ex: "same").group("main", Once())
        exs = [Exchange(f"t{i}", request(1)) for i in range(50)]
        outcomes = await asyncio.gather(*(flow.run(ex) for ex in exs))
        assert runs == 1
        assert outcomes.count(Outcome.COMMITTED) == 1
        assert outcomes.count(Outcome.REPLAYED) == 49
        assert len({ex.response for ex in exs}) == 1
        assert all(ex.response is not None and ex.response[2] == PAN for ex in exs)


async def test_crashed_owner_lease_expires_and_other_process_waits(tmp_path: Path) -> None:
    path = tmp_path / "i.db"
    a = SqliteIdempotencyStore(path, lease=0.3)
    assert await a.claim("k") is None
    a._held.clear()  # a dead process renews nothing
    await a.close()
    async with SqliteIdempotencyStore(path, lease=0.3) as b:
        t0 = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(b.claim("k"), 3) is None
        assert 0.1 < asyncio.get_running_loop().time() - t0 < 1.5
        # a waiter in another "process" (store) sees the completion by polling
        async with SqliteIdempotencyStore(path, lease=5) as c:
            waiter = asyncio.create_task(c.claim("k"))
            await asyncio.sleep(0.05)
            assert not waiter.done()
            await b.complete("k", Message("0210", {39: "05"}))
            got = await asyncio.wait_for(waiter, 2)
            assert got is not None and got.response is not None and got.response[39] == "05"


async def test_purge_and_ttl(tmp_path: Path) -> None:
    async with SqliteIdempotencyStore(tmp_path / "i.db", ttl=0.1, lease=0.1) as store:
        assert await store.claim("done") is None
        await store.complete("done", Message("0210", {39: "00"}))
        assert await store.claim("held") is None
        store._held.clear()
        await asyncio.sleep(0.15)
        assert await store.purge() == 2
        assert await store.claim("done") is None  # expired: a fresh claim


async def test_unwritable_store_clear_error(tmp_path: Path) -> None:
    with pytest.raises(IdempotencyError, match="cannot open"):
        SqliteIdempotencyStore(tmp_path / "missing-dir" / "i.db")


async def test_exclusive_node_takes_over_its_crashed_runs_claims_at_once(tmp_path: Path) -> None:
    path = tmp_path / "i.db"
    crashed = SqliteIdempotencyStore(path, lease=60, node="host:8583", exclusive_node=True)
    assert await crashed.claim("k") is None
    assert await crashed.claim("other") is None
    crashed._held.clear()  # a dead process renews nothing
    await crashed.close()
    # another node (or a store that does not declare its node exclusive) waits for the lease
    async with SqliteIdempotencyStore(path, lease=60, node="host:8584", exclusive_node=True) as b:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(b.claim("other"), 0.3)
    async with SqliteIdempotencyStore(path, lease=60, node="host:8583") as c:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(c.claim("other"), 0.3)
    # the node's next run takes the claim over at once, and its own claims still exclude
    async with SqliteIdempotencyStore(
        path, lease=60, node="host:8583", exclusive_node=True
    ) as restarted:
        assert await asyncio.wait_for(restarted.claim("k"), 2) is None
        await restarted.complete("k", Message("0210", {39: "00"}))
        got = await restarted.claim("k")
        assert got is not None and got.response is not None and got.response[39] == "00"
        assert await asyncio.wait_for(restarted.claim("other"), 2) is None
