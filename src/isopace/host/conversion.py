"""Currency conversion for requests in a currency other than the account's.

A card is used abroad: the request's amount (DE 4) is in the currency of the transaction (DE 49),
the account is kept in its own. Without a rate the host declines such a request 57 (transaction
not permitted); with one (``rate`` in the configuration, ``FROM:TO=RATE``, e.g. ``978:840=1.0842``:
one euro is 1.0842 US dollars) it holds and posts the cardholder billing amount in the account's
currency and says so in the answer, as ISO 8583:1987 lays it out: DE 6 (amount, cardholder
billing), DE 10 (conversion rate, cardholder billing) and DE 51 (currency code, cardholder
billing).

Decisions:

- Amounts are integers in each currency's minor unit (`isopace.iso8583.minor_units`), so the rate
  is applied across the two exponents: 10.00 EUR (1000) at 1.0842 is 10.842 USD, 1084 cents. The
  result is rounded half up (a half cent goes to the larger amount), in `decimal`, never floats.
- DE 10 is eight digits: the first says how many of the other seven are decimals (``61084200``
  is 1.084200). A rate is kept to the precision that fits there; a rate that does not fit (zero,
  negative, 10,000,000 or more) is refused when the configuration is read.
- Rates are read when the request is processed: a reversal is converted at the rate of its own
  time, so configure the day's rates once (a rate changed between an original and its reversal
  makes the reversal's billing amount differ, and it does not find its original: 25).
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

from isopace.host.errors import ConfigError
from isopace.iso8583 import minor_units

__all__ = ["Rates", "rate_field"]


def rate_field(rate: Decimal) -> str:
    """DE 10 of ``rate``: the count of decimals, then seven digits (``1.0842`` -> ``61084200``)."""
    for decimals in range(7, -1, -1):
        digits = (rate * 10**decimals).to_integral_value(ROUND_HALF_UP)
        if digits < 10**7:
            return f"{decimals}{int(digits):07d}"
    raise ValueError(f"rate {rate} does not fit DE 10")


class Rates:
    """The configured rates: ``{"978:840": "1.0842"}``, each one way (the reverse is its own
    entry: buying and selling rates differ)."""

    __slots__ = ("_rates",)

    def __init__(self, table: Mapping[str, str] | None = None) -> None:
        self._rates: dict[tuple[str, str], tuple[Decimal, str]] = {}
        for pair, text in (table or {}).items():
            source, sep, target = pair.partition(":")
            if not sep or minor_units(source) is None or minor_units(target) is None:
                raise ConfigError(
                    f"rate {pair!r}: expected FROM:TO, two ISO 4217 numeric codes isopace knows"
                )
            try:
                rate = Decimal(text)
            except InvalidOperation:
                raise ConfigError(f"rate {pair} = {text!r}: not a number") from None
            if not rate.is_finite() or rate <= 0 or rate >= 10**7:
                raise ConfigError(f"rate {pair} = {text}: must be above 0 and below 10000000")
            field = rate_field(rate)
            # the rate as DE 10 carries it, so the answer's amount is the one its rate gives
            self._rates[source, target] = (Decimal(int(field[1:])).scaleb(-int(field[0])), field)

    def __bool__(self) -> bool:
        return bool(self._rates)

    def convert(self, amount: int, source: str, target: str) -> tuple[int, str] | None:
        """``amount`` (minor units of ``source``) in minor units of ``target``, and DE 10 of the
        rate; None without a rate for the pair."""
        found = self._rates.get((source, target))
        if found is None:
            return None
        rate, field = found
        shift = (minor_units(target) or 0) - (minor_units(source) or 0)
        converted = (Decimal(amount) * rate).scaleb(shift).to_integral_value(ROUND_HALF_UP)
        return int(converted), field
