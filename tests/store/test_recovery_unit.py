"""recover(): decisions, hooks, failures, idempotency, on journal states built by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from isopace.flow import CONTINUE, Event, EventKind, Exchange, Flow, retry
from isopace.store import RecoveredAbortError, SqliteJournal, recover
from tests.store.helpers import PAN, request

TRACK2 = PAN + "=2512101123"
TRACK1 = "B" + PAN + "^DOE/JOHN^25121011234"


class Hook:
    def __init__(self, name: str, log: list[tuple[str, str, bool]], fail: bool = False) -> None:
        self.name = name
        self.log = log
        self.fail = fail

    def prepare(self, ex: Exchange) -> object:
        return CONTINUE

    async def recover(self, ex: Exchange, committing: bool) -> None:
        if self.fail:
            raise RuntimeError(f"ledger unavailable for {TRACK2} / {TRACK1}")
        self.log.append((self.name, ex.id, committing))
        assert ex.get("hold") == "H-" + ex.id  # durable properties are back


class NoHook:
    name = "nohook"

    def prepare(self, ex: Exchange) -> object:
        return CONTINUE


async def _journal_state(journal: SqliteJournal) -> None:
    # t-commit: decided to commit; t-prep: died during prepare; t-done: finished
    for tx, kinds, joined in (
        ("t-commit", ("BEGIN", "COMMITTING"), ["a", "nohook", "b"]),
        ("t-prep", ("BEGIN",), []),
        ("t-done", ("BEGIN", "COMMITTING", "COMMITTED"), ["a"]),
    ):
        ex = Exchange.restore(tx, request(), durable={"hold": "H-" + tx}, joined=joined)
        for kind in kinds:
            await journal.record(ex, Event(EventKind[kind]))


async def test_commit_and_abort_decisions(tmp_path: Path) -> None:
    log: list[tuple[str, str, bool]] = []
    async with SqliteJournal(tmp_path / "j.db", node="n1") as journal:
        await _journal_state(journal)
        flow = Flow().group("main", Hook("a", log), NoHook(), retry(Hook("b", log)))
        assert (await recover(flow, journal, older_than=3600)).total == 0  # too recent
        report = await recover(flow, journal)
        assert report.committed == ["t-commit"] and report.aborted == ["t-prep"]
        assert report.unrecoverable_stages == {"t-commit": ["nohook"]}
        # committing: joined stages in prepare order; aborting: every hook, reverse order
        assert log == [
            ("a", "t-commit", True),
            ("b", "t-commit", True),
            ("b", "t-prep", False),
            ("a", "t-prep", False),
        ]
        assert [r.kind for r in await journal.by_id("t-commit")][-1] == "COMMITTED"
        aborted = (await journal.by_id("t-prep"))[-1]
        assert aborted.kind == "ABORTED" and "aborted by recovery" in (aborted.error or "")
        assert (await recover(flow, journal)).total == 0  # idempotent
        assert issubclass(RecoveredAbortError, Exception)


async def test_failing_hook_leaves_transaction_in_doubt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log: list[tuple[str, str, bool]] = []
    async with SqliteJournal(tmp_path / "j.db") as journal:
        await _journal_state(journal)
        flow = Flow().group("main", Hook("a", log, fail=True), NoHook(), Hook("b", log))
        report = await recover(flow, journal)
        assert set(report.failed) == {"t-commit", "t-prep"}
        assert "ledger unavailable" in report.failed["t-commit"]
        # the hook's error is masked in the report and the log: no PAN, no track data
        assert report.failed["t-commit"] == (
            "RuntimeError: ledger unavailable for 476173******0010=**** / B476173******0010^****"
        )
        logged = caplog.text + repr(report) + repr([r.__dict__ for r in caplog.records])
        assert "left in doubt" in caplog.text
        for secret in (PAN, "2512101123", "DOE/JOHN", "25121011234"):
            assert secret not in logged, secret
        assert {d.tx_id for d in await journal.in_doubt()} == {"t-commit", "t-prep"}
        fixed = Flow().group("main", Hook("a", log), NoHook(), Hook("b", log))
        report = await recover(fixed, journal)
        assert report.committed == ["t-commit"] and report.aborted == ["t-prep"]
        assert await journal.in_doubt() == []


async def test_other_nodes_left_alone_unless_asked(tmp_path: Path) -> None:
    log: list[tuple[str, str, bool]] = []
    path = tmp_path / "j.db"
    async with SqliteJournal(path, node="other") as journal:
        await _journal_state(journal)
    async with SqliteJournal(path, node="me") as journal:
        flow = Flow().group("main", Hook("a", log), NoHook(), Hook("b", log))
        assert (await recover(flow, journal)).total == 0
        assert len(await journal.in_doubt(all_nodes=True)) == 2
        assert (await recover(flow, journal, all_nodes=True)).total == 2


async def test_recovery_completes_idempotency_claims_of_committed_transactions(
    tmp_path: Path,
) -> None:
    """A run that crashed after COMMITTING left its claim held: recovery waits for the lease,
    then stores the journalled response, so a duplicate is replayed, not processed again."""
    from isopace.iso8583 import Message
    from isopace.store import SqliteIdempotencyStore

    log: list[tuple[str, str, bool]] = []
    crashed = SqliteIdempotencyStore(tmp_path / "i.db", lease=0.3)
    for tx in ("t-commit", "t-prep"):
        assert await crashed.claim("key-" + tx) is None
    crashed._held.clear()  # a dead process renews nothing
    await crashed.close()
    async with (
        SqliteJournal(tmp_path / "j.db") as journal,
        SqliteIdempotencyStore(tmp_path / "i.db", lease=0.3) as store,
    ):
        for tx, kinds in (("t-commit", ("BEGIN", "COMMITTING")), ("t-prep", ("BEGIN",))):
            ex = Exchange.restore(tx, request(), durable={"hold": "H-" + tx}, joined=["a"])
            ex.response = Message("0210", {11: "000001", 39: "00"})
            for kind in kinds:
                await journal.record(ex, Event(EventKind[kind]))
        flow = Flow().group("main", Hook("a", log))

        def key(ex: Exchange) -> str:
            return "key-" + ex.id

        report = await recover(flow, journal, idempotency=store, key=key)
        assert report.committed == ["t-commit"] and report.aborted == ["t-prep"]
        assert report.completed_keys == ["key-t-commit"]
        replay = await store.claim("key-t-commit")
        assert replay is not None and replay.response is not None
        assert replay.response[39] == "00"
        assert await store.claim("key-t-prep") is None  # expired: a duplicate runs afresh


async def test_recovery_stores_an_answer_without_response_with_its_fingerprint(
    tmp_path: Path,
) -> None:
    """A committing transaction that decided no response is stored all the same (its duplicate
    is replayed, never committed again), with the fingerprint the flow kept durable."""
    from isopace.flow import FINGERPRINT_PROPERTY, Stored
    from isopace.store import SqliteIdempotencyStore

    log: list[tuple[str, str, bool]] = []
    async with (
        SqliteJournal(tmp_path / "j.db") as journal,
        SqliteIdempotencyStore(tmp_path / "i.db", lease=0.3) as store,
    ):
        durable = {"hold": "H-t", FINGERPRINT_PROPERTY: "k1:abc"}
        ex = Exchange.restore("t", request(), durable=durable, joined=["a"])
        for kind in ("BEGIN", "COMMITTING"):
            await journal.record(ex, Event(EventKind[kind]))
        flow = Flow().group("main", Hook("a", log))
        report = await recover(flow, journal, idempotency=store, key=lambda ex: "key-" + ex.id)
        assert report.committed == ["t"] and report.completed_keys == ["key-t"]
        assert await store.claim("key-t") == Stored(None, "k1:abc")
