"""What a stored answer is: a committed outcome with or without a response (the seed's rule), and
the request's fingerprint (a duplicate by key that is another request is neither replayed nor
run). Each rule runs through every way a flow with idempotency runs: bare, with a journal, with a
deadline, with a listener, all of them, and with concurrent duplicates waiting on the first (and,
through the autouse ``run_path`` fixture, with the fast path allowed and forced off)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from isopace.flow import (
    FINGERPRINT_PROPERTY,
    EventKind,
    Exchange,
    FingerprintMismatchError,
    Flow,
    MemoryJournal,
    MemoryStore,
    Outcome,
    Stored,
)
from isopace.iso8583 import Message

PAN = "4761739001010010"
OTHER_PAN = "5555555555554444"


def request(pan: str = PAN, amount: str = "000000000100", stan: str = "000001") -> Message:
    return Message("0200", {2: pan, 3: "000000", 4: amount, 11: stan, 41: "TERM0001"})


def key(ex: Exchange) -> str:
    return f"{ex.request[41]}:{ex.request[11]}"


def fingerprint(ex: Exchange) -> str:
    """A test fingerprint of what makes the request the transaction it is (no card number in
    clear: the stores keep it as given)."""
    m = ex.request
    return f"{m.mti[:3]}|{hash(m[2]) & 0xFFFF:x}|{m[3]}|{m[4]}"


class Listener:
    def __init__(self) -> None:
        self.runs: list[Outcome] = []

    def stage_finished(self, *args: Any) -> None:
        pass

    def run_finished(self, ex: Exchange, outcome: Outcome, seconds: float) -> None:
        self.runs.append(outcome)


class Ledger:
    """A stage that moves money in commit and builds no response (item 4 of issue 12): it sets
    ``ex.response`` only when ``respond``; ``delay`` makes its prepare slow."""

    name = "ledger"

    def __init__(self, *, respond: bool = False, delay: float = 0.0) -> None:
        self.respond = respond
        self.delay = delay
        self.prepares = 0
        self.commits = 0
        self.balance = 0

    async def prepare(self, ex: Exchange) -> None:
        self.prepares += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.respond:
            code = f"A{self.prepares:05d}"
            ex.response = ex.request.reply().set(38, code).set(39, "00")

    def commit(self, ex: Exchange) -> None:
        self.commits += 1
        self.balance -= int(ex.request[4])


PATHS = ["bare", "journal", "deadline", "listener", "all"]


def build(path: str, stage: Ledger, store: Any = None, **kw: Any) -> tuple[Flow, dict[str, Any]]:
    """A flow with idempotency configured for ``path``; returns it and the run keywords."""
    journal = MemoryJournal() if path in ("journal", "all") else None
    listener = Listener() if path in ("listener", "all") else None
    flow = Flow(
        journal=journal,
        listener=listener,
        idempotency=store if store is not None else MemoryStore(),
        key=key,
        **kw,
    ).group("main", stage)
    run_kw = {"timeout": 5.0} if path in ("deadline", "all") else {}
    return flow, run_kw


@pytest.mark.parametrize("path", PATHS)
async def test_committed_without_a_response_is_replayed_never_run_again(path: str) -> None:
    ledger = Ledger()
    store = MemoryStore()
    flow, kw = build(path, ledger, store)
    first = Exchange("1", request())
    assert await flow.run(first, **kw) is Outcome.COMMITTED
    assert first.response is None and "1:000001" not in store  # keys are "terminal:stan"
    assert "TERM0001:000001" in store
    dup = Exchange("2", request())
    assert await flow.run(dup, **kw) is Outcome.REPLAYED
    assert dup.response is None and dup.error is None
    assert ledger.prepares == 1 and ledger.commits == 1 and ledger.balance == -100
    journal = flow._journal
    if isinstance(journal, MemoryJournal):
        assert journal.kinds("2") == [EventKind.IDEMPOTENT_HIT]
    assert await store.claim("TERM0001:000001") == Stored(None)


@pytest.mark.parametrize("path", PATHS)
async def test_concurrent_duplicates_of_a_run_without_response_wait_and_replay(path: str) -> None:
    ledger = Ledger(delay=0.02)
    flow, kw = build(path, ledger)
    exchanges = [Exchange(str(i), request()) for i in range(20)]
    outcomes = await asyncio.gather(*(flow.run(ex, **kw) for ex in exchanges))
    assert outcomes.count(Outcome.COMMITTED) == 1 and outcomes.count(Outcome.REPLAYED) == 19
    assert ledger.prepares == 1 and ledger.commits == 1 and ledger.balance == -100
    assert all(ex.response is None for ex in exchanges)


async def test_run_cancelled_in_its_commit_pass_keeps_its_outcome() -> None:
    """A decision taken stands: the outcome of a run cancelled while committing is stored (with
    no response), so its duplicate is replayed rather than committed a second time."""
    commits = 0
    entered = asyncio.Event()

    class SlowCommit:
        name = "slow-commit"

        def prepare(self, ex: Exchange) -> None:
            return None

        async def commit(self, ex: Exchange) -> None:
            nonlocal commits
            entered.set()
            await asyncio.sleep(0.05)
            commits += 1

    store = MemoryStore()
    flow = Flow(idempotency=store, key=key).group("main", SlowCommit())
    task = asyncio.create_task(flow.run(Exchange("1", request())))
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert commits == 0  # interrupted: in doubt, finished by recovery, never by a duplicate
    assert await flow.run(Exchange("2", request())) is Outcome.REPLAYED
    assert commits == 0


@pytest.mark.parametrize("path", PATHS)
async def test_same_key_other_request_is_neither_replayed_nor_run(path: str) -> None:
    ledger = Ledger(respond=True)
    flow, kw = build(path, ledger, fingerprint=fingerprint)
    first = Exchange("1", request())
    assert await flow.run(first, **kw) is Outcome.COMMITTED
    assert first.response is not None and first.response[38] == "A00001"
    other = Exchange("2", request(OTHER_PAN, "000000200000"))
    assert await flow.run(other, **kw) is Outcome.ABORTED
    assert isinstance(other.error, FingerprintMismatchError)
    assert other.error.key == "TERM0001:000001" and "another request" in str(other.error)
    assert other.response is None  # nothing of the first answer (its DE 38) reaches it
    assert ledger.prepares == 1 and ledger.commits == 1 and ledger.balance == -100
    journal = flow._journal
    if isinstance(journal, MemoryJournal):
        assert journal.kinds("2") == [EventKind.BEGIN, EventKind.ABORTED]
        assert journal.kinds("1")[0] is EventKind.BEGIN
    listener = flow._listener
    if isinstance(listener, Listener):
        assert listener.runs == [Outcome.COMMITTED, Outcome.ABORTED]
    # the same request again is still the first one's retransmission
    again = Exchange("3", request())
    assert await flow.run(again, **kw) is Outcome.REPLAYED
    assert again.response == first.response and ledger.prepares == 1


@pytest.mark.parametrize("path", PATHS)
async def test_waiter_with_another_fingerprint_is_refused_after_the_first_run(path: str) -> None:
    ledger = Ledger(respond=True, delay=0.03)
    flow, kw = build(path, ledger, fingerprint=fingerprint)
    owner = Exchange("owner", request())
    same = [Exchange(f"s{i}", request()) for i in range(5)]
    other = [Exchange(f"o{i}", request(amount="000000200000")) for i in range(5)]
    task = asyncio.create_task(flow.run(owner, **kw))
    await asyncio.sleep(0.005)  # the owner holds the claim
    outcomes = await asyncio.gather(*(flow.run(ex, **kw) for ex in same + other))
    assert await task is Outcome.COMMITTED
    assert outcomes[:5] == [Outcome.REPLAYED] * 5 and outcomes[5:] == [Outcome.ABORTED] * 5
    assert all(isinstance(ex.error, FingerprintMismatchError) for ex in other)
    assert all(ex.response is None for ex in other)
    assert all(ex.response == owner.response for ex in same)
    assert ledger.prepares == 1 and ledger.commits == 1


async def test_a_decline_keeps_its_fingerprint_too() -> None:
    def decline(ex: Exchange) -> None:
        ex.response = ex.request.reply().set(39, "51")
        ex.abort()

    from isopace.flow import func_stage

    flow = Flow(idempotency=MemoryStore(), key=key, fingerprint=fingerprint).group(
        "main", func_stage("decline", decline)
    )
    assert await flow.run(Exchange("1", request())) is Outcome.ABORTED
    dup = Exchange("2", request())
    assert await flow.run(dup) is Outcome.REPLAYED and dup.response is not None
    other = Exchange("3", request(amount="000000000200"))
    assert await flow.run(other) is Outcome.ABORTED and other.response is None
    assert isinstance(other.error, FingerprintMismatchError)


async def test_matches_is_asked_before_a_mismatch_is_declared() -> None:
    """A fingerprint function with ``matches`` (a keyed fingerprint whose key was rotated) gets
    the last word on a stored fingerprint that differs."""

    class Versioned:
        def __init__(self) -> None:
            self.version = "v1"
            self.asked: list[str] = []

        def __call__(self, ex: Exchange) -> str:
            return f"{self.version}:{ex.request[4]}"

        def matches(self, ex: Exchange, stored: str) -> bool:
            self.asked.append(stored)
            old, _, rest = stored.partition(":")
            return old == "v1" and rest == ex.request[4]

    fp = Versioned()
    ledger = Ledger(respond=True)
    flow = Flow(idempotency=MemoryStore(), key=key, fingerprint=fp).group("main", ledger)
    await flow.run(Exchange("1", request()))
    fp.version = "v2"  # "rotated"
    dup = Exchange("2", request())
    assert await flow.run(dup) is Outcome.REPLAYED and fp.asked == ["v1:000000000100"]
    other = Exchange("3", request(amount="000000000999"))
    assert await flow.run(other) is Outcome.ABORTED
    assert isinstance(other.error, FingerprintMismatchError) and ledger.commits == 1


async def test_failing_matches_is_a_mismatch_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken:
        def __call__(self, ex: Exchange) -> str:
            return str(ex.request[4])

        def matches(self, ex: Exchange, stored: str) -> bool:
            raise RuntimeError("key ring unavailable")

    flow = Flow(idempotency=MemoryStore(), key=key, fingerprint=Broken()).group("main", Ledger())
    await flow.run(Exchange("1", request()))
    other = Exchange("2", request(amount="000000000999"))
    assert await flow.run(other) is Outcome.ABORTED
    assert isinstance(other.error, FingerprintMismatchError)
    assert "matches() failed" in caplog.text


async def test_answer_stored_without_a_fingerprint_is_replayed() -> None:
    """An answer a flow without a fingerprint function stored (or an earlier version) has no
    fingerprint to compare: it is replayed, as before."""
    store = MemoryStore()
    ledger = Ledger(respond=True)
    before = Flow(idempotency=store, key=key).group("main", ledger)
    await before.run(Exchange("1", request()))
    after = Flow(idempotency=store, key=key, fingerprint=fingerprint).group("main", ledger)
    dup = Exchange("2", request(amount="000000000999"))
    assert await after.run(dup) is Outcome.REPLAYED and ledger.prepares == 1


async def test_a_failing_fingerprint_function_aborts_before_the_claim() -> None:
    def broken(ex: Exchange) -> str:
        raise KeyError(2)

    store = MemoryStore()
    journal = MemoryJournal()
    ledger = Ledger()
    flow = Flow(journal=journal, idempotency=store, key=key, fingerprint=broken)
    flow.group("main", ledger)
    ex = Exchange("1", request())
    assert await flow.run(ex) is Outcome.ABORTED
    assert isinstance(ex.error, KeyError) and ledger.prepares == 0
    assert journal.kinds("1") == [EventKind.BEGIN, EventKind.ABORTED]
    assert await store.claim("TERM0001:000001") is None  # never claimed


async def test_the_fingerprint_is_a_durable_property_for_recovery() -> None:
    seen: list[dict[str, object]] = []

    class Journal(MemoryJournal):
        async def record(self, ex: Exchange, event: Any) -> None:
            seen.append(ex.durable())
            await super().record(ex, event)

    flow = Flow(journal=Journal(), idempotency=MemoryStore(), key=key, fingerprint=fingerprint)
    flow.group("main", Ledger())
    ex = Exchange("1", request())
    await flow.run(ex)
    expected = fingerprint(ex)
    # journalled with the decision to commit (BEGIN carries none: recovery does not need it)
    assert seen == [{}, {FINGERPRINT_PROPERTY: expected}, {FINGERPRINT_PROPERTY: expected}]
    assert PAN not in expected


def test_fingerprint_needs_idempotency() -> None:
    with pytest.raises(ValueError, match="fingerprint= needs idempotency"):
        Flow(fingerprint=fingerprint)
