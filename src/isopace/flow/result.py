"""What a stage votes at the end of its prepare, and what a run ends in.

A prepare returns one of the singletons ``CONTINUE``, ``SKIP``, ``DONE`` or a ``route(...)``
result; returning ``None`` means ``CONTINUE``. ``CONTINUE`` and ``route`` make the stage join the
transaction (its ``commit`` or ``abort`` runs in the second phase); ``SKIP`` and ``DONE`` do not.
``DONE`` also ends the prepare pass, so the stages that joined so far commit.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final


class Outcome(StrEnum):
    """How :meth:`Flow.run` ended."""

    COMMITTED = "committed"
    """Every prepare voted to go on and the commit pass ran (commit errors are on ``ex.error``)."""
    ABORTED = "aborted"
    """The joined stages were rolled back; the cause is on ``ex.error``."""
    REPLAYED = "replayed"
    """A duplicate request: the stored response was replayed and no stage ran."""


class Result:
    """A prepare vote. Use the ``CONTINUE``, ``SKIP``, ``DONE`` singletons or ``route(...)``."""

    __slots__ = ("groups", "kind")

    kind: str
    groups: tuple[str, ...]

    def __init__(self, kind: str, groups: tuple[str, ...] = ()) -> None:
        if kind not in _KINDS:
            raise ValueError(f"flow: unknown result kind {kind!r}")
        if kind == "route" and not groups:
            raise ValueError("flow: route() needs at least one group")
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "groups", tuple(groups))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Result is immutable")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Result):
            return NotImplemented
        return self.kind == other.kind and self.groups == other.groups

    def __hash__(self) -> int:
        return hash((self.kind, self.groups))

    def __repr__(self) -> str:
        if self.kind == "route":
            return f"route({', '.join(repr(g) for g in self.groups)})"
        return self.kind.upper()


_KINDS: Final = frozenset({"continue", "skip", "done", "route"})

CONTINUE: Final = Result("continue")
"""Join the transaction and go on with the next stage."""
SKIP: Final = Result("skip")
"""Do not join; go on with the next stage."""
DONE: Final = Result("done")
"""Do not join; stop the prepare pass and commit the stages that joined so far."""


def route(*groups: str) -> Result:
    """Join the transaction and append the stages of ``groups`` (in order) to the work list."""
    for group in groups:
        if not isinstance(group, str):
            raise TypeError(f"flow: route() takes group names, got {type(group).__name__}")
    return Result("route", groups)
