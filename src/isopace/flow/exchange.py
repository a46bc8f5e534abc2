"""The per-transaction state carried through a flow.

An ``Exchange`` holds the request, the response being built, a property bag the stages use to
talk to each other, the abort state and (with the profiler on) the stage timings. It belongs to
one task at a time and is not safe for concurrent use; run it through a flow once.

Properties set with ``durable=True`` are the ones a durable journal keeps so that recovery can
finish or undo a transaction found in doubt after a crash: their values must be JSON values
(``str``, ``int``, ``float``, ``bool``, ``None``, lists and string-keyed dicts of them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from isopace.flow.errors import AbortedError
from isopace.flow.profiler import Marks, StageTiming, format_profile, stage_timings

if TYPE_CHECKING:
    from isopace.iso8583 import Message


class Exchange:
    """One transaction: ``Exchange(id, request)``.

    ``id`` names the transaction in logs and journals (for example a terminal + STAN key or a
    UUID), ``request`` is the inbound message (immutable, shared freely), ``response`` is what the
    stages build for the caller (``None`` until one sets it).
    """

    __slots__ = (
        "_cause",
        "_durable",
        "_error",
        "_joined",
        "_props",
        "_timings",
        "aborted",
        "deadline",
        "id",
        "request",
        "response",
    )

    id: str
    request: Message
    response: Message | None
    aborted: bool
    """True once ``abort()`` was called or the flow decided to roll back."""
    deadline: float | None
    """The run's deadline on the loop clock (``loop.time()``); None without ``timeout=``."""

    def __init__(self, id: str, request: Message) -> None:
        self.id = id
        self.request = request
        self.response = None
        self.aborted = False
        self.deadline = None
        self._props: dict[str, object] | None = None
        self._durable: set[str] | None = None
        self._cause: BaseException | None = None
        self._error: BaseException | None = None
        self._joined: Sequence[Any] = ()
        self._timings: Marks | None = None

    @classmethod
    def restore(
        cls,
        id: str,
        request: Message,
        *,
        durable: Mapping[str, object] | None = None,
        joined: Iterable[str] = (),
        response: Message | None = None,
    ) -> Exchange:
        """Rebuild an exchange from a journal record (for recovery): durable properties, the
        names of the stages that joined and the response as recorded."""
        ex = cls(id, request)
        ex.response = response
        for key, value in (durable or {}).items():
            ex.set(key, value, durable=True)
        ex._joined = list(joined)
        return ex

    # -- property bag ---------------------------------------------------------------------------

    def set(self, key: str, value: object, *, durable: bool = False) -> None:
        """Set property ``key``. ``durable=True`` also keeps it in durable journal records."""
        props = self._props
        if props is None:
            props = self._props = {}
        props[key] = value
        if durable:
            _check_json(key, value)
            if self._durable is None:
                self._durable = set()
            self._durable.add(key)
        elif self._durable is not None:
            self._durable.discard(key)

    def get(self, key: str, default: Any = None) -> Any:
        """The property ``key``, or ``default``."""
        props = self._props
        if props is None:
            return default
        return props.get(key, default)

    def __contains__(self, key: object) -> bool:
        return self._props is not None and key in self._props

    def durable(self) -> dict[str, object]:
        """The properties last set with ``durable=True``, as a new dict."""
        if not self._durable or self._props is None:
            return {}
        props = self._props
        return {k: props[k] for k in sorted(self._durable) if k in props}

    # -- abort state ----------------------------------------------------------------------------

    def abort(self, cause: BaseException | None = None) -> None:
        """Mark the transaction for rollback. A prepare may call this and still return
        ``CONTINUE`` (then it joined and is rolled back too), e.g. after building a decline.
        ``cause`` becomes ``ex.error`` unless a prepare raised; ``None`` never erases a cause
        given earlier, and with no cause at all the error is ``AbortedError``."""
        self.aborted = True
        if cause is not None:
            self._cause = cause

    @property
    def error(self) -> BaseException | None:
        """Why the transaction aborted, or the ``ExceptionGroup`` of failed commits; else None."""
        return self._error

    @property
    def declined(self) -> bool:
        """Whether the run aborted by a stage's own ``ex.abort()`` (a decision, such as a
        decline), rather than by a failure (a prepare that raised, the deadline, ...)."""
        error = self._error
        return error is not None and (error is self._cause or type(error) is AbortedError)

    @property
    def joined(self) -> tuple[str, ...]:
        """Names of the stages that joined, in prepare order. Complete from the end of the
        prepare pass on (journals read it at ``COMMITTING`` / ``ABORTED``); a stage reading it
        during the pass may find it behind when the flow has nothing configured."""
        return tuple(s if isinstance(s, str) else s.name for s in self._joined)

    # -- what the run records (the flow writes these; stages read the properties) -------------

    def fail(self, error: BaseException | None = None) -> None:
        """The flow's decision to roll back: ``error`` becomes ``ex.error``; with None, the
        cause given to ``abort()``, else ``AbortedError()`` (the abort-cause rule, in one
        place)."""
        self.aborted = True
        if error is None:
            error = self._cause if self._cause is not None else AbortedError()
        self._error = error

    def record_error(self, error: BaseException | None) -> None:
        """Set ``ex.error`` without deciding anything (the group of failed commits)."""
        self._error = error

    def record_run(self, joined: Sequence[Any], marks: Marks | None = None) -> None:
        """What the run fills in as it goes: the sequence of joined stages (objects with a
        ``name``, or names), which ``joined`` reads, and with the profiler the list of clock
        marks, which ``timings`` works the stage timings out of; the run appends to both
        without telling the exchange again."""
        self._joined = joined
        self._timings = marks

    # -- profiler -------------------------------------------------------------------------------

    @property
    def timings(self) -> list[StageTiming]:
        """Per-stage timings in the order the methods ran (only with ``profiler=True``)."""
        raw = self._timings
        return [] if raw is None else stage_timings(raw)

    def profile(self) -> str:
        """The timings on one line (``name/phase=1.2ms ... total=3.4ms``); empty when off."""
        return format_profile(self.timings)

    def __repr__(self) -> str:
        state = "aborted" if self.aborted else "open"
        return f"<Exchange {self.id!r} {state}>"


def _check_json(key: str, value: object) -> None:
    if not _is_json(value):
        raise TypeError(
            f"flow: durable property {key!r} must be a JSON value "
            f"(str, int, float, bool, None, list, dict), got {type(value).__name__}"
        )


def _is_json(value: object) -> bool:
    if value is None or isinstance(value, str | int | float | bool):
        return True
    if isinstance(value, list | tuple):
        return all(_is_json(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json(v) for k, v in value.items())
    return False
