"""The flow: named groups of stages and the two-phase run algorithm.

A run starts with the entry group's stages as its work list and prepares them in order. Each
prepare votes (see :mod:`isopace.flow.result`); ``route(...)`` appends the named groups' stages
to the work list. The prepare pass ends when the work list is exhausted or a stage votes
``DONE`` (then the joined stages commit, in prepare order), or when a prepare raises, a stage
called ``ex.abort()``, a routed group does not exist, the run would prepare more than
``max_stages`` stages, or the deadline passed (then the joined stages abort, in reverse order).

Decisions beyond the table in the design document, written down here:

- The deadline (``timeout=``) is checked before each prepare and once more at the decision
  point, after the last prepare: a response produced after the caller stopped waiting is not
  committed. An ``async`` prepare still running at the deadline is interrupted. Commits and
  aborts are never cut short by the deadline.
- A cancelled run rolls the joined stages back, journals ``ABORTED`` (with the
  ``CancelledError`` as its error) and re-raises. The rollback and its journal record run in a
  task shielded from further cancellation whenever they have anything to await. A cancellation
  that arrives after the decision point (during the commit pass) does not undo the decision:
  the remaining commits still run (shielded), ``COMMITTED`` is not journalled — the
  interrupted commit is in doubt, which is what recovery (``stage.recover``) is for — and the
  ``CancelledError`` propagates.
- Commit errors do not stop the other commits; the outcome stays ``COMMITTED`` and
  ``ex.error`` is an ``ExceptionGroup`` of them. Abort errors are logged; the other aborts run.
- With idempotency, a duplicate waits for the first run of its key and replays its answer.
  A store that fails to answer ``claim`` aborts the run (``ex.error`` is the store's error)
  rather than risk processing a duplicate. A committed run's outcome is stored whether or not
  a stage set a response (as in the seed: an answer without a response still counts as found,
  and its duplicate is ``REPLAYED`` with ``ex.response`` None, its stages not run again, its
  commits never run twice); so is the response of a decline: a run a stage aborted with
  ``ex.abort()`` after setting ``ex.response``. Any other abort (a prepare that raised, the
  deadline, a cancellation before the decision point, an unknown group) releases the key even
  if a response was set, so a retransmission gets a fresh run rather than the replay of a
  half-built answer. Storing and releasing are shielded from cancellation; failures to store
  are logged. Waiting for the first run of a key counts against the deadline (the waiter then
  aborts with ``TimeoutError``, journalling ``BEGIN`` and ``ABORTED``); a key or fingerprint
  function that raises aborts the run the same way.
- With a ``fingerprint`` function as well, the answer keeps the request's fingerprint, and a
  duplicate whose fingerprint differs (see :mod:`isopace.flow.idempotency`) is not replayed
  and not run: it aborts with ``FingerprintMismatchError`` and no response, journalling
  ``BEGIN`` and ``ABORTED``, and its caller chooses the answer. With a journal the fingerprint
  becomes a durable property of the exchange (``FINGERPRINT_PROPERTY``) at the decision to
  commit, journalled with ``COMMITTING`` (not with ``BEGIN``: recovery needs it only for a
  transaction it finishes, and stores it with that answer). The fingerprint is taken once per
  run, before the claim.
- A stage routed to more than once prepares, and joins, once per time: it commits or aborts as
  many times as it joined.
- An exchange is run once. ``ex.joined`` is complete from the end of the prepare pass on.
- The run is built once per flow from small parts, each in its own module: the transaction
  and its passes (:mod:`isopace.flow._transaction`), idempotency as a wrapper of a run
  (:mod:`isopace.flow._idempotent`), the profiler and listener behind a watch and the journal
  behind a recorder (:mod:`isopace.flow._watch`, :mod:`isopace.flow._recorder`), each with a
  do-nothing default. A flow with nothing configured around its stages takes
  ``Transaction.run_plain``, with or without a deadline, one specialised loop kept for the
  overhead target (its docstring gives the numbers); the tests run every rule through it and
  through the general passes (the first run of a flow, which resolves its entry, included).
- A stage's prepare may return ``None`` for ``CONTINUE``. A prepare that returns something else
  than a result aborts the run with a ``TypeError`` naming the stage. A plain function that
  returns an awaitable (a callable object with an ``async __call__``, for instance) has it
  awaited.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from isopace.flow._idempotent import Idempotent
from isopace.flow._interrupt import NO_DEADLINE, Deadline
from isopace.flow._recorder import UNRECORDED, Recorder
from isopace.flow._resolve import Plan, ResolvedStage
from isopace.flow._transaction import Setup, Transaction
from isopace.flow._watch import Listened, RunFunc, watch
from isopace.flow.errors import DuplicateStageError, NoEntryError, UnknownGroupError
from isopace.flow.exchange import Exchange
from isopace.flow.idempotency import FingerprintFunc, IdempotencyStore, KeyFunc
from isopace.flow.journal import Journal
from isopace.flow.listener import FlowListener
from isopace.flow.result import Outcome

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from isopace.flow.stage import Stage


class Flow:
    """A two-phase transaction manager over named groups of stages.

    Build it once, add groups with :meth:`group`, then call :meth:`run` per transaction from as
    many tasks as you like. Do not add groups while runs are in progress.
    """

    def __init__(
        self,
        *,
        entry: str | None = None,
        journal: Journal | None = None,
        idempotency: IdempotencyStore | None = None,
        key: KeyFunc | None = None,
        fingerprint: FingerprintFunc | None = None,
        profiler: bool = False,
        max_stages: int = 1024,
        logger: logging.Logger | None = None,
        listener: FlowListener | None = None,
    ) -> None:
        if (idempotency is None) != (key is None):
            raise ValueError("flow: idempotency= and key= go together")
        if fingerprint is not None and idempotency is None:
            raise ValueError("flow: fingerprint= needs idempotency= and key=")
        if max_stages < 1:
            raise ValueError("flow: max_stages must be at least 1")
        self._entry_name = entry
        # The configuration as given, for inspection (the run reads it through _setup).
        self._journal = journal
        self._listener = listener
        self._max_stages = max_stages
        self._groups: dict[str, Plan] = {}
        self._by_name: dict[str, ResolvedStage] = {}
        self._first_group: str | None = None
        self._entry: Plan | None = None
        self._entry_fits = False
        log = logger or logging.getLogger("isopace.flow")
        watched = profiler or listener is not None
        self._setup = Setup(
            self._groups,
            max_stages,
            watch(profiler, listener, log),
            UNRECORDED if journal is None else Recorder(journal, log),
            log,
        )
        # Nothing configured around the stages: a run without a deadline is a plain one.
        self._plain = journal is None and idempotency is None and not watched
        run: RunFunc = self._setup.run
        if idempotency is not None and key is not None:
            run = Idempotent(run, idempotency, key, fingerprint, self._setup.journal, log).run
        if listener is not None:
            run = Listened(run, listener, log).run
        self._run = run

    # -- building -------------------------------------------------------------------------------

    def group(self, name: str, *stages: Stage) -> Flow:
        """Add ``stages`` to group ``name`` (created on first use, extended afterwards).

        The first group added is the entry unless ``entry=`` names another. Stage names are
        unique in a flow: the same stage object may sit in several groups, but a different
        stage under a name already used raises ``DuplicateStageError`` (a ``ValueError``).
        """
        if not isinstance(name, str) or not name:
            raise ValueError("flow: a group needs a non-empty name")
        added: dict[str, ResolvedStage] = {}
        resolved: list[ResolvedStage] = []
        for stage in stages:
            stage_name = getattr(stage, "name", None)
            known = None
            if isinstance(stage_name, str):
                known = self._by_name.get(stage_name) or added.get(stage_name)
            if known is not None:
                if known.stage is not stage:
                    raise DuplicateStageError(known.name)
                resolved.append(known)
                continue
            rs = ResolvedStage(stage)
            added[rs.name] = rs
            resolved.append(rs)
        self._by_name.update(added)
        existing = self._groups.get(name)
        self._groups[name] = Plan((existing.stages if existing else ()) + tuple(resolved))
        if self._first_group is None:
            self._first_group = name
        self._entry = None
        return self

    def stages(self) -> dict[str, Any]:
        """Every distinct stage of the flow by name (what recovery looks stages up in)."""
        return {name: rs.stage for name, rs in self._by_name.items()}

    def groups(self) -> dict[str, tuple[str, ...]]:
        """The groups and the names of their stages, in order."""
        return {g: tuple(rs.name for rs in plan.stages) for g, plan in self._groups.items()}

    @property
    def entry(self) -> str | None:
        """The name of the entry group (None while there is none)."""
        return self._entry_name or self._first_group

    def _resolve_entry(self) -> Plan:
        name = self._entry_name or self._first_group
        if name is None:
            raise NoEntryError()
        plan = self._groups.get(name)
        if plan is None:
            raise UnknownGroupError(name)
        self._entry_fits = self._plain and len(plan.stages) <= self._max_stages
        self._entry = plan
        return plan

    # -- running --------------------------------------------------------------------------------

    def run(self, ex: Exchange, *, timeout: float | None = None) -> Coroutine[Any, Any, Outcome]:
        """Run ``ex`` through the flow and return how it ended (``await flow.run(ex)``).

        Never raises for a stage's failure (the cause is on ``ex.error``); raises
        ``NoEntryError`` / ``UnknownGroupError`` for a mis-configured entry before anything is
        journalled, and ``CancelledError`` when the task is cancelled (after the rollback).

        A plain method that hands back the run's own coroutine, rather than a coroutine
        awaiting it: one frame less on every run, which the flow benchmark's plain sync case
        (flow <= 1.5x of direct calls) needs. Anything that can raise is inside that coroutine,
        so ``flow.run(ex)`` itself never raises and a task made of it fails as a coroutine would.
        """
        plan = self._entry
        if plan is None:
            return self._resolving(ex, timeout)
        if timeout is None:
            if self._entry_fits:
                return Transaction.run_plain(self._setup, ex, plan, plan.steps, NO_DEADLINE)
            run = self._run  # an attribute load, then the call: the fast way to a bound method
            return run(ex, plan, None, None)
        return self._run_until(ex, plan, timeout)

    async def _resolving(self, ex: Exchange, timeout: float | None) -> Outcome:
        """The first run (or one after a change to the groups): resolve the entry, then run."""
        self._resolve_entry()
        return await self.run(ex, timeout=timeout)

    async def _run_until(self, ex: Exchange, plan: Plan, timeout: float) -> Outcome:
        deadline = ex.deadline = asyncio.get_running_loop().time() + timeout
        if self._entry_fits:
            timer = Deadline(deadline)
            steps = Transaction.plain_steps(plan, timer)
            return await Transaction.run_plain(self._setup, ex, plan, steps, timer)
        return await self._run(ex, plan, deadline, None)
