"""What the flow measures around its stages: the profiler and the listener, behind one object.

The run loops call ``watch.clock()`` once and then ``watch.stage(...)`` after every stage method,
with no test of their own for whether anything is watching: a flow without profiler or listener
gets :data:`UNWATCHED`, whose methods do nothing (and read no clock); :func:`watch` picks the
watch for the others. Timings chain one clock reading from one stage to the next
(``stage`` returns the reading it took), so each includes the flow's own bookkeeping for that
stage, tens of nanoseconds.

:class:`Listened` wraps a whole run for the listener's ``run_finished``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeAlias

from isopace._cardtext import error_text
from isopace.flow.profiler import Phase
from isopace.flow.result import Outcome

if TYPE_CHECKING:
    from isopace.flow._resolve import Plan
    from isopace.flow.exchange import Exchange
    from isopace.flow.listener import FlowListener

Timings: TypeAlias = list[tuple[str, Phase, float]]
RunFunc: TypeAlias = Callable[
    ["Exchange", "Plan", "float | None", "str | None"], Coroutine[Any, Any, Outcome]
]
"""A run of a transaction: ``(ex, plan, deadline, fingerprint)``; the flow's core run and the
wrappers around it (idempotency, the listener) all have this shape."""

_clock = time.perf_counter


class Watch:
    """Nothing watching: no clock read, nothing recorded."""

    __slots__ = ()

    profiles = False
    """Whether runs keep per-stage timings on the exchange (``profiler=True``)."""

    def clock(self) -> float:
        return 0.0

    def stage(
        self,
        timings: Timings | None,
        name: str,
        phase: Phase,
        began: float,
        error: BaseException | None,
    ) -> float:
        """A stage method that started at ``began`` ended (``error``: what it raised); returns
        the clock reading the next stage's time starts from."""
        return 0.0


UNWATCHED = Watch()


class Profiled(Watch):
    """The profiler: each stage method's time into the run's ``timings``."""

    __slots__ = ()

    profiles = True

    def clock(self) -> float:
        return _clock()

    def stage(
        self,
        timings: Timings | None,
        name: str,
        phase: Phase,
        began: float,
        error: BaseException | None,
    ) -> float:
        ended = _clock()
        timings.append((name, phase, ended - began))  # type: ignore[union-attr]
        return ended


class Listening(Watch):
    """A listener, told of each stage method (and, with ``profiles``, the profiler too)."""

    __slots__ = ("listener", "log", "profiles")

    def __init__(self, listener: FlowListener, log: logging.Logger, profiles: bool) -> None:
        self.listener = listener
        self.log = log
        self.profiles = profiles

    def clock(self) -> float:
        return _clock()

    def stage(
        self,
        timings: Timings | None,
        name: str,
        phase: Phase,
        began: float,
        error: BaseException | None,
    ) -> float:
        ended = _clock()
        seconds = ended - began
        if timings is not None:
            timings.append((name, phase, seconds))
        try:
            self.listener.stage_finished(name, phase, seconds, error)
        except Exception as exc:
            self.log.error(
                "flow listener failed\n%s",
                error_text(exc, traceback=True),
                extra={"stage": name, "phase": phase.value},
            )
        return ended


def watch(profiler: bool, listener: FlowListener | None, log: logging.Logger) -> Watch:
    """The watch for a flow's ``profiler=`` and ``listener=``: one class per combination, so
    that each ``stage`` does only its own work (the profiler alone appends and nothing else)."""
    if listener is not None:
        return Listening(listener, log, profiler)
    return Profiled() if profiler else UNWATCHED


class Listened:
    """A run reported to the listener's ``run_finished`` (also when it raises: as aborted)."""

    __slots__ = ("inner", "listener", "log")

    def __init__(self, inner: RunFunc, listener: FlowListener, log: logging.Logger) -> None:
        self.inner = inner
        self.listener = listener
        self.log = log

    async def run(
        self, ex: Exchange, plan: Plan, deadline: float | None, fingerprint: str | None = None
    ) -> Outcome:
        start = _clock()
        outcome = Outcome.ABORTED
        try:
            outcome = await self.inner(ex, plan, deadline, fingerprint)
            return outcome
        finally:
            try:
                self.listener.run_finished(ex, outcome, _clock() - start)
            except Exception as exc:
                self.log.error(
                    "flow listener failed\n%s",
                    error_text(exc, traceback=True),
                    extra={"exchange_id": ex.id},
                )
