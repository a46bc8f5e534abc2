"""isopace.flow: the two-phase transaction manager.

A first flow: a stage that holds money in prepare, keeps it in commit and gives it back in
abort, and one that refuses what it cannot pay::

    >>> import asyncio
    >>> from isopace.flow import Exchange, Flow
    >>> from isopace.iso8583 import Message
    >>> balance = {"acct": 100}
    >>> class Hold:
    ...     name = "hold"
    ...     def prepare(self, ex):
    ...         amount = int(ex.request[4])
    ...         if amount > balance["acct"]:
    ...             ex.response = ex.request.reply().set(39, "51")
    ...             ex.abort()              # joined anyway: its abort runs
    ...             return None
    ...         balance["acct"] -= amount
    ...         ex.set("held", amount)
    ...     def commit(self, ex):
    ...         ex.response = ex.request.reply().set(39, "00")
    ...     def abort(self, ex):
    ...         balance["acct"] += ex.get("held", 0)
    >>> flow = Flow().group("main", Hold())
    >>> for i, amount in enumerate(["60", "60"]):
    ...     ex = Exchange(f"tx{i}", Message("0200", {4: amount.zfill(12)}))
    ...     print(asyncio.run(flow.run(ex)), ex.response[39], balance["acct"])
    committed 00 40
    aborted 51 40

The guide (``docs/concepts.md``, ``docs/tutorial.md``) explains each part; the names below are
the whole public API.

A transaction, carried in an :class:`Exchange`, runs through an ordered pipeline of stages taken
from named groups. In the prepare pass each stage does reversible work and votes: ``CONTINUE``
(join and go on), ``SKIP`` (go on without joining), ``route(*groups)`` (join and append those
groups' stages), ``DONE`` (stop preparing and commit) — or it aborts, by raising or by calling
``ex.abort()``. Then the stages that joined commit in prepare order, or abort in reverse order.

Around the algorithm, all optional: a :class:`Journal` of lifecycle events (the basis of crash
recovery and audit), idempotent replay of duplicate requests through an
:class:`IdempotencyStore`, per-stage retry, a per-stage profiler and a :class:`FlowListener`
for metrics. Stages may be plain functions or coroutines, mixed freely in one flow. An exchange
belongs to one task at a time; one flow serves many concurrent runs.

Idempotent replay follows the seed: a committed transaction's outcome is stored with its
response or without one, and a duplicate of it is replayed (``Outcome.REPLAYED``), never run
again, even when no stage built a response; a decline is stored and replayed too. A stored
answer carries the request's fingerprint (a caller's ``fingerprint=`` function, like ``key=``):
a duplicate whose fingerprint differs is neither replayed nor run, and its caller decides what it
gets (:class:`FingerprintMismatchError`; see :mod:`isopace.flow.idempotency`).
"""

from isopace.flow.errors import (
    AbortedError,
    DuplicateStageError,
    FingerprintMismatchError,
    FlowError,
    NoEntryError,
    TooManyStagesError,
    UnknownGroupError,
)
from isopace.flow.exchange import Exchange
from isopace.flow.flow import Flow
from isopace.flow.idempotency import (
    FINGERPRINT_PROPERTY,
    FingerprintFunc,
    IdempotencyStore,
    KeyFunc,
    MemoryStore,
    Stored,
    refill,
)
from isopace.flow.journal import (
    Event,
    EventKind,
    Journal,
    JournalEntry,
    LoggingJournal,
    MemoryJournal,
)
from isopace.flow.listener import FlowListener
from isopace.flow.profiler import Phase, StageTiming
from isopace.flow.result import CONTINUE, DONE, SKIP, Outcome, Result, route
from isopace.flow.retry import RetryPolicy, RetryStage, exponential_backoff, fixed_backoff, retry
from isopace.flow.stage import (
    Aborter,
    Committer,
    FuncStage,
    Recoverer,
    Stage,
    func_stage,
    stage,
)

__all__ = [
    "CONTINUE",
    "DONE",
    "FINGERPRINT_PROPERTY",
    "SKIP",
    "AbortedError",
    "Aborter",
    "Committer",
    "DuplicateStageError",
    "Event",
    "EventKind",
    "Exchange",
    "FingerprintFunc",
    "FingerprintMismatchError",
    "Flow",
    "FlowError",
    "FlowListener",
    "FuncStage",
    "IdempotencyStore",
    "Journal",
    "JournalEntry",
    "KeyFunc",
    "LoggingJournal",
    "MemoryJournal",
    "MemoryStore",
    "NoEntryError",
    "Outcome",
    "Phase",
    "Recoverer",
    "Result",
    "RetryPolicy",
    "RetryStage",
    "Stage",
    "StageTiming",
    "Stored",
    "TooManyStagesError",
    "UnknownGroupError",
    "exponential_backoff",
    "fixed_backoff",
    "func_stage",
    "refill",
    "retry",
    "route",
    "stage",
]
