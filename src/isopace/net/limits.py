"""The limits of a server's port: their defaults, the open-file limit they derive from, counters.

Why these limits: a server that leaves a connection open as long as its peer likes, accepts as
many as arrive and buffers every unfinished frame can be starved by anyone who can reach the
port, with no more than a few hundred sockets and no valid message at all. Each limit bounds one
resource a client can pin:

- ``idle_timeout`` (default 300 s): a connection that sends no complete frame (a keep-alive
  counts) for this long is closed: it pins a descriptor and nothing else proves it is alive. A
  connection is not idle while the server owes it an answer.
- ``frame_timeout`` (default 30 s): a connection that starts a frame and does not finish it
  within this time is closed: a length header then nothing, or a trickle of bytes, is the
  classic way to hold a connection and a buffer while looking active. It is also the deadline of
  a TLS handshake.
- ``max_connections`` (default: see :func:`default_max_connections`): past it a new connection
  is closed as soon as it is accepted. Descriptors are shared with the rest of the process, so
  running out of them would stop the database and the log too, not only new clients.
- ``max_buffered_bytes`` (default 32 MiB): the bytes held in unfinished frames across all
  connections. Each connection is already bounded by the maximum frame size (64 KiB); this
  bounds their sum (2,000 connections each holding 64 KiB would pin 128 MB).

Counters of what the limits did are in :class:`ServerStats` (``Server.stats``), for metrics.
"""

from __future__ import annotations

import dataclasses

__all__ = [
    "BUFFER_CAP",
    "DEFAULT_FRAME_TIMEOUT",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_BUFFERED_BYTES",
    "FRAME_TIMEOUT",
    "IDLE_TIMEOUT",
    "RESERVED_FILES",
    "ServerStats",
    "default_max_connections",
    "raise_open_file_limit",
]

DEFAULT_IDLE_TIMEOUT = 300.0
DEFAULT_FRAME_TIMEOUT = 30.0
DEFAULT_MAX_BUFFERED_BYTES = 32 * 1024 * 1024
RESERVED_FILES = 64
"""Descriptors :func:`default_max_connections` leaves to the rest of the process: the database
and its WAL, shared-memory and lock files, key and log files, listening sockets, a pool of
database connections."""

IDLE_TIMEOUT = "idle_timeout"
FRAME_TIMEOUT = "frame_timeout"
BUFFER_CAP = "buffer_cap"
"""Why the server closed a connection (the keys of :attr:`ServerStats.closed`)."""

_FALLBACK_FILES = 1024  # where the limit cannot be read (not POSIX)
_UNLIMITED = 1 << 20  # stands for RLIM_INFINITY (Linux's default nr_open)


@dataclasses.dataclass(slots=True)
class ServerStats:
    """What a server's limits did since it started (plain counters, read by metrics)."""

    refused: int = 0
    """Connections closed at accept because ``max_connections`` were open."""
    accept_errors: int = 0
    """``accept()`` failures for lack of resources (descriptors, buffers, memory)."""
    closed: dict[str, int] = dataclasses.field(
        default_factory=lambda: {IDLE_TIMEOUT: 0, FRAME_TIMEOUT: 0, BUFFER_CAP: 0}
    )
    """Connections the server closed, by reason: ``idle_timeout``, ``frame_timeout``,
    ``buffer_cap``."""


def default_max_connections() -> int:
    """The open-file soft limit of this process minus :data:`RESERVED_FILES` (at least 1). Read
    when a server starts, so a limit raised before (:func:`raise_open_file_limit`) counts."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return _FALLBACK_FILES - RESERVED_FILES
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = _UNLIMITED
    return max(1, soft - RESERVED_FILES)


def raise_open_file_limit() -> int | None:
    """Raise this process's soft limit of open files to its hard limit (what a long-running server
    may use without privileges); the soft limit afterwards, None where there is none. A hard limit
    of "unlimited" is tried as 2^20 (Linux refuses more than ``nr_open``); if the kernel refuses,
    the soft limit stays as it was."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _UNLIMITED if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft
