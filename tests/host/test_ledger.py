"""The ledger on SQLite and PostgreSQL: no overdraw under concurrency, idempotent transitions,
the balance check; plus the config loader, the BIN table, velocity and the metrics text.

Inputs tried: 200 concurrent holds racing for funds that cover 37 of them; capture / release /
refund run twice and in the wrong order; a reserve retried with the same transaction id; an
unknown account; a card blocked and unblocked; TOML with unknown keys, wrong types, flags
overriding the file.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from isopace.host import (
    BinRoute,
    ConfigError,
    HoldState,
    Ledger,
    Metrics,
    PostgresLedger,
    SeedCard,
    SqliteLedger,
    Velocity,
    load_config,
)
from isopace.host.ledger import HoldDetails, ReserveStatus
from isopace.store.keys import Key, KeyRing, write_key_file

from .conftest import PG_DSN

CARD = SeedCard("4111111111111111", "ACC-T", 3_700)


@pytest.fixture(params=["sqlite", "postgres"])
async def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Ledger]:
    schema = f"t_ledger_{uuid.uuid4().hex[:10]}"
    book: Ledger
    if request.param == "sqlite":
        book = SqliteLedger(tmp_path / "ledger.db", keys=KeyRing.generate())
    else:
        book = PostgresLedger(PG_DSN, schema=schema, max_size=20, keys=KeyRing.generate())
    await book.open()
    await book.seed([CARD])
    try:
        yield book
    finally:
        await book.close()
        if request.param == "postgres":
            conn = await asyncpg.connect(PG_DSN)
            try:
                await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            finally:
                await conn.close()


async def test_concurrent_holds_never_overdraw(ledger: Ledger) -> None:
    results = await asyncio.gather(
        *(
            ledger.reserve(f"tx-{i}", "ACC-T", 100, HoldDetails(terminal="T", stan=f"{i:06d}"))
            for i in range(200)
        )
    )
    approved = [i for i, r in enumerate(results) if r.approved]
    assert len(approved) == 37
    assert all(r.status is ReserveStatus.INSUFFICIENT_FUNDS for r in results if not r.approved)
    account = await ledger.account("ACC-T")
    assert account is not None
    assert (account.balance, account.held, account.available) == (3_700, 3_700, 0)
    # Capture and release concurrently, each twice: applied once.
    ops = []
    for i in approved:
        op = ledger.capture if i % 2 else ledger.release
        ops += [op(f"tx-{i}"), op(f"tx-{i}")]
    done = await asyncio.gather(*ops)
    assert sum(done) == len(approved)
    check = await ledger.check()
    assert check.ok, check.problems
    assert check.pending == 0
    captured = sum(1 for i in approved if i % 2)
    account = await ledger.account("ACC-T")
    assert account is not None
    assert account.balance == 3_700 - 100 * captured
    assert account.held == 0


async def test_transitions_are_idempotent_and_ordered(ledger: Ledger) -> None:
    assert (await ledger.reserve("a", "ACC-T", 500)).approved
    assert (await ledger.reserve("a", "ACC-T", 500)).approved  # same id: no second hold
    account = await ledger.account("ACC-T")
    assert account is not None and account.held == 500
    assert not await ledger.refund("a")  # nothing captured yet
    assert await ledger.authorize("a")
    assert await ledger.capture("a")
    assert not await ledger.capture("a")
    assert not await ledger.release("a")  # captured: release does nothing
    assert await ledger.reverse("a") == "refunded"
    assert await ledger.reverse("a") == "none"
    hold = await ledger.hold("a")
    assert hold is not None and hold.state == HoldState.REFUNDED
    account = await ledger.account("ACC-T")
    assert account is not None and (account.balance, account.held) == (3_700, 0)
    assert (await ledger.reserve("b", "NOPE", 1)).status is ReserveStatus.NO_ACCOUNT
    assert (await ledger.check()).ok


async def test_sqlite_holds_record_their_times_as_utc_iso_with_microseconds(
    tmp_path: Path,
) -> None:
    import datetime as dt
    import sqlite3

    book = SqliteLedger(tmp_path / "ledger.db", keys=KeyRing.generate())
    await book.open()
    try:
        await book.seed([CARD])
        before = dt.datetime.now(dt.UTC)
        assert (await book.reserve("t", "ACC-T", 100)).approved
        await asyncio.sleep(0.002)
        assert await book.capture("t")
        after = dt.datetime.now(dt.UTC)
    finally:
        await book.close()
    conn = sqlite3.connect(tmp_path / "ledger.db")
    try:
        created, updated = conn.execute(
            "SELECT created_at, updated_at FROM holds WHERE txn_id = 't'"
        ).fetchone()
    finally:
        conn.close()
    for text in (created, updated):  # datetime.isoformat(timespec="microseconds"), UTC
        assert len(text) == 32 and text.endswith("+00:00") and text[19] == "."
        assert before - dt.timedelta(seconds=1) <= dt.datetime.fromisoformat(text) <= after
    assert created < updated


async def test_cards_block_and_find_original(ledger: Ledger) -> None:
    card = await ledger.card(CARD.pan)
    assert card is not None and card.masked_pan == "411111******1111" and not card.blocked
    assert await ledger.card("4242424242424242") is None
    assert await ledger.set_card_status(CARD.pan, "blocked")
    card = await ledger.card(CARD.pan)
    assert card is not None and card.blocked
    assert await ledger.seed([CARD]) == []  # seeding again creates nothing
    details = HoldDetails(terminal="T1", stan="000007", tx_time="1129000000", rrn="RRN000000007")
    await ledger.reserve("x", "ACC-T", 10, details)
    found = await ledger.find_original(terminal="T1", stan="000007", tx_time="1129000000")
    assert found is not None and found.txn_id == "x"
    by_rrn = await ledger.find_original(terminal="T1", stan="999999", rrn="RRN000000007")
    assert by_rrn is not None and by_rrn.txn_id == "x"
    assert await ledger.find_original(terminal="T2", stan="000007") is None
    assert [h.txn_id for h in await ledger.pending_holds()] == ["x"]


async def test_find_original_matches_the_card_and_the_amount(ledger: Ledger) -> None:
    other = SeedCard("5555555555554444", "ACC-O", 5_000)
    await ledger.seed([other])
    ref, other_ref = ledger.pan_ref(CARD.pan), ledger.pan_ref(other.pan)
    keys = {"terminal": "T1", "stan": "000008", "tx_time": "1129000000", "rrn": "RRN000000008"}
    await ledger.reserve("y", "ACC-T", 25, HoldDetails(**keys, pan_ref=ref))
    await ledger.reserve(
        "legacy", "ACC-T", 30, HoldDetails(terminal="T1", stan="000009")
    )  # no card ref
    found = await ledger.find_original(**keys, pan_ref=ref, amount=25)
    assert found is not None and found.txn_id == "y" and found.pan_ref == ref
    by_rrn = await ledger.find_original(terminal="T1", rrn="RRN000000008", pan_ref=ref, amount=25)
    assert by_rrn is not None and by_rrn.txn_id == "y"
    # another card, another amount: not the original (by STAN or by RRN)
    assert await ledger.find_original(**keys, pan_ref=other_ref, amount=25) is None
    assert await ledger.find_original(**keys, pan_ref=ref, amount=24) is None
    assert await ledger.find_original(terminal="T1", rrn="RRN000000008", pan_ref=other_ref) is None
    # a hold without a card reference (made before schema version 3): the card's account decides
    legacy = await ledger.find_original(terminal="T1", stan="000009", pan_ref=ref, amount=30)
    assert legacy is not None and legacy.txn_id == "legacy"
    assert await ledger.find_original(terminal="T1", stan="000009", pan_ref=other_ref) is None


def test_config_file_flags_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('port = 9000\nmetrics-port = 9100\nbins = { "4" = "visa" }\n')
    cfg = load_config(str(path), {"port": 9001, "db": None})
    assert (cfg.port, cfg.metrics_port, cfg.bins) == (9001, 9100, {"4": "visa"})
    assert cfg.legacy_paths[0].endswith("isopace.journal.db")
    path.write_text("colour = 'blue'\n")
    with pytest.raises(ConfigError, match="unknown key 'colour'"):
        load_config(str(path))
    path.write_text("timeout = 'soon'\n")
    with pytest.raises(ConfigError, match="timeout"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="out of range"):
        load_config(None, {"port": 70000})


def test_bin_table_and_velocity() -> None:
    router = BinRoute({"4": "visa", "5": "mastercard", "4000": "private"})
    assert router.group_for("4000056655665556") == "private"
    assert router.group_for("4111111111111111") == "visa"
    assert router.group_for("6011111111111117") is None
    velocity = Velocity(60, 2, 1000)
    assert velocity.check("c", 100) is None
    assert velocity.check("c", 100) is None
    assert velocity.check("c", 100) == "65"
    assert velocity.check("d", 1001) == "61"


def test_metrics_text() -> None:
    from isopace.flow import Exchange, Outcome, Phase
    from isopace.iso8583 import Message

    metrics = Metrics()
    ex = Exchange("1", Message("0200", {11: "000001"}))
    ex.response = Message("0210", {39: "51"})
    metrics.stage_finished("reserve", Phase.PREPARE, 0.002, None)
    metrics.stage_finished("reserve", Phase.COMMIT, 0.001, RuntimeError("x"))
    metrics.run_finished(ex, Outcome.ABORTED, 0.004)
    text = metrics.render()
    assert 'isopace_transactions_total{outcome="aborted",code="51"} 1' in text
    assert 'isopace_stage_seconds_bucket{stage="reserve",phase="prepare",le="0.0025"} 1' in text
    assert 'isopace_stage_seconds_bucket{stage="reserve",phase="prepare",le="0.001"} 0' in text
    assert 'isopace_stage_errors_total{stage="reserve",phase="commit"} 1' in text
    assert "isopace_transaction_seconds_count 1" in text


async def test_duplicate_idempotency_key_is_refused(ledger: Ledger) -> None:
    first = await ledger.reserve(
        "k1", "ACC-T", 100, HoldDetails(idem_key="020|T|000001|1129", approval_code="ABC123")
    )
    assert first.approved
    dup = await ledger.reserve(
        "k2", "ACC-T", 100, HoldDetails(idem_key="020|T|000001|1129", approval_code="X")
    )
    assert dup.status is ReserveStatus.DUPLICATE
    assert dup.original is not None
    assert (dup.original.txn_id, dup.original.approval_code) == ("k1", "ABC123")
    assert await ledger.release("k1")  # a released hold frees the key
    again = await ledger.reserve("k3", "ACC-T", 100, HoldDetails(idem_key="020|T|000001|1129"))
    assert again.approved
    racing = await asyncio.gather(
        *(
            ledger.reserve(f"r{i}", "ACC-T", 10, HoldDetails(idem_key="020|T|000002|1129"))
            for i in range(20)
        )
    )
    assert sum(r.approved for r in racing) == 1
    assert sum(r.status is ReserveStatus.DUPLICATE for r in racing) == 19
    assert (await ledger.check()).ok


async def test_flow_without_stored_answer_is_not_debited_twice(tmp_path: Path) -> None:
    """The idempotency store lost the answer (as after a crash between commit and storing it):
    the ledger still recognises the retransmission and answers with the same approval."""
    from isopace.flow import Exchange
    from isopace.host import build_flow
    from isopace.iso8583 import ISO87_ASCII, Message

    book = SqliteLedger(tmp_path / "l.db", keys=KeyRing.generate())
    await book.open()
    try:
        await book.seed([CARD])
        flow = build_flow(book, spec=ISO87_ASCII)  # no idempotency store at all
        request = Message(
            "0200",
            {2: CARD.pan, 3: "000000", 4: "000000000500", 7: "1129101010", 11: "000042",
             41: "TERM0001"},
        )  # fmt: skip
        answers = []
        for i in range(3):
            ex = Exchange(f"t{i}", request)
            await flow.run(ex)
            assert ex.response is not None
            answers.append((ex.response[39], ex.response[38]))
        assert answers[0][0] == "00"
        assert answers == [answers[0]] * 3
        account = await book.account("ACC-T")
        assert account is not None and account.balance == 3_700 - 500
    finally:
        await book.close()


async def test_version_1_ledger_is_upgraded(tmp_path: Path) -> None:
    """A ledger file made before holds carried idempotency keys opens and gains them."""
    import sqlite3

    path = tmp_path / "v1.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE ledger_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO ledger_meta VALUES ('schema_version', '1');
        CREATE TABLE accounts (id TEXT PRIMARY KEY, currency TEXT NOT NULL, opening INTEGER
            NOT NULL, balance INTEGER NOT NULL, held INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE holds (txn_id TEXT PRIMARY KEY, account_id TEXT NOT NULL, amount INTEGER
            NOT NULL, state TEXT NOT NULL, mti TEXT, terminal TEXT, stan TEXT, tx_time TEXT,
            rrn TEXT, created_at TEXT NOT NULL, updated_at TEXT NOT NULL);
        INSERT INTO accounts VALUES ('ACC-T', '840', 1000, 1000, 0);
        """
    )
    conn.commit()
    conn.close()
    book = SqliteLedger(path)
    await book.open()
    try:
        assert (
            await book.reserve("a", "ACC-T", 10, HoldDetails(idem_key="k", approval_code="C1"))
        ).approved
        dup = await book.reserve("b", "ACC-T", 10, HoldDetails(idem_key="k"))
        assert dup.status is ReserveStatus.DUPLICATE
        assert await book.reduce("a", 4)  # version 5's original_amount column
        assert await book.remember_reversal(
            "r", terminal="T", stan="1", tx_time=None, rrn=None, pan_ref="p", amount=1,
            expires_in=60,
        )  # fmt: skip
        assert (await book.check()).ok
    finally:
        await book.close()
    conn = sqlite3.connect(path)
    try:
        version = conn.execute("SELECT value FROM ledger_meta WHERE key = 'schema_version'")
        assert version.fetchone() == ("6",)
    finally:
        conn.close()


async def test_partial_reversals_lower_what_stands(ledger: Ledger) -> None:
    ref = ledger.pan_ref(CARD.pan)
    keys = {"terminal": "T3", "stan": "000010", "tx_time": "1206000000"}
    assert (await ledger.reserve("auth", "ACC-T", 1_000, HoldDetails(**keys, pan_ref=ref))).approved
    assert await ledger.authorize("auth")
    assert await ledger.reduce("auth", 400)  # the authorization now holds 4.00
    assert not await ledger.reduce("auth", 400)  # the same partial reversal: nothing more
    assert not await ledger.reduce("auth", 900)  # not lower than what stands
    account = await ledger.account("ACC-T")
    assert account is not None and (account.balance, account.held) == (3_700, 400)
    hold = await ledger.hold("auth")
    assert hold is not None and (hold.amount, hold.first_amount) == (400, 1_000)
    # the full reversal still finds it by the amount it was made for, and undoes what stands
    found = await ledger.find_original(**keys, pan_ref=ref, amount=1_000)
    assert found is not None and found.txn_id == "auth"
    assert await ledger.reverse("auth") == "released"
    account = await ledger.account("ACC-T")
    assert account is not None and (account.balance, account.held) == (3_700, 0)
    # a captured purchase gets the difference back, and its capture row matches
    assert (await ledger.reserve("buy", "ACC-T", 2_000, HoldDetails(pan_ref=ref))).approved
    assert await ledger.capture("buy")
    assert await ledger.reduce("buy", 1_500)
    account = await ledger.account("ACC-T")
    assert account is not None and (account.balance, account.held) == (3_700 - 1_500, 0)
    check = await ledger.check()
    assert check.ok, check.problems
    assert await ledger.reverse("buy") == "refunded"
    account = await ledger.account("ACC-T")
    assert account is not None and account.balance == 3_700
    assert (await ledger.check()).ok
    assert not await ledger.reduce("buy", 0)  # refunded: nothing stands
    with pytest.raises(ValueError, match="negative"):
        await ledger.reduce("buy", -1)


async def test_a_remembered_reversal_voids_its_late_original(ledger: Ledger) -> None:
    ref = ledger.pan_ref(CARD.pan)
    keys = {"terminal": "T4", "stan": "000011", "tx_time": "1206000000", "rrn": None}
    assert await ledger.remember_reversal("rev", **keys, pan_ref=ref, amount=700, expires_in=60)
    assert not await ledger.remember_reversal("rev", **keys, pan_ref=ref, amount=700, expires_in=60)
    late = await ledger.reserve("late", "ACC-T", 700, HoldDetails(**keys, pan_ref=ref))
    assert late.status is ReserveStatus.REVERSED
    assert await ledger.hold("late") is None  # nothing held
    # another amount, another card, another STAN: not the reversed transaction
    other_ref = ledger.pan_ref("5555555555554444")
    assert (await ledger.reserve("a", "ACC-T", 701, HoldDetails(**keys, pan_ref=ref))).approved
    assert (
        await ledger.reserve("b", "ACC-T", 700, HoldDetails(**keys, pan_ref=other_ref))
    ).approved
    other_stan = {**keys, "stan": "000012"}
    assert (
        await ledger.reserve("c", "ACC-T", 700, HoldDetails(**other_stan, pan_ref=ref))
    ).approved
    # by RRN too
    by_rrn = {"terminal": "T4", "stan": None, "tx_time": None, "rrn": "633400000011"}
    assert await ledger.remember_reversal("rev2", **by_rrn, pan_ref=ref, amount=50, expires_in=60)
    rrn_late = await ledger.reserve(
        "d", "ACC-T", 50, HoldDetails(**{**by_rrn, "stan": "000099"}, pan_ref=ref)
    )
    assert rrn_late.status is ReserveStatus.REVERSED
    # forgotten (the reversal aborted) or expired: the original is served again
    assert await ledger.forget_reversal("rev")
    assert (await ledger.reserve("late", "ACC-T", 700, HoldDetails(**keys, pan_ref=ref))).approved
    keys5 = {**keys, "stan": "000013"}
    assert await ledger.remember_reversal("rev3", **keys5, pan_ref=ref, amount=5, expires_in=0.01)
    await asyncio.sleep(0.05)
    assert (await ledger.reserve("e", "ACC-T", 5, HoldDetails(**keys5, pan_ref=ref))).approved
    account = await ledger.account("ACC-T")
    assert account is not None and account.held == 701 + 700 + 700 + 700 + 5
    assert (await ledger.check()).ok


async def _authorized(ledger: Ledger, txn_id: str, amount: int, **keys: str) -> None:
    assert (await ledger.reserve(txn_id, "ACC-T", amount, HoldDetails(mti="0100", **keys))).approved
    assert await ledger.authorize(txn_id)


async def _figures(ledger: Ledger) -> tuple[int, int]:
    account = await ledger.account("ACC-T")
    assert account is not None
    return account.balance, account.held


async def test_a_completion_captures_its_amount_and_releases_the_rest(ledger: Ledger) -> None:
    await _authorized(ledger, "auth", 1_000)
    assert await ledger.claim_completion("auth", "c1")
    assert await ledger.claim_completion("auth", "c1")  # the same completion again: its claim
    assert not await ledger.claim_completion("auth", "c2")  # another completion: refused
    assert await _figures(ledger) == (3_700, 1_000)  # a claim moves no money
    assert await ledger.complete("c1", 600)  # a partial completion
    assert await _figures(ledger) == (3_100, 0)  # 6.00 posted, the other 4.00 released
    assert not await ledger.complete("c1", 600)  # run again (recovery): nothing twice
    assert not await ledger.unclaim_completion("c1")  # captured: nothing to undo
    hold = await ledger.hold("auth")
    assert hold is not None
    assert (hold.state, hold.amount, hold.first_amount) == (HoldState.CAPTURED, 600, 1_000)
    # the completed authorization is reversed like a purchase: the capture refunded
    assert await ledger.reverse("auth") == "refunded"
    assert await _figures(ledger) == (3_700, 0)

    # above what it holds: the ledger captures no more than the hold
    await _authorized(ledger, "auth2", 500)
    assert await ledger.claim_completion("auth2", "c3")
    assert await ledger.complete("c3", 900)
    assert await _figures(ledger) == (3_200, 0)
    # an aborted completion drops its claim, and another may complete the authorization
    await _authorized(ledger, "auth3", 700)
    assert await ledger.claim_completion("auth3", "c4")
    assert await ledger.unclaim_completion("c4")
    assert not await ledger.complete("c4", 700)  # no claim any more: nothing captured
    assert await ledger.claim_completion("auth3", "c5")
    assert await ledger.complete("c5", 700)
    assert await _figures(ledger) == (2_500, 0)
    # a pending authorization (its 0100 in flight) is completed; its commit then changes nothing
    assert (await ledger.reserve("auth4", "ACC-T", 300, HoldDetails(mti="0100"))).approved
    assert await ledger.claim_completion("auth4", "c6")
    assert await ledger.complete("c6", 300)
    assert not await ledger.authorize("auth4")
    assert not await ledger.release("auth4")
    assert await _figures(ledger) == (2_200, 0)
    # released or unknown authorizations cannot be claimed
    await _authorized(ledger, "auth5", 100)
    assert await ledger.release("auth5")
    assert not await ledger.claim_completion("auth5", "c7")
    assert not await ledger.claim_completion("nope", "c8")
    with pytest.raises(ValueError, match="negative"):
        await ledger.complete("c9", -1)
    check = await ledger.check()
    assert check.ok, check.problems


async def test_concurrent_completions_of_one_authorization_capture_once(ledger: Ledger) -> None:
    await _authorized(ledger, "auth", 1_000)
    claims = await asyncio.gather(*(ledger.claim_completion("auth", f"c{i}") for i in range(20)))
    assert sum(claims) == 1
    winner = f"c{claims.index(True)}"
    done = await asyncio.gather(*(ledger.complete(f"c{i}", 800) for i in range(20)))
    assert done == [f"c{i}" == winner for i in range(20)]
    assert await _figures(ledger) == (2_900, 0)
    assert (await ledger.check()).ok


async def test_authorizations_nobody_completed_expire(ledger: Ledger) -> None:
    for i in range(3):
        await _authorized(ledger, f"old{i}", 100 + i)
    assert (await ledger.reserve("pending", "ACC-T", 50, HoldDetails(mti="0100"))).approved
    await _authorized(ledger, "claimed", 20)
    await asyncio.sleep(0.4)
    assert await ledger.claim_completion("claimed", "c1")  # a completion in flight: kept
    await _authorized(ledger, "young", 30)
    assert await ledger.expire(0.3, batch=1) == 3  # in batches of one
    assert await _figures(ledger) == (3_700, 50 + 20 + 30)
    check = await ledger.check()
    assert check.ok, check.problems
    assert check.expired == 3
    assert sorted(h.txn_id for h in await ledger.expired_holds()) == ["old0", "old1", "old2"]
    assert [h.state for h in await ledger.expired_holds(limit=1)] == [HoldState.EXPIRED]
    hold = await ledger.hold("pending")
    assert hold is not None and hold.state == HoldState.PENDING  # recovery's, not the sweep's
    assert await ledger.expire(0.3) == 0  # nothing more
    # an expired authorization can no longer be completed, reversed or reduced
    assert not await ledger.claim_completion("old0", "c2")
    assert await ledger.reverse("old0") == "none"
    assert not await ledger.reduce("old0", 10)
    # a claim as old as the expiry is a completion that died unjournalled: it expires too
    await asyncio.sleep(0.4)
    assert await ledger.expire(0.3) == 2  # "claimed" and "young"
    assert await _figures(ledger) == (3_700, 50)
    assert (await ledger.check()).ok
    with pytest.raises(ValueError, match="batch"):
        await ledger.expire(1, batch=0)


async def test_find_original_by_approval_code(ledger: Ledger) -> None:
    ref = ledger.pan_ref(CARD.pan)
    other_ref = ledger.pan_ref("5555555555554444")
    details = HoldDetails(terminal="T5", stan="000001", approval_code="A1B2C3", pan_ref=ref)
    await ledger.reserve("a", "ACC-T", 10, details)
    found = await ledger.find_original(terminal="T5", stan="000099", approval_code="A1B2C3",
                                       pan_ref=ref)  # fmt: skip
    assert found is not None and found.txn_id == "a"
    assert (
        await ledger.find_original(terminal="T5", approval_code="A1B2C3", pan_ref=other_ref) is None
    )
    assert await ledger.find_original(terminal="T6", approval_code="A1B2C3", pan_ref=ref) is None


async def test_version_5_ledger_is_upgraded(ledger: Ledger, tmp_path: Path) -> None:
    """A version 5 ledger (no holds.completed_by, none of its indexes) with an authorization
    held opens as version 6, and the authorization can be completed or expire."""
    await _authorized(ledger, "auth", 400)
    await _authorized(ledger, "auth2", 100)
    downgrade = [
        "DROP INDEX holds_by_completion",
        "DROP INDEX holds_authorized",
        "ALTER TABLE holds DROP COLUMN completed_by",
        "UPDATE ledger_meta SET value = '5' WHERE key = 'schema_version'",
    ]
    if isinstance(ledger, SqliteLedger):
        import sqlite3

        await ledger.close()
        conn = sqlite3.connect(ledger.path)
        for sql in downgrade:
            conn.execute(sql)
        conn.commit()
        conn.close()
        book: Ledger = SqliteLedger(ledger.path, keys=ledger.keys)
    else:
        assert isinstance(ledger, PostgresLedger)
        await ledger.close()
        conn = await asyncpg.connect(PG_DSN, server_settings={"search_path": ledger.schema})
        try:
            for sql in downgrade:
                await conn.execute(sql)
        finally:
            await conn.close()
        book = PostgresLedger(PG_DSN, schema=ledger.schema, keys=ledger.keys)
    await book.open()
    try:
        assert await book.claim_completion("auth", "c1")
        assert await book.complete("c1", 250)
        await asyncio.sleep(0.05)
        assert await book.expire(0.01) == 1
        account = await book.account("ACC-T")
        assert account is not None and (account.balance, account.held) == (3_700 - 250, 0)
        check = await book.check()
        assert check.ok and check.expired == 1, check.problems
    finally:
        await book.close()
        await ledger.open()  # for the fixture's own close
    if isinstance(book, SqliteLedger):
        import sqlite3

        conn = sqlite3.connect(book.path)
        try:
            version = conn.execute("SELECT value FROM ledger_meta WHERE key = 'schema_version'")
            assert version.fetchone() == ("6",)
        finally:
            conn.close()


def test_hold_expiry_options(tmp_path: Path) -> None:
    assert load_config().hold_expiry == 7 * 86400  # seven days by default
    path = tmp_path / "c.toml"
    path.write_text("hold_expiry = 3600\nhold-sweep-interval = 5\n")
    cfg = load_config(str(path))
    assert (cfg.hold_expiry, cfg.hold_sweep_interval) == (3600, 5)
    assert load_config(str(path), {"hold_expiry": 0}).hold_expiry == 0  # never
    with pytest.raises(ConfigError, match="hold_expiry"):
        load_config(None, {"hold_expiry": -1})
    with pytest.raises(ConfigError, match="hold_sweep_interval"):
        load_config(None, {"hold_sweep_interval": 0})


def test_a_card_fingerprint_follows_a_ring_reloaded_in_place(tmp_path: Path) -> None:
    """The ledger remembers its last card fingerprint (risk stage, then reserve): a rotation
    that changes the same ring object in place (`isopace keys rotate`, the host's key watch)
    must not leave it on the old key."""
    path = str(tmp_path / "host.card.key")
    first, second = Key.generate(), Key.generate()
    write_key_file(path, [first], purpose="card")
    ring = KeyRing.from_file(path)
    book = SqliteLedger(tmp_path / "ledger.db", keys=ring)
    before = book.pan_ref(CARD.pan)
    assert before.startswith(first.id + ":") and book.pan_ref(CARD.pan) == before
    ring.save([second, first])  # in place; the host then calls use_keys with the same ring
    after = book.pan_ref(CARD.pan)
    assert after.startswith(second.id + ":") and after != before
    book.use_keys(ring)
    assert book.pan_ref(CARD.pan) == after
