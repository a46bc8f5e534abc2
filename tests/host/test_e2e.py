"""End-to-end: real ``isopace serve`` processes, driven by ``isopace send`` and the client, once
on SQLite (one host) and once on PostgreSQL + Redis (two hosts on two ports sharing them: the
retransmissions and reversals go to both).

Inputs tried: approvals (0100, 0200), insufficient funds, a blocked card, a PAN no BIN routes, a
card not in the ledger, a request missing DE 41, a PAN failing Luhn, an unsupported MTI, a frame
whose fields are cut short (garbage after the bitmap), echo 0800, retransmissions (sequential and
concurrent on two connections), reversals of a purchase and of an authorization, a repeated
reversal, a second reversal of the same original, a reversal of an unknown transaction, of
another card's transaction and of another amount.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import subprocess
import time
import urllib.request
from pathlib import Path

from isopace.iso8583 import ISO87_ASCII, Message
from isopace.net import Client

from .conftest import (
    E2E,
    PAN_BLOCKED,
    PAN_LOW,
    PAN_MC,
    PAN_OK,
    PAN_UNKNOWN_BIN,
    PAN_UNKNOWN_CARD,
    Backend,
    HostProcess,
    accounts,
    cli,
    cli_json,
    free_port,
    purchase,
    send,
)


async def request_all(port: int, messages: list[Message]) -> list[Message]:
    async with Client(ISO87_ASCII, port=port) as client:
        return list(await asyncio.gather(*(client.request(m, timeout=10) for m in messages)))


def test_approve_with_send_debits_the_account(host: tuple[HostProcess, list[str], int]) -> None:
    proc, store, _ = host
    before = accounts(store)["ACC-1001"]["balance"]
    response = send(proc.port, "--pan", PAN_OK, "--amount", "25.00")
    assert response["mti"] == "0210"
    assert response["39"] == "00"
    assert len(response["38"]) == 6
    assert response["2"] == "411111******1111"  # masked in the output
    assert accounts(store)["ACC-1001"]["balance"] == before - 2500


def test_declines(host: tuple[HostProcess, list[str], int]) -> None:
    proc, store, _ = host
    before = accounts(store)
    assert send(proc.port, "--pan", PAN_LOW, "--amount", "25.00")["39"] == "51"
    assert send(proc.port, "--pan", PAN_BLOCKED, "--amount", "1.00")["39"] == "05"
    assert send(proc.port, "--pan", PAN_UNKNOWN_BIN, "--amount", "1.00")["39"] == "14"
    assert send(proc.port, "--pan", PAN_UNKNOWN_CARD, "--amount", "1.00")["39"] == "14"
    after = accounts(store)
    assert after == before  # nothing held, nothing posted


def test_malformed_requests_get_30(host: tuple[HostProcess, list[str], int]) -> None:
    proc, _, _ = host
    missing = send(proc.port, "--pan", PAN_OK, "--amount", "1.00", "--field", "41=")
    assert missing["39"] == "30"
    bad_luhn = send(proc.port, "--pan", "4111111111111112", "--amount", "1.00")
    assert bad_luhn["39"] == "30"
    unsupported = send(proc.port, "--mti", "0300", "--pan", PAN_OK, "--amount", "1.00")
    assert unsupported["39"] == "30"
    # A frame whose bitmap announces DE 2 but whose data stops after a bad length prefix.
    payload = b"0200" + b"4000000000000000" + b"9X"
    with socket.create_connection(("127.0.0.1", proc.port), timeout=10) as sock:
        sock.sendall(struct.pack(">H", len(payload)) + payload)
        header = sock.recv(2)
        (length,) = struct.unpack(">H", header)
        data = b""
        while len(data) < length:
            data += sock.recv(length - len(data))
    reply = ISO87_ASCII.decode(data)
    assert reply.mti == "0210"
    assert reply[39] == "30"


def test_echo_0800(host: tuple[HostProcess, list[str], int]) -> None:
    proc, _, _ = host
    response = send(proc.port, "--mti", "0800", "--network-code", "301")
    assert response["mti"] == "0810"
    assert response["39"] == "00"
    assert response["70"] == "301"


def test_retransmission_is_replayed_and_debited_once(e2e: E2E) -> None:
    """Sequential duplicates to one host, concurrent ones to both hosts (PostgreSQL + Redis)."""
    proc, peer, store = e2e.proc, e2e.peer, e2e.backend.store
    before = accounts(store)["ACC-1002"]["balance"]
    args = ["--pan", PAN_MC, "--amount", "10.00", "--stan", "424242", "--time", "1129111111"]
    first = send(proc.port, *args)
    second = send(proc.port, *args)
    third = send(peer.port, *args)
    assert first["39"] == second["39"] == third["39"] == "00"
    assert first["38"] == third["38"]
    assert first["38"] == second["38"]  # the same approval, replayed
    assert accounts(store)["ACC-1002"]["balance"] == before - 1000

    # Concurrent duplicates on two connections, ten distinct requests: each applied once.
    messages = [purchase(PAN_MC, 100, 500 + i, tx_time="1129121212") for i in range(10)]

    async def both() -> tuple[list[Message], list[Message]]:
        a, b = await asyncio.gather(
            request_all(proc.port, messages), request_all(peer.port, messages)
        )
        return a, b

    a, b = asyncio.run(both())
    assert [m[39] for m in a] == ["00"] * 10
    assert [m[38] for m in a] == [m[38] for m in b]
    assert accounts(store)["ACC-1002"]["balance"] == before - 1000 - 10 * 100


def test_reversal_refunds_a_purchase_once(e2e: E2E) -> None:
    """The purchase on one host, the reversal on the other, retransmitted to both."""
    proc, peer, store = e2e.proc, e2e.peer, e2e.backend.store
    before = accounts(store)["ACC-1001"]["balance"]
    original = ["--stan", "777001", "--time", "1129131313", "--terminal", "TERMREV1"]
    assert send(proc.port, "--pan", PAN_OK, "--amount", "40.00", *original)["39"] == "00"
    assert accounts(store)["ACC-1001"]["balance"] == before - 4000
    reversal = [
        "--mti", "0400", "--pan", PAN_OK, "--amount", "40.00", "--terminal", "TERMREV1",
        "--stan", "777002", "--time", "1129131320",
        "--original-stan", "777001", "--original-time", "1129131313",
    ]  # fmt: skip
    response = send(peer.port, *reversal)
    assert response["mti"] == "0410"
    assert response["39"] == "00"
    assert accounts(store)["ACC-1001"]["balance"] == before
    # The same reversal retransmitted: replayed, not applied twice.
    assert send(proc.port, *reversal)["39"] == "00"
    assert send(peer.port, *reversal)["39"] == "00"
    # A new reversal (new STAN) of the same original: answered, changes nothing.
    again = [*reversal[:-6], "--stan", "777003", *reversal[-4:]]
    assert send(proc.port, *again)["39"] == "00"
    assert accounts(store)["ACC-1001"]["balance"] == before


def test_reversal_releases_an_authorization(host: tuple[HostProcess, list[str], int]) -> None:
    proc, store, _ = host
    before = accounts(store)["ACC-1001"]
    auth = ["--mti", "0100", "--pan", PAN_OK, "--amount", "30.00", "--terminal", "TERMREV2",
            "--stan", "888001", "--time", "1129141414"]  # fmt: skip
    assert send(proc.port, *auth)["39"] == "00"
    held = accounts(store)["ACC-1001"]
    assert held["held"] == before["held"] + 3000
    assert held["balance"] == before["balance"]
    reversal = ["--mti", "0400", "--pan", PAN_OK, "--amount", "30.00", "--terminal", "TERMREV2",
                "--stan", "888002", "--original-stan", "888001", "--original-time", "1129141414",
                "--original-mti", "0100"]  # fmt: skip
    assert send(proc.port, *reversal)["39"] == "00"
    assert accounts(store)["ACC-1001"] == before


def test_reversal_of_another_card_or_amount_is_25(host: tuple[HostProcess, list[str], int]) -> None:
    proc, store, _ = host
    terminal = ["--terminal", "TERMREV3"]
    assert send(proc.port, "--pan", PAN_OK, "--amount", "20.00", *terminal,
                "--stan", "666001", "--time", "1129151515")["39"] == "00"  # fmt: skip
    before = accounts(store)
    reversal = [*terminal, "--mti", "0400", "--original-stan", "666001",
                "--original-time", "1129151515"]  # fmt: skip
    other_card = send(
        proc.port, *reversal, "--pan", PAN_MC, "--amount", "20.00", "--stan", "666002"
    )
    assert other_card["39"] == "25"
    other_amount = send(
        proc.port, *reversal, "--pan", PAN_OK, "--amount", "2.00", "--stan", "666003"
    )
    assert other_amount["39"] == "25"
    assert accounts(store) == before  # nothing reversed
    assert send(proc.port, *reversal, "--pan", PAN_OK, "--amount", "20.00",
                "--stan", "666004")["39"] == "00"  # fmt: skip
    assert accounts(store)["ACC-1001"]["balance"] == before["ACC-1001"]["balance"] + 2000


def test_reversal_by_rrn_alone_refunds_the_purchase(
    host: tuple[HostProcess, list[str], int],
) -> None:
    """A reversal with no DE 90 finds its original by DE 37 (the spec's rule for 0400 is DE 90
    or DE 37), and refunds it once."""
    proc, store, _ = host
    before = accounts(store)["ACC-1001"]["balance"]
    terminal = ["--terminal", "TERMREV4", "--rrn", "633412345678"]
    assert send(proc.port, "--pan", PAN_OK, "--amount", "12.34", *terminal,
                "--stan", "555001")["39"] == "00"  # fmt: skip
    assert accounts(store)["ACC-1001"]["balance"] == before - 1234
    reversal = ["--mti", "0400", "--pan", PAN_OK, "--amount", "12.34", *terminal,
                "--stan", "555002"]  # fmt: skip
    response = send(proc.port, *reversal)
    assert (response["mti"], response["39"], response["37"]) == ("0410", "00", "633412345678")
    assert accounts(store)["ACC-1001"]["balance"] == before
    assert send(proc.port, *reversal[:-1], "555003")["39"] == "00"  # again: changes nothing
    assert accounts(store)["ACC-1001"]["balance"] == before


def test_a_swiped_card_with_track_2_only_is_charged(
    host: tuple[HostProcess, list[str], int],
) -> None:
    """DE 35 without DE 2 (the spec's rule is one of the two): the card number is the one
    track 2 holds, and that card's account is debited."""
    proc, store, _ = host
    before = accounts(store)["ACC-1001"]["balance"]
    track2 = ["--field", "2=", "--field", f"35={PAN_OK}=2812201123456"]
    response = send(proc.port, "--pan", PAN_OK, "--amount", "3.21", *track2, "--stan", "555101")
    assert response["39"] == "00" and "2" not in response
    assert accounts(store)["ACC-1001"]["balance"] == before - 321


def test_a_reversal_that_overtakes_its_original_voids_it(
    host: tuple[HostProcess, list[str], int],
) -> None:
    """The original timed out at the acquirer, which reversed it; the reversal arrives first:
    answered 00 (DE 90 echoed) and remembered, and the late original is declined 12 without
    any hold. Its retransmission and the reversal's are replayed."""
    proc, store, _ = host
    before = accounts(store)
    original = ["--pan", PAN_OK, "--amount", "77.00", "--terminal", "TERMREV5",
                "--stan", "444001", "--time", "1206101010"]  # fmt: skip
    reversal = ["--mti", "0400", "--pan", PAN_OK, "--amount", "77.00", "--terminal", "TERMREV5",
                "--stan", "444002", "--original-stan", "444001",
                "--original-time", "1206101010"]  # fmt: skip
    answer = send(proc.port, *reversal)
    assert (answer["mti"], answer["39"]) == ("0410", "00")
    assert answer["90"].startswith("0200444001" + "1206101010")
    late = send(proc.port, *original)
    assert (late["mti"], late["39"]) == ("0210", "12") and "38" not in late
    assert send(proc.port, *original)["39"] == "12"
    assert send(proc.port, *reversal)["39"] == "00"
    assert accounts(store) == before  # nothing held, nothing posted
    # another transaction of the card on that terminal is served as usual
    other = [*original[:-4], "--stan", "444003", "--time", "1206101011"]
    assert send(proc.port, *other)["39"] == "00"
    assert accounts(store)["ACC-1001"]["balance"] == before["ACC-1001"]["balance"] - 7700


def test_partial_reversals_leave_the_actual_amount_standing(
    host: tuple[HostProcess, list[str], int],
) -> None:
    """DE 95's actual amount: a purchase of 50.00 partially reversed to 30.00 gives 20.00
    back, once; a full reversal afterwards gives back the rest. An authorization partially
    reversed holds less. An actual amount not lower than the original's is declined 13."""
    proc, store, _ = host
    before = accounts(store)["ACC-1001"]
    buy = ["--pan", PAN_OK, "--amount", "50.00", "--terminal", "TERMREV6",
           "--stan", "444101", "--time", "1206111111"]  # fmt: skip
    assert send(proc.port, *buy)["39"] == "00"
    assert accounts(store)["ACC-1001"]["balance"] == before["balance"] - 5000

    def reversal(stan: str, actual: int | None, amount: str = "50.00") -> list[str]:
        out = ["--mti", "0400", "--pan", PAN_OK, "--amount", amount, "--terminal", "TERMREV6",
               "--stan", stan, "--original-stan", "444101",
               "--original-time", "1206111111"]  # fmt: skip
        if actual is not None:
            out += ["--field", f"95={actual:012d}" + "0" * 30]
        return out

    answer = send(proc.port, *reversal("444102", 3000))
    assert (answer["39"], answer["95"][:12]) == ("00", "000000003000")
    assert accounts(store)["ACC-1001"]["balance"] == before["balance"] - 3000
    assert send(proc.port, *reversal("444103", 3000))["39"] == "00"  # again: changes nothing
    assert accounts(store)["ACC-1001"]["balance"] == before["balance"] - 3000
    assert send(proc.port, *reversal("444104", 5000))["39"] == "13"  # not lower: refused
    assert send(proc.port, *reversal("444105", 9000))["39"] == "13"
    assert accounts(store)["ACC-1001"]["balance"] == before["balance"] - 3000
    assert send(proc.port, *reversal("444106", None))["39"] == "00"  # full: the rest back
    assert accounts(store)["ACC-1001"] == before

    auth = ["--mti", "0100", "--pan", PAN_OK, "--amount", "40.00", "--terminal", "TERMREV7",
            "--stan", "444201", "--time", "1206121212"]  # fmt: skip
    assert send(proc.port, *auth)["39"] == "00"
    partial = ["--mti", "0400", "--pan", PAN_OK, "--amount", "40.00", "--terminal", "TERMREV7",
               "--stan", "444202", "--original-stan", "444201", "--original-time", "1206121212",
               "--original-mti", "0100", "--field", "95=" + "000000001000" + "0" * 30]  # fmt: skip
    assert send(proc.port, *partial)["39"] == "00"
    held = accounts(store)["ACC-1001"]
    assert (held["balance"], held["held"]) == (before["balance"], before["held"] + 1000)


def test_repeats_are_their_original_never_twice(
    host: tuple[HostProcess, list[str], int],
) -> None:
    """An 0201 whose original never arrived is processed as the original (answered 0210) and
    debited once; the original arriving late, and the repeat again, are replayed. An 0421
    whose original reversal was not seen is acknowledged 0430."""
    proc, store, _ = host
    before = accounts(store)["ACC-1001"]["balance"]
    common = ["--pan", PAN_OK, "--amount", "6.66", "--terminal", "TERMRPT1",
              "--stan", "444301", "--time", "1206131313"]  # fmt: skip
    repeat = send(proc.port, "--mti", "0201", *common)
    assert (repeat["mti"], repeat["39"]) == ("0210", "00") and repeat["38"]
    assert accounts(store)["ACC-1001"]["balance"] == before - 666
    late = send(proc.port, *common)
    assert (late["mti"], late["39"], late["38"]) == ("0210", "00", repeat["38"])
    assert send(proc.port, "--mti", "0201", *common)["38"] == repeat["38"]
    assert accounts(store)["ACC-1001"]["balance"] == before - 666
    advice = ["--mti", "0421", "--pan", PAN_OK, "--amount", "6.66", "--terminal", "TERMRPT1",
              "--stan", "444302", "--original-stan", "444301",
              "--original-time", "1206131313"]  # fmt: skip
    answer = send(proc.port, *advice)
    assert (answer["mti"], answer["39"]) == ("0430", "00")
    assert accounts(store)["ACC-1001"]["balance"] == before  # the repeat of an 0420 reversed it


def test_a_reversal_advice_that_reverses_nothing_is_acknowledged(
    host: tuple[HostProcess, list[str], int],
) -> None:
    """0420 naming another amount's transaction: acknowledged 0430 / 00 (an advice is never
    refused), nothing changes, and the host logs it for review."""
    proc, store, _ = host
    buy = ["--pan", PAN_OK, "--amount", "9.99", "--terminal", "TERMREV8",
           "--stan", "444401", "--time", "1206141414"]  # fmt: skip
    assert send(proc.port, *buy)["39"] == "00"
    before = accounts(store)
    advice = ["--mti", "0420", "--pan", PAN_OK, "--amount", "1.00", "--terminal", "TERMREV8",
              "--stan", "444402", "--original-stan", "444401",
              "--original-time", "1206141414"]  # fmt: skip
    answer = send(proc.port, *advice)
    assert (answer["mti"], answer["39"]) == ("0430", "00")
    assert accounts(store) == before
    assert "reverses nothing" in proc.output


def _auth(terminal: str, stan: str, amount: str, pan: str = PAN_OK) -> list[str]:
    """``isopace send`` flags of an 0100 on ``terminal`` (DE 7 fixed, so DE 90 can name it)."""
    return ["--mti", "0100", "--pan", pan, "--amount", amount, "--terminal", terminal,
            "--stan", stan, "--time", "1207101010"]  # fmt: skip


def _completion(terminal: str, stan: str, amount: str, of: str | None, *more: str) -> list[str]:
    """An 0220 on ``terminal`` completing the 0100 of STAN ``of`` (DE 90; None: no DE 90)."""
    out = ["--mti", "0220", "--pan", PAN_OK, "--amount", amount, "--terminal", terminal,
           "--stan", stan, "--time", "1207111111", *more]  # fmt: skip
    if of is not None:
        out += ["--original-mti", "0100", "--original-stan", of, "--original-time", "1207101010"]
    return out


def test_an_authorization_is_completed_once(host: tuple[HostProcess, list[str], int]) -> None:
    """0100 of 40.00, then its 0220 of 40.00 (DE 90 names it): answered 0230 / 00 with the
    authorization's approval code, the 40.00 posted and no longer held. The 0220
    retransmitted, and its repeat (0221), change nothing."""
    proc, store, _ = host
    before = accounts(store)["ACC-1001"]
    auth = send(proc.port, *_auth("TERMCMP1", "333001", "40.00"))
    assert (auth["mti"], auth["39"]) == ("0110", "00")
    held = accounts(store)["ACC-1001"]
    assert (held["balance"], held["held"]) == (before["balance"], before["held"] + 4000)
    completion = _completion("TERMCMP1", "333002", "40.00", "333001")
    answer = send(proc.port, *completion)
    assert (answer["mti"], answer["39"], answer["38"]) == ("0230", "00", auth["38"])
    after = accounts(store)["ACC-1001"]
    assert (after["balance"], after["held"]) == (before["balance"] - 4000, before["held"])
    assert send(proc.port, *completion)["39"] == "00"  # retransmitted: replayed
    repeat = send(proc.port, *["0221" if a == "0220" else a for a in completion])
    assert (repeat["mti"], repeat["39"]) == ("0230", "00")
    assert accounts(store)["ACC-1001"] == after  # captured once
    # another completion of the same authorization (a new STAN): acknowledged, nothing posted
    again = send(proc.port, *_completion("TERMCMP1", "333003", "40.00", "333001"))
    assert (again["mti"], again["39"]) == ("0230", "00")
    assert accounts(store)["ACC-1001"] == after
    assert "completion advice" in proc.output and "review it" in proc.output


def test_a_partial_completion_releases_the_rest(host: tuple[HostProcess, list[str], int]) -> None:
    """0100 of 50.00 completed at 30.00: 30.00 posted, the other 20.00 released. A completion
    above the authorized amount: an 0200 is declined 13 and moves nothing; an advice captures
    the authorized amount and no more (the excess logged for review)."""
    proc, store, _ = host
    before = accounts(store)["ACC-1001"]
    assert send(proc.port, *_auth("TERMCMP2", "333101", "50.00"))["39"] == "00"
    answer = send(proc.port, *_completion("TERMCMP2", "333102", "30.00", "333101"))
    assert (answer["mti"], answer["39"]) == ("0230", "00")
    after = accounts(store)["ACC-1001"]
    assert (after["balance"], after["held"]) == (before["balance"] - 3000, before["held"])

    # an 0200 naming the authorization in DE 90 is a completion too
    assert send(proc.port, *_auth("TERMCMP2", "333201", "25.00"))["39"] == "00"
    over = ["--pan", PAN_OK, "--amount", "25.01", "--terminal", "TERMCMP2", "--stan", "333202",
            "--original-mti", "0100", "--original-stan", "333201",
            "--original-time", "1207101010"]  # fmt: skip
    declined = send(proc.port, *over)
    assert (declined["mti"], declined["39"]) == ("0210", "13")
    held = accounts(store)["ACC-1001"]
    assert (held["balance"], held["held"]) == (after["balance"], after["held"] + 2500)
    within = [*over[:3], "20.00", *over[4:7], "333203", *over[8:]]
    answer = send(proc.port, *within)
    assert (answer["mti"], answer["39"]) == ("0210", "00")
    done = accounts(store)["ACC-1001"]
    assert (done["balance"], done["held"]) == (after["balance"] - 2000, after["held"])

    # an advice above the authorized amount cannot be declined: 10.00 captured of 15.00
    assert send(proc.port, *_auth("TERMCMP2", "333301", "10.00"))["39"] == "00"
    answer = send(proc.port, *_completion("TERMCMP2", "333302", "15.00", "333301"))
    assert (answer["mti"], answer["39"]) == ("0230", "00")
    last = accounts(store)["ACC-1001"]
    assert (last["balance"], last["held"]) == (done["balance"] - 1000, done["held"])
    assert "above the 1000 authorized" in proc.output


def test_a_zero_completion_releases_the_authorization(
    host: tuple[HostProcess, list[str], int],
) -> None:
    """An 0220 of 0.00 (the sale did not happen): acknowledged, never declined 13 for its
    amount; nothing is posted and the whole hold is released."""
    proc, store, _ = host
    before = accounts(store)["ACC-1001"]
    assert send(proc.port, *_auth("TERMCMP5", "333501", "18.00"))["39"] == "00"
    assert accounts(store)["ACC-1001"]["held"] == before["held"] + 1800
    answer = send(proc.port, *_completion("TERMCMP5", "333502", "0.00", "333501"))
    assert (answer["mti"], answer["39"]) == ("0230", "00")
    assert accounts(store)["ACC-1001"] == before


def test_a_completion_of_an_unknown_authorization(host: tuple[HostProcess, list[str], int]) -> None:
    """An 0220 whose authorization was never seen reports an offline approval: acknowledged
    and posted as a stand-in capture when the funds allow; when they do not, acknowledged,
    nothing posted, logged for review. An 0200 naming an unknown authorization is declined 25."""
    proc, store, _ = host
    before = accounts(store)
    answer = send(proc.port, *_completion("TERMCMP3", "333401", "7.50", "333400"))
    assert (answer["mti"], answer["39"]) == ("0230", "00")
    after = accounts(store)
    assert after["ACC-1001"]["balance"] == before["ACC-1001"]["balance"] - 750
    assert after["ACC-1001"]["held"] == before["ACC-1001"]["held"]
    short = send(proc.port, "--mti", "0220", "--pan", PAN_LOW, "--amount", "500.00",
                 "--terminal", "TERMCMP3", "--stan", "333402")  # fmt: skip
    assert (short["mti"], short["39"]) == ("0230", "00")
    assert accounts(store)["ACC-1003"] == before["ACC-1003"]  # nothing posted
    assert "insufficient funds: nothing posted (review it)" in proc.output
    request = send(proc.port, "--pan", PAN_OK, "--amount", "7.50", "--terminal", "TERMCMP3",
                   "--stan", "333403", "--original-mti", "0100", "--original-stan", "333400",
                   "--original-time", "1207101010")  # fmt: skip
    assert (request["mti"], request["39"]) == ("0210", "25")
    assert accounts(store) == after


def test_a_stand_in_approval_is_held_then_completed_by_its_approval_code(
    host: tuple[HostProcess, list[str], int],
) -> None:
    """An 0120 (the network approved in stand-in, approval code in DE 38) is held and
    acknowledged 0130; an 0220 that names it only by DE 38 (no DE 90) captures it."""
    proc, store, _ = host
    before = accounts(store)["ACC-1001"]
    advice = ["--mti", "0120", "--pan", PAN_OK, "--amount", "12.00", "--terminal", "TERMCMP4",
              "--stan", "333501", "--time", "1207121212", "--field", "38=SI0042"]  # fmt: skip
    answer = send(proc.port, *advice)
    assert (answer["mti"], answer["39"]) == ("0130", "00")
    held = accounts(store)["ACC-1001"]
    assert (held["balance"], held["held"]) == (before["balance"], before["held"] + 1200)
    assert send(proc.port, *advice)["39"] == "00"  # retransmitted: held once
    assert accounts(store)["ACC-1001"] == held
    completion = _completion("TERMCMP4", "333502", "11.00", None, "--field", "38=SI0042")
    answer = send(proc.port, *completion)
    assert (answer["mti"], answer["39"], answer["38"]) == ("0230", "00", "SI0042")
    after = accounts(store)["ACC-1001"]
    assert (after["balance"], after["held"]) == (before["balance"] - 1100, before["held"])


def test_metrics_journal_describe_and_ledger(host: tuple[HostProcess, list[str], int]) -> None:
    proc, store, metrics = host
    send(proc.port, "--pan", PAN_OK, "--amount", "1.00")
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as resp:
        text = resp.read().decode()
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert 'isopace_transactions_total{outcome="committed",code="00"}' in text
    assert 'isopace_transactions_total{outcome="aborted",code="51"}' in text or "code=" in text
    assert 'isopace_stage_seconds_bucket{stage="reserve",phase="prepare",le="+Inf"}' in text
    assert "isopace_in_flight 0" in text

    counts = cli_json("journal", *store, "--counts")
    assert counts["COMMITTED"] > 0
    assert counts["IN_DOUBT"] == 0

    encoded = ISO87_ASCII.encode(purchase(PAN_OK, 2500, 1))
    described = cli("describe", encoded.hex(), check=True).stdout
    assert "411111******1111" in described
    assert PAN_OK not in described
    masked = json.loads(cli("describe", encoded.hex(), "--json", check=True).stdout)
    assert masked["2"] == "411111******1111"

    ledger = cli("ledger", *store, check=True).stdout
    assert "ledger balances" in ledger


def test_journal_search_by_pan(e2e: E2E) -> None:
    """No --journal-key: on SQLite the host generated one next to the database (mode 0600) on
    first start, on PostgreSQL the hosts derive one from the ledger's card key; either way
    ``isopace journal --pan`` finds the card's transactions (on PostgreSQL, whichever host
    served them)."""
    response = send(e2e.proc.port, "--pan", PAN_LOW, "--amount", "0.07", "--stan", "515151")
    assert response["39"] == "00"
    response = send(e2e.peer.port, "--pan", PAN_LOW, "--amount", "0.08", "--stan", "515152")
    assert response["39"] == "00"
    if e2e.backend.kind == "sqlite":
        key_file = Path(e2e.backend.db).with_suffix(".journal.key")
        assert key_file.stat().st_mode & 0o777 == 0o600
    records = [
        json.loads(line)
        for line in cli("journal", *e2e.backend.store, "--pan", PAN_LOW, "--json", check=True)
        .stdout.strip()
        .splitlines()
    ]
    assert records and {r["pan"] for r in records} - {None} == {"510510******5100"}
    assert len({r["tx_id"] for r in records if r["kind"] == "COMMITTED"}) >= 2  # both hosts'
    other = cli("journal", *e2e.backend.store, "--pan", PAN_MC, "--json", check=True).stdout
    assert "510510******5100" not in other


def test_log_lines_are_masked(host: tuple[HostProcess, list[str], int]) -> None:
    proc, _, _ = host
    send(proc.port, "--pan", PAN_OK, "--amount", "2.00")
    log = proc.output
    assert "pan=411111******1111" in log
    assert PAN_OK not in log
    assert "reserve/prepare=" in log  # the profile


def test_config_file_and_velocity_limits(tmp_path: Path) -> None:
    config = tmp_path / "host.toml"
    config.write_text(
        f'db = "{tmp_path / "v.db"}"\nvelocity_max_count = 2\nvelocity_max_amount = 300000\n'
        'bins = { "4" = "visa", "55" = "mastercard" }\n'
    )
    proc = HostProcess(free_port(), ["--config", str(config)], tmp_path / "v.log").start()
    try:
        codes = [
            send(proc.port, "--pan", PAN_OK, "--amount", "1.00")["39"],
            send(proc.port, "--pan", PAN_OK, "--amount", "1.00")["39"],
            send(proc.port, "--pan", PAN_OK, "--amount", "1.00")["39"],
            send(proc.port, "--pan", PAN_MC, "--amount", "2000.00")["39"],
            send(proc.port, "--pan", PAN_MC, "--amount", "1001.00")["39"],
            # 51xx is no longer routed: only 55 goes to mastercard in this table.
            send(proc.port, "--pan", PAN_LOW, "--amount", "1.00")["39"],
        ]
        assert codes == ["00", "00", "65", "00", "61", "14"], proc.output
    finally:
        status = proc.stop()
    assert status == 0, proc.output


def test_tls(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    proc = HostProcess(
        free_port(),
        ["--db", str(tmp_path / "t.db"), "--tls-cert", str(cert), "--tls-key", str(key)],
        tmp_path / "tls.log",
    ).start()
    try:
        response = send(proc.port, "--tls-ca", str(cert), "--pan", PAN_OK, "--amount", "3.00")
        assert response["39"] == "00"
        plain = cli(
            "send", "--port", str(proc.port), "--pan", PAN_OK, "--amount", "1", "--timeout", "3"
        )
        assert plain.returncode == 2  # a plain-text client gets no answer from a TLS port
    finally:
        assert proc.stop() == 0


def test_bench_command_reports_every_response(host: tuple[HostProcess, list[str], int]) -> None:
    proc, store, _ = host
    closed = cli_json("bench", "--port", str(proc.port), "-c", "4", "-d", "1", "--no-progress")
    assert closed["complete"] is True
    assert closed["sent"] == closed["answered"] > 0
    assert closed["codes"] == {"00": closed["answered"]}
    assert closed["p50_ms"] <= closed["p99_ms"]
    opened = cli_json("bench", "--port", str(proc.port), "--tps", "50", "-d", "1", "--no-progress")
    assert opened["complete"] is True and opened["sent"] == 50
    text = cli("bench", "--port", str(proc.port), "-c", "2", "-d", "0.5", "--no-progress").stdout
    assert "every request got a response: yes" in text
    assert "p99.9" in text
    assert accounts(store)["ACC-9000"]["held"] == 0


def test_authorizations_nobody_completes_expire(backend: Backend, tmp_path: Path) -> None:
    """--hold-expiry 4 with a sweep every 0.2 s: an 0100 nobody completes is released (held back
    to what it was, the balance untouched), listed by ``isopace ledger --expired``; a
    completion arriving after that is posted as a stand-in capture; a completed one never
    expires. (The requests go through the client, not ``isopace send``: a process start per
    request could take longer than the expiry on a loaded machine.)"""
    proc = HostProcess(
        free_port(),
        [*backend.serve, "--hold-expiry", "4", "--hold-sweep-interval", "0.2"],
        tmp_path / "expiry.log",
    ).start()

    def figures() -> tuple[int, int]:
        ((balance, held),) = backend.fetch(
            "SELECT balance, held FROM accounts WHERE id = 'ACC-1001'"
        )
        return int(balance), int(held)

    def completion(stan: int, amount: int, of: Message) -> Message:
        return purchase(PAN_OK, amount, stan, "TERMEXP1", "1207111111", mti="0220").set(
            90, f"0100{of[11]}{of[7]}" + "0" * 22
        )

    try:
        balance, held = figures()
        auth = purchase(PAN_OK, 6000, 222001, "TERMEXP1", "1207101010", mti="0100")
        small = purchase(PAN_OK, 500, 222002, "TERMEXP1", "1207101010", mti="0100")
        answers = asyncio.run(request_all(proc.port, [auth, small]))
        assert [(a.mti, a[39]) for a in answers] == [("0110", "00")] * 2
        (done,) = asyncio.run(request_all(proc.port, [completion(222003, 500, small)]))
        assert (done.mti, done[39]) == ("0230", "00")
        assert figures() == (balance - 500, held + 6000)  # only the 60.00 still held
        deadline = time.monotonic() + 30
        while figures()[1] != held:
            assert time.monotonic() < deadline, proc.output
            time.sleep(0.1)
        assert figures() == (balance - 500, held)  # released, nothing posted
        listed = cli_json("ledger", *backend.store, "--expired")
        assert listed["expired"] == 1 and listed["ok"]
        expired = [(h["terminal"], h["stan"], h["amount"]) for h in listed["expired_holds"]]
        assert expired == [("TERMEXP1", "222001", 6000)]
        assert listed["expired_holds"][0]["approval_code"] == answers[0][38]
        text = cli("ledger", *backend.store, "--expired", check=True).stdout
        assert "TERMEXP1" in text and "1 expired" in text
        assert "authorization(s) nobody completed" in proc.output
        (late,) = asyncio.run(request_all(proc.port, [completion(222004, 6000, auth)]))
        assert (late.mti, late[39]) == ("0230", "00")
        assert figures() == (balance - 500 - 6000, held)  # a stand-in capture
        assert proc.stop() == 0, proc.output
    finally:
        proc.stop()
