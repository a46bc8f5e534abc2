"""The run algorithm against a small reference model, on generated pipelines.

Each generated flow has up to six stages (sync or async) with fixed behaviours — continue,
skip, done, route to existing or unknown groups, raise, decline with ``ex.abort()`` — spread
over up to three groups that may share stages and route into each other (loops included). The
log of prepare / commit / abort calls, the outcome, ``ex.joined`` and the kind of ``ex.error``
must match what the rules in the design document give. Every case runs through both paths of
``Flow.run`` (see ``conftest.run_path``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from isopace.flow import (
    CONTINUE,
    DONE,
    SKIP,
    AbortedError,
    Exchange,
    Flow,
    Outcome,
    Result,
    TooManyStagesError,
    UnknownGroupError,
    route,
)

MAX_STAGES = 8
GROUPS = ["g0", "g1", "g2"]


@dataclass(frozen=True)
class Spec:
    name: str
    behaviour: str  # none | continue | skip | done | route | raise | decline
    targets: tuple[str, ...]
    is_async: bool
    commit_raises: bool
    abort_raises: bool


class Boom(Exception):
    pass


def make_stage(spec: Spec, log: list[tuple[str, str]]) -> Any:
    def vote(ex: Exchange) -> Result | None:
        log.append(("prepare", spec.name))
        b = spec.behaviour
        if b == "raise":
            raise Boom(spec.name)
        if b == "decline":
            ex.abort()
            return CONTINUE
        return {
            "none": None,
            "continue": CONTINUE,
            "skip": SKIP,
            "done": DONE,
            "route": route(*spec.targets) if spec.targets else CONTINUE,
        }[b]

    def commit(ex: Exchange) -> None:
        log.append(("commit", spec.name))
        if spec.commit_raises:
            raise Boom("commit " + spec.name)

    def abort(ex: Exchange) -> None:
        log.append(("abort", spec.name))
        if spec.abort_raises:
            raise Boom("abort " + spec.name)

    if spec.is_async:

        class AsyncStage:
            name = spec.name

            async def prepare(self, ex: Exchange) -> Result | None:
                await asyncio.sleep(0)
                return vote(ex)

            async def commit(self, ex: Exchange) -> None:
                commit(ex)

            async def abort(self, ex: Exchange) -> None:
                await asyncio.sleep(0)
                abort(ex)

        return AsyncStage()

    class SyncStage:
        name = spec.name

        def prepare(self, ex: Exchange) -> Result | None:
            return vote(ex)

        def commit(self, ex: Exchange) -> None:
            commit(ex)

        def abort(self, ex: Exchange) -> None:
            abort(ex)

    return SyncStage()


def model(
    specs: list[Spec], groups: dict[str, list[int]]
) -> tuple[list[tuple[str, str]], Outcome, list[str], type[BaseException] | None]:
    """The rules, written as plainly as possible."""
    log: list[tuple[str, str]] = []
    work = [specs[i] for i in groups["g0"]]
    joined: list[Spec] = []
    error: type[BaseException] | None = None
    commit = True
    position = 0
    while position < len(work):
        if position == MAX_STAGES:
            commit, error = False, TooManyStagesError
            break
        spec = work[position]
        position += 1
        log.append(("prepare", spec.name))
        b = spec.behaviour
        if b == "raise":
            commit, error = False, Boom
            break
        if b in ("none", "continue") or (b == "route" and not spec.targets):
            joined.append(spec)
        elif b == "decline":
            joined.append(spec)
            commit, error = False, AbortedError
            break
        elif b == "done":
            break
        elif b == "route":
            joined.append(spec)
            unknown = [g for g in spec.targets if g not in groups]
            if unknown:
                commit, error = False, UnknownGroupError
                break
            for g in spec.targets:
                work.extend(specs[i] for i in groups[g])
    if commit:
        log.extend(("commit", s.name) for s in joined)
        if any(s.commit_raises for s in joined):
            error = ExceptionGroup
        return log, Outcome.COMMITTED, [s.name for s in joined], error
    log.extend(("abort", s.name) for s in reversed(joined))
    return log, Outcome.ABORTED, [s.name for s in joined], error


@st.composite
def pipelines(draw: st.DrawFn) -> tuple[list[Spec], dict[str, list[int]]]:
    n = draw(st.integers(1, 6))
    group_count = draw(st.integers(1, 3))
    names = GROUPS[:group_count]
    specs = [
        Spec(
            name=f"s{i}",
            behaviour=draw(
                st.sampled_from(
                    ["none", "continue", "continue", "skip", "done", "route", "raise", "decline"]
                )
            ),
            targets=tuple(draw(st.lists(st.sampled_from([*names, "nope"]), max_size=2))),
            is_async=draw(st.booleans()),
            commit_raises=draw(st.integers(0, 9)) == 0,
            abort_raises=draw(st.integers(0, 9)) == 0,
        )
        for i in range(n)
    ]
    groups = {g: draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=4)) for g in names}
    return specs, groups


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(pipelines())
async def test_flow_matches_the_model(case: tuple[list[Spec], dict[str, list[int]]]) -> None:
    specs, groups = case
    log: list[tuple[str, str]] = []
    stages = [make_stage(spec, log) for spec in specs]
    flow = Flow(max_stages=MAX_STAGES)
    for g, members in groups.items():
        flow.group(g, *(stages[i] for i in members))
    ex = Exchange("t", "r")
    outcome = await flow.run(ex)
    want_log, want_outcome, want_joined, want_error = model(specs, groups)
    assert log == want_log
    assert outcome is want_outcome
    assert list(ex.joined) == want_joined
    if want_error is None:
        assert ex.error is None
    else:
        assert type(ex.error) is want_error
    assert ex.aborted == (outcome is Outcome.ABORTED)
