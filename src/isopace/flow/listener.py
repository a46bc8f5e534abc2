"""The observability hook: a listener the flow calls per stage method and per finished run.

Pass ``Flow(listener=...)`` to feed metrics (counts, latency histograms). The calls are plain
synchronous calls on the run's task: keep them cheap and non-blocking. A listener that raises is
logged and otherwise ignored. With no listener the flow does no timing work at all for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from isopace.flow.profiler import Phase
from isopace.flow.result import Outcome

if TYPE_CHECKING:
    from isopace.flow.exchange import Exchange


class FlowListener(Protocol):
    """Receives what the flow measured."""

    def stage_finished(
        self, stage: str, phase: Phase, seconds: float, error: BaseException | None
    ) -> None:
        """A prepare, commit or abort of ``stage`` ended; ``error``: what it raised, or None."""

    def run_finished(self, ex: Exchange, outcome: Outcome, seconds: float) -> None:
        """A run ended with ``outcome`` after ``seconds``; any cause is on ``ex.error``."""
