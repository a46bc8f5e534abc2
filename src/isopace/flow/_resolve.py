"""Stage resolution: look at a stage once, when it is added, and keep what the run needs.

For each of ``prepare``, ``commit`` and ``abort`` the flow keeps the callable and whether it is a
coroutine function, so the run loop makes a plain call (and awaits only when it must) without
inspecting anything per call. With the profiler or a listener, the callables are wrapped here
once in timing wrappers of the same kind (sync or async); without them nothing is wrapped.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from typing import Any

from isopace.flow.exchange import Exchange
from isopace.flow.listener import FlowListener
from isopace.flow.profiler import Phase, StageTiming


class ResolvedStage:
    """A stage as the run loop sees it."""

    __slots__ = (
        "abort",
        "abort_async",
        "commit",
        "commit_async",
        "name",
        "prepare",
        "prepare_async",
        "stage",
    )

    def __init__(
        self,
        stage: Any,
        *,
        profiler: bool,
        listener: FlowListener | None,
        logger: logging.Logger,
    ) -> None:
        name = getattr(stage, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"flow: {stage!r} is not a stage: it needs a non-empty str name")
        prepare = getattr(stage, "prepare", None)
        if not callable(prepare):
            raise TypeError(f"flow: stage {name!r} has no callable prepare(ex)")
        self.stage = stage
        self.name = name
        timed = profiler or listener is not None
        self.prepare_async = _is_async(prepare)
        self.prepare = (
            _timed(prepare, self.prepare_async, name, Phase.PREPARE, profiler, listener, logger)
            if timed
            else prepare
        )
        commit = _optional(stage, "commit", name)
        self.commit_async = commit is not None and _is_async(commit)
        self.commit = (
            _timed(commit, self.commit_async, name, Phase.COMMIT, profiler, listener, logger)
            if timed and commit is not None
            else commit
        )
        abort = _optional(stage, "abort", name)
        self.abort_async = abort is not None and _is_async(abort)
        self.abort = (
            _timed(abort, self.abort_async, name, Phase.ABORT, profiler, listener, logger)
            if timed and abort is not None
            else abort
        )

    def __repr__(self) -> str:
        return f"<resolved stage {self.name!r}>"


def _optional(stage: object, attr: str, name: str) -> Callable[..., Any] | None:
    fn = getattr(stage, attr, None)
    if fn is None:
        return None
    if not callable(fn):
        raise TypeError(f"flow: stage {name!r}: {attr} must be callable")
    return fn  # type: ignore[no-any-return]


def _is_async(fn: Callable[..., Any]) -> bool:
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - a callable object's async __call__
    return call is not None and not inspect.isroutine(fn) and inspect.iscoroutinefunction(call)


def _timed(
    fn: Callable[[Exchange], Any],
    is_async: bool,
    name: str,
    phase: Phase,
    profiler: bool,
    listener: FlowListener | None,
    logger: logging.Logger,
) -> Callable[[Exchange], Any]:
    clock = time.perf_counter

    def observe(ex: Exchange, seconds: float, error: BaseException | None) -> None:
        if profiler:
            ex.timings.append(StageTiming(name, phase, seconds))
        if listener is not None:
            try:
                listener.stage_finished(name, phase, seconds, error)
            except Exception:
                logger.exception("flow listener failed", extra={"stage": name, "phase": str(phase)})

    if is_async:

        async def timed_async(ex: Exchange) -> Any:
            start = clock()
            try:
                result = await fn(ex)
            except BaseException as exc:
                observe(ex, clock() - start, exc)
                raise
            observe(ex, clock() - start, None)
            return result

        return timed_async

    def timed_sync(ex: Exchange) -> Any:
        start = clock()
        try:
            result = fn(ex)
        except BaseException as exc:
            observe(ex, clock() - start, exc)
            raise
        observe(ex, clock() - start, None)
        return result

    return timed_sync
