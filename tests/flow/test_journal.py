"""Journal event sequences, journal failures, MemoryJournal bounds, LoggingJournal masking."""

from __future__ import annotations

import logging

import pytest

from isopace.flow import (
    Event,
    EventKind,
    Exchange,
    Flow,
    JournalEntry,
    LoggingJournal,
    MemoryJournal,
    MemoryStore,
    Outcome,
    func_stage,
)

from .conftest import ARec, Log, Rec


class Snapshots:
    """Records what a journal can read from the exchange at record time."""

    def __init__(self) -> None:
        self.seen: list[tuple[EventKind, tuple[str, ...], dict[str, object], object]] = []

    async def record(self, ex: Exchange, event: Event) -> None:
        self.seen.append((event.kind, ex.joined, ex.durable(), ex.response))


async def test_commit_sequence_and_what_the_journal_sees(log: Log) -> None:
    journal = Snapshots()

    def reserve(ex: Exchange) -> None:
        ex.set("hold", "H-1", durable=True)
        ex.set("scratch", object())

    def respond(ex: Exchange) -> None:
        ex.response = "0210"

    flow = Flow(journal=journal).group(
        "main", func_stage("reserve", reserve), ARec("b", log), func_stage("respond", respond)
    )
    assert await flow.run(Exchange("t", "r")) is Outcome.COMMITTED
    assert journal.seen == [
        (EventKind.BEGIN, (), {}, None),
        (EventKind.COMMITTING, ("reserve", "b", "respond"), {"hold": "H-1"}, "0210"),
        (EventKind.COMMITTED, ("reserve", "b", "respond"), {"hold": "H-1"}, "0210"),
    ]


async def test_abort_sequence_carries_the_cause(log: Log) -> None:
    journal = MemoryJournal()
    boom = RuntimeError("boom")
    flow = Flow(journal=journal).group("main", Rec("a", log), Rec("b", log, raises=boom))
    await flow.run(Exchange("t", "r"))
    assert journal.entries() == [
        JournalEntry("t", Event(EventKind.BEGIN)),
        JournalEntry("t", Event(EventKind.ABORTED, boom)),
    ]


async def test_commit_errors_are_journalled_with_committed(log: Log) -> None:
    journal = MemoryJournal()
    flow = Flow(journal=journal).group("main", Rec("a", log, commit_raises=RuntimeError("x")))
    ex = Exchange("t", "r")
    await flow.run(ex)
    last = journal.entries()[-1].event
    assert last.kind is EventKind.COMMITTED and last.error is ex.error


async def test_replay_journals_only_the_hit(log: Log) -> None:
    journal = MemoryJournal()
    flow = Flow(journal=journal, idempotency=MemoryStore(), key=lambda ex: "k").group(
        "main", func_stage("respond", lambda ex: setattr(ex, "response", "0210"))
    )
    await flow.run(Exchange("first", "r"))
    assert await flow.run(Exchange("dup", "r")) is Outcome.REPLAYED
    assert journal.kinds("first") == [EventKind.BEGIN, EventKind.COMMITTING, EventKind.COMMITTED]
    assert journal.kinds("dup") == [EventKind.IDEMPOTENT_HIT]


async def test_a_failing_journal_never_aborts(log: Log, caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        async def record(self, ex: Exchange, event: Event) -> None:
            raise OSError("disk full")

    flow = Flow(journal=Broken()).group("main", Rec("a", log), ARec("b", log))
    ex = Exchange("t", "r")
    assert await flow.run(ex) is Outcome.COMMITTED
    assert log.of("commit") == ["a", "b"] and ex.error is None
    assert "journal failed to record" in caplog.text and "disk full" in caplog.text
    log.clear()
    flow = Flow(journal=Broken()).group("main", Rec("a", log), Rec("b", log, raises=KeyError()))
    assert await flow.run(Exchange("t", "r")) is Outcome.ABORTED
    assert log.of("abort") == ["a"]


async def test_memory_journal_bounded() -> None:
    journal = MemoryJournal(max_entries=4)
    flow = Flow(journal=journal).group("main", func_stage("a", lambda ex: None))
    for i in range(3):
        await flow.run(Exchange(str(i), "r"))
    assert len(journal) == 4
    assert [e.id for e in journal.entries()] == ["1", "2", "2", "2"]
    journal.clear()
    assert journal.entries() == []
    with pytest.raises(ValueError):
        MemoryJournal(max_entries=0)


class Masked:
    """Something with the masked view a Message offers."""

    def to_masked_dict(self) -> dict[str, str]:
        return {"mti": "0200", "2": "476173******0010"}


async def test_logging_journal_writes_one_masked_record_per_event(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("test.flow.journal")

    def prep(ex: Exchange) -> None:
        ex.set("card", "4761739001010010", durable=True)
        ex.response = "raw 5413330089010012 text"
        raise ValueError("PAN 4761739001010010 refused")

    flow = Flow(journal=LoggingJournal(logger)).group("main", func_stage("p", prep))
    with caplog.at_level(logging.INFO, logger="test.flow.journal"):
        await flow.run(Exchange("t-1", Masked()))  # type: ignore[arg-type]
    records = [r for r in caplog.records if r.name == "test.flow.journal"]
    assert [r.flow_event for r in records] == ["begin", "aborted"]  # type: ignore[attr-defined]
    aborted = records[1]
    assert aborted.levelno == logging.WARNING
    assert aborted.exchange_id == "t-1"  # type: ignore[attr-defined]
    assert aborted.request == {"mti": "0200", "2": "476173******0010"}  # type: ignore[attr-defined]
    assert aborted.durable == {"card": "476173******0010"}  # type: ignore[attr-defined]
    assert aborted.response == "raw 541333******0012 text"  # type: ignore[attr-defined]
    assert aborted.error == "ValueError: PAN 476173******0010 refused"  # type: ignore[attr-defined]
    text = caplog.text + repr([r.__dict__ for r in records])
    assert "4761739001010010" not in text and "5413330089010012" not in text


TRACK2 = "4761739001010010=2512101123"  # short discretionary data
TRACK1 = "B4761739001010010^DOE/JOHN^25121011234"
TRACK_SECRETS = ("4761739001010010", "2512101123", "DOE/JOHN", "25121011234")


async def test_track_data_masked_in_logging_journal_and_flow_logs(
    log: Log, caplog: pytest.LogCaptureFixture
) -> None:
    logger = logging.getLogger("test.flow.tracks")
    cause = f"track 2 {TRACK2}? track 1 {TRACK1}"

    def prep(ex: Exchange) -> None:
        ex.set("track", TRACK2, durable=True)
        raise ValueError(f"bad {cause}")

    failing = Flow(journal=LoggingJournal(logger)).group(
        "main",
        Rec("j", log, abort_raises=RuntimeError(f"abort failed {cause}")),
        func_stage("p", prep),
    )
    commits = Flow(journal=LoggingJournal(logger)).group(
        "main", Rec("c", log, commit_raises=RuntimeError(f"commit failed {cause}"))
    )
    with caplog.at_level(logging.INFO):
        assert await failing.run(Exchange("t-1", "r")) is Outcome.ABORTED
        await commits.run(Exchange("t-2", "r"))
    aborted = next(r for r in caplog.records if getattr(r, "flow_event", None) == "aborted")
    assert aborted.error == (  # type: ignore[attr-defined]
        "ValueError: bad track 2 476173******0010=****? track 1 B476173******0010^****"
    )
    assert aborted.durable == {"track": "476173******0010=****"}  # type: ignore[attr-defined]
    flow_logs = [r.getMessage() for r in caplog.records if r.name == "isopace.flow"]
    assert any("abort of stage j failed" in m for m in flow_logs)
    assert any("commit of stage c failed" in m for m in flow_logs)
    text = caplog.text + repr([r.__dict__ for r in caplog.records])
    for secret in TRACK_SECRETS:
        assert secret not in text, secret


async def test_logging_journal_quiet_when_disabled(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.flow.quiet")
    logger.setLevel(logging.ERROR)
    flow = Flow(journal=LoggingJournal(logger)).group("main", func_stage("p", lambda ex: None))
    await flow.run(Exchange("t", "r"))
    assert not [r for r in caplog.records if r.name == "test.flow.quiet"]


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("4761739001010010", "476173******0010"),
        ("PAN 4761 7390 0101 0010 declined", "PAN 476173******0010 declined"),
        ("card 4761-7390-0101-0010", "card 476173******0010"),
        ("5413330089010012346", "541333*********2346"),  # 19 digits
        # track data after the PAN: short discretionary data, track 1 name and discretionary data
        ("t2 4761739001010010=2512101123?", "t2 476173******0010=****?"),
        ("t1 B4761739001010010^DOE/JOHN^25121011234", "t1 B476173******0010^****"),
        ("stan 000001 amount 000000002500", "stan 000001 amount 000000002500"),
        ("123456789012", "123456789012"),  # 12 digits: too short for a card number
        ("12345678901234567890123", "12345678901234567890123"),  # 23: not a card number
        ("", ""),
    ],
)
def test_mask_text(text: str, masked: str) -> None:
    from isopace.flow.journal import mask_text

    assert mask_text(text) == masked
