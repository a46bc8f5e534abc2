"""The run algorithm: join rules, ordering, routing, abort causes, commit/abort errors."""

from __future__ import annotations

from typing import Any

import pytest

from isopace import IsopaceError
from isopace.flow import (
    CONTINUE,
    DONE,
    SKIP,
    AbortedError,
    DuplicateStageError,
    Exchange,
    Flow,
    FlowError,
    NoEntryError,
    Outcome,
    Result,
    TooManyStagesError,
    UnknownGroupError,
    func_stage,
    route,
    stage,
)

from .conftest import ARec, Log, Rec


@pytest.mark.parametrize("kind", [Rec, ARec])
async def test_commit_runs_prepare_then_commit_in_order(kind: type[Rec], log: Log) -> None:
    flow = Flow().group("main", kind("a", log), kind("b", log, CONTINUE), kind("c", log))
    ex = Exchange("t1", "req")
    assert await flow.run(ex) is Outcome.COMMITTED
    assert log == [
        ("prepare", "a"),
        ("prepare", "b"),
        ("prepare", "c"),
        ("commit", "a"),
        ("commit", "b"),
        ("commit", "c"),
    ]
    assert ex.error is None and not ex.aborted
    assert ex.joined == ("a", "b", "c")


@pytest.mark.parametrize("kind", [Rec, ARec])
async def test_failing_prepare_aborts_joined_in_reverse_and_does_not_join(
    kind: type[Rec], log: Log
) -> None:
    boom = RuntimeError("boom")
    flow = Flow().group(
        "main", kind("a", log), kind("b", log), kind("c", log, raises=boom), kind("d", log)
    )
    ex = Exchange("t", "req")
    assert await flow.run(ex) is Outcome.ABORTED
    assert log.of("prepare") == ["a", "b", "c"]
    assert log.of("abort") == ["b", "a"]  # c raised: it did not join; d never ran
    assert log.of("commit") == []
    assert ex.error is boom and ex.aborted
    assert ex.joined == ("a", "b")


async def test_mixed_sync_and_async_stages_in_one_flow(log: Log) -> None:
    flow = Flow().group("main", Rec("a", log), ARec("b", log), Rec("c", log), ARec("d", log))
    assert await flow.run(Exchange("t", "r")) is Outcome.COMMITTED
    assert log.of("prepare") == ["a", "b", "c", "d"]
    assert log.of("commit") == ["a", "b", "c", "d"]
    log.clear()
    flow2 = Flow().group("main", Rec("a", log), ARec("b", log), Rec("c", log, raises=ValueError()))
    assert await flow2.run(Exchange("t", "r")) is Outcome.ABORTED
    assert log.of("abort") == ["b", "a"]


async def test_decline_with_abort_and_continue_joins_and_rolls_back(log: Log) -> None:
    flow = Flow().group("main", Rec("a", log), Rec("b", log, decline=True), Rec("c", log))
    ex = Exchange("t", "req")
    assert await flow.run(ex) is Outcome.ABORTED
    assert log.of("prepare") == ["a", "b"]  # the pass stops right after the abort
    assert log.of("abort") == ["b", "a"]  # b joined (CONTINUE), so it is rolled back too
    assert isinstance(ex.error, AbortedError)
    assert ex.response == "decline-by-b"


async def test_abort_cause_precedence(log: Log) -> None:
    cause = ValueError("insufficient funds")
    flow = Flow().group("main", Rec("a", log, decline=True, abort_with=cause))
    ex = Exchange("t", "r")
    await flow.run(ex)
    assert ex.error is cause
    # an exception raised by the prepare beats the cause given to ex.abort
    raised = RuntimeError("raised")
    flow = Flow().group("main", Rec("a", log, decline=True, abort_with=cause, raises=raised))
    ex = Exchange("t", "r")
    await flow.run(ex)
    assert ex.error is raised
    # ex.abort(None) never erases an earlier cause
    ex = Exchange("t", "r")

    def twice(e: Exchange) -> None:
        e.abort(cause)
        e.abort(None)

    await Flow().group("m", func_stage("x", twice)).run(ex)
    assert ex.error is cause
    # no cause at all: AbortedError
    ex = Exchange("t", "r")
    await Flow().group("m", func_stage("x", lambda e: e.abort())).run(ex)
    assert isinstance(ex.error, AbortedError) and isinstance(ex.error, IsopaceError)


async def test_skip_does_not_join(log: Log) -> None:
    flow = Flow().group("main", Rec("a", log), Rec("b", log, SKIP), Rec("c", log))
    ex = Exchange("t", "r")
    assert await flow.run(ex) is Outcome.COMMITTED
    assert log.of("prepare") == ["a", "b", "c"]
    assert log.of("commit") == ["a", "c"]
    assert ex.joined == ("a", "c")


async def test_done_stops_the_pass_and_does_not_join(log: Log) -> None:
    flow = Flow().group("main", Rec("a", log), Rec("b", log, DONE), Rec("c", log))
    ex = Exchange("t", "r")
    assert await flow.run(ex) is Outcome.COMMITTED
    assert log.of("prepare") == ["a", "b"]
    assert log.of("commit") == ["a"]  # b returned DONE: its own commit must not run
    assert ex.joined == ("a",)


async def test_done_with_abort_aborts(log: Log) -> None:
    flow = Flow().group("main", Rec("a", log), Rec("b", log, DONE, decline=True))
    assert await flow.run(Exchange("t", "r")) is Outcome.ABORTED
    assert log.of("abort") == ["a"]


async def test_route_appends_groups_to_the_work_list(log: Log) -> None:
    flow = (
        Flow()
        .group("main", Rec("a", log), Rec("r", log, route("x", "y")), Rec("b", log))
        .group("x", Rec("x1", log), Rec("x2", log))
        .group("y", ARec("y1", log))
    )
    ex = Exchange("t", "r")
    assert await flow.run(ex) is Outcome.COMMITTED
    # appended at the end of the work list, after the rest of the current group
    assert log.of("prepare") == ["a", "r", "b", "x1", "x2", "y1"]
    assert log.of("commit") == ["a", "r", "b", "x1", "x2", "y1"]  # the router joined


async def test_unknown_route_group_rolls_back_the_router(log: Log) -> None:
    flow = Flow().group("main", Rec("a", log), Rec("r", log, route("x", "nope")), Rec("b", log))
    flow.group("x", Rec("x1", log))
    ex = Exchange("t", "r")
    assert await flow.run(ex) is Outcome.ABORTED
    assert isinstance(ex.error, UnknownGroupError) and ex.error.group == "nope"
    assert "nope" in str(ex.error)
    assert log.of("prepare") == ["a", "r"]
    assert log.of("abort") == ["r", "a"]


async def test_max_stages_stops_a_routing_loop(log: Log) -> None:
    looping = Rec("loop", log, route("main"))
    flow = Flow(max_stages=10).group("main", looping)
    ex = Exchange("t", "r")
    assert await flow.run(ex) is Outcome.ABORTED
    assert isinstance(ex.error, TooManyStagesError)
    assert len(log.of("prepare")) == 10  # the 11th prepare never ran
    assert len(log.of("abort")) == 10


async def test_max_stages_is_inclusive(log: Log) -> None:
    flow = Flow(max_stages=3).group("main", Rec("a", log), Rec("b", log), Rec("c", log))
    assert await flow.run(Exchange("t", "r")) is Outcome.COMMITTED
    flow = Flow(max_stages=2).group("main", Rec("d", log), Rec("e", log), Rec("f", log))
    ex = Exchange("t", "r")
    assert await flow.run(ex) is Outcome.ABORTED
    assert isinstance(ex.error, TooManyStagesError)
    assert log.of("prepare")[-2:] == ["d", "e"]


async def test_failing_commit_does_not_stop_the_others(log: Log) -> None:
    e1, e2 = RuntimeError("one"), KeyError("two")
    flow = Flow().group(
        "main",
        Rec("a", log, commit_raises=e1),
        ARec("b", log),
        ARec("c", log, commit_raises=e2),
        Rec("d", log),
    )
    ex = Exchange("t", "r")
    assert await flow.run(ex) is Outcome.COMMITTED
    assert log.of("commit") == ["a", "b", "c", "d"]
    assert isinstance(ex.error, ExceptionGroup)
    assert list(ex.error.exceptions) == [e1, e2]
    assert log.of("abort") == []


async def test_failing_abort_is_logged_and_the_rest_still_run(
    log: Log, caplog: pytest.LogCaptureFixture
) -> None:
    flow = Flow().group(
        "main",
        Rec("a", log),
        Rec("b", log, abort_raises=RuntimeError("abort failed 4761739001010010")),
        Rec("c", log, raises=ValueError("x")),
    )
    ex = Exchange("t", "r")
    assert await flow.run(ex) is Outcome.ABORTED
    assert log.of("abort") == ["b", "a"]
    assert isinstance(ex.error, ValueError)
    assert "abort of stage b failed" in caplog.text
    assert "4761739001010010" not in caplog.text and "476173******0010" in caplog.text


async def test_prepare_returning_garbage_aborts_naming_the_stage(log: Log) -> None:
    flow = Flow().group("main", Rec("a", log), func_stage("odd", lambda ex: "yes"))
    ex = Exchange("t", "r")
    assert await flow.run(ex) is Outcome.ABORTED
    assert isinstance(ex.error, TypeError) and "'odd'" in str(ex.error)
    assert log.of("abort") == ["a"]


async def test_equal_result_objects_work_like_the_singletons(log: Log) -> None:
    flow = Flow().group(
        "main", Rec("a", log, Result("continue")), Rec("b", log, Result("skip")), Rec("c", log)
    )
    ex = Exchange("t", "r")
    assert await flow.run(ex) is Outcome.COMMITTED
    assert ex.joined == ("a", "c")


async def test_callable_object_with_async_call_is_awaited() -> None:
    class Prep:
        async def __call__(self, ex: Exchange) -> Result:
            ex.set("ran", True)
            return SKIP

    ex = Exchange("t", "r")
    assert await Flow().group("m", func_stage("x", Prep())).run(ex) is Outcome.COMMITTED
    assert ex.get("ran") is True and ex.joined == ()


async def test_func_stage_and_decorator() -> None:
    @stage("double")
    async def double(ex: Exchange) -> None:
        ex.set("n", ex.get("n", 1) * 2)

    plain = func_stage("inc", lambda ex: ex.set("n", ex.get("n") + 1))
    ex = Exchange("t", "r")
    assert await Flow().group("main", double, plain, double).run(ex) is Outcome.COMMITTED
    assert ex.get("n") == 6
    assert double.name == "double"


async def test_entry_errors_raise_before_anything_runs() -> None:
    with pytest.raises(NoEntryError):
        await Flow().run(Exchange("t", "r"))
    flow = Flow(entry="missing").group("main", func_stage("a", lambda ex: None))
    with pytest.raises(UnknownGroupError) as info:
        await flow.run(Exchange("t", "r"))
    assert isinstance(info.value, ValueError) and isinstance(info.value, FlowError)
    assert "missing" in str(info.value)


async def test_entry_names_a_group_other_than_the_first(log: Log) -> None:
    flow = Flow(entry="b").group("a", Rec("a1", log)).group("b", Rec("b1", log))
    assert flow.entry == "b"
    await flow.run(Exchange("t", "r"))
    assert log.of("prepare") == ["b1"]


async def test_group_extends_and_stage_names_are_unique(log: Log) -> None:
    a = Rec("a", log)
    flow = Flow().group("main", a).group("main", Rec("b", log)).group("other", a)
    assert flow.groups() == {"main": ("a", "b"), "other": ("a",)}
    assert flow.stages() == {"a": a, "b": flow.stages()["b"]}
    with pytest.raises(DuplicateStageError, match="'a'") as info:
        flow.group("x", Rec("a", log))
    assert isinstance(info.value, ValueError)
    with pytest.raises(DuplicateStageError):
        Flow().group("x", Rec("z", log), Rec("z", log))


@pytest.mark.parametrize("bad", [object(), func_stage])
async def test_adding_a_non_stage_is_refused(bad: Any) -> None:
    with pytest.raises(TypeError):
        Flow().group("main", bad)


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError):
        Flow(max_stages=0)
    with pytest.raises(ValueError):
        Flow(key=lambda ex: "k")
    with pytest.raises(ValueError):
        route()
    with pytest.raises(TypeError):
        route(1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        func_stage("", lambda ex: None)
    with pytest.raises(ValueError):
        Flow().group("")


async def test_a_flow_serves_concurrent_runs(log: Log) -> None:
    import asyncio

    flow = Flow().group("main", ARec("a", log), ARec("b", log, delay=0.001), Rec("c", log))
    outcomes = await asyncio.gather(*(flow.run(Exchange(str(i), "r")) for i in range(50)))
    assert set(outcomes) == {Outcome.COMMITTED}
    assert len(log.of("commit")) == 150


async def test_abort_with_skip_does_not_join_but_aborts(log: Log) -> None:
    flow = Flow().group("main", Rec("a", log), Rec("b", log, SKIP, decline=True), Rec("c", log))
    ex = Exchange("t", "r")
    assert await flow.run(ex) is Outcome.ABORTED
    assert log.of("prepare") == ["a", "b"]
    assert log.of("abort") == ["a"]
    assert ex.joined == ("a",)


async def test_done_first_commits_nothing(log: Log) -> None:
    flow = Flow().group("main", Rec("a", log, DONE), Rec("b", log))
    ex = Exchange("t", "r")
    assert await flow.run(ex) is Outcome.COMMITTED
    assert log.of("prepare") == ["a"] and log.of("commit") == [] and ex.joined == ()


async def test_route_after_skip_and_abort_inside_routed_group(log: Log) -> None:
    flow = (
        Flow()
        .group("main", Rec("a", log, SKIP), Rec("r", log, route("x")))
        .group("x", ARec("x1", log), Rec("x2", log, decline=True), Rec("x3", log))
    )
    ex = Exchange("t", "r")
    assert await flow.run(ex) is Outcome.ABORTED
    assert log.of("prepare") == ["a", "r", "x1", "x2"]
    assert log.of("abort") == ["x2", "x1", "r"]
    assert ex.joined == ("r", "x1", "x2")
