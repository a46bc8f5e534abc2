"""Stages that record what the flow calls on them, sync and async."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from isopace.flow import Exchange, Flow, Result


class Log(list[tuple[str, str]]):
    """(phase, stage) calls in order."""

    def of(self, phase: str) -> list[str]:
        return [name for p, name in self if p == phase]


class Rec:
    """A sync stage with prepare, commit and abort; ``vote`` is what prepare returns."""

    def __init__(
        self,
        name: str,
        log: Log,
        vote: Any = None,
        *,
        raises: BaseException | None = None,
        abort_with: BaseException | None = None,
        decline: bool = False,
        commit_raises: Exception | None = None,
        abort_raises: Exception | None = None,
    ) -> None:
        self.name = name
        self.log = log
        self.vote = vote
        self.raises = raises
        self.abort_with = abort_with
        self.decline = decline
        self.commit_raises = commit_raises
        self.abort_raises = abort_raises

    def prepare(self, ex: Exchange) -> Result | None:
        self.log.append(("prepare", self.name))
        if self.decline:
            ex.response = f"decline-by-{self.name}"
            ex.abort(self.abort_with)
        if self.raises is not None:
            raise self.raises
        return self.vote  # type: ignore[no-any-return]

    def commit(self, ex: Exchange) -> None:
        self.log.append(("commit", self.name))
        if self.commit_raises is not None:
            raise self.commit_raises

    def abort(self, ex: Exchange) -> None:
        self.log.append(("abort", self.name))
        if self.abort_raises is not None:
            raise self.abort_raises


class ARec(Rec):
    """The async twin of :class:`Rec`; ``delay`` makes prepare sleep first."""

    def __init__(self, name: str, log: Log, vote: Any = None, *, delay: float = 0.0, **kw: Any):
        super().__init__(name, log, vote, **kw)
        self.delay = delay
        self.abort_delay = 0.0

    async def prepare(self, ex: Exchange) -> Result | None:  # type: ignore[override]
        if self.delay:
            await asyncio.sleep(self.delay)
        await asyncio.sleep(0)
        return super().prepare(ex)

    async def commit(self, ex: Exchange) -> None:  # type: ignore[override]
        await asyncio.sleep(0)
        super().commit(ex)

    async def abort(self, ex: Exchange) -> None:  # type: ignore[override]
        if self.abort_delay:
            await asyncio.sleep(self.abort_delay)
        await asyncio.sleep(0)
        super().abort(ex)


@pytest.fixture
def log() -> Log:
    return Log()


@pytest.fixture(autouse=True, params=["fast", "general"])
def run_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs twice: with the plain run (``Transaction.run_plain``) where it applies,
    and with the general passes forced, so both implement every rule."""
    if request.param == "general":
        original = Flow._resolve_entry

        def general_only(self: Flow) -> Any:
            plan = original(self)
            self._entry_fits = False
            return plan

        monkeypatch.setattr(Flow, "_resolve_entry", general_only)
    return str(request.param)
