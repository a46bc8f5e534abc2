"""Errors of the transaction manager.

A stage's own failure never surfaces as one of these from :meth:`Flow.run`: it is recorded on
``ex.error``. ``NoEntryError`` and ``UnknownGroupError`` are raised by ``run`` only when the flow's
entry is mis-configured; the others are abort causes found on ``ex.error``.
"""

from __future__ import annotations

from isopace.errors import IsopaceError


class FlowError(IsopaceError):
    """Base class of the errors of :mod:`isopace.flow`."""


class NoEntryError(FlowError, ValueError):
    """The flow has no group to start from."""

    def __init__(self) -> None:
        super().__init__("flow: no entry group configured")


class UnknownGroupError(FlowError, ValueError):
    """A group named as the entry or by ``route(...)`` does not exist."""

    def __init__(self, group: str) -> None:
        super().__init__(f"flow: unknown group {group!r}")
        self.group = group


class TooManyStagesError(FlowError):
    """More prepares than ``max_stages`` in one run: most likely a routing loop."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"flow: stage limit {limit} exceeded (routing loop?)")
        self.limit = limit


class AbortedError(FlowError):
    """The cause of an abort requested with ``ex.abort()`` and no cause of its own."""

    def __init__(self, message: str = "flow: transaction aborted") -> None:
        super().__init__(message)


class DuplicateStageError(FlowError, ValueError):
    """A different stage was added under a name the flow already uses."""

    def __init__(self, name: str) -> None:
        super().__init__(f"flow: a different stage named {name!r} is already in the flow")
        self.name = name


class FingerprintMismatchError(FlowError):
    """A duplicate by key whose request differs from the one the key's answer was stored for
    (its fingerprint differs): neither replayed nor run, the caller decides its answer."""

    def __init__(self, key: str) -> None:
        super().__init__(
            f"flow: idempotency key {key!r} was answered for another request (its fingerprint "
            "differs): not replayed, not run"
        )
        self.key = key
