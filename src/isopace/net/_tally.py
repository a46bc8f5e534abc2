"""One log line per interval for an event that may repeat thousands of times a second. Private.

Why: the port's limits fire on what clients do (a flood of connections past the maximum, a
thousand idle terminals reaching their timeout together, a process out of descriptors). A line
per event would let any client fill the disk and bury everything else in the log; no line would
leave the operator blind. So the first event after a quiet interval is logged at once, the ones
that follow within ``interval`` seconds are only counted, and when the interval ends one line
gives their count (and the detail of the last), for as long as they continue. One timer per
:class:`Tally`, armed only while events come; nothing on any per-request path.
"""

from __future__ import annotations

import asyncio
import logging

logger = logging.getLogger("isopace.net")


class Tally:
    """Counts one kind of event and logs it rate-limited (see the module notes).

    ``text`` says what happened (``"refused a connection: 100 connections open, the maximum"``);
    :meth:`note` adds one event with its detail (a peer, an error): the first is logged as
    ``text (detail)``, the rest as ``text: N more in the last 10 s (last: detail)``."""

    __slots__ = ("_count", "_detail", "_loop", "_timer", "event", "interval", "level", "text")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        event: str,
        text: str,
        *,
        level: int = logging.WARNING,
        interval: float = 10.0,
    ) -> None:
        self._loop = loop
        self.event = event
        self.text = text
        self.level = level
        self.interval = interval
        self._count = 0
        self._detail = ""
        self._timer: asyncio.TimerHandle | None = None

    def note(self, detail: str) -> None:
        """One more event."""
        if self._timer is None:  # quiet until now: say it at once, then count for an interval
            self._log(f"{self.text} ({detail})", 1)
            self._timer = self._loop.call_later(self.interval, self._tick)
            return
        self._count += 1
        self._detail = detail

    def _tick(self) -> None:
        if not self._count:
            self._timer = None  # quiet again: the next event is logged at once
            return
        self.flush()
        self._timer = self._loop.call_later(self.interval, self._tick)

    def flush(self) -> None:
        """Log the events counted since the last line now (at shutdown, or at the interval)."""
        count, self._count = self._count, 0
        if count:
            self._log(
                f"{self.text}: {count} more in the last {self.interval:g} s (last: {self._detail})",
                count,
            )

    def close(self) -> None:
        """Log what is still counted and stop the timer."""
        self.flush()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _log(self, message: str, count: int) -> None:
        logger.log(self.level, "%s", message, extra={"event": self.event, "count": count})
