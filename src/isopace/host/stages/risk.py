"""What is checked before money moves: the card and its velocity (risk), the transaction type and
the currency (DE 3, DE 49), and the network group a BIN routes to.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from isopace.flow import SKIP, Result, route
from isopace.host.conversion import Rates
from isopace.host.ledger import Kind, Ledger
from isopace.host.stages._common import (
    CASHBACK,
    _text,
    additional_amounts,
    decline,
)
from isopace.iso8583 import Iso8583Error, card_number, minor_units
from isopace.iso8583 import response_codes as rc

if TYPE_CHECKING:
    from isopace.flow import Exchange


__all__ = ["BinRoute", "Risk", "TransactionType", "Velocity"]


class Velocity:
    """Per-card sliding-window counters (in this process; each host node counts its own traffic)."""

    def __init__(self, window: float, max_count: int, max_amount: int) -> None:
        self.window = window
        self.max_count = max_count
        self.max_amount = max_amount
        self._seen: dict[str, collections.deque[tuple[float, int]]] = {}

    @property
    def enabled(self) -> bool:
        return self.max_count > 0 or self.max_amount > 0

    def check(self, card_ref: str, amount: int) -> str | None:
        """Count this attempt; a response code if it goes over a limit, else None."""
        now = time.monotonic()
        seen = self._seen.get(card_ref)
        if seen is None:
            seen = self._seen[card_ref] = collections.deque()
        while seen and seen[0][0] <= now - self.window:
            seen.popleft()
        if self.max_count and len(seen) >= self.max_count:
            return rc.EXCEEDS_FREQUENCY_LIMIT
        if self.max_amount and sum(a for _, a in seen) + amount > self.max_amount:
            return rc.EXCEEDS_AMOUNT_LIMIT
        seen.append((now, amount))
        if len(self._seen) > 100_000:  # bounded: forget idle cards
            for ref in [r for r, d in self._seen.items() if not d][:50_000]:
                del self._seen[ref]
        return None


class Risk:
    """Declines blocked cards (05) and cards over their velocity limits (65 count, 61 amount).
    Unknown cards pass: routing and the reserve stage decide on them. Votes SKIP."""

    name = "risk"

    def __init__(self, ledger: Ledger, velocity: Velocity | None = None) -> None:
        self.ledger = ledger
        self.velocity = velocity

    async def prepare(self, ex: Exchange) -> Result:
        pan = card_number(ex.request) or ""
        card = await self.ledger.card(pan)
        if card is None:
            return SKIP
        ex.set("card", card)
        if card.blocked:
            return decline(ex, rc.DO_NOT_HONOUR, f"card {card.masked_pan} {card.status}")
        if self.velocity is not None and self.velocity.enabled:
            code = self.velocity.check(card.pan_ref, ex.get("amount", 0))
            if code is not None:
                return decline(ex, code, f"card {card.masked_pan} over its velocity limit")
        return SKIP


class TransactionType:
    """Reads the transaction type (DE 3 positions 1-2) and the currency (DE 49), as an issuer
    processor does, and sends the request where that type is handled:

    - 00 purchase, 01 cash withdrawal, 09 purchase with cashback: routed by the BIN (its
      ``purchase`` `BinRoute`, run in this stage: one stage and one route less on the busiest
      path) to the network's reserve. The cash part (a withdrawal's whole amount; a
      cashback's DE 54 entry of amount type 40, which must not exceed DE 4) counts against the
      card's daily cash limit there.
    - 20 refund (in an 0200; as an authorization it is declined 12): to ``refund``, which
      credits the account.
    - 30, 31 balance inquiry: to ``inquiry``, which moves no money and answers the ledger and
      available balances in DE 54.
    - 40 transfer: declined 40 (requested function not supported by this host).
    - anything else: declined 12 (invalid transaction).

    The account-type digits (positions 3-6) are not checked: this ledger keeps one account per
    card, and a request for the default (00), savings (10), checking (20) or credit (30)
    account posts to it. DE 49 must be a currency this host knows (else 30) and the card's
    account currency, or one the configured rates convert from (`isopace.host.conversion`: the
    amounts are then held and posted in the account's currency, and the answer carries the
    billing amount, rate and currency in DE 6, 10 and 51), else 57 (transaction not permitted).
    Routes (it is the last stage of ``authorize``)."""

    name = "txn-type"

    def __init__(self, purchase: BinRoute, rates: Rates | None = None) -> None:
        self.purchase = purchase
        self.rates = rates if rates is not None else Rates()

    def prepare(self, ex: Exchange) -> Result:
        m = ex.request
        code = (_text(m, 3) or "")[:2]
        currency = _text(m, 49)
        card = ex.get("card")
        if currency is not None and code not in ("30", "31"):
            if minor_units(currency) is None:
                return decline(ex, rc.FORMAT_ERROR, f"field 49: {currency!r} is no known currency")
            if card is not None and card.currency and currency != card.currency:
                converted = self.rates.convert(ex.get("amount", 0), currency, card.currency)
                if converted is None:
                    reason = f"field 49: {currency}, the account is in {card.currency}"
                    return decline(ex, rc.TRANSACTION_NOT_PERMITTED, reason)
                billing, rate = converted
                ex.set("amount", billing)
                ex.set("converted", (currency, card.currency), durable=True)
                ex.set("answer_fields", {6: f"{billing:012d}", 10: rate, 51: card.currency})
        if code in ("30", "31"):
            return route("inquiry", "respond")
        if code == "20":
            if m.mti[1] != "2":
                return decline(ex, rc.INVALID_TRANSACTION, "a refund is a financial request")
            return route("refund", "respond")
        if code == "40":
            return decline(ex, rc.FUNCTION_NOT_SUPPORTED, "transfers are not supported")
        amount = ex.get("amount", 0)
        if code == "00":
            ex.set("kind", Kind.PURCHASE)
        elif code == "01":
            ex.set("kind", Kind.CASH)
            ex.set("cash", amount)
        elif code == "09":
            try:
                cash = additional_amounts(_text(m, 54) or "").get(CASHBACK)
            except Iso8583Error as exc:
                return decline(ex, rc.FORMAT_ERROR, str(exc))
            converted = ex.get("converted")
            if cash is not None and converted is not None:  # DE 54 is in DE 49's currency
                cash = (self.rates.convert(cash, *converted) or (cash, ""))[0]
            if cash is None or not 0 < cash <= amount:
                return decline(ex, rc.INVALID_AMOUNT, "field 54: no cashback within DE 4")
            ex.set("kind", Kind.CASHBACK)
            ex.set("cash", cash)
        else:
            return decline(ex, rc.INVALID_TRANSACTION, f"field 3: transaction type {code!r}")
        return self.purchase.prepare(ex)


class BinRoute:
    """Routes by the PAN's BIN (longest matching prefix of the table) to the network's group,
    then ``respond``; a PAN no prefix matches is declined (14 by default)."""

    name = "bin-route"

    def __init__(self, bins: Mapping[str, str], unknown_code: str = rc.INVALID_CARD_NUMBER) -> None:
        self.bins = dict(bins)
        self._prefixes = sorted(self.bins, key=len, reverse=True)
        self.unknown_code = unknown_code

    def group_for(self, pan: str) -> str | None:
        for prefix in self._prefixes:
            if pan.startswith(prefix):
                return self.bins[prefix]
        return None

    def prepare(self, ex: Exchange) -> Result:
        group = self.group_for(card_number(ex.request) or "")
        if group is None:
            return decline(ex, self.unknown_code, "no route for the BIN")
        ex.set("network", group)
        return route(group, "respond")
