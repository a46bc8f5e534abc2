"""One run of one transaction: its state on one object, and the three passes over it.

A :class:`Transaction` holds what a run used to keep in loose locals: the exchange, the work
list (the entry group's stages, extended by routing), the stages that joined, the deadline and
the timings. :meth:`~Transaction.prepare` is the prepare pass and returns the decision (True:
commit, False: roll back, ``ex.error`` set); :meth:`~Transaction.commit` and
:meth:`~Transaction.abort` are the second phase. Every vote is counted in one place,
:meth:`~Transaction.count`, by a ``match`` on its :class:`~isopace.flow.result.Vote`.

What the flow has around its stages comes in through :class:`Setup` as objects with
do-nothing defaults (a :class:`~isopace.flow._watch.Watch` for the profiler and listener, an
:class:`~isopace.flow._recorder.Unrecorded` journal), so the passes call them unconditionally
and hold no ``if`` for what is configured.

One specialised loop remains, :meth:`Transaction.run_plain`, for a flow with nothing around its
stages: see its docstring for the numbers that keep it. The deadline is an object with a
do-nothing default too (:class:`~isopace.flow._interrupt.Deadline`), through which both loops
iterate their stages.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Coroutine, Iterable, Sequence
from itertools import islice
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from isopace._cardtext import error_text
from isopace.flow._interrupt import NO_DEADLINE, Deadline, NoDeadline, shielded
from isopace.flow._recorder import Unrecorded
from isopace.flow._resolve import Plan, ResolvedStage, Step
from isopace.flow._watch import Watch
from isopace.flow.errors import TooManyStagesError, UnknownGroupError
from isopace.flow.idempotency import FINGERPRINT_PROPERTY
from isopace.flow.journal import BEGIN_EVENT, COMMITTED_EVENT, COMMITTING_EVENT, Event, EventKind
from isopace.flow.profiler import Phase
from isopace.flow.result import CONTINUE, Outcome, Result, Vote

if TYPE_CHECKING:
    from isopace.flow.exchange import Exchange

_COMMITTED = Outcome.COMMITTED
_ABORTED = Outcome.ABORTED
_PREPARE = Phase.PREPARE
_COMMIT = Phase.COMMIT
_ABORT = Phase.ABORT
_CONTINUE = Vote.CONTINUE
_SKIP = Vote.SKIP
_DONE = Vote.DONE
_ROUTE = Vote.ROUTE
_STEP_AWAITS = itemgetter(2)
"""Whether a plan step's prepare will be awaited (the deadline arms its timer first)."""


class Setup:
    """What every run of one flow shares: its groups (for routing), the stage limit, the
    watch, the journal and the logger."""

    __slots__ = ("groups", "journal", "log", "max_stages", "watch")

    def __init__(
        self,
        groups: dict[str, Plan],
        max_stages: int,
        watch: Watch,
        journal: Unrecorded,
        log: logging.Logger,
    ) -> None:
        self.groups = groups
        self.max_stages = max_stages
        self.watch = watch
        self.journal = journal
        self.log = log

    def run(
        self, ex: Exchange, plan: Plan, deadline: float | None, fingerprint: str | None = None
    ) -> Coroutine[Any, Any, Outcome]:
        """The general run of ``ex`` (a :data:`~isopace.flow._watch.RunFunc`); a plain
        function handing out the transaction's coroutine, so it adds no frame to the run."""
        timer = NO_DEADLINE if deadline is None else Deadline(deadline)
        return Transaction(self, ex, plan, timer).run(fingerprint)


class Transaction:
    """The state of one run; see the module documentation."""

    __slots__ = ("ex", "joined", "mark", "overflow", "setup", "timer", "work")

    def __init__(
        self,
        setup: Setup,
        ex: Exchange,
        plan: Plan,
        timer: NoDeadline,
        joined: list[ResolvedStage] | None = None,
    ) -> None:
        self.setup = setup
        self.ex = ex
        self.timer = timer
        work = list(plan.stages)
        # More than max_stages prepares abort the run (a routing loop): the work list never
        # grows past the limit, and overflow says that something was cut off.
        self.overflow = len(work) > setup.max_stages
        if self.overflow:
            del work[setup.max_stages :]
        self.work = work
        self.joined: list[ResolvedStage] = [] if joined is None else joined
        marks, self.mark = setup.watch.marks()
        ex.record_run(self.joined, marks)

    # -- the whole run --------------------------------------------------------------------------

    async def run(self, fingerprint: str | None = None) -> Outcome:
        """Prepare, decide, then commit or roll back, journalled; ``fingerprint``: the
        request's, kept with the decision to commit (for recovery; the idempotency wrapper
        passes it only to a flow with a journal)."""
        journal = self.setup.journal
        step = journal.step
        ex = self.ex
        try:
            try:
                await step(ex, BEGIN_EVENT)
            except Exception as exc:
                journal.failed(ex, EventKind.BEGIN, exc)
            commit = await self.prepare()
            if commit:
                if fingerprint is not None:
                    ex.set(FINGERPRINT_PROPERTY, fingerprint, durable=True)
                try:
                    await step(ex, COMMITTING_EVENT)
                except Exception as exc:
                    journal.failed(ex, EventKind.COMMITTING, exc)
        except asyncio.CancelledError as exc:
            await self.cancelled(exc)
            raise
        if not commit:
            return await self.abort()
        await self.commit(self.joined)
        error = ex.error
        try:
            await step(ex, COMMITTED_EVENT if error is None else Event(EventKind.COMMITTED, error))
        except Exception as exc:
            journal.failed(ex, EventKind.COMMITTED, exc)
        return _COMMITTED

    @staticmethod
    async def run_plain(
        setup: Setup, ex: Exchange, plan: Plan, steps: Iterable[Step], timer: NoDeadline
    ) -> Outcome:
        """The run of a flow with nothing around its stages (no journal, idempotency,
        profiler nor listener) whose entry group fits ``max_stages``, with or without a
        deadline (``timer``); ``steps`` are the plan's, or the deadline's iteration of them
        (:meth:`plain_steps`).

        It prepares the stages voting ``CONTINUE`` (or None) in a loop of its own over the
        plan's ready-made steps, builds no :class:`Transaction` and no joined list while every
        stage so far joined (the joined stages are then the plan's first ones), and commits
        through the plan's list of stages that have a commit. On any other vote it builds the
        transaction, counts the vote and hands the rest of the work list to the general
        prepare pass; a failure, the deadline or a cancellation goes to the general abort pass.
        A deadline costs a run without one nothing per stage: the steps are the plan's own
        tuple then.

        Kept because the target is tight (flow <= 1.5x of direct calls): measured on the
        5-stage benchmark pipeline, best of 20 x 3000 runs, direct calls took 0.69 µs (sync)
        / 1.32 µs (async) per transaction, this loop 1.08 / 1.73 µs, the general passes with
        the do-nothing watch and journal 3.80 / 3.92 µs. With ``timeout=``, counted with
        callgrind (instructions per transaction, same pipeline): 50,200 (sync) / 78,100
        (async) through the general passes, 29,500 / 57,600 through this loop (wall
        clock, best of 9 x 3000 runs: 3.85 µs against 2.21-2.31 µs, sync).
        """
        stages = plan.stages
        index = -1
        tx: Transaction | None = None
        try:
            for index, prepare, prepare_async in steps:
                try:
                    result = prepare(ex)
                    if prepare_async:
                        result = await result
                    if result is None or result is CONTINUE:
                        if not ex.aborted:
                            continue
                        tx = Transaction(setup, ex, plan, timer, list(stages[: index + 1]))
                        commit = tx.fail()
                        break
                    tx = Transaction(setup, ex, plan, timer, list(stages[:index]))
                    if result.__class__ is not Result:
                        timer.arm()
                        result = await _checked(stages[index], result)
                except Exception as exc:
                    if tx is None:
                        tx = Transaction(setup, ex, plan, timer, list(stages[:index]))
                    commit = tx.fail(exc)
                    break
                decision = tx.count(stages[index], result)
                commit = await tx.prepare(index + 1) if decision is None else decision
                break
            else:
                if timer.late:
                    tx = Transaction(setup, ex, plan, timer, list(stages[: index + 1]))
                    commit = tx.fail(_deadline_error(ex))
        except asyncio.CancelledError as exc:
            # Only the prepare pass is in here: a cancelled commit is not rolled back.
            if tx is None:
                tx = Transaction(setup, ex, plan, timer, list(stages[:index]))
            if not timer.consume():
                timer.disarm()
                await tx.cancelled(exc)
                raise
            commit = tx.fail(_deadline_error(ex))
        if tx is None:
            # Every stage joined (and the deadline's steps, if any, disarmed its timer).
            ex.record_run(stages)
            errors: list[Exception] | None = None
            commits = plan.commits
            for position, rs, commit_fn, commit_async in commits:
                try:
                    result = commit_fn(ex)
                    if commit_async or (result is not None and inspect.isawaitable(result)):
                        await result
                except Exception as exc:
                    errors = _commit_failed(setup.log, ex, rs, exc, errors)
                except asyncio.CancelledError:
                    tx = Transaction(setup, ex, plan, timer, list(stages))
                    rest = [step[1] for step in commits[position + 1 :]]
                    await tx.commit_interrupted(rs, rest, errors)
                    raise
            if errors:
                ex.record_error(_commit_group(errors))
            return _COMMITTED
        timer.disarm()
        if not commit:
            return await tx.abort()
        await tx.commit(tx.joined)
        return _COMMITTED

    @staticmethod
    def plain_steps(plan: Plan, timer: Deadline) -> Iterable[Step]:
        """The steps of ``plan`` as :meth:`run_plain` takes them under ``timer``."""
        return timer.steps(plan.steps, _STEP_AWAITS)

    # -- the prepare pass -----------------------------------------------------------------------

    async def prepare(self, start: int = 0) -> bool:
        """The prepare pass over the work list from position ``start`` (the plain run hands
        over after the stages it prepared itself), and the decision: True to commit, False to
        roll back (``ex.error`` set)."""
        ex = self.ex
        mark = self.mark
        clock = self.setup.watch.clock
        timer = self.timer
        join = self.joined.append
        result: Any
        mark((_PREPARE, clock()))
        try:
            # A list iterator sees the stages that routing appends while it runs; the
            # deadline hands each out only while it has not passed.
            for rs in timer.steps(islice(self.work, start, None)):
                try:
                    result = rs.prepare(ex)
                    if rs.prepare_async:
                        result = await result
                    if result is not None and result.__class__ is not Result:
                        timer.arm()
                        result = await _checked(rs, result)
                except Exception as exc:
                    mark((rs.name, clock(), exc))
                    return self.fail(exc)
                except BaseException as exc:
                    mark((rs.name, clock(), exc))
                    if isinstance(exc, asyncio.CancelledError) and timer.consume():
                        return self.fail(_deadline_error(ex))
                    raise
                mark((rs.name, clock()))
                # The common vote is counted inline, a call less per stage (0.3 µs a run on
                # the 5-stage benchmark); count() still counts every vote, CONTINUE included.
                if result is None or result is CONTINUE:
                    join(rs)
                    if ex.aborted:
                        return self.fail()
                elif (decision := self.count(rs, result)) is not None:
                    return decision and self.in_time()
            if timer.late:
                return self.fail(_deadline_error(ex))
            if ex.aborted:
                return self.fail()
            if self.overflow:
                return self.fail(TooManyStagesError(self.setup.max_stages))
            return True
        finally:
            if timer.expiry is not None:
                timer.disarm()

    def count(self, rs: ResolvedStage, result: Result | None) -> bool | None:
        """Count the vote of ``rs``: None to go on with the next stage, else the decision.

        ``CONTINUE`` and ``route`` join; ``route`` appends its groups' stages to the work list
        (an unknown group rolls back); ``DONE`` commits what joined so far. A stage that called
        ``ex.abort()`` ends the pass whatever it voted (having joined if it voted to join).
        """
        match _CONTINUE if result is None else result.vote:
            case Vote.CONTINUE:
                self.joined.append(rs)
            case Vote.SKIP:
                pass
            case Vote.DONE:
                if not self.ex.aborted:
                    return True
            case Vote.ROUTE:
                self.joined.append(rs)
                groups = self.setup.groups
                routed: list[ResolvedStage] = []
                for group in result.groups:  # type: ignore[union-attr]
                    plan = groups.get(group)
                    if plan is None:
                        return self.fail(UnknownGroupError(group))
                    routed.extend(plan.stages)
                work = self.work
                work.extend(routed)
                limit = self.setup.max_stages
                if len(work) > limit:
                    del work[limit:]
                    self.overflow = True
        if self.ex.aborted:
            return self.fail()
        return None

    def in_time(self) -> bool:
        """The decision to commit, unless the deadline passed meanwhile: a response produced
        after the caller stopped waiting is not committed."""
        if self.timer.passed():
            return self.fail(_deadline_error(self.ex))
        return True

    def fail(self, error: BaseException | None = None) -> bool:
        """Decide to roll back with ``error`` (None: the abort cause of ``ex.abort()``)."""
        self.ex.fail(error)
        return False

    # -- the commit pass ------------------------------------------------------------------------

    async def commit(self, stages: Sequence[ResolvedStage]) -> None:
        """Commit ``stages`` in order; failures are gathered on ``ex.error``."""
        ex = self.ex
        mark = self.mark
        clock = self.setup.watch.clock
        errors: list[Exception] | None = None
        mark((_COMMIT, clock()))
        for position, rs in enumerate(stages):
            commit_fn = rs.commit
            if commit_fn is None:
                continue
            try:
                result = commit_fn(ex)
                if rs.commit_async or (result is not None and inspect.isawaitable(result)):
                    await result
            except Exception as exc:
                mark((rs.name, clock(), exc))
                errors = _commit_failed(self.setup.log, ex, rs, exc, errors)
                mark((_COMMIT, clock()))  # the next stage's time leaves the logging out
                continue
            except asyncio.CancelledError as exc:
                mark((rs.name, clock(), exc))
                await self.commit_interrupted(rs, stages[position + 1 :], errors)
                raise
            mark((rs.name, clock()))
        if errors:
            ex.record_error(_commit_group(errors))

    async def commit_interrupted(
        self,
        interrupted: ResolvedStage,
        rest: Sequence[ResolvedStage],
        errors: list[Exception] | None,
    ) -> None:
        """A cancellation hit a commit: finish the others, shielded; leave the run in doubt."""
        ex = self.ex
        self.setup.log.error(
            "flow: commit of stage %s interrupted by cancellation; the transaction is in doubt",
            interrupted.name,
            extra={"exchange_id": ex.id, "stage": interrupted.name},
        )

        async def finish() -> None:
            await self.commit(rest)
            if errors:
                gathered = list(errors)
                if isinstance(ex.error, ExceptionGroup):
                    gathered.extend(ex.error.exceptions)
                ex.record_error(_commit_group(gathered))

        await shielded(finish())

    # -- the abort pass -------------------------------------------------------------------------

    async def abort(self) -> Outcome:
        """Roll back; shielded from cancellation whenever there is anything to await."""
        if self.setup.journal.records or any(rs.abort_async for rs in self.joined):
            if await shielded(self._abort_pass()):
                raise asyncio.CancelledError()
        else:
            await self._abort_pass()
        return _ABORTED

    async def cancelled(self, exc: asyncio.CancelledError) -> None:
        """The run's task was cancelled before the decision: roll back, shielded."""
        self.ex.fail(exc)
        await shielded(self._abort_pass())

    async def _abort_pass(self) -> None:
        """Abort the joined stages in reverse order, then journal ``ABORTED``."""
        ex = self.ex
        setup = self.setup
        mark = self.mark
        clock = setup.watch.clock
        for rs in reversed(self.joined):
            abort = rs.abort
            if abort is None:
                continue
            mark((_ABORT, clock()))
            try:
                result = abort(ex)
                if rs.abort_async or (result is not None and inspect.isawaitable(result)):
                    await result
            except Exception as exc:
                mark((rs.name, clock(), exc))
                setup.log.error(
                    "flow: abort of stage %s failed: %s",
                    rs.name,
                    error_text(exc),
                    extra={"exchange_id": ex.id, "stage": rs.name},
                )
            else:
                mark((rs.name, clock()))
        await setup.journal.aborted(ex)


def _commit_failed(
    log: logging.Logger,
    ex: Exchange,
    rs: ResolvedStage,
    exc: Exception,
    errors: list[Exception] | None,
) -> list[Exception]:
    log.error(
        "flow: commit of stage %s failed: %s",
        rs.name,
        error_text(exc),
        extra={"exchange_id": ex.id, "stage": rs.name},
    )
    exc.add_note(f"in the commit of stage {rs.name!r}")
    if errors is None:
        errors = []
    errors.append(exc)
    return errors


def _deadline_error(ex: Exchange) -> TimeoutError:
    return TimeoutError(f"flow: deadline passed for exchange {ex.id!r}")


def _commit_group(errors: list[Exception]) -> ExceptionGroup[Exception]:
    return ExceptionGroup(f"flow: {len(errors)} commit(s) failed", errors)


async def _checked(rs: ResolvedStage, result: object) -> Result | None:
    """A prepare result that is not a ``Result``: await an awaitable, reject anything else."""
    if inspect.isawaitable(result):
        result = await result
    if result is None or isinstance(result, Result):
        return result
    raise TypeError(
        f"flow: stage {rs.name!r} returned {type(result).__name__} from prepare; "
        "expected CONTINUE, SKIP, DONE, route(...) or None"
    )
