"""Stage resolution: look at a stage once, when it is added, and keep what the run needs.

For each of ``prepare``, ``commit`` and ``abort`` the flow keeps the callable and whether it is a
coroutine function, so the run loop makes a plain call (and awaits only when it must) without
inspecting anything per call. A group's stages are also kept as ready-made step tuples
(:class:`Plan`) for the run loop's fast path.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeAlias


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

    def __init__(self, stage: Any) -> None:
        name = getattr(stage, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"flow: {stage!r} is not a stage: it needs a non-empty str name")
        prepare = getattr(stage, "prepare", None)
        if not callable(prepare):
            raise TypeError(f"flow: stage {name!r} has no callable prepare(ex)")
        self.stage = stage
        self.name: str = name
        self.prepare: Callable[[Any], Any] = prepare
        self.prepare_async = is_async(prepare)
        self.commit = _optional(stage, "commit", name)
        self.commit_async = self.commit is not None and is_async(self.commit)
        self.abort = _optional(stage, "abort", name)
        self.abort_async = self.abort is not None and is_async(self.abort)

    def __repr__(self) -> str:
        return f"<resolved stage {self.name!r}>"


Step: TypeAlias = tuple[int, Callable[[Any], Any], bool]
"""A stage's position in its group, its prepare and whether that prepare is a coroutine."""


class Plan:
    """A group's stages, with the tuples the run loop iterates."""

    __slots__ = ("commits", "stages", "steps")

    def __init__(self, stages: tuple[ResolvedStage, ...]) -> None:
        self.stages = stages
        self.steps: tuple[Step, ...] = tuple(
            (i, rs.prepare, rs.prepare_async) for i, rs in enumerate(stages)
        )
        commits: list[tuple[int, ResolvedStage, Callable[[Any], Any], bool]] = []
        for rs in stages:
            if rs.commit is not None:
                commits.append((len(commits), rs, rs.commit, rs.commit_async))
        self.commits = tuple(commits)


def _optional(stage: object, attr: str, name: str) -> Callable[[Any], Any] | None:
    fn = getattr(stage, attr, None)
    if fn is None:
        return None
    if not callable(fn):
        raise TypeError(f"flow: stage {name!r}: {attr} must be callable")
    return fn  # type: ignore[no-any-return]


def is_async(fn: Callable[..., Any]) -> bool:
    """Whether calling ``fn`` gives a coroutine to await (also for an ``async __call__``)."""
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - a callable object's async __call__
    return call is not None and not inspect.isroutine(fn) and inspect.iscoroutinefunction(call)
