"""A card number in any field other than the card data fields is masked in storage too: the
journal's request, response, durable properties and error (SQLite, shared or on its own, and
PostgreSQL), and every idempotency store's answer (SQLite shared and standalone, PostgreSQL,
Redis), with the same detector the log uses; a replayed answer gets the duplicate's own values.

Inputs tried: a PAN in text fields (plain, grouped by spaces or dashes, followed by track data),
in a binary field as packed BCD (even, F-padded odd), as ASCII bytes, and as a durable property
(text and integer); values that only look like numbers (amounts, STAN) are kept as they are."""

from __future__ import annotations

import json
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis

from isopace.flow import CONTINUE, Event, EventKind, Exchange, Flow, Outcome
from isopace.iso8583 import Message
from isopace.store import (
    CardDataProtector,
    PostgresIdempotencyStore,
    PostgresJournal,
    RedisIdempotencyStore,
    SqliteDatabase,
    SqliteIdempotencyStore,
    SqliteJournal,
    stored_json,
)
from isopace.store.protect import card_text_fields

PAN = "4761739001010010"
AMEX = "378282246310005"  # 15 digits: packed BCD needs an F pad
MASKED = "476173******0010"


def forms(pan: str) -> list[bytes]:
    """How a PAN could sit in a file: ASCII, packed BCD, hex text of its ASCII digits."""
    bcd = bytes.fromhex(pan if len(pan) % 2 == 0 else pan + "F")
    hexed = pan.encode().hex()
    return [pan.encode(), bcd, hexed.encode(), hexed.upper().encode()]


def assert_absent(blob: bytes, where: str, pans: tuple[str, ...] = (PAN, AMEX)) -> None:
    for pan in pans:
        for form in forms(pan):
            assert form not in blob, f"{pan} ({form!r}) found in {where}"


def carrier(pan: str = PAN) -> Message:
    """A request with the PAN where a terminal or acquirer could put one by mistake."""
    return Message(
        "0200",
        {
            2: pan,
            3: "000000",
            4: "000000002500",
            7: "1129101010",
            11: "000001",
            34: pan,
            41: "TERM0001",
            43: f"SHOP {pan[:4]} {pan[4:8]} {pan[8:12]} {pan[12:]} TOWN",
            48: f"ref={pan}=25121010000012300000",
            102: f"{pan[:4]}-{pan[4:8]}-{pan[8:12]}-{pan[12:]}",
            62: AMEX,
        },
    )


def reply(request: Message) -> Message:
    return request.reply().set_many({39: "00", 48: request[48], 102: request[102]})


def test_text_fields_masked_in_place_and_named_in_redacted() -> None:
    text = stored_json(carrier())
    assert_absent(text.encode(), "the stored JSON")
    back = Message.from_json(text)
    assert back[34] == MASKED
    assert back[43] == "SHOP 476173******0010 TOWN"
    assert back[48] == f"ref={MASKED}=****"
    assert back[102] == MASKED
    assert back[62] == "378282*****0005"
    # what recovery and the key function read is kept as it was
    assert (back.mti, back[4], back[7], back[11], back[41]) == (
        "0200",
        "000000002500",
        "1129101010",
        "000001",
        "TERM0001",
    )
    assert back.redacted == {2, 34, 43, 48, 62, 102}
    assert 2 not in back


def test_binary_fields_holding_a_card_number_are_dropped() -> None:
    m = Message(
        "0200",
        {
            4: "000000002500",
            53: bytes.fromhex(PAN),  # packed BCD
            96: bytes.fromhex(AMEX + "F"),  # odd length, F-padded
            110: PAN.encode(),  # ASCII digits in a binary field
            64: bytes.fromhex("0123456789ABCDEF"),  # a MAC: no card number, kept
        },
    )
    assert card_text_fields(m) == {53: None, 96: None, 110: None}
    text = stored_json(m)
    assert_absent(text.encode(), "the stored JSON")
    back = Message.from_json(text)
    assert back[64] == bytes.fromhex("0123456789ABCDEF") and back[4] == "000000002500"
    assert 53 not in back and 96 not in back and 110 not in back
    assert back.redacted == {53, 96, 110}
    # the log's view hides them too (the same detector)
    masked = m.to_masked_dict()
    assert masked["53"] == MASKED and masked["110"] == "****"
    assert_absent(json.dumps(masked).encode(), "the masked view")


def test_a_message_without_card_numbers_is_stored_as_before() -> None:
    m = Message("0200", {3: "000000", 4: "000000002500", 11: "000001", 42: "MERCHANT0000001"})
    assert stored_json(m) == m.to_json(redact=True)


def test_stored_form_is_built_once_per_message_and_never_outlives_a_change() -> None:
    """The journal and the idempotency store keep the same response: its stored form is built
    once; a message changed from it (a card number put in DE 48) is scanned anew."""
    clean = Message("0210", {3: "000000", 11: "000001", 39: "00", 48: "NO CARD HERE"})
    first = stored_json(clean)
    assert stored_json(clean) is first
    dirty = clean.set(48, f"card {PAN}")
    text = stored_json(dirty)
    assert_absent(text.encode(), "the stored JSON of the changed message")
    assert Message.from_json(text)[48] == f"card {MASKED}"
    assert stored_json(clean) is first and PAN not in first


def test_durable_properties_are_stored_masked_whatever_their_shape() -> None:
    """The stored properties are JSON: a card number anywhere in them, grouped, nested or as an
    integer, is masked; properties with no 13 digits in a row are stored as they are."""
    from isopace.flow.journal import BEGIN_EVENT
    from isopace.store.records import DURABLE, build_row

    def stored(**props: object) -> object:
        ex = Exchange("tx-1", carrier())
        for key, value in props.items():
            ex.set(key, value, durable=True)
        text = build_row(ex, BEGIN_EVENT, CardDataProtector(), "node")[DURABLE]
        assert text is not None
        assert_absent(text.encode(), "the stored properties")
        return json.loads(text)

    plain = {"hold": "tx-1", "capture": True, "amount": 2500, "stan": "000001", "rate": 1.5}
    assert stored(**plain) == plain
    grouped = f"{PAN[:4]} {PAN[4:8]} {PAN[8:12]} {PAN[12:]}"
    assert stored(
        note=f"card {grouped}", nested={"cards": [PAN, {"n": int(AMEX)}]}, neg=-int(PAN)
    ) == {
        "note": "card 476173******0010",
        "nested": {"cards": [MASKED, {"n": "378282*****0005"}]},
        "neg": "-476173******0010",
    }


class Decline:
    """Declines with the request's DE 48 / 102 echoed, a durable property holding the PAN, and
    an abort cause naming it."""

    name = "decline"

    def prepare(self, ex: Exchange) -> object:
        ex.set("card_text", f"pan {ex.request[2]}", durable=True)
        ex.set("card_number", int(ex.request[2]), durable=True)
        ex.response = reply(ex.request).set(39, "05")
        ex.abort(ValueError(f"card {ex.request[34]} refused"))
        return CONTINUE


class Approve:
    name = "approve"

    def prepare(self, ex: Exchange) -> object:
        ex.set("note", f"approved {ex.request[34]}", durable=True)
        ex.response = reply(ex.request)
        return CONTINUE


async def _run_both(journal: object, stan: int = 1) -> None:
    for stage, n in ((Approve(), stan), (Decline(), stan + 1)):
        flow = Flow(journal=journal).group("main", stage)  # type: ignore[arg-type]
        ex = Exchange(f"tx-{n}", carrier().set(11, f"{n:06d}"))
        await flow.run(ex)
        assert ex.response is not None


def _files(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file())


async def test_sqlite_journal_rows_hold_no_card_number(tmp_path: Path) -> None:
    (tmp_path / "alone").mkdir()
    alone = SqliteJournal(tmp_path / "alone" / "journal.db", hmac_key=b"k" * 32)
    await _run_both(alone)
    records = await alone.by_id("tx-2")
    await alone.close()
    assert_absent(_files(tmp_path / "alone"), "the journal's files")
    begin = records[0]
    assert begin.pan_masked == MASKED and begin.request is not None
    assert begin.request[48] == f"ref={MASKED}=****"
    final = records[-1]
    assert final.response is not None and final.response[102] == MASKED
    assert final.durable == {"card_text": f"pan {MASKED}", "card_number": MASKED}
    assert final.error == f"ValueError: card {MASKED} refused"

    (tmp_path / "shared").mkdir()
    database = SqliteDatabase(tmp_path / "shared" / "host.db")
    shared = SqliteJournal.on(database, hmac_key=b"k" * 32)
    await _run_both(shared)
    await shared.close()
    await database.close()
    assert_absent(_files(tmp_path / "shared"), "the shared database's files")


async def test_postgres_journal_rows_hold_no_card_number(pg: tuple[str, str]) -> None:
    dsn, schema = pg
    journal = PostgresJournal(dsn, schema=schema, hmac_key=b"k" * 32)
    await journal.open()
    await _run_both(journal)
    # an in-doubt one too: its request is copied into the inflight table
    await journal.record(Exchange("tx-doubt", carrier()), Event(EventKind.BEGIN))
    records = await journal.by_id("tx-2")
    await journal.close()
    assert records[-1].response is not None and records[-1].response[48] == f"ref={MASKED}=****"
    conn = await asyncpg.connect(dsn)
    try:
        for table in ("journal", "inflight"):
            rows = await conn.fetch(f"SELECT * FROM {schema}.{table}")
            assert rows
            assert_absent(repr([tuple(r) for r in rows]).encode(), f"{schema}.{table}")
    finally:
        await conn.close()


class Answer:
    name = "answer"

    def __init__(self) -> None:
        self.runs = 0

    def prepare(self, ex: Exchange) -> object:
        self.runs += 1
        ex.response = reply(ex.request)
        return CONTINUE


async def _replay(store: object) -> None:
    """Run one request, then its duplicate: the answer is stored masked and replayed with the
    duplicate's own values."""
    stage = Answer()
    flow = Flow(idempotency=store, key=lambda ex: f"k-{ex.request[11]}")  # type: ignore[arg-type]
    flow.group("main", stage)
    first = Exchange("tx-a", carrier())
    assert await flow.run(first) is Outcome.COMMITTED
    again = Exchange("tx-b", carrier())
    assert await flow.run(again) is Outcome.REPLAYED
    assert stage.runs == 1
    assert again.response is not None
    assert again.response[48] == carrier()[48] and again.response[102] == carrier()[102]
    assert again.response[2] == PAN


async def test_sqlite_idempotency_answers_hold_no_card_number(tmp_path: Path) -> None:
    (tmp_path / "alone").mkdir()
    alone = SqliteIdempotencyStore(tmp_path / "alone" / "idem.db")
    await _replay(alone)
    await alone.close()
    assert_absent(_files(tmp_path / "alone"), "the idempotency store's files")

    (tmp_path / "shared").mkdir()
    database = SqliteDatabase(tmp_path / "shared" / "host.db")
    shared = SqliteIdempotencyStore.on(database)
    await _replay(shared)
    await shared.close()
    await database.close()
    assert_absent(_files(tmp_path / "shared"), "the shared database's files")


async def test_postgres_idempotency_answers_hold_no_card_number(pg: tuple[str, str]) -> None:
    dsn, schema = pg
    store = PostgresIdempotencyStore(dsn, schema=schema)
    await store.open()
    await _replay(store)
    await store.close()
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(f"SELECT * FROM {schema}.idempotency_keys")
    finally:
        await conn.close()
    assert rows
    assert_absent(repr([tuple(r) for r in rows]).encode(), "idempotency_keys")


async def test_redis_idempotency_answers_hold_no_card_number(
    redis_prefix: tuple[str, str],
) -> None:
    url, prefix = redis_prefix
    store = RedisIdempotencyStore(url, prefix=prefix)
    await _replay(store)
    await store.close()
    client = aioredis.Redis.from_url(url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
        values = [await client.get(k) for k in keys]
    finally:
        await client.aclose()
    assert any(v and v.startswith(b"A") for v in values)
    assert_absent(b"".join(v or b"" for v in values), "Redis")


def test_protector_path_uses_the_same_masking() -> None:
    text, masked, fingerprint = CardDataProtector(b"k" * 32).protect_fields(carrier())
    assert text == stored_json(carrier()) and masked == MASKED and fingerprint
