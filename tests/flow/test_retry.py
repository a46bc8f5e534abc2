"""retry(): stops on success, ex.aborted, non-retryable errors and the last attempt."""

from __future__ import annotations

import time

import pytest

from isopace.flow import (
    SKIP,
    Exchange,
    Flow,
    Outcome,
    Result,
    RetryPolicy,
    exponential_backoff,
    fixed_backoff,
    retry,
)

from .conftest import ARec, Log, Rec


class Flaky:
    """Fails ``failures`` times, then votes ``vote``."""

    def __init__(
        self, failures: int, *, error: Exception | None = None, vote: Result | None = None
    ):
        self.name = "flaky"
        self.failures = failures
        self.error = error or ConnectionError("link down")
        self.vote = vote
        self.calls = 0
        self.commits = 0
        self.aborts = 0

    async def prepare(self, ex: Exchange) -> Result | None:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return self.vote

    def commit(self, ex: Exchange) -> None:
        self.commits += 1

    def abort(self, ex: Exchange) -> None:
        self.aborts += 1


NO_WAIT = fixed_backoff(0)


async def test_success_after_transient_failures() -> None:
    inner = Flaky(2)
    stage = retry(inner, RetryPolicy(3, NO_WAIT))
    assert stage.name == "flaky"
    ex = Exchange("t", "r")
    assert await Flow().group("main", stage).run(ex) is Outcome.COMMITTED
    assert inner.calls == 3
    assert inner.commits == 1 and inner.aborts == 0  # forwarded, run once


async def test_the_vote_of_the_successful_attempt_counts() -> None:
    inner = Flaky(1, vote=SKIP)
    ex = Exchange("t", "r")
    assert await Flow().group("main", retry(inner, RetryPolicy(2, NO_WAIT))).run(ex)
    assert ex.joined == () and inner.commits == 0


async def test_exhausted_retries_abort_with_the_last_error(log: Log) -> None:
    inner = Flaky(10)
    ex = Exchange("t", "r")
    flow = Flow().group("main", Rec("a", log), retry(inner, RetryPolicy(3, NO_WAIT)))
    assert await flow.run(ex) is Outcome.ABORTED
    assert inner.calls == 3
    assert ex.error is inner.error
    assert inner.aborts == 0  # it never joined
    assert log.of("abort") == ["a"]


async def test_abort_decision_is_not_retried() -> None:
    class Decliner:
        name = "decliner"
        calls = 0

        def prepare(self, ex: Exchange) -> None:
            self.calls += 1
            ex.abort(ValueError("do not honour"))
            raise RuntimeError("declined")

    inner = Decliner()
    ex = Exchange("t", "r")
    assert await Flow().group("main", retry(inner, RetryPolicy(5, NO_WAIT))).run(ex)
    assert inner.calls == 1
    assert str(ex.error) == "declined"


async def test_non_retryable_error_stops_at_once() -> None:
    inner = Flaky(10, error=ValueError("bad field"))
    policy = RetryPolicy(5, NO_WAIT, retryable=lambda e: isinstance(e, ConnectionError))
    ex = Exchange("t", "r")
    assert await Flow().group("main", retry(inner, policy)).run(ex) is Outcome.ABORTED
    assert inner.calls == 1


async def test_backoff_gets_the_number_of_the_failed_attempt() -> None:
    seen: list[int] = []

    def backoff(n: int) -> float:
        seen.append(n)
        return 0.0

    inner = Flaky(10)
    await Flow().group("main", retry(inner, RetryPolicy(4, backoff))).run(Exchange("t", "r"))
    assert seen == [1, 2, 3]
    assert inner.calls == 4


async def test_backoff_is_waited() -> None:
    inner = Flaky(2)
    start = time.monotonic()
    await (
        Flow()
        .group("main", retry(inner, RetryPolicy(3, fixed_backoff(0.02))))
        .run(Exchange("t", "r"))
    )
    assert time.monotonic() - start >= 0.035


async def test_retry_is_interrupted_by_the_deadline_in_bounded_time(log: Log) -> None:
    inner = Flaky(100)
    stage = retry(inner, RetryPolicy(100, fixed_backoff(10.0)))
    flow = Flow().group("main", ARec("a", log), stage)
    ex = Exchange("t", "r")
    start = time.monotonic()
    assert await flow.run(ex, timeout=0.05) is Outcome.ABORTED
    assert time.monotonic() - start < 1.0
    assert isinstance(ex.error, TimeoutError)
    assert inner.calls == 1
    assert log.of("abort") == ["a"]


async def test_sync_inner_stage_and_forwarded_hooks(log: Log) -> None:
    inner = Rec("plain", log)
    stage = retry(inner)
    assert stage.commit == inner.commit and stage.abort == inner.abort
    assert not hasattr(retry(Flaky(0)), "recover")

    class WithRecover(Rec):
        def recover(self, ex: Exchange, committing: bool) -> None:
            self.log.append(("recover", self.name))

    rec = WithRecover("r", log)
    wrapped = retry(rec)
    wrapped.recover(Exchange("t", "r"), True)
    assert log.of("recover") == ["r"]
    flow = Flow().group("main", wrapped)
    assert flow.stages()["r"].recover == rec.recover
    assert await Flow().group("main", stage).run(Exchange("t", "r")) is Outcome.COMMITTED
    assert log.of("commit") == ["plain"]


def test_policy_validation_and_backoffs() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(0)
    with pytest.raises(ValueError):
        fixed_backoff(-1)
    with pytest.raises(TypeError):
        retry(object())
    assert RetryPolicy().max_attempts == 3 and RetryPolicy().backoff(1) == 0.05
    exp = exponential_backoff(0.1, 2.0, 0.5, jitter=False)
    assert [exp(n) for n in (1, 2, 3, 4)] == [0.1, 0.2, 0.4, 0.5]
    jittered = exponential_backoff(0.1, 2.0, 0.5)
    assert all(0.0 <= jittered(n) <= 0.5 for n in range(1, 10))
