"""Transaction types (DE 3) and currencies (DE 49) against ``isopace serve`` (SQLite, and
PostgreSQL + Redis): each answer (MTI, DE 39, DE 38, DE 54) and the ledger's balances after.

Inputs tried: a refund (credits, once on retransmission; not as an 0100; its reversal
refused), balance inquiries (0100 and 0200, 30 and 31: DE 54 with the ledger and available
balances, nothing moves), cash withdrawals up to and over the daily cash limit, a purchase with
cashback (DE 54's cash counted against the same limit; cash missing or above DE 4), a transfer
(40), unknown types (12), a currency other than the account's (57) and one no table knows (30);
with configured rates, EUR and JPY converted into USD (DE 6, 10, 51; the reversal converted
too), and rates that are no number, not positive, or name unknown currencies.
"""

from __future__ import annotations

from collections.abc import Callable

from .conftest import PAN_MC, PAN_OK, HostProcess, accounts, cli, send

Host = tuple[HostProcess, list[str], int]


def cashback(cash: int) -> str:
    """DE 54 with one cashback entry (amount type 40) of ``cash`` minor units in 840."""
    return f"0040840C{cash:012d}"


def test_a_refund_credits_the_account_once(host: Host) -> None:
    proc, store, _ = host
    before = accounts(store)["ACC-1001"]
    refund = ["--pan", PAN_OK, "--amount", "12.00", "--processing-code", "200000",
              "--terminal", "TERMTYP1", "--stan", "333001", "--time", "1206151515"]  # fmt: skip
    answer = send(proc.port, *refund)
    assert (answer["mti"], answer["39"]) == ("0210", "00") and answer["38"]
    after = accounts(store)["ACC-1001"]
    assert (after["balance"], after["held"]) == (before["balance"] + 1200, before["held"])
    assert send(proc.port, *refund)["38"] == answer["38"]  # replayed, not credited again
    assert accounts(store)["ACC-1001"] == after
    # as an authorization: invalid; its reversal: refused, the credit stays
    auth = [*refund[:-4], "--stan", "333002", "--time", "1206151516", "--mti", "0100"]
    assert send(proc.port, *auth)["39"] == "12"
    reversal = ["--mti", "0400", "--pan", PAN_OK, "--amount", "12.00", "--processing-code",
                "200000", "--terminal", "TERMTYP1", "--stan", "333003", "--original-stan",
                "333001", "--original-time", "1206151515"]  # fmt: skip
    assert send(proc.port, *reversal)["39"] == "12"
    assert accounts(store)["ACC-1001"] == after


def test_balance_inquiries_answer_de54_and_move_nothing(host: Host) -> None:
    proc, store, _ = host
    before = accounts(store)["ACC-1001"]
    for mti, code, stan in (("0200", "310000", "333101"), ("0100", "302000", "333102")):
        answer = send(proc.port, "--mti", mti, "--pan", PAN_OK, "--amount", "0.00",
                      "--processing-code", code, "--terminal", "TERMTYP2",
                      "--stan", stan)  # fmt: skip
        assert answer["39"] == "00", answer
        account_type = code[2:4]
        assert answer["54"] == (
            f"{account_type}01840C{before['balance']:012d}"
            f"{account_type}02840C{before['balance'] - before['held']:012d}"
        )
    assert accounts(store)["ACC-1001"] == before


def test_cash_counts_against_the_daily_cash_limit(host: Host) -> None:
    """The default limit is 500.00 a card a day: 300.00 cash, then a purchase of 300.00 with
    250.00 cashback is over it; of 250.00 with 200.00 cashback, at it; then any cash is
    refused, a purchase is not."""
    proc, store, _ = host
    before = accounts(store)["ACC-1002"]["balance"]
    common = ["--pan", PAN_MC, "--terminal", "TERMTYP3"]
    cash = send(proc.port, *common, "--amount", "300.00", "--processing-code", "010000",
                "--stan", "333201")  # fmt: skip
    assert cash["39"] == "00"
    over = send(proc.port, *common, "--amount", "300.00", "--processing-code", "090000",
                "--field", "54=" + cashback(25000), "--stan", "333202")  # fmt: skip
    assert over["39"] == "61"
    assert accounts(store)["ACC-1002"]["balance"] == before - 30000
    at_limit = send(proc.port, *common, "--amount", "250.00", "--processing-code", "090000",
                    "--field", "54=" + cashback(20000), "--stan", "333203")  # fmt: skip
    assert at_limit["39"] == "00"
    assert accounts(store)["ACC-1002"]["balance"] == before - 55000
    assert send(proc.port, *common, "--amount", "0.01", "--processing-code", "010000",
                "--stan", "333204")["39"] == "61"  # fmt: skip
    # a purchase is not cash: still approved
    assert send(proc.port, *common, "--amount", "1.00", "--stan", "333205")["39"] == "00"
    # cashback without its DE 54 (a format error), or more than the whole amount
    cases = (("333206", [], "30"), ("333207", ["--field", "54=" + cashback(20000)], "13"))
    for stan, field, code in cases:
        answer = send(proc.port, *common, "--amount", "10.00", "--processing-code", "090000",
                      *field, "--stan", stan)  # fmt: skip
        assert answer["39"] == code, (stan, answer)
    assert accounts(store)["ACC-1002"]["balance"] == before - 55100
    ledger_ok = accounts(store)  # `accounts` asserts the ledger's invariants hold
    assert ledger_ok["ACC-1002"]["held"] == 0


def test_other_types_and_currencies_are_declined_and_move_nothing(host: Host) -> None:
    proc, store, _ = host
    before = accounts(store)
    common = ["--pan", PAN_OK, "--amount", "5.00", "--terminal", "TERMTYP4"]
    cases = [
        ("400000", "840", "40"),  # transfer: not supported
        ("999999", "840", "12"),
        ("170000", "840", "12"),  # cash advance: not a type this host handles
        ("000000", "978", "57"),  # the account is in 840, no conversion table
        ("000000", "999", "30"),  # no such currency
    ]
    for i, (code, currency, expected) in enumerate(cases):
        answer = send(proc.port, *common, "--processing-code", code, "--currency", currency,
                      "--stan", f"33330{i}")  # fmt: skip
        assert answer["39"] == expected, (code, currency, answer)
        assert "38" not in answer
    assert accounts(store) == before


def test_a_configured_rate_converts_into_the_account_currency(
    spawn: Callable[..., HostProcess], db: str
) -> None:
    """With rates for EUR and JPY into USD: the hold and the posting are in USD (rounded half
    up across the exponents), the answer carries DE 6, 10 and 51; a reversal in EUR finds and
    refunds it; a currency without a rate is still 57."""
    proc = spawn("--db", db, "--rate", "978:840=1.0842", "--rate", "392:840=0.0067")
    store = ["--db", db]
    before = accounts(store)["ACC-1001"]["balance"]
    eur = ["--pan", PAN_OK, "--amount", "10.00", "--currency", "978", "--terminal", "TERMFX01",
           "--stan", "333401", "--time", "1206161616"]  # fmt: skip
    answer = send(proc.port, *eur)
    assert answer["39"] == "00"
    assert (answer["4"], answer["49"]) == ("000000001000", "978")  # as the acquirer sent them
    assert (answer["6"], answer["10"], answer["51"]) == ("000000001084", "61084200", "840")
    assert accounts(store)["ACC-1001"]["balance"] == before - 1084  # 10.842 USD, half up
    jpy = send(proc.port, "--pan", PAN_OK, "--amount", "1000", "--currency", "392",
               "--terminal", "TERMFX01", "--stan", "333402")  # fmt: skip
    assert (jpy["39"], jpy["6"], jpy["10"]) == ("00", "000000000670", "70067000")
    assert accounts(store)["ACC-1001"]["balance"] == before - 1084 - 670
    reversal = send(proc.port, "--mti", "0400", "--pan", PAN_OK, "--amount", "10.00",
                    "--currency", "978", "--terminal", "TERMFX01", "--stan", "333403",
                    "--original-stan", "333401", "--original-time", "1206161616")  # fmt: skip
    assert reversal["39"] == "00"
    assert accounts(store)["ACC-1001"]["balance"] == before - 670
    gbp = send(proc.port, "--pan", PAN_OK, "--amount", "1.00", "--currency", "826",
               "--terminal", "TERMFX01", "--stan", "333404")  # fmt: skip
    assert gbp["39"] == "57"
    assert accounts(store)["ACC-1001"]["balance"] == before - 670


def test_bad_rates_are_one_line_errors() -> None:
    for rate, problem in (
        ("978:840=abc", "not a number"),
        ("978:840=0", "above 0"),
        ("978-840=1.1", "FROM:TO"),
        ("978:999=1.1", "FROM:TO"),
        ("978840", "expected FROM:TO=RATE"),
    ):
        run = cli("serve", "--port", "0", "--rate", rate)
        assert run.returncode == 2, (rate, run.stdout, run.stderr)
        assert problem in run.stderr and run.stderr.count("\n") == 1, (rate, run.stderr)
