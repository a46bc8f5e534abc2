"""Issue 12, items 3 and 8, end to end: a real ``isopace serve`` (SQLite; then PostgreSQL + Redis),
driven over real sockets by ``isopace send`` and the client, each answer checked (MTI, DE 39, DE
38) and the ledger's balances read back with ``isopace ledger --json``.

- A request that reuses the idempotency key (DE 41 + 11 + 7) of an earlier one with another card
  and amount is declined 94, nothing is debited, and the earlier approval code is not in the
  answer; the earlier request's retransmission is still replayed. Likewise for the same card
  with another amount, processing code or merchant.
- DE 32: two acquirers' terminals with the same id are two keys.
- Requests without DE 7 (with DE 37, or DE 12 + 13) are approved, and their retransmissions
  replayed, debited once; without any of them the request is declined 30 naming the fields.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest

from isopace.iso8583 import APPROVALS, ISO87_ASCII, Message
from isopace.net import Client

from .conftest import PAN_MC, PAN_OK, Backend, HostProcess, cli, cli_json, free_port


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def host(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[HostProcess, Backend]]:
    tmp = tmp_path_factory.mktemp(f"dup-{request.param}")
    backend = Backend(request.param, tmp)
    proc = HostProcess(free_port(), backend.serve, tmp / "serve.log")
    try:
        proc.start()
        yield proc, backend
        assert proc.stop() == 0, proc.output
    finally:
        proc.stop()
        backend.drop()


def send(port: int, *args: str) -> dict[str, str]:
    """``isopace send --json``: the response (masked), exit status 0 for an approval."""
    proc = cli("send", "--port", str(port), *args, "--json")
    assert proc.returncode in (0, 1), proc.stderr
    response: dict[str, str] = json.loads(proc.stdout.splitlines()[-1])["response"]
    assert proc.returncode == (0 if response.get("39") in APPROVALS else 1)
    return response


def balances(backend: Backend) -> dict[str, int]:
    data = cli_json("ledger", *backend.store)
    assert data["ok"], data["problems"]
    return {a["id"]: a["balance"] for a in data["accounts"]}


def available(backend: Backend) -> dict[str, int]:
    data = cli_json("ledger", *backend.store)
    return {a["id"]: a["available"] for a in data["accounts"]}


def test_another_card_and_amount_under_an_earlier_key_is_declined_94(
    host: tuple[HostProcess, Backend],
) -> None:
    """The issue's case: 2000.00 on ...4444 reusing DE 41 + 11 + 7 of 1.00 on ...1111."""
    proc, backend = host
    before = balances(backend)
    key = ["--terminal", "TERMDUP1", "--stan", "310001", "--time", "1201101010"]
    first = send(proc.port, "--pan", PAN_OK, "--amount", "1.00", *key)
    assert first["mti"] == "0210" and first["39"] == "00" and len(first["38"]) == 6
    other = send(proc.port, "--pan", PAN_MC, "--amount", "2000.00", *key)
    assert other["mti"] == "0210" and other["39"] == "94"
    assert "38" not in other  # nothing of the first transaction's answer
    assert other["4"] == "000000200000" and other["2"] == "555555******4444"  # its own echo
    after = balances(backend)
    assert after["ACC-1001"] == before["ACC-1001"] - 100
    assert after["ACC-1002"] == before["ACC-1002"]  # 2000.00 would have been approved
    # the 2000.00 sent again is still 94; the first one sent again is its replay
    assert send(proc.port, "--pan", PAN_MC, "--amount", "2000.00", *key)["39"] == "94"
    again = send(proc.port, "--pan", PAN_OK, "--amount", "1.00", *key)
    assert again["39"] == "00" and again["38"] == first["38"]
    assert balances(backend) == after
    assert available(backend)["ACC-1002"] == before["ACC-1002"]  # nothing held either


@pytest.mark.parametrize(
    ("change", "value"),
    [("--amount", "1.01"), ("--processing-code", "010000"), ("--merchant", "OTHERMERCHANT01")],
)
def test_same_card_other_content_under_an_earlier_key_is_declined_94(
    host: tuple[HostProcess, Backend], change: str, value: str
) -> None:
    proc, backend = host
    stan = {"--amount": "320001", "--processing-code": "320002", "--merchant": "320003"}[change]
    base = {
        "--pan": PAN_OK,
        "--amount": "1.00",
        "--processing-code": "000000",
        "--merchant": "MERCHANT0000001",
    }
    key = ["--terminal", "TERMDUP2", "--stan", stan, "--time", "1201111111"]
    first_args = [x for kv in base.items() for x in kv] + key
    first = send(proc.port, *first_args)
    assert first["39"] == "00" and len(first["38"]) == 6
    before = balances(backend)
    changed = dict(base, **{change: value})
    other = send(proc.port, *[x for kv in changed.items() for x in kv], *key)
    assert other["mti"] == "0210" and other["39"] == "94" and "38" not in other
    assert balances(backend) == before
    replay = send(proc.port, *first_args)
    assert replay["39"] == "00" and replay["38"] == first["38"]
    assert balances(backend) == before


def test_acquirer_id_de32_is_part_of_the_key(host: tuple[HostProcess, Backend]) -> None:
    """Terminal ids are unique per acquirer only: the same DE 41 + 11 + 7 from two acquirers
    (DE 32) are two transactions; each one's retransmission is replayed."""
    proc, backend = host
    before = balances(backend)
    key = ["--terminal", "TERMDUP3", "--stan", "330001", "--time", "1201121212"]
    card = ["--pan", PAN_OK, "--amount", "2.00"]
    a = send(proc.port, *card, *key, "--field", "32=11111111")
    b = send(proc.port, *card, *key, "--field", "32=22222222")
    assert a["39"] == b["39"] == "00" and a["38"] != b["38"]
    assert balances(backend)["ACC-1001"] == before["ACC-1001"] - 400
    a2 = send(proc.port, *card, *key, "--field", "32=11111111")
    b2 = send(proc.port, *card, *key, "--field", "32=22222222")
    assert (a2["39"], a2["38"]) == ("00", a["38"]) and (b2["39"], b2["38"]) == ("00", b["38"])
    assert balances(backend)["ACC-1001"] == before["ACC-1001"] - 400


def test_without_de7_the_key_is_de37_and_the_request_is_approved(
    host: tuple[HostProcess, Backend],
) -> None:
    proc, backend = host
    before = balances(backend)
    args = ["--pan", PAN_MC, "--amount", "3.00", "--terminal", "TERMDUP4", "--stan", "340001"]
    args += ["--rrn", "340001000001", "--field", "7="]
    first = send(proc.port, *args)
    assert first["mti"] == "0210" and first["39"] == "00" and len(first["38"]) == 6
    assert "7" not in first
    again = send(proc.port, *args)
    assert again["39"] == "00" and again["38"] == first["38"]
    assert balances(backend)["ACC-1002"] == before["ACC-1002"] - 300
    # another RRN is another transaction
    other = send(proc.port, *args[:-4], "--rrn", "340001000002", "--field", "7=")
    assert other["39"] == "00" and other["38"] != first["38"]
    assert balances(backend)["ACC-1002"] == before["ACC-1002"] - 600


def test_without_de7_and_de37_the_key_is_de12_and_13(host: tuple[HostProcess, Backend]) -> None:
    """An 0100 and an 0200 from a test tool that sends neither DE 7 nor DE 37, sent at once on
    three connections: approved, held and debited once each."""
    proc, backend = host
    before = available(backend)
    before_balance = balances(backend)

    def bare(mti: str, stan: str, amount: int) -> Message:
        return Message(
            mti,
            {
                2: PAN_OK,
                3: "000000",
                4: f"{amount:012d}",
                11: stan,
                12: "101112",
                13: "1201",
                41: "TERMDUP5",
                49: "840",
            },
        )

    async def one_connection() -> list[Message]:
        messages = [bare("0100", "350001", 500), bare("0200", "350002", 700)]
        async with Client(ISO87_ASCII, port=proc.port) as client:
            return list(await asyncio.gather(*(client.request(m, timeout=15) for m in messages)))

    async def run() -> list[Message]:
        copies = await asyncio.gather(*(one_connection() for _ in range(3)))
        return [answer for answers in copies for answer in answers]

    answers = asyncio.run(run())
    assert [a.mti for a in answers] == ["0110", "0210"] * 3
    assert [a[39] for a in answers] == ["00"] * 6
    assert len({a[38] for a in answers[0::2]}) == 1 and len({a[38] for a in answers[1::2]}) == 1
    assert available(backend)["ACC-1001"] == before["ACC-1001"] - 1200  # one hold, one debit
    assert balances(backend)["ACC-1001"] == before_balance["ACC-1001"] - 700


def test_without_any_time_or_reference_the_request_is_declined_30(
    host: tuple[HostProcess, Backend],
) -> None:
    proc, backend = host
    before = balances(backend)
    args = ["--pan", PAN_OK, "--amount", "4.00", "--terminal", "TERMDUP6", "--stan", "360001"]
    for removed in (["7=", "37=", "12="], ["7=", "37=", "13="]):
        fields = [x for f in removed for x in ("--field", f)]
        answer = send(proc.port, *args, *fields)
        assert answer["mti"] == "0210" and answer["39"] == "30" and "38" not in answer
    assert balances(backend) == before


def test_the_log_names_what_the_key_lacks(host: tuple[HostProcess, Backend]) -> None:
    proc, _ = host
    args = ["--pan", PAN_OK, "--amount", "4.00", "--terminal", "TERMDUP7", "--stan", "370001"]
    answer = send(proc.port, *args, "--field", "7=", "--field", "37=", "--field", "12=")
    assert answer["39"] == "30"
    assert asyncio.run(_wait_for(proc, "7 (or 37, or 12 and 13)")), proc.output[-2000:]


async def _wait_for(proc: HostProcess, text: str, seconds: float = 5.0) -> bool:
    for _ in range(int(seconds / 0.05)):
        if text in proc.output:
            return True
        await asyncio.sleep(0.05)
    return False
