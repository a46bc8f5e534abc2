"""What a stage votes at the end of its prepare, and what a run ends in.

A prepare returns one of the singletons ``CONTINUE``, ``SKIP``, ``DONE`` or a ``route(...)``
result; returning ``None`` means ``CONTINUE``. ``CONTINUE`` and ``route`` make the stage join the
transaction (its ``commit`` or ``abort`` runs in the second phase); ``SKIP`` and ``DONE`` do not.
``DONE`` also ends the prepare pass, so the stages that joined so far commit.
"""

from __future__ import annotations

from enum import Enum, StrEnum
from typing import Final


class Outcome(StrEnum):
    """How :meth:`Flow.run` ended."""

    COMMITTED = "committed"
    """Every prepare voted to go on and the commit pass ran (commit errors are on ``ex.error``)."""
    ABORTED = "aborted"
    """The joined stages were rolled back; the cause is on ``ex.error``."""
    REPLAYED = "replayed"
    """A duplicate request: the stored response was replayed and no stage ran."""


class Vote(Enum):
    """The kind of a prepare vote, for ``match``: the run loop tells votes apart by this, never
    by identity or by string. A plain ``Enum`` (not a ``StrEnum``): its members compare by
    identity, which is what the loop's ``match`` needs to stay cheap."""

    CONTINUE = "continue"
    SKIP = "skip"
    DONE = "done"
    ROUTE = "route"


class Result:
    """A prepare vote. Use the ``CONTINUE``, ``SKIP``, ``DONE`` singletons or ``route(...)``.

    Results are values: ``Result("continue") == CONTINUE``, so user code may compare with the
    singletons or build its own; ``vote`` is the :class:`Vote` and ``kind`` its string.
    """

    __slots__ = ("groups", "vote")

    vote: Vote
    groups: tuple[str, ...]

    def __init__(self, kind: str | Vote, groups: tuple[str, ...] = ()) -> None:
        try:
            vote = Vote(kind)
        except ValueError:
            raise ValueError(f"flow: unknown result kind {kind!r}") from None
        if vote is Vote.ROUTE and not groups:
            raise ValueError("flow: route() needs at least one group")
        object.__setattr__(self, "vote", vote)
        object.__setattr__(self, "groups", tuple(groups))

    @property
    def kind(self) -> str:
        """The vote's name: ``"continue"``, ``"skip"``, ``"done"`` or ``"route"``."""
        return str(self.vote.value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Result is immutable")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Result):
            return NotImplemented
        return self.vote is other.vote and self.groups == other.groups

    def __hash__(self) -> int:
        return hash((self.vote.value, self.groups))

    def __repr__(self) -> str:
        if self.vote is Vote.ROUTE:
            return f"route({', '.join(repr(g) for g in self.groups)})"
        return self.kind.upper()


CONTINUE: Final = Result(Vote.CONTINUE)
"""Join the transaction and go on with the next stage."""
SKIP: Final = Result(Vote.SKIP)
"""Do not join; go on with the next stage."""
DONE: Final = Result(Vote.DONE)
"""Do not join; stop the prepare pass and commit the stages that joined so far."""


def route(*groups: str) -> Result:
    """Join the transaction and append the stages of ``groups`` (in order) to the work list."""
    for group in groups:
        if not isinstance(group, str):
            raise TypeError(f"flow: route() takes group names, got {type(group).__name__}")
    return Result(Vote.ROUTE, groups)
