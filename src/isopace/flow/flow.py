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
- ``run()`` has two paths with the same semantics: an inline one for a flow with nothing around
  its stages (no journal, idempotency, profiler, listener nor deadline), which handles stages
  voting ``CONTINUE`` itself and hands any other vote to the general prepare pass, and the
  general one. The tests run every rule through both.
- A stage's prepare may return ``None`` for ``CONTINUE``. A prepare that returns something else
  than a result aborts the run with a ``TypeError`` naming the stage. A plain function that
  returns an awaitable (a callable object with an ``async __call__``, for instance) has it
  awaited.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Sequence
from itertools import islice
from typing import TYPE_CHECKING, Any, TypeAlias

from isopace._cardtext import error_text
from isopace.flow._interrupt import Expiry, arm, shielded, until
from isopace.flow._resolve import Plan, ResolvedStage
from isopace.flow.errors import (
    AbortedError,
    DuplicateStageError,
    FingerprintMismatchError,
    NoEntryError,
    TooManyStagesError,
    UnknownGroupError,
)
from isopace.flow.exchange import Exchange
from isopace.flow.idempotency import (
    FINGERPRINT_PROPERTY,
    FingerprintFunc,
    IdempotencyStore,
    KeyFunc,
    Stored,
    refill,
)
from isopace.flow.journal import (
    BEGIN_EVENT,
    COMMITTED_EVENT,
    COMMITTING_EVENT,
    IDEMPOTENT_HIT_EVENT,
    Event,
    EventKind,
    Journal,
)
from isopace.flow.listener import FlowListener
from isopace.flow.profiler import Phase
from isopace.flow.result import CONTINUE, DONE, SKIP, Outcome, Result

if TYPE_CHECKING:
    from isopace.flow.stage import Stage

_COMMITTED = Outcome.COMMITTED
_ABORTED = Outcome.ABORTED
_REPLAYED = Outcome.REPLAYED
_PREPARE = Phase.PREPARE
_COMMIT = Phase.COMMIT
_ABORT = Phase.ABORT
_clock = time.perf_counter

CommitStep: TypeAlias = tuple[int, ResolvedStage, Any, bool]


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
        self._journal = journal
        self._store = idempotency
        self._key = key
        self._fingerprint = fingerprint
        self._matches = getattr(fingerprint, "matches", None)
        self._profiler = profiler
        self._max_stages = max_stages
        self._log = logger or logging.getLogger("isopace.flow")
        self._listener = listener
        self._timed = profiler or listener is not None
        # Nothing configured around the stages: run() takes its inline fast path.
        self._plain = journal is None and idempotency is None and not self._timed
        self._groups: dict[str, Plan] = {}
        self._by_name: dict[str, ResolvedStage] = {}
        self._first_group: str | None = None
        self._entry: Plan | None = None
        self._entry_fits = False

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

    async def run(self, ex: Exchange, *, timeout: float | None = None) -> Outcome:
        """Run ``ex`` through the flow and return how it ended.

        Never raises for a stage's failure (the cause is on ``ex.error``); raises
        ``NoEntryError`` / ``UnknownGroupError`` for a mis-configured entry before anything is
        journalled, and ``CancelledError`` when the task is cancelled (after the rollback).
        """
        plan = self._entry
        if plan is None:
            plan = self._resolve_entry()
        if timeout is not None or not self._entry_fits:
            deadline = None
            if timeout is not None:
                deadline = asyncio.get_running_loop().time() + timeout
                ex.deadline = deadline
            if self._listener is not None:
                return await self._run_listened(ex, plan, deadline)
            if self._store is not None:
                return await self._run_idempotent(ex, plan, deadline)
            return await self._run(ex, plan, deadline)
        # The fast path: no journal, idempotency, profiler, listener nor deadline. It handles
        # stages voting CONTINUE inline and hands any other vote over to _prepare(). While
        # every stage so far joined, the joined stages are the plan's first ones: the list is
        # only built when the pass leaves that track.
        stages = plan.stages
        joined: Sequence[ResolvedStage] | None = None
        commit = True
        index = 0
        try:
            for index, prepare, prepare_async in plan.steps:
                try:
                    result = prepare(ex)
                    if prepare_async:
                        result = await result
                except Exception as exc:
                    joined = ex._joined = list(stages[:index])
                    commit = self._fail(ex, exc)
                    break
                if result is not None and result is not CONTINUE:
                    joined = ex._joined = list(stages[:index])
                    commit = await self._prepare(ex, list(stages), index, result, joined, None)
                    break
                if ex.aborted:
                    joined = ex._joined = list(stages[: index + 1])
                    commit = self._fail_aborted(ex)
                    break
            else:
                joined = ex._joined = stages
        except asyncio.CancelledError as exc:
            if joined is None:
                joined = ex._joined = list(stages[:index])
            await self._cancelled(ex, joined, exc)
            raise
        if not commit:
            return await self._abort(ex, joined)
        steps = plan.commits if joined is stages else _commit_steps(joined)
        errors: list[Exception] | None = None
        for position, rs, commit_fn, commit_async in steps:
            try:
                result = commit_fn(ex)
                if commit_async or (result is not None and inspect.isawaitable(result)):
                    await result
            except Exception as exc:
                errors = self._commit_failed(ex, rs, exc, errors)
            except asyncio.CancelledError:
                rest = [step[1] for step in steps[position + 1 :]]
                await self._commit_interrupted(ex, rs, rest, errors)
                raise
        if errors:
            ex._error = _commit_group(errors)
        return _COMMITTED

    async def _run_listened(self, ex: Exchange, plan: Plan, deadline: float | None) -> Outcome:
        listener = self._listener
        assert listener is not None
        start = _clock()
        outcome = _ABORTED
        try:
            if self._store is not None:
                outcome = await self._run_idempotent(ex, plan, deadline)
            else:
                outcome = await self._run(ex, plan, deadline)
            return outcome
        finally:
            try:
                listener.run_finished(ex, outcome, _clock() - start)
            except Exception as exc:
                self._log.error(
                    "flow listener failed\n%s",
                    error_text(exc, traceback=True),
                    extra={"exchange_id": ex.id},
                )

    async def _run_idempotent(self, ex: Exchange, plan: Plan, deadline: float | None) -> Outcome:
        store = self._store
        key_func = self._key
        assert store is not None and key_func is not None
        fingerprint: str | None = None
        try:
            key = key_func(ex)
            if key is not None and self._fingerprint is not None:
                fingerprint = self._fingerprint(ex)
        except Exception as exc:
            return await self._refuse(ex, exc)
        if key is None:
            return await self._run(ex, plan, deadline)
        try:
            if deadline is None:
                stored = await store.claim(key)
            else:
                stored = await until(deadline, store.claim(key))
        except Exception as exc:
            if isinstance(exc, TimeoutError):
                exc = TimeoutError(f"flow: deadline passed waiting for the first run of {ex.id!r}")
            else:
                self._log.error(
                    "flow: idempotency store failed to claim: %s",
                    error_text(exc),
                    extra={"exchange_id": ex.id},
                )
            return await self._refuse(ex, exc)
        if stored is not None:
            if not self._same_request(ex, stored, fingerprint):
                return await self._refuse(ex, FingerprintMismatchError(key))
            response = stored.response
            ex.response = refill(response, ex.request) if response is not None else None
            if self._journal is not None:
                await self._record(ex, IDEMPOTENT_HIT_EVENT)
            return _REPLAYED
        try:
            outcome = await self._run(ex, plan, deadline, fingerprint)
        except BaseException:
            # Cancelled. Before the decision point the run was rolled back: give the key up.
            # During the commit pass the decision stands: keep the outcome for duplicates.
            await shielded(self._settle(ex, key, not ex.aborted, fingerprint))
            raise
        keep = outcome is _COMMITTED or (ex.response is not None and _declined(ex))
        if await shielded(self._settle(ex, key, keep, fingerprint)):
            raise asyncio.CancelledError()
        return outcome

    def _same_request(self, ex: Exchange, stored: Stored, fingerprint: str | None) -> bool:
        """Whether ``stored`` answers ``ex``'s request (see "fingerprint" in the module doc)."""
        kept = stored.fingerprint
        if kept is None or fingerprint is None or kept == fingerprint:
            return True
        matches = self._matches
        if matches is None:
            return False
        try:
            return bool(matches(ex, kept))
        except Exception as exc:
            self._log.error(
                "flow: fingerprint matches() failed: %s",
                error_text(exc),
                extra={"exchange_id": ex.id},
            )
            return False

    async def _settle(self, ex: Exchange, key: str, keep: bool, fingerprint: str | None) -> None:
        """Store the run's answer under ``key`` (``keep``) or release the key."""
        store = self._store
        assert store is not None
        try:
            if keep:
                await store.complete(key, ex.response, fingerprint)
            else:
                await store.release(key)
        except Exception as exc:
            self._log.error(
                "flow: idempotency store failed to %s: %s",
                "complete" if keep else "release",
                error_text(exc),
                extra={"exchange_id": ex.id},
            )

    async def _refuse(self, ex: Exchange, error: BaseException) -> Outcome:
        """End a run that could not start (no stage ran): BEGIN and ABORTED are journalled."""
        ex.aborted = True
        ex._error = error
        if self._journal is not None:
            await self._record(ex, BEGIN_EVENT)
            await self._record(ex, Event(EventKind.ABORTED, error))
        return _ABORTED

    async def _run(
        self, ex: Exchange, plan: Plan, deadline: float | None, fingerprint: str | None = None
    ) -> Outcome:
        """The general run: journal, deadline, profiler and listener as configured;
        ``fingerprint``: the request's, kept with the decision to commit (for recovery)."""
        journal = self._journal
        joined: list[ResolvedStage] = []
        ex._joined = joined
        try:
            if journal is not None:
                try:
                    await journal.record(ex, BEGIN_EVENT)
                except Exception as exc:
                    self._journal_failed(ex, BEGIN_EVENT, exc)
            if self._profiler:
                ex._timings = []
            work = list(plan.stages)
            if deadline is None:
                commit = await self._prepare(ex, work, 0, None, joined, None)
            else:
                try:
                    commit = await self._prepare(ex, work, 0, None, joined, deadline)
                    if commit and asyncio.get_running_loop().time() >= deadline:
                        commit = self._fail(ex, _deadline_error(ex))
                except TimeoutError:
                    commit = self._fail(ex, _deadline_error(ex))
            if commit and journal is not None:
                if fingerprint is not None:
                    ex.set(FINGERPRINT_PROPERTY, fingerprint, durable=True)
                try:
                    await journal.record(ex, COMMITTING_EVENT)
                except Exception as exc:
                    self._journal_failed(ex, COMMITTING_EVENT, exc)
        except asyncio.CancelledError as exc:
            await self._cancelled(ex, joined, exc)
            raise
        if not commit:
            return await self._abort(ex, joined)
        await self._commit(ex, joined)
        if journal is not None:
            error = ex._error
            event = COMMITTED_EVENT if error is None else Event(EventKind.COMMITTED, error)
            try:
                await journal.record(ex, event)
            except Exception as exc:
                self._journal_failed(ex, event, exc)
        return _COMMITTED

    # -- the prepare pass -----------------------------------------------------------------------

    async def _prepare(
        self,
        ex: Exchange,
        work: list[ResolvedStage],
        start: int,
        pending: object,
        joined: list[ResolvedStage],
        deadline: float | None,
    ) -> bool:
        """The prepare pass over ``work`` from index ``start``; True: commit, False: abort
        (``ex.error`` set). ``pending``, when not None, is the vote ``work[start]`` already
        returned (handed over by the fast path)."""
        max_stages = self._max_stages
        overflow = len(work) > max_stages
        if overflow:
            del work[max_stages:]
        timed = self._timed
        timings = ex._timings
        listener = self._listener
        now = asyncio.get_running_loop().time if deadline is not None else None
        result: Any
        # Timings chain one clock reading from one stage to the next, so each includes the
        # flow's own bookkeeping for that stage (tens of nanoseconds).
        began = _clock() if timed else 0.0
        # The deadline timer is armed before the first await (a pass of plain functions never
        # suspends, so checking the deadline before each prepare is all it needs).
        expiry: Expiry | None = None
        armed = deadline is None
        try:
            # A list iterator sees the stages that routing appends while it runs.
            for rs in islice(work, start, None):
                if pending is None:
                    if now is not None and now() >= deadline:  # type: ignore[operator]
                        return self._fail(ex, _deadline_error(ex))
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
                            result = await _odd_result(rs, result)
                    except Exception as exc:
                        if timed:
                            self._observe(ex, rs.name, _PREPARE, _clock() - began, exc)
                        return self._fail(ex, exc)
                    except BaseException as exc:
                        if timed:
                            self._observe(ex, rs.name, _PREPARE, _clock() - began, exc)
                        if (
                            expiry is not None
                            and isinstance(exc, asyncio.CancelledError)
                            and expiry.consume()
                        ):
                            return self._fail(ex, _deadline_error(ex))
                        raise
                    if timed:
                        ended = _clock()
                        if timings is not None:
                            timings.append((rs.name, _PREPARE, ended - began))
                        if listener is not None:
                            self._notify(rs.name, _PREPARE, ended - began, None)
                        began = ended
                else:
                    result, pending = pending, None
                    if result.__class__ is not Result:
                        try:
                            result = await _odd_result(rs, result)
                        except Exception as exc:
                            return self._fail(ex, exc)
                if result is None or result is CONTINUE:
                    joined.append(rs)
                elif result is SKIP:
                    pass
                elif result is DONE:
                    if ex.aborted:
                        break
                    return True
                else:
                    kind = result.kind
                    if kind == "route":
                        joined.append(rs)
                        routed: list[ResolvedStage] = []
                        for group in result.groups:
                            plan = self._groups.get(group)
                            if plan is None:
                                return self._fail(ex, UnknownGroupError(group))
                            routed.extend(plan.stages)
                        work.extend(routed)
                        if len(work) > max_stages:
                            del work[max_stages:]
                            overflow = True
                    elif kind == "continue":
                        joined.append(rs)
                    elif kind == "done" and not ex.aborted:
                        return True
                if ex.aborted:
                    break
            if ex.aborted:
                return self._fail_aborted(ex)
            if overflow:
                return self._fail(ex, TooManyStagesError(max_stages))
            return True
        finally:
            if expiry is not None:
                expiry.disarm()

    def _fail(self, ex: Exchange, error: BaseException) -> bool:
        ex.aborted = True
        ex._error = error
        return False

    def _fail_aborted(self, ex: Exchange) -> bool:
        cause = ex._cause
        return self._fail(ex, cause if cause is not None else AbortedError())

    # -- the commit pass ------------------------------------------------------------------------

    async def _commit(self, ex: Exchange, stages: Sequence[ResolvedStage]) -> None:
        """Commit ``stages`` in order; failures are gathered on ``ex.error``."""
        timed = self._timed
        timings = ex._timings
        listener = self._listener
        errors: list[Exception] | None = None
        began = _clock() if timed else 0.0
        for position, rs in enumerate(stages):
            commit_fn = rs.commit
            if commit_fn is None:
                continue
            try:
                result = commit_fn(ex)
                if rs.commit_async or (result is not None and inspect.isawaitable(result)):
                    await result
            except Exception as exc:
                if timed:
                    self._observe(ex, rs.name, _COMMIT, _clock() - began, exc)
                errors = self._commit_failed(ex, rs, exc, errors)
                if timed:
                    began = _clock()
                continue
            except asyncio.CancelledError as exc:
                if timed:
                    self._observe(ex, rs.name, _COMMIT, _clock() - began, exc)
                await self._commit_interrupted(ex, rs, stages[position + 1 :], errors)
                raise
            if timed:
                ended = _clock()
                if timings is not None:
                    timings.append((rs.name, _COMMIT, ended - began))
                if listener is not None:
                    self._notify(rs.name, _COMMIT, ended - began, None)
                began = ended
        if errors:
            ex._error = _commit_group(errors)

    async def _commit_interrupted(
        self,
        ex: Exchange,
        interrupted: ResolvedStage,
        rest: Sequence[ResolvedStage],
        errors: list[Exception] | None,
    ) -> None:
        """A cancellation hit a commit: finish the others, shielded; leave the run in doubt."""
        self._log.error(
            "flow: commit of stage %s interrupted by cancellation; the transaction is in doubt",
            interrupted.name,
            extra={"exchange_id": ex.id, "stage": interrupted.name},
        )

        async def finish() -> None:
            await self._commit(ex, rest)
            if errors:
                gathered = list(errors)
                if isinstance(ex._error, ExceptionGroup):
                    gathered.extend(ex._error.exceptions)
                ex._error = _commit_group(gathered)

        await shielded(finish())

    def _commit_failed(
        self, ex: Exchange, rs: ResolvedStage, exc: Exception, errors: list[Exception] | None
    ) -> list[Exception]:
        self._log.error(
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

    # -- the abort pass -------------------------------------------------------------------------

    async def _abort(self, ex: Exchange, joined: Sequence[ResolvedStage]) -> Outcome:
        """Roll back; shielded from cancellation whenever there is anything to await."""
        if self._journal is not None or any(rs.abort_async for rs in joined):
            if await shielded(self._abort_pass(ex, joined)):
                raise asyncio.CancelledError()
        else:
            await self._abort_pass(ex, joined)
        return _ABORTED

    async def _cancelled(
        self, ex: Exchange, joined: Sequence[ResolvedStage], exc: asyncio.CancelledError
    ) -> None:
        ex.aborted = True
        ex._error = exc
        await shielded(self._abort_pass(ex, joined))

    async def _abort_pass(self, ex: Exchange, joined: Sequence[ResolvedStage]) -> None:
        """Abort the joined stages in reverse order, then journal ``ABORTED``."""
        timed = self._timed
        for rs in reversed(joined):
            abort = rs.abort
            if abort is None:
                continue
            began = _clock() if timed else 0.0
            error: Exception | None = None
            try:
                result = abort(ex)
                if rs.abort_async or (result is not None and inspect.isawaitable(result)):
                    await result
            except Exception as exc:
                error = exc
                self._log.error(
                    "flow: abort of stage %s failed: %s",
                    rs.name,
                    error_text(exc),
                    extra={"exchange_id": ex.id, "stage": rs.name},
                )
            if timed:
                self._observe(ex, rs.name, _ABORT, _clock() - began, error)
        if self._journal is not None:
            await self._record(ex, Event(EventKind.ABORTED, ex._error))

    # -- observing ------------------------------------------------------------------------------

    def _observe(
        self, ex: Exchange, name: str, phase: Phase, seconds: float, error: BaseException | None
    ) -> None:
        if self._profiler:
            timings = ex._timings
            if timings is None:
                timings = ex._timings = []
            timings.append((name, phase, seconds))
        if self._listener is not None:
            self._notify(name, phase, seconds, error)

    def _notify(self, name: str, phase: Phase, seconds: float, error: BaseException | None) -> None:
        try:
            self._listener.stage_finished(name, phase, seconds, error)  # type: ignore[union-attr]
        except Exception as exc:
            self._log.error(
                "flow listener failed\n%s",
                error_text(exc, traceback=True),
                extra={"stage": name, "phase": phase.value},
            )

    async def _record(self, ex: Exchange, event: Event) -> None:
        journal = self._journal
        assert journal is not None
        try:
            await journal.record(ex, event)
        except Exception as exc:
            self._journal_failed(ex, event, exc)

    def _journal_failed(self, ex: Exchange, event: Event, exc: Exception) -> None:
        self._log.error(
            "flow: journal failed to record %s: %s",
            event.kind.value,
            error_text(exc),
            extra={"exchange_id": ex.id, "flow_event": event.kind.value},
        )


def _commit_steps(joined: Sequence[ResolvedStage]) -> list[CommitStep]:
    steps: list[CommitStep] = []
    for rs in joined:
        if rs.commit is not None:
            steps.append((len(steps), rs, rs.commit, rs.commit_async))
    return steps


def _declined(ex: Exchange) -> bool:
    """Whether the run ended by a stage's own ``ex.abort()`` (a decision), not a failure."""
    error = ex._error
    return error is not None and (error is ex._cause or type(error) is AbortedError)


def _deadline_error(ex: Exchange) -> TimeoutError:
    return TimeoutError(f"flow: deadline passed for exchange {ex.id!r}")


def _commit_group(errors: list[Exception]) -> ExceptionGroup[Exception]:
    return ExceptionGroup(f"flow: {len(errors)} commit(s) failed", errors)


async def _odd_result(rs: ResolvedStage, result: object) -> Result | None:
    """A prepare result that is not a ``Result``: await an awaitable, reject anything else."""
    if inspect.isawaitable(result):
        result = await result
    if result is None or isinstance(result, Result):
        return result
    raise TypeError(
        f"flow: stage {rs.name!r} returned {type(result).__name__} from prepare; "
        "expected CONTINUE, SKIP, DONE, route(...) or None"
    )
