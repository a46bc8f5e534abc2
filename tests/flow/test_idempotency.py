"""Idempotent replay: claim protocol, concurrent duplicates, declines, MemoryStore bounds."""

from __future__ import annotations

import asyncio

import pytest

from isopace.flow import (
    EventKind,
    Exchange,
    Flow,
    MemoryJournal,
    MemoryStore,
    Outcome,
    Stored,
    func_stage,
    refill,
)
from isopace.iso8583 import Message

PAN = "4761739001010010"


def request(stan: str = "000001") -> Message:
    return Message("0200", {2: PAN, 3: "000000", 4: "000000002500", 11: stan, 41: "TERM0001"})


def key(ex: Exchange) -> str | None:
    stan = ex.request.get(11)
    return None if stan is None else f"{ex.request.get(41)}:{stan}"


class Auth:
    """Approves (or declines) after an optional pause; counts runs and commits."""

    name = "auth"

    def __init__(self, *, decline: bool = False, delay: float = 0.0) -> None:
        self.decline = decline
        self.delay = delay
        self.prepares = 0
        self.commits = 0
        self.aborts = 0

    async def prepare(self, ex: Exchange) -> None:
        self.prepares += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        code = "05" if self.decline else "00"
        ex.response = ex.request.reply().set(38, f"A{self.prepares:05d}").set(39, code)
        if self.decline:
            ex.abort()

    def commit(self, ex: Exchange) -> None:
        self.commits += 1

    def abort(self, ex: Exchange) -> None:
        self.aborts += 1


async def test_duplicate_is_replayed_without_running_any_stage() -> None:
    auth = Auth()
    journal = MemoryJournal()
    flow = Flow(journal=journal, idempotency=MemoryStore(), key=key).group("main", auth)
    first = Exchange("1", request())
    assert await flow.run(first) is Outcome.COMMITTED
    dup = Exchange("2", request())
    assert await flow.run(dup) is Outcome.REPLAYED
    assert auth.prepares == 1 and auth.commits == 1
    assert dup.response == first.response and dup.response is not None
    assert dup.response[39] == "00" and dup.error is None
    assert journal.kinds("2") == [EventKind.IDEMPOTENT_HIT]
    other = Exchange("3", request("000002"))
    assert await flow.run(other) is Outcome.COMMITTED
    assert auth.prepares == 2


async def test_no_key_means_not_idempotent() -> None:
    auth = Auth()
    flow = Flow(idempotency=MemoryStore(), key=key).group("main", auth)
    bare = Message("0200", {41: "TERM0001"})
    assert await flow.run(Exchange("1", bare)) is Outcome.COMMITTED
    assert await flow.run(Exchange("2", bare)) is Outcome.COMMITTED
    assert auth.prepares == 2


async def test_hundred_concurrent_duplicates_run_once() -> None:
    auth = Auth(delay=0.01)
    flow = Flow(idempotency=MemoryStore(), key=key).group("main", auth)
    exchanges = [Exchange(str(i), request()) for i in range(100)]
    outcomes = await asyncio.gather(*(flow.run(ex) for ex in exchanges))
    assert auth.prepares == 1 and auth.commits == 1
    assert outcomes.count(Outcome.COMMITTED) == 1
    assert outcomes.count(Outcome.REPLAYED) == 99
    responses = {ex.response for ex in exchanges}
    assert len(responses) == 1 and None not in responses


async def test_decline_is_stored_and_replayed() -> None:
    auth = Auth(decline=True)
    flow = Flow(idempotency=MemoryStore(), key=key).group("main", auth)
    first = Exchange("1", request())
    assert await flow.run(first) is Outcome.ABORTED
    dup = Exchange("2", request())
    assert await flow.run(dup) is Outcome.REPLAYED
    assert auth.prepares == 1 and auth.aborts == 1
    assert dup.response == first.response and dup.response is not None
    assert dup.response[39] == "05"


async def test_abort_without_response_is_released() -> None:
    calls = 0

    def fail(ex: Exchange) -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError("issuer unreachable")

    store = MemoryStore()
    flow = Flow(idempotency=store, key=key).group("main", func_stage("fail", fail))
    assert await flow.run(Exchange("1", request())) is Outcome.ABORTED
    assert await flow.run(Exchange("2", request())) is Outcome.ABORTED
    assert calls == 2 and len(store) == 0


async def test_timed_out_run_with_response_is_not_stored() -> None:
    async def slow(ex: Exchange) -> None:
        ex.response = ex.request.reply().set(39, "00")
        await asyncio.sleep(10)

    store = MemoryStore()
    flow = Flow(idempotency=store, key=key).group("main", func_stage("slow", slow))
    ex = Exchange("1", request())
    assert await flow.run(ex, timeout=0.02) is Outcome.ABORTED
    assert isinstance(ex.error, TimeoutError) and len(store) == 0


async def test_waiter_runs_itself_when_the_owner_is_cancelled() -> None:
    auth = Auth(delay=0.05)
    journal = MemoryJournal()
    flow = Flow(journal=journal, idempotency=MemoryStore(), key=key).group("main", auth)
    owner = asyncio.create_task(flow.run(Exchange("owner", request())))
    await asyncio.sleep(0.01)  # the owner holds the claim, inside its prepare
    waiter_ex = Exchange("waiter", request())
    waiter = asyncio.create_task(flow.run(waiter_ex))
    await asyncio.sleep(0.01)
    owner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await owner
    assert await asyncio.wait_for(waiter, 2.0) is Outcome.COMMITTED
    assert auth.prepares == 2 and auth.commits == 1 and auth.aborts == 0
    assert waiter_ex.response is not None and waiter_ex.response[39] == "00"
    assert journal.kinds("owner") == [EventKind.BEGIN, EventKind.ABORTED]


async def test_cancelled_waiter_leaves_the_owner_alone() -> None:
    auth = Auth(delay=0.03)
    flow = Flow(idempotency=MemoryStore(), key=key).group("main", auth)
    owner_ex = Exchange("owner", request())
    owner = asyncio.create_task(flow.run(owner_ex))
    await asyncio.sleep(0.005)
    waiters = [asyncio.create_task(flow.run(Exchange(f"w{i}", request()))) for i in range(3)]
    await asyncio.sleep(0.005)
    waiters[0].cancel()
    assert await owner is Outcome.COMMITTED
    assert [await w for w in waiters[1:]] == [Outcome.REPLAYED, Outcome.REPLAYED]
    assert waiters[0].cancelled()
    assert auth.prepares == 1


async def test_waiting_for_the_first_run_is_bounded_by_the_deadline() -> None:
    auth = Auth(delay=0.2)
    journal = MemoryJournal()
    flow = Flow(journal=journal, idempotency=MemoryStore(), key=key).group("main", auth)
    owner = asyncio.create_task(flow.run(Exchange("owner", request())))
    await asyncio.sleep(0.01)
    ex = Exchange("dup", request())
    assert await flow.run(ex, timeout=0.02) is Outcome.ABORTED
    assert isinstance(ex.error, TimeoutError)
    assert journal.kinds("dup") == [EventKind.BEGIN, EventKind.ABORTED]
    assert await owner is Outcome.COMMITTED
    assert auth.prepares == 1


async def test_a_failing_store_aborts_rather_than_risk_a_duplicate() -> None:
    class Down:
        async def claim(self, key: str) -> Stored | None:
            raise ConnectionError("store down")

        async def complete(
            self, key: str, response: Message | None, fingerprint: str | None = None
        ) -> None:
            raise AssertionError("not reached")

        async def release(self, key: str) -> None:
            raise AssertionError("not reached")

    auth = Auth()
    flow = Flow(idempotency=Down(), key=key).group("main", auth)
    ex = Exchange("1", request())
    assert await flow.run(ex) is Outcome.ABORTED
    assert isinstance(ex.error, ConnectionError) and auth.prepares == 0


async def test_a_failing_key_function_aborts() -> None:
    def bad_key(ex: Exchange) -> str:
        raise KeyError(11)

    auth = Auth()
    ex = Exchange("1", request())
    flow = Flow(idempotency=MemoryStore(), key=bad_key).group("main", auth)
    assert await flow.run(ex) is Outcome.ABORTED
    assert isinstance(ex.error, KeyError) and auth.prepares == 0


async def test_store_failing_to_complete_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    class Flaky(MemoryStore):
        async def complete(
            self, key: str, response: Message | None, fingerprint: str | None = None
        ) -> None:
            raise OSError("write failed")

    flow = Flow(idempotency=Flaky(), key=key).group("main", Auth())
    assert await flow.run(Exchange("1", request())) is Outcome.COMMITTED
    assert "failed to complete" in caplog.text


async def test_replay_refills_redacted_card_data_from_the_request() -> None:
    class Redacting(MemoryStore):
        """Stores what a durable store keeps: the response as redacted JSON."""

        async def complete(
            self, key: str, response: Message | None, fingerprint: str | None = None
        ) -> None:
            assert response is not None
            redacted = Message.from_json(response.to_json(redact=True))
            await super().complete(key, redacted, fingerprint)

    auth = Auth()
    flow = Flow(idempotency=Redacting(), key=key).group("main", auth)
    first = Exchange("1", request())
    await flow.run(first)
    dup = Exchange("2", request())
    assert await flow.run(dup) is Outcome.REPLAYED
    assert dup.response is not None and first.response is not None
    assert dup.response[2] == PAN
    assert dup.response.fields() == first.response.fields()


def test_refill_leaves_unredacted_messages_alone() -> None:
    stored = request().reply()
    assert refill(stored, request()) is stored
    redacted = Message.from_json(stored.to_json(redact=True))
    assert 2 not in redacted and redacted.redacted == {2}
    assert refill(redacted, Message("0200", {11: "000001"})).get(2) is None
    assert refill(redacted, request())[2] == PAN


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_memory_store_ttl_and_lru_bound() -> None:
    clock = Clock()
    store = MemoryStore(max_entries=2, ttl=10.0, clock=clock)
    one, two, three = Message("0210", {11: "1"}), Message("0210", {11: "2"}), Message("0210")
    for k, m in (("a", one), ("b", two)):
        assert await store.claim(k) is None
        await store.complete(k, m)
    assert await store.claim("a") == Stored(one)  # a is now the most recently used
    assert await store.claim("c") is None
    await store.complete("c", three)
    assert len(store) == 2 and "b" not in store and "a" in store
    clock.now += 11
    assert "a" not in store
    assert await store.claim("a") is None  # expired: claimable again


async def test_memory_store_claim_lease_expires() -> None:
    clock = Clock()
    store = MemoryStore(lease=0.05)
    assert await store.claim("k") is None
    # the owner never completes nor releases: after the lease a waiter takes over
    assert await asyncio.wait_for(store.claim("k"), 1.0) is None
    del clock


async def test_memory_store_release_wakes_one_new_owner() -> None:
    store = MemoryStore()
    assert await store.claim("k") is None
    waiters = [asyncio.create_task(store.claim("k")) for _ in range(5)]
    await asyncio.sleep(0)
    await store.release("k")
    await asyncio.sleep(0.01)
    owners = [w for w in waiters if w.done()]
    assert len(owners) == 1 and owners[0].result() is None
    response = Message("0210", {39: "00"})
    await store.complete("k", response)
    assert [await w for w in waiters if w is not owners[0]] == [Stored(response)] * 4


def test_memory_store_validation() -> None:
    with pytest.raises(ValueError):
        MemoryStore(max_entries=0)
    with pytest.raises(ValueError):
        MemoryStore(ttl=0)


async def test_failure_after_a_response_was_built_is_not_replayed() -> None:
    calls = 0

    def approve(ex: Exchange) -> None:
        ex.response = ex.request.reply().set(39, "00")

    def ledger_down(ex: Exchange) -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError("ledger down")

    store = MemoryStore()
    flow = Flow(idempotency=store, key=key).group(
        "main", func_stage("approve", approve), func_stage("ledger", ledger_down)
    )
    first = Exchange("1", request())
    assert await flow.run(first) is Outcome.ABORTED
    assert first.response is not None and first.response[39] == "00"
    # the half-built approval is not what a duplicate gets: the key was released
    assert len(store) == 0
    assert await flow.run(Exchange("2", request())) is Outcome.ABORTED
    assert calls == 2


async def test_decline_with_its_own_cause_is_replayed() -> None:
    def decline(ex: Exchange) -> None:
        ex.response = ex.request.reply().set(39, "51")
        ex.abort(ValueError("insufficient funds"))

    flow = Flow(idempotency=MemoryStore(), key=key).group("main", func_stage("d", decline))
    assert await flow.run(Exchange("1", request())) is Outcome.ABORTED
    dup = Exchange("2", request())
    assert await flow.run(dup) is Outcome.REPLAYED
    assert dup.response is not None and dup.response[39] == "51"
