"""The profiler (ex.timings, ex.profile()) and the FlowListener hook."""

from __future__ import annotations

import asyncio
import re
import time

import pytest

from isopace.flow import (
    Exchange,
    Flow,
    MemoryStore,
    Outcome,
    Phase,
    StageTiming,
    func_stage,
)
from isopace.flow.profiler import format_profile, format_seconds

from .conftest import ARec, Log, Rec


async def test_profiler_records_every_phase_in_order(log: Log) -> None:
    flow = Flow(profiler=True).group(
        "main", Rec("a", log), ARec("b", log), Rec("c", log, raises=ValueError())
    )
    ex = Exchange("t", "r")
    await flow.run(ex)
    assert [(t.stage, t.phase) for t in ex.timings] == [
        ("a", Phase.PREPARE),
        ("b", Phase.PREPARE),
        ("c", Phase.PREPARE),  # recorded even though it raised
        ("b", Phase.ABORT),
        ("a", Phase.ABORT),
    ]
    assert all(t.seconds >= 0 for t in ex.timings)
    profile = ex.profile()
    assert re.fullmatch(
        r"a/prepare=\S+ b/prepare=\S+ c/prepare=\S+ b/abort=\S+ a/abort=\S+ total=\S+", profile
    )


async def test_profiler_measures_and_commit_is_timed() -> None:
    def slow(ex: Exchange) -> None:
        time.sleep(0.002)

    class Commits:
        name = "commits"

        def prepare(self, ex: Exchange) -> None:
            pass

        async def commit(self, ex: Exchange) -> None:
            await asyncio.sleep(0.002)

    ex = Exchange("t", "r")
    await Flow(profiler=True).group("m", func_stage("slow", slow), Commits()).run(ex)
    timings = {(t.stage, t.phase): t.seconds for t in ex.timings}
    assert timings[("slow", Phase.PREPARE)] >= 0.002
    assert timings[("commits", Phase.COMMIT)] >= 0.002
    assert re.search(r"slow/prepare=\d+\.\dms", ex.profile())


async def test_profile_is_empty_when_off(log: Log) -> None:
    ex = Exchange("t", "r")
    await Flow().group("main", Rec("a", log)).run(ex)
    assert ex.timings == [] and ex.profile() == ""


def test_profile_format_units() -> None:
    assert format_seconds(850e-9) == "850ns"
    assert format_seconds(12.34e-6) == "12.3µs"
    assert format_seconds(4.5e-3) == "4.5ms"
    assert format_seconds(1.2) == "1.20s"
    timings = [
        StageTiming("auth", Phase.PREPARE, 0.0012),
        StageTiming("ledger", Phase.COMMIT, 0.0022),
    ]
    assert format_profile(timings) == "auth/prepare=1.2ms ledger/commit=2.2ms total=3.4ms"


class Listener:
    def __init__(self) -> None:
        self.stages: list[tuple[str, Phase, type[BaseException] | None]] = []
        self.runs: list[tuple[str, Outcome]] = []

    def stage_finished(
        self, stage: str, phase: Phase, seconds: float, error: BaseException | None
    ) -> None:
        assert seconds >= 0
        self.stages.append((stage, phase, None if error is None else type(error)))

    def run_finished(self, ex: Exchange, outcome: Outcome, seconds: float) -> None:
        self.runs.append((ex.id, outcome))


async def test_listener_gets_every_stage_and_outcome(log: Log) -> None:
    listener = Listener()
    flow = Flow(listener=listener, idempotency=MemoryStore(), key=lambda ex: ex.id).group(
        "main", Rec("a", log), ARec("b", log)
    )
    await flow.run(Exchange("ok", "r"))
    assert listener.stages == [
        ("a", Phase.PREPARE, None),
        ("b", Phase.PREPARE, None),
        ("a", Phase.COMMIT, None),
        ("b", Phase.COMMIT, None),
    ]
    listener.stages.clear()
    failing = Flow(listener=listener).group("main", Rec("a", log), Rec("x", log, raises=OSError()))
    await failing.run(Exchange("bad", "r"))
    assert listener.stages == [
        ("a", Phase.PREPARE, None),
        ("x", Phase.PREPARE, OSError),
        ("a", Phase.ABORT, None),
    ]
    assert listener.runs == [("ok", Outcome.COMMITTED), ("bad", Outcome.ABORTED)]


async def test_listener_sees_replays_and_cancellations() -> None:
    listener = Listener()

    def respond(ex: Exchange) -> None:
        ex.response = "0210"

    flow = Flow(listener=listener, idempotency=MemoryStore(), key=lambda ex: "k").group(
        "main", func_stage("respond", respond)
    )
    await flow.run(Exchange("1", "r"))
    await flow.run(Exchange("2", "r"))
    hang = Flow(listener=listener).group("main", func_stage("hang", lambda ex: asyncio.sleep(60)))
    task = asyncio.create_task(hang.run(Exchange("3", "r")))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert listener.runs == [
        ("1", Outcome.COMMITTED),
        ("2", Outcome.REPLAYED),
        ("3", Outcome.ABORTED),
    ]


async def test_a_failing_listener_is_only_logged(
    log: Log, caplog: pytest.LogCaptureFixture
) -> None:
    track = "4761739001010010=2512101123 B4761739001010010^DOE/JOHN^25121011234"

    class Broken:
        def stage_finished(self, *args: object) -> None:
            raise RuntimeError(f"metrics down {track}")

        def run_finished(self, *args: object) -> None:
            raise RuntimeError(f"metrics down {track}")

    flow = Flow(listener=Broken()).group("main", Rec("a", log))
    assert await flow.run(Exchange("t", "r")) is Outcome.COMMITTED
    assert log.of("commit") == ["a"]
    assert "listener failed" in caplog.text
    # logged with its traceback, masked: never the raw exception (no exc_info)
    assert "Traceback" in caplog.text and "476173******0010=****" in caplog.text
    assert not [r for r in caplog.records if r.exc_info or r.exc_text]
    for secret in ("4761739001010010", "2512101123", "DOE/JOHN"):
        assert secret not in caplog.text
