"""What the flow measures around its stages: the profiler and the listener, behind one object.

A run takes two things from its watch: ``clock`` and a per-run ``mark`` function
(:meth:`Watch.marks`, which also hands out the list the exchange keeps for its timings). The
passes call ``mark((phase, clock()))`` where a chain of timings starts and
``mark((stage_name, clock()))`` after every stage method (``(name, clock(), error)`` after one
that raised), with no test of their own for whether anything is watching. A stage's
time is the distance from the mark before it, so each includes the flow's own bookkeeping for
that stage, tens of nanoseconds; :func:`~isopace.flow.profiler.stage_timings` works the
durations out when ``ex.timings`` is read.

Why marks and not a method of the watch per stage: with the profiler, ``mark`` is the run's
list's ``append`` and ``clock`` is ``time.perf_counter``, two builtins and no Python frame. On
the 5-stage benchmark that is about 90 ns a stage method against 190 ns for a watch method
doing the same, 1 µs a run. A flow without profiler or listener gets :data:`UNWATCHED`, whose
``clock`` reads no clock and whose ``mark`` ignores its argument, both builtins as well (about
40 ns a stage method, what a do-nothing Python method costs too).

:class:`Listened` wraps a whole run for the listener's ``run_finished``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeAlias

from isopace._cardtext import error_text
from isopace.flow.profiler import Mark, Marks, Phase
from isopace.flow.result import Outcome

if TYPE_CHECKING:
    from isopace.flow._resolve import Plan
    from isopace.flow.exchange import Exchange
    from isopace.flow.listener import FlowListener

MarkFunc: TypeAlias = Callable[[Mark], object]
RunFunc: TypeAlias = Callable[
    ["Exchange", "Plan", "float | None", "str | None"], Coroutine[Any, Any, Outcome]
]
"""A run of a transaction: ``(ex, plan, deadline, fingerprint)``; the flow's core run and the
wrappers around it (idempotency, the listener) all have this shape."""

_clock = time.perf_counter

_IGNORE: MarkFunc = ().count
"""A builtin that takes one argument and does nothing with it (it counts it in an empty
tuple): the do-nothing mark, a call without a Python frame."""


_UNMARKED: tuple[None, MarkFunc] = (None, _IGNORE)


class Watch:
    """Nothing watching: no clock read, nothing recorded."""

    __slots__ = ("clock",)

    profiles = False
    """Whether runs keep per-stage timings on the exchange (``profiler=True``)."""

    def __init__(self, clock: Callable[[], float] = float) -> None:
        self.clock = clock
        """The clock the marks read: without a watch ``float``, a builtin that returns 0.0
        and reads nothing. An instance attribute, not a class one, so that reading it is
        one of the interpreter's fast attribute loads."""

    def marks(self) -> tuple[Marks | None, MarkFunc]:
        """One run's list of marks for the exchange to keep (None: no timings) and its mark
        function (see the module documentation)."""
        return _UNMARKED


UNWATCHED = Watch()


class Profiled(Watch):
    """The profiler: the run's marks kept on the exchange, its timings worked out from them."""

    __slots__ = ()

    profiles = True

    def __init__(self) -> None:
        super().__init__(_clock)

    def marks(self) -> tuple[Marks | None, MarkFunc]:
        marks: Marks = []
        return marks, marks.append


class Listening(Watch):
    """A listener, told of each stage method (and, with ``profiles``, the profiler too)."""

    __slots__ = ("listener", "log", "profiles")

    def __init__(self, listener: FlowListener, log: logging.Logger, profiles: bool) -> None:
        super().__init__(_clock)
        self.listener = listener
        self.log = log
        self.profiles = profiles

    def marks(self) -> tuple[Marks | None, MarkFunc]:
        kept: Marks | None = [] if self.profiles else None
        return kept, _Told(self.listener, self.log, kept).mark


class _Told:
    """One run's marks turned into the listener's ``stage_finished`` calls as they come."""

    __slots__ = ("kept", "last", "listener", "log", "phase")

    def __init__(self, listener: FlowListener, log: logging.Logger, kept: Marks | None) -> None:
        self.listener = listener
        self.log = log
        self.kept = kept
        self.phase = Phase.PREPARE
        self.last = 0.0

    def mark(self, mark: Mark) -> None:
        if self.kept is not None:
            self.kept.append(mark)
        name, reading = mark[0], mark[1]
        seconds = reading - self.last
        self.last = reading
        if isinstance(name, Phase):
            self.phase = name
            return
        error = mark[2] if len(mark) > 2 else None
        try:
            self.listener.stage_finished(name, self.phase, seconds, error)
        except Exception as exc:
            self.log.error(
                "flow listener failed\n%s",
                error_text(exc, traceback=True),
                extra={"stage": name, "phase": self.phase.value},
            )


def watch(profiler: bool, listener: FlowListener | None, log: logging.Logger) -> Watch:
    """The watch for a flow's ``profiler=`` and ``listener=``: one class per combination, so
    that each run's marks do only their own work (the profiler's only append)."""
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
