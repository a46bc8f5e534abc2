"""The stage protocols and the function-stage helpers.

A stage has a ``name`` and a ``prepare(ex)`` that does reversible work and returns its vote
(a :class:`Result`, or ``None`` for ``CONTINUE``). It may also have:

- ``commit(ex)``: makes the effects durable, run in prepare order once every prepare went on;
- ``abort(ex)``: undoes reserved work, run in reverse prepare order when the transaction aborts;
- ``recover(ex, committing)``: finishes (``committing=True``) or undoes a transaction found in
  doubt after a crash, from the exchange a durable journal rebuilt.

Each of them may be a plain ``def`` or an ``async def``: the flow looks once, when the stage is
added to a group, and calls it the right way from then on.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol, TypeAlias, runtime_checkable

from isopace.flow.exchange import Exchange
from isopace.flow.result import Result

PrepareReturn: TypeAlias = Result | Awaitable[Result | None] | None
PrepareFunc: TypeAlias = Callable[[Exchange], PrepareReturn]


@runtime_checkable
class Stage(Protocol):
    """One participant of a flow."""

    @property
    def name(self) -> str: ...

    def prepare(self, ex: Exchange) -> PrepareReturn: ...


@runtime_checkable
class Committer(Protocol):
    """A stage with a commit half."""

    def commit(self, ex: Exchange) -> Awaitable[None] | None: ...


@runtime_checkable
class Aborter(Protocol):
    """A stage with a rollback half."""

    def abort(self, ex: Exchange) -> Awaitable[None] | None: ...


@runtime_checkable
class Recoverer(Protocol):
    """A stage that can finish or undo an in-doubt transaction after a crash."""

    def recover(self, ex: Exchange, committing: bool) -> Awaitable[None] | None: ...


class FuncStage:
    """A prepare-only stage made from a function; see :func:`func_stage`."""

    __slots__ = ("name", "prepare")

    name: str
    prepare: PrepareFunc

    def __init__(self, name: str, fn: PrepareFunc) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError("flow: a stage needs a non-empty name")
        if not callable(fn):
            raise TypeError(f"flow: stage {name!r}: prepare must be callable")
        self.name = name
        self.prepare = fn

    def __repr__(self) -> str:
        return f"<stage {self.name!r}>"


def func_stage(name: str, fn: PrepareFunc) -> FuncStage:
    """A prepare-only stage named ``name`` whose prepare is ``fn`` (``def`` or ``async def``)."""
    return FuncStage(name, fn)


def stage(name: str) -> Callable[[PrepareFunc], FuncStage]:
    """Decorator form of :func:`func_stage`::

    @stage("validate")
    def validate(ex: Exchange) -> Result | None: ...
    """

    def wrap(fn: PrepareFunc) -> FuncStage:
        return FuncStage(name, fn)

    return wrap
