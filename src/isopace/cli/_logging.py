"""The log of a serving process, written by a thread of its own instead of the event loop.

Why: ``isopace serve`` logs one line per transaction, and a line formatted and written where
it is logged costs the event loop the handler's work too: the time stamp rendered, the
message merged with its arguments (the transaction's profile among them), the stream written
and flushed, a system call per line. Here the loop only makes the record and puts it on a
queue; a :class:`logging.handlers.QueueListener` thread formats and writes it, while the
loop serves the next transaction (the write releases the interpreter's lock).

Decisions:

- The queue takes the record as it is made. The standard ``QueueHandler`` formats the
  message on the caller's thread (to make the record picklable, which a queue inside the
  process does not need); :class:`_Unformatted` leaves that to the listener. So what a
  record's arguments render is rendered off the loop: the host passes the transaction's
  profile as an object whose ``str()`` builds it. The arguments must not change after the
  call; the host's do not (strings, and an exchange whose run is over).
- A record does not look up what the format never prints: the caller's file and line (a
  walk of the stack per record), the thread and process names (the logging module's own
  switches, ``logging.logThreads`` and its siblings, and ``logging._srcfile``, documented for
  this purpose in the logging HOWTO's "Optimization" section).
- Order is kept: every record of the process goes through the one queue, so the lines come
  out in the order they were logged. :meth:`QueuedLog.stop` writes what is still queued
  before it returns (the process calls it on its way out, whatever the way); a process
  killed with SIGKILL loses the lines still queued, as it loses its stream's buffer.
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
import sys
from typing import TextIO

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class _Unformatted(logging.handlers.QueueHandler):
    """A queue handler that hands the record over unformatted (see the module docs)."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


class QueuedLog:
    """The process's root logging through a queue to one writer thread, until :meth:`stop`."""

    def __init__(self, level: int, stream: TextIO | None = None) -> None:
        records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        writer = logging.StreamHandler(stream if stream is not None else sys.stderr)
        writer.setFormatter(logging.Formatter(FORMAT))
        self._listener = logging.handlers.QueueListener(records, writer)
        self._handler = _Unformatted(records)
        root = logging.getLogger()
        self._previous = (root.handlers[:], root.level, _switches())
        root.handlers[:] = [self._handler]
        root.setLevel(level)
        _set_switches(False, False, False, None)
        self._listener.start()
        self._running = True

    def stop(self) -> None:
        """Write what is queued, stop the thread and give the root logger back its handlers,
        level and switches (a second call does nothing)."""
        if not self._running:
            return
        self._running = False
        self._listener.stop()
        root = logging.getLogger()
        handlers, level, switches = self._previous
        root.handlers[:] = handlers
        root.setLevel(level)
        _set_switches(*switches)


_Switches = tuple[bool, bool, bool, "str | None"]


def _switches() -> _Switches:
    return (
        logging.logThreads,
        logging.logProcesses,
        logging.logMultiprocessing,
        logging._srcfile,
    )


def _set_switches(
    threads: bool, processes: bool, multiprocessing: bool, srcfile: str | None
) -> None:
    """What a record looks up beyond its message: the thread, the process and its name, the
    caller's file and line (``logging._srcfile`` None: no walk of the stack)."""
    logging.logThreads = threads
    logging.logProcesses = processes
    logging.logMultiprocessing = multiprocessing
    logging._srcfile = srcfile
