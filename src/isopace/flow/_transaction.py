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
stages and no deadline: see its docstring for the numbers that keep it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Coroutine, Sequence
from itertools import islice
from typing import TYPE_CHECKING, Any

from isopace._cardtext import error_text
from isopace.flow._interrupt import Expiry, arm, shielded
from isopace.flow._recorder import Unrecorded
from isopace.flow._resolve import Plan, ResolvedStage
from isopace.flow._watch import Watch
from isopace.flow.errors import TooManyStagesError, UnknownGroupError
from isopace.flow.journal import EventKind
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
        return Transaction(self, ex, plan, deadline).run(fingerprint)


class Transaction:
    """The state of one run; see the module documentation."""

    __slots__ = ("deadline", "ex", "joined", "mark", "overflow", "setup", "work")

    def __init__(
        self,
        setup: Setup,
        ex: Exchange,
        plan: Plan,
        deadline: float | None,
        joined: list[ResolvedStage] | None = None,
    ) -> None:
        self.setup = setup
        self.ex = ex
        self.deadline = deadline
        work = list(plan.stages)
        # More than max_stages prepares abort the run (a routing loop): the work list never
        # grows past the limit, and overflow says that something was cut off.
        self.overflow = len(work) > setup.max_stages
        if self.overflow:
            del work[setup.max_stages :]
        self.work = work
        self.joined: list[ResolvedStage] = [] if joined is None else joined
        ex.record_joined(self.joined)
        self.mark = setup.watch.marks(ex)

    # -- the whole run --------------------------------------------------------------------------

    async def run(self, fingerprint: str | None = None) -> Outcome:
        """Prepare, decide, then commit or roll back, journalled; ``fingerprint``: the
        request's, kept with the decision to commit (for recovery)."""
        journal = self.setup.journal
        ex = self.ex
        try:
            try:
                await journal.begin(ex)
            except Exception as exc:
                journal.failed(ex, EventKind.BEGIN, exc)
            commit = await self.prepare()
            if commit:
                try:
                    await journal.committing(ex, fingerprint)
                except Exception as exc:
                    journal.failed(ex, EventKind.COMMITTING, exc)
        except asyncio.CancelledError as exc:
            await self.cancelled(exc)
            raise
        if not commit:
            return await self.abort()
        await self.commit(self.joined)
        try:
            await journal.committed(ex)
        except Exception as exc:
            journal.failed(ex, EventKind.COMMITTED, exc)
        return _COMMITTED

    @staticmethod
    async def run_plain(setup: Setup, ex: Exchange, plan: Plan) -> Outcome:
        """The run of a flow with nothing around its stages (no journal, idempotency,
        profiler, listener nor deadline) whose entry group fits ``max_stages``.

        It prepares the stages voting ``CONTINUE`` (or None) in a loop of its own over the
        plan's ready-made steps, builds no :class:`Transaction` and no joined list while every
        stage so far joined (the joined stages are then the plan's first ones), and commits
        through the plan's list of stages that have a commit. On any other vote it builds the
        transaction, counts the vote and hands the rest of the work list to the general
        prepare pass; a failure goes to the general abort pass.

        Kept because the target is tight (flow <= 1.5x of direct calls): measured on the
        5-stage benchmark pipeline, best of 20 x 3000 runs, direct calls took 0.69 µs (sync)
        / 1.32 µs (async) per transaction, this loop 1.08 / 1.73 µs, the general passes with
        the do-nothing watch and journal 3.80 / 3.92 µs.
        """
        stages = plan.stages
        index = 0
        tx: Transaction | None = None
        try:
            for index, prepare, prepare_async in plan.steps:
                try:
                    result = prepare(ex)
                    if prepare_async:
                        result = await result
                    if result is None or result is CONTINUE:
                        if not ex.aborted:
                            continue
                        tx = Transaction(setup, ex, plan, None, list(stages[: index + 1]))
                        commit = tx.fail()
                        break
                    tx = Transaction(setup, ex, plan, None, list(stages[:index]))
                    if result.__class__ is not Result:
                        result = await _checked(stages[index], result)
                except Exception as exc:
                    if tx is None:
                        tx = Transaction(setup, ex, plan, None, list(stages[:index]))
                    commit = tx.fail(exc)
                    break
                decision = tx.count(stages[index], result)
                commit = await tx.prepare(index + 1) if decision is None else decision
                break
            else:
                ex.record_joined(stages)
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
                        tx = Transaction(setup, ex, plan, None, list(stages))
                        rest = [step[1] for step in commits[position + 1 :]]
                        await tx.commit_interrupted(rs, rest, errors)
                        raise
                if errors:
                    ex.record_error(_commit_group(errors))
                return _COMMITTED
        except asyncio.CancelledError as exc:
            if tx is None:
                tx = Transaction(setup, ex, plan, None, list(stages[:index]))
            await tx.cancelled(exc)
            raise
        if not commit:
            return await tx.abort()
        await tx.commit(tx.joined)
        return _COMMITTED

    # -- the prepare pass -----------------------------------------------------------------------

    async def prepare(self, start: int = 0) -> bool:
        """The prepare pass over the work list from position ``start`` (the plain run hands
        over after the stages it prepared itself), and the decision: True to commit, False to
        roll back (``ex.error`` set)."""
        ex = self.ex
        mark = self.mark
        clock = self.setup.watch.clock
        deadline = self.deadline
        now = asyncio.get_running_loop().time if deadline is not None else None
        result: Any
        mark((_PREPARE, clock()))
        # The deadline timer is armed before the first await (a pass of plain functions never
        # suspends, so checking the deadline before each prepare is all it needs).
        expiry: Expiry | None = None
        armed = deadline is None
        try:
            # A list iterator sees the stages that routing appends while it runs.
            for rs in islice(self.work, start, None):
                if now is not None and now() >= deadline:  # type: ignore[operator]
                    return self.fail(_deadline_error(ex))
                try:
                    result = rs.prepare(ex)
                    if rs.prepare_async:
                        if not armed:
                            armed = True
                            expiry = arm(deadline)  # type: ignore[arg-type]
                        result = await result
                    if result is not None and result.__class__ is not Result:
                        if not armed:
                            armed = True
                            expiry = arm(deadline)  # type: ignore[arg-type]
                        result = await _checked(rs, result)
                except Exception as exc:
                    mark((rs.name, clock(), exc))
                    return self.fail(exc)
                except BaseException as exc:
                    mark((rs.name, clock(), exc))
                    if (
                        expiry is not None
                        and isinstance(exc, asyncio.CancelledError)
                        and expiry.consume()
                    ):
                        return self.fail(_deadline_error(ex))
                    raise
                mark((rs.name, clock()))
                # The common vote is counted inline, a call less per stage (0.3 µs a run on
                # the 5-stage benchmark); count() still counts every vote, CONTINUE included.
                if result is None or result is CONTINUE:
                    self.joined.append(rs)
                    if ex.aborted:
                        return self.fail()
                elif (decision := self.count(rs, result)) is not None:
                    return decision and self.in_time()
            if ex.aborted:
                return self.fail()
            if self.overflow:
                return self.fail(TooManyStagesError(self.setup.max_stages))
            return deadline is None or self.in_time()
        finally:
            if expiry is not None:
                expiry.disarm()

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
        deadline = self.deadline
        if deadline is not None and asyncio.get_running_loop().time() >= deadline:
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
        if self.setup.journal.awaits or any(rs.abort_async for rs in self.joined):
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
