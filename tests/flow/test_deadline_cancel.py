"""The run's deadline and task cancellation: joined stages always roll back."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from isopace.flow import (
    EventKind,
    Exchange,
    Flow,
    MemoryJournal,
    Outcome,
    func_stage,
)

from .conftest import ARec, Log, Rec


async def test_deadline_interrupts_an_overrunning_async_prepare(log: Log) -> None:
    journal = MemoryJournal()
    slow = ARec("slow", log, delay=10.0)
    flow = Flow(journal=journal).group("main", Rec("a", log), ARec("b", log), slow, Rec("c", log))
    ex = Exchange("t", "r")
    start = time.monotonic()
    assert await flow.run(ex, timeout=0.05) is Outcome.ABORTED
    assert time.monotonic() - start < 1.0
    assert isinstance(ex.error, TimeoutError)
    assert log.of("prepare") == ["a", "b"]  # slow was interrupted before it logged
    assert log.of("abort") == ["b", "a"]
    assert journal.kinds("t") == [EventKind.BEGIN, EventKind.ABORTED]
    assert ex.deadline is not None


async def test_deadline_is_checked_before_each_prepare(log: Log) -> None:
    def hog(ex: Exchange) -> None:
        time.sleep(0.03)  # a sync prepare cannot be interrupted, but the next one never starts

    flow = Flow().group("main", Rec("a", log), func_stage("hog", hog), Rec("b", log))
    ex = Exchange("t", "r")
    assert await flow.run(ex, timeout=0.01) is Outcome.ABORTED
    assert isinstance(ex.error, TimeoutError)
    assert log.of("prepare") == ["a"]
    assert log.of("abort") == ["a"]


async def test_deadline_passed_during_the_last_prepare_aborts(log: Log) -> None:
    def hog(ex: Exchange) -> None:
        time.sleep(0.03)

    flow = Flow().group("main", Rec("a", log), func_stage("hog", hog))
    ex = Exchange("t", "r")
    assert await flow.run(ex, timeout=0.01) is Outcome.ABORTED
    assert isinstance(ex.error, TimeoutError)
    assert log.of("commit") == [] and log.of("abort") == ["a"]


async def test_a_run_within_its_deadline_commits(log: Log) -> None:
    flow = Flow().group("main", ARec("a", log, delay=0.001), Rec("b", log))
    assert await flow.run(Exchange("t", "r"), timeout=5.0) is Outcome.COMMITTED
    assert log.of("commit") == ["a", "b"]


async def test_stage_raising_timeout_error_is_a_stage_failure(log: Log) -> None:
    flow = Flow().group("main", Rec("a", log), Rec("b", log, raises=TimeoutError("upstream")))
    ex = Exchange("t", "r")
    assert await flow.run(ex, timeout=5.0) is Outcome.ABORTED
    assert str(ex.error) == "upstream"


async def test_cancellation_rolls_back_journals_and_propagates(log: Log) -> None:
    journal = MemoryJournal()
    started = asyncio.Event()

    async def wait_forever(ex: Exchange) -> None:
        started.set()
        await asyncio.sleep(3600)

    flow = Flow(journal=journal).group(
        "main", Rec("a", log), ARec("b", log), func_stage("wait", wait_forever)
    )
    ex = Exchange("t", "r")
    task = asyncio.create_task(flow.run(ex))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert log.of("abort") == ["b", "a"]
    assert journal.kinds("t") == [EventKind.BEGIN, EventKind.ABORTED]
    assert isinstance(journal.entries()[-1].event.error, asyncio.CancelledError)
    assert ex.aborted and isinstance(ex.error, asyncio.CancelledError)


async def test_cancellation_during_the_abort_pass_is_shielded(log: Log) -> None:
    journal = MemoryJournal()
    slow_abort = ARec("slow", log)
    slow_abort.abort_delay = 0.05
    started = asyncio.Event()

    async def wait_forever(ex: Exchange) -> None:
        started.set()
        await asyncio.sleep(3600)

    flow = Flow(journal=journal).group(
        "main", ARec("a", log), slow_abort, func_stage("wait", wait_forever)
    )
    task = asyncio.create_task(flow.run(Exchange("t", "r")))
    await started.wait()
    task.cancel()
    await asyncio.sleep(0.01)  # now inside slow's abort
    task.cancel()  # a second cancellation hits the abort pass
    with pytest.raises(asyncio.CancelledError):
        await task
    assert log.of("abort") == ["slow", "a"]
    assert journal.kinds("t") == [EventKind.BEGIN, EventKind.ABORTED]


async def test_cancellation_of_a_decline_abort_pass_still_completes_it(log: Log) -> None:
    slow = ARec("slow", log)
    slow.abort_delay = 0.05
    flow = Flow().group("main", ARec("a", log), slow, Rec("d", log, decline=True))
    task = asyncio.create_task(flow.run(Exchange("t", "r")))
    for _ in range(20):
        await asyncio.sleep(0.005)
        if log.of("prepare") == ["a", "slow", "d"]:
            break
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert log.of("abort") == ["d", "slow", "a"]


class _SlowCommit:
    """A stage whose commit sets ``in_commit`` and then waits for ever (until cancelled)."""

    name = "slow"

    def __init__(self, log: Log) -> None:
        self.log = log
        self.in_commit = asyncio.Event()

    def prepare(self, ex: Exchange) -> None:
        return None

    async def commit(self, ex: Exchange) -> None:
        self.in_commit.set()
        await asyncio.sleep(3600)

    def abort(self, ex: Exchange) -> None:
        self.log.append(("abort", self.name))


async def test_cancellation_during_commit_finishes_the_commits(log: Log) -> None:
    journal = MemoryJournal()
    slow = _SlowCommit(log)
    in_commit = slow.in_commit
    flow = Flow(journal=journal).group("main", Rec("a", log), slow, ARec("c", log))
    ex = Exchange("t", "r")
    task = asyncio.create_task(flow.run(ex))
    await in_commit.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert log.of("commit") == ["a", "c"]  # the decision stands: c still commits
    assert log.of("abort") == []
    # the interrupted commit leaves the transaction in doubt for recovery
    assert journal.kinds("t") == [EventKind.BEGIN, EventKind.COMMITTING]


async def test_cancellation_during_commit_rolls_nothing_back_without_a_journal(log: Log) -> None:
    """The plain run too: the decision stands, the other commits finish, nothing aborts (a
    committed stage rolled back would move the money back behind the caller's back)."""
    slow = _SlowCommit(log)
    in_commit = slow.in_commit
    flow = Flow().group("main", Rec("a", log), slow, ARec("c", log))
    for run in range(2):  # the first run resolves the entry; both take the same path
        in_commit.clear()
        log.clear()
        ex = Exchange(f"t{run}", "r")
        task = asyncio.create_task(flow.run(ex))
        await in_commit.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert log.of("commit") == ["a", "c"]
        assert log.of("abort") == []
        assert not ex.aborted


async def test_retry_is_interrupted_by_cancellation(log: Log) -> None:
    from isopace.flow import RetryPolicy, fixed_backoff, retry

    calls = 0

    def flaky(ex: Exchange) -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError("down")

    stage = retry(func_stage("flaky", flaky), RetryPolicy(5, fixed_backoff(3600)))
    flow = Flow().group("main", Rec("a", log), stage)
    task = asyncio.create_task(flow.run(Exchange("t", "r")))
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls == 1
    assert log.of("abort") == ["a"]


async def test_a_deadline_outside_a_task_is_still_checked(log: Log) -> None:
    """A coroutine driven outside a task (as an eager handler may be) cannot be interrupted,
    but its deadline still aborts the run before the next prepare."""

    def hog(ex: Exchange) -> None:
        time.sleep(0.03)

    flow = Flow().group("main", Rec("a", log), func_stage("hog", hog), Rec("b", log))
    ex = Exchange("t", "r")
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Outcome] = loop.create_future()

    def drive() -> None:  # a loop callback: no current task
        assert asyncio.current_task() is None
        coro = flow.run(ex, timeout=0.01)
        try:
            coro.send(None)
        except StopIteration as stop:
            done.set_result(stop.value)

    loop.call_soon(drive)
    assert await done is Outcome.ABORTED
    assert isinstance(ex.error, TimeoutError)
    assert log.of("prepare") == ["a"] and log.of("abort") == ["a"]


async def test_an_outer_timeout_is_a_cancellation_for_the_run(log: Log) -> None:
    """The caller's own asyncio.timeout cancels the run (rolled back, CancelledError out of
    run), and the caller gets its TimeoutError: the run's deadline does not swallow it."""
    flow = Flow().group("main", Rec("a", log), ARec("slow", log, delay=10.0))
    ex = Exchange("t", "r")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.02):
            await flow.run(ex, timeout=10.0)
    assert isinstance(ex.error, asyncio.CancelledError)
    assert log.of("abort") == ["a"]
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_deadline_and_outside_cancellation_together_propagate_the_cancellation(
    log: Log,
) -> None:
    started = asyncio.Event()

    async def wait(ex: Exchange) -> None:
        started.set()
        await asyncio.sleep(3600)

    flow = Flow().group("main", Rec("a", log), func_stage("wait", wait))
    task = asyncio.create_task(flow.run(Exchange("t", "r"), timeout=0.05))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert log.of("abort") == ["a"]


async def test_a_timed_out_run_leaves_the_task_uncancelled(log: Log) -> None:
    flow = Flow().group("main", Rec("a", log), ARec("slow", log, delay=10.0))
    ex = Exchange("t", "r")
    assert await flow.run(ex, timeout=0.01) is Outcome.ABORTED
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0.02)  # no stray cancellation arrives later


async def test_a_prepare_that_swallows_the_interruption_still_times_out(log: Log) -> None:
    async def stubborn(ex: Exchange) -> None:
        with contextlib.suppress(asyncio.CancelledError):  # misbehaving: carries on
            await asyncio.sleep(10)

    flow = Flow().group("main", Rec("a", log), func_stage("stubborn", stubborn))
    ex = Exchange("t", "r")
    assert await flow.run(ex, timeout=0.02) is Outcome.ABORTED
    assert isinstance(ex.error, TimeoutError)
    assert log.of("abort") == ["a"]
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_outside_cancellation_at_the_deadline_instant_wins(log: Log) -> None:
    async def both(ex: Exchange) -> None:
        task = asyncio.current_task()
        assert task is not None and ex.deadline is not None
        asyncio.get_running_loop().call_at(ex.deadline, task.cancel)  # same instant
        await asyncio.sleep(3600)

    flow = Flow().group("main", Rec("a", log), func_stage("both", both))
    task = asyncio.create_task(flow.run(Exchange("t", "r"), timeout=0.02))
    with pytest.raises(asyncio.CancelledError):
        await task
    assert log.of("abort") == ["a"]
