"""Bad input against a real ``isopace serve`` (SQLite) over a real socket: every request that
decodes is answered with the right code and journalled, never approved; what is not a message of
the spec is dropped with one WARNING; nothing a client sends logs an ERROR or a traceback, moves
money, or puts a card number in the log or the data files.

Inputs tried: a DE 55 whose TLV length runs past its data, one with an odd number of hex
characters, one whose tag is cut short; amount zero on a purchase, a cash withdrawal, a refund and
an authorization; DE 7 with month 99, day 32, Feb 30, hour 25, minute 60; DE 12 with hour 25 and
second 60; DE 13 with month 13 and Feb 30; MTIs 9999 and ABCD; framed HTTP text (three times on
one connection); a truncated frame; a bitmap of garbage after a valid MTI; DE 2 longer than its
maximum; DE 4 one digit short (answered 30 with no field read past the fault); a non-numeric
DE 4; DE 2 with a letter; DE 42 and DE 2 of bytes that are not ASCII
(located, but failing to decode when read).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from isopace.iso8583 import ISO87_ASCII, Message
from isopace.store import SqliteJournal

from .conftest import PAN_OK, HostProcess, cli_json, purchase

SPEC = ISO87_ASCII


class Wire:
    """One connection to the host: ``send(payload)`` frames it (2-byte length header) and
    returns the answer's payload, or None when none comes within ``wait`` seconds."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)

    def send(self, payload: bytes, wait: float = 5.0) -> bytes | None:
        self.sock.settimeout(wait)
        self.sock.sendall(struct.pack(">H", len(payload)) + payload)
        try:
            header = self._read(2)
        except TimeoutError:
            return None
        return self._read(struct.unpack(">H", header)[0])

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise AssertionError("the host closed the connection")
            data += chunk
        return data

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def answer(port: int, payload: bytes) -> Message:
    wire = Wire(port)
    try:
        raw = wire.send(payload)
    finally:
        wire.close()
    assert raw is not None, "no answer"
    return SPEC.decode(raw)


def request(stan: int, **fields: str | bytes) -> Message:
    """A purchase of 1.00 on the demo card with ``stan`` (unique per test input)."""
    m = purchase(PAN_OK, 100, stan)
    for name, value in fields.items():
        m = m.set(int(name.removeprefix("de")), value)
    return m


def with_de55_hex(stan: int, hex_text: bytes) -> bytes:
    """A purchase whose DE 55 (hex characters under the ASCII spec) is ``hex_text`` as is."""
    raw = SPEC.encode(request(stan, de55=b"\x9f\x26\x02\xaa\xaa"))
    i = raw.index(b"9F2602AAAA")
    return raw[: i - 3] + f"{len(hex_text):03d}".encode() + hex_text + raw[i + 10 :]


def journalled(db: str) -> dict[str, list[Any]]:
    """The journal's records of each transaction of the host's database, by the STAN (DE 11) of
    the request its BEGIN record stored, oldest first."""

    async def read() -> dict[str, list[Any]]:
        by_tx: dict[str, list[Any]] = {}
        stans: dict[str, str] = {}
        async with SqliteJournal(db) as journal:
            now = datetime.now(UTC)
            for rec in await journal.by_time(now - timedelta(hours=1), now + timedelta(hours=1)):
                by_tx.setdefault(rec.tx_id, []).append(rec)
                req = rec.request
                if rec.kind == "BEGIN" and req is not None and 11 in req:
                    stans[req[11]] = rec.tx_id
        return {stan: by_tx[tx] for stan, tx in stans.items()}

    return asyncio.run(read())


def balances(db: str) -> dict[str, int]:
    return {a["id"]: a["balance"] for a in cli_json("ledger", "--db", db)["accounts"]}


def assert_clean_log(host: HostProcess) -> None:
    log = host.output
    assert " ERROR " not in log, log
    assert "Traceback" not in log, log
    assert PAN_OK not in log


@pytest.fixture
def host(spawn: Callable[..., HostProcess], db: str) -> HostProcess:
    return spawn("--db", db)


# -- DE 55 ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "hex_text"),
    [
        ("length overruns the data", b"9F260A0102"),
        ("odd number of hex characters", b"9F2602AAA"),
        ("truncated tag", b"9F"),
        ("constructed tag whose content overruns", b"7003" + b"9F2605AA"),
    ],
)
def test_de55_not_ber_tlv_is_answered_30_and_journalled(
    host: HostProcess, db: str, case: str, hex_text: bytes
) -> None:
    before = balances(db)
    reply = answer(host.port, with_de55_hex(700, hex_text))
    assert (reply.mti, reply[39], reply[11]) == ("0210", "30", "000700"), case
    assert balances(db) == before
    host.stop()
    records = journalled(db)["000700"]
    assert records[0].kind == "BEGIN"
    assert records[-1].kind == "ABORTED" and records[-1].response[39] == "30"
    assert "55" in (records[-1].error or ""), records[-1].error
    assert_clean_log(host)


def test_de55_well_formed_is_still_approved(host: HostProcess) -> None:
    reply = answer(host.port, with_de55_hex(701, b"9F2602AAAA9F370411223344"))
    assert reply[39] == "00"


# -- amount zero ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mti", "processing"),
    [("0200", "000000"), ("0200", "010000"), ("0200", "200000"), ("0100", "000000")],
)
def test_amount_zero_is_declined_13_and_moves_no_money(
    host: HostProcess, db: str, mti: str, processing: str
) -> None:
    before = balances(db)
    m = purchase(PAN_OK, 0, 710, mti=mti).set(3, processing)
    reply = answer(host.port, SPEC.encode(m))
    assert reply[39] == "13", reply
    assert 38 not in reply  # no approval code
    assert balances(db) == before
    # a non-zero amount on the same card still goes through
    assert answer(host.port, SPEC.encode(purchase(PAN_OK, 100, 711, mti=mti)))[39] == "00"
    host.stop()
    assert journalled(db)["000710"][-1].kind == "ABORTED"
    assert_clean_log(host)


# -- dates and times -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        (7, "9999999999"),  # month 99
        (7, "1232101010"),  # day 32
        (7, "0230101010"),  # 30 February
        (7, "1129251010"),  # hour 25
        (7, "1129106010"),  # minute 60
        (12, "250000"),  # hour 25
        (12, "101060"),  # second 60
        (13, "1301"),  # month 13
        (13, "0230"),  # 30 February
    ],
)
def test_date_time_not_real_is_answered_30(
    host: HostProcess, db: str, field: int, value: str
) -> None:
    reply = answer(host.port, SPEC.encode(request(720).set(field, value)))
    assert reply[39] == "30", reply
    host.stop()
    records = journalled(db)["000720"]
    assert f"field {field}" in (records[-1].error or ""), records[-1].error
    assert_clean_log(host)


def test_real_edge_dates_are_approved(host: HostProcess) -> None:
    m = request(721).set(7, "0229235959").set(12, "000000").set(13, "1231")
    assert answer(host.port, SPEC.encode(m))[39] == "00"


# -- MTIs and frames that are not messages of the spec ----------------------------------------


@pytest.mark.parametrize("mti", ["9999", "ABCD"])
def test_request_mti_not_valid_is_answered_30_with_what_was_located(
    host: HostProcess, db: str, mti: str
) -> None:
    raw = mti.encode() + SPEC.encode(request(730))[4:]
    reply = answer(host.port, raw)
    # no response MTI derives from it: the answer carries it as received, never an invented one
    assert reply.mti == mti
    assert (reply[39], reply[11], reply[41]) == ("30", "000730", "TERME2E1")
    host.stop()
    records = journalled(db)["000730"]
    assert records[-1].kind == "ABORTED" and records[-1].response[39] == "30"
    assert_clean_log(host)


def test_framed_http_text_is_dropped_with_one_warning(host: HostProcess) -> None:
    http = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\n\r\n"
    wire = Wire(host.port)
    try:
        for _ in range(3):
            assert wire.send(http, wait=1.0) is None  # never answered (no "MTI 4755")
        # the connection is still in sync and serves a real request
        raw = wire.send(SPEC.encode(request(740)))
    finally:
        wire.close()
    assert raw is not None and SPEC.decode(raw)[39] == "00"
    host.stop()
    warnings = [line for line in host.output.splitlines() if "unparseable frame" in line]
    assert len(warnings) == 1, warnings
    assert " WARNING " in warnings[0] and "dropped" in warnings[0]
    assert_clean_log(host)


# -- everything at once ----------------------------------------------------------------------


def test_no_client_input_logs_an_error_moves_money_or_leaks_a_card_number(
    host: HostProcess, db: str, tmp_path: Path
) -> None:
    good = SPEC.encode(request(800))
    amount_at = good.index(b"000000000100")
    pan_at = good.index(PAN_OK.encode())
    # decoded requests: (name, payload, STAN, expected DE 39); each must be journalled
    decoded = [
        ("DE 55 overruns", with_de55_hex(801, b"9F260A0102"), "30"),
        ("DE 55 odd hex", with_de55_hex(802, b"9F2602AAA"), "30"),
        ("DE 55 truncated tag", with_de55_hex(803, b"9F"), "30"),
        ("amount zero", SPEC.encode(purchase(PAN_OK, 0, 804)), "13"),
        ("cash amount zero", SPEC.encode(purchase(PAN_OK, 0, 805).set(3, "010000")), "13"),
        ("refund amount zero", SPEC.encode(purchase(PAN_OK, 0, 806).set(3, "200000")), "13"),
        ("DE 7 month 99", SPEC.encode(request(807, de7="9999999999")), "30"),
        ("DE 12 hour 25", SPEC.encode(request(808, de12="250000")), "30"),
        ("DE 13 Feb 30", SPEC.encode(request(809, de13="0230")), "30"),
        ("MTI 9999", b"9999" + SPEC.encode(request(810))[4:], "30"),
        ("MTI ABCD", b"ABCD" + SPEC.encode(request(811))[4:], "30"),
        (
            "DE 4 not numeric",
            (lambda r: r[:amount_at] + b"00000000AB12" + r[amount_at + 12 :])(
                SPEC.encode(request(812))
            ),
            "30",
        ),
        (
            "DE 2 with a letter",
            (lambda r: r[:pan_at] + b"41111111111A1111" + r[pan_at + 16 :])(
                SPEC.encode(request(813))
            ),
            "30",
        ),
        (
            "DE 42 not ASCII",
            SPEC.encode(request(814, de42="MERCHANT0000001")).replace(
                b"MERCHANT0000001", b"\xff" * 15
            ),
            "30",
        ),
        (
            "DE 2 not ASCII",
            (lambda r: r[:pan_at] + b"\xff" * 16 + r[pan_at + 16 :])(SPEC.encode(request(815))),
            "30",
        ),
    ]
    truncated = SPEC.encode(request(820))[:-5]
    bitmap_garbage = b"0200" + b"ZZZZ" * 4 + SPEC.encode(request(821))[20:]
    long_pan = b"0200" + good[4:20] + b"25" + b"4" * 25 + good[20 + 2 + 16 :]
    # frames the spec does not decode, but whose MTI it reads: answered 30 by the server itself
    # (no transaction: nothing was handed to the flow, so nothing is journalled)
    malformed = [("truncated", truncated), ("bitmap garbage", bitmap_garbage)]
    malformed.append(("DE 2 too long", long_pan))
    short = SPEC.encode(request(822))
    at = short.index(b"000000000100")
    # DE 4 one digit short: every field after it read one byte off, DE 11 among them
    malformed.append(("DE 4 one digit short", short[:at] + short[at + 1 :]))
    http = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    before = balances(db)
    wire = Wire(host.port)
    try:
        for name, payload, code in decoded:
            raw = wire.send(payload)
            assert raw is not None, name
            reply = SPEC.decode(raw)
            assert reply[39] == code, (name, reply)
            assert 38 not in reply, name
        for name, payload in malformed:
            raw = wire.send(payload)
            assert raw is not None, name
            reply = SPEC.decode(raw)
            # nothing echoed that was read past the fault (a misread DE 11 could pair the
            # answer with another transaction in flight)
            assert (reply.mti, reply.fields()) == ("0210", {39: "30"}), (name, reply)
        assert wire.send(http, wait=1.0) is None
        assert wire.send(bytes(range(256)) * 3, wait=1.0) is None  # garbage: no MTI
        raw = wire.send(good)  # and the connection still serves
        assert raw is not None and SPEC.decode(raw)[39] == "00"
    finally:
        wire.close()
    after = balances(db)
    assert after["ACC-1001"] == before["ACC-1001"] - 100  # only the good purchase
    assert {k: v for k, v in after.items() if k != "ACC-1001"} == {
        k: v for k, v in before.items() if k != "ACC-1001"
    }
    assert host.stop() == 0
    assert_clean_log(host)
    records = journalled(db)
    for name, payload, code in decoded:
        stan = SPEC.decode(payload)[11]
        recs = records.get(stan)
        assert recs, f"{name}: no journal record"
        assert recs[0].kind == "BEGIN", name
        assert recs[-1].kind == "ABORTED" and recs[-1].response[39] == code, name
    for path in Path(db).parent.iterdir():
        data = path.read_bytes()
        assert PAN_OK.encode() not in data, path
        assert bytes.fromhex(PAN_OK) not in data, path
        assert PAN_OK.encode().hex().encode() not in data.lower(), path
