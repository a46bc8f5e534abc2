"""The log of a serving process: what each line costs the event loop, kept to what it prints.

Why: ``isopace serve`` logs one line per transaction (at INFO), on the event loop, and the host
bench measured logging on at 5-9% of the throughput with it off. Two parts of that cost buy
nothing here:

- **Look-ups the format never prints.** A record finds the thread's and the process's names;
  the format prints neither. The logging module's public switches turn them off
  (``logging.logThreads``, ``logProcesses``, ``logMultiprocessing``, from the logging HOWTO's
  "Optimization" section). The caller's file and line (a walk of the stack) have only a private
  switch, ``logging._srcfile``, which the project's rule against reading other modules' private
  names keeps out: about 2 µs a line left in.
- **A system call per line.** ``StreamHandler`` flushes its stream after every record. Here the
  flush of a line written on the event loop waits for the end of the loop's turn
  (:class:`TurnFlushed`), so the lines of one turn (under load, those of many transactions)
  leave in one write; elsewhere (start-up, shut-down, other threads) a line is flushed at once.

Measured with ``host._log`` over one approved exchange, 5 x 5000 calls, best, into a file:
17.4 µs a line as before, 17.1 with the switches, 15.0 with the flush per turn as well.

A writer thread was tried first (a ``QueueListener``, the message rendered off the loop) and
taken back: the thread's formatting holds the interpreter's lock as the loop's did, so the
throughput did not move and the p99 at half load rose from 8-10 to 12-14 ms.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TextIO

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class TurnFlushed(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that, on the event loop's thread, flushes once per loop turn."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        # The loop a flush is scheduled on (a loop that stopped before running it leaves it
        # here; the next loop schedules its own).
        self._scheduled: asyncio.AbstractEventLoop | None = None

    def flush(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on a running loop's thread: at once
            super().flush()
            return
        if self._scheduled is not loop:
            self._scheduled = loop
            loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._scheduled = None
        super().flush()


def setup(level: int, stream: TextIO) -> None:
    """The process's root logging: one :class:`TurnFlushed` handler on ``stream``, records
    without the look-ups the format does not print."""
    handler = TurnFlushed(stream)
    handler.setFormatter(logging.Formatter(FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
