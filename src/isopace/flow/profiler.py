"""Per-stage timings and their one-line rendering.

With ``Flow(profiler=True)`` every prepare (also one that raises), commit and abort appends a
``StageTiming`` to ``ex.timings``; ``ex.profile()`` renders them in order as
``auth/prepare=12.0µs ledger/commit=1.3ms total=1.4ms``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple, TypeAlias


class Phase(StrEnum):
    """The phase a stage method belongs to."""

    PREPARE = "prepare"
    COMMIT = "commit"
    ABORT = "abort"


class StageTiming(NamedTuple):
    """How long one stage method took."""

    stage: str
    phase: Phase
    seconds: float


Mark: TypeAlias = tuple[str, float] | tuple[str, float, BaseException]
"""One clock reading of a run: ``(phase, reading)`` where a chain of timings starts,
``(stage, reading)`` where a stage method ended, ``(stage, reading, error)`` where one raised."""

Marks: TypeAlias = list[Mark]


def stage_timings(marks: Marks) -> list[StageTiming]:
    """The timings of a run's marks: each stage method's time is the distance from the mark
    before it, its phase the one the last phase mark named."""
    timings: list[StageTiming] = []
    phase = Phase.PREPARE
    last = 0.0
    for mark in marks:
        name, reading = mark[0], mark[1]
        if isinstance(name, Phase):
            phase = name
        else:
            timings.append(StageTiming(name, phase, reading - last))
        last = reading
    return timings


def format_seconds(seconds: float) -> str:
    """Render a duration in a readable unit: ``850ns``, ``12.3µs``, ``4.5ms``, ``1.20s``."""
    if seconds < 1e-6:
        return f"{seconds * 1e9:.0f}ns"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f}µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.1f}ms"
    return f"{seconds:.2f}s"


def format_profile(timings: list[StageTiming]) -> str:
    """One line: each ``stage/phase=duration`` in order, then ``total=``; empty if none."""
    if not timings:
        return ""
    parts = [f"{t.stage}/{t.phase}={format_seconds(t.seconds)}" for t in timings]
    parts.append(f"total={format_seconds(sum(t.seconds for t in timings))}")
    return " ".join(parts)
