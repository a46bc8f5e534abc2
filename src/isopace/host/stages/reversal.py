"""Reversals (0400, 0420 and their repeats): find the original, undo it in full or in part
(DE 95), and remember one that overtakes its original.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from isopace.flow import CONTINUE, SKIP, Result
from isopace.host.conversion import Rates
from isopace.host.ledger import HoldState, Ledger
from isopace.host.stages._common import (
    _for_review,
    _original_keys,
    _text,
    decline,
)
from isopace.iso8583 import Iso8583Error, card_number
from isopace.iso8583 import response_codes as rc
from isopace.iso8583.mti import is_advice

if TYPE_CHECKING:
    from isopace.flow import Exchange
    from isopace.iso8583 import Message


__all__ = ["Reversal"]


def _replacement_amount(m: Message) -> int | None:
    """The amount a partial reversal leaves standing: DE 95's first twelve digits (actual
    amount, transaction); None for a full reversal (no DE 95, or that amount zero, as ISO
    8583:1987 fills an unused DE 95). `Iso8583Error` when it is not twelve digits."""
    de95 = _text(m, 95)
    if de95 is None:
        return None
    actual = de95[:12]
    if not (len(actual) == 12 and actual.isascii() and actual.isdigit()):
        raise Iso8583Error("field 95: the actual amount is not twelve digits")
    return int(actual) or None


class Reversal:
    """Finds the original (same terminal, by DE 90's STAN + transmission time, else DE 37, of the
    same card, DE 2 or track 2, and the same amount, DE 4) and, in commit, undoes it.

    - **Full reversal** (no DE 95): releases its hold (an authorization) or refunds its capture
      (a purchase). A reversal of something already reversed is answered 00 and changes
      nothing (the ledger's transitions are conditional); a retransmitted reversal is replayed
      by the idempotency store.
    - **Partial reversal** (DE 95, its actual amount lower than the original's): the original
      then stands at that amount (`Ledger.reduce`): an authorization holds less, a purchase gets
      the difference back. The same partial reversal again changes nothing; a full reversal
      afterwards undoes what stands. An actual amount not lower than the original's is declined
      13 (invalid amount).
    - **Original not seen** (no transaction of that terminal with that STAN + time or RRN): the
      usual case of a reversal that overtook its original, which timed out at the acquirer. The
      reversal is remembered (`Ledger.remember_reversal`, in the ledger's database, for
      `window` seconds, in prepare, undone if the transaction aborts) and answered 00, and the
      late original is declined 12 without any hold: the acquirer considers it void.
    - **Another card's or amount's transaction** under those keys: reverses nothing, declined 25
      (unable to locate the original).
    - **Advices** (0420, 0421): the acquirer reports a reversal that has happened and repeats it
      until acknowledged, so an advice that could be read is always answered 00; one that
      reverses nothing (another card or amount, an actual amount not lower) is logged as a
      WARNING for review.

    A reversal that arrives while its original is still in flight releases the pending hold,
    and the original's capture then finds nothing to post: the reversal wins, the ledger
    balances.

    A reversal in a currency other than the account's is converted as its original was
    (``rates``, `isopace.host.conversion`): DE 4 and DE 95's actual amount become the account
    currency's before the original is looked for.

    Durable properties (for recovery): ``original`` (the original's transaction id),
    ``reverse_to`` (a partial reversal's standing amount), ``early`` (a remembered reversal)."""

    name = "reversal"

    def __init__(self, ledger: Ledger, window: float = 86400.0, rates: Rates | None = None) -> None:
        self.ledger = ledger
        self.window = window
        self.rates = rates if rates is not None else Rates()

    async def prepare(self, ex: Exchange) -> Result:
        request = ex.request
        advice = is_advice(request.mti)
        stan, tx_time, rrn = _original_keys(request)
        terminal = _text(request, 41) or ""
        pan = card_number(request) or ""
        amount = ex.get("amount", 0)
        try:
            standing = _replacement_amount(request)
        except Iso8583Error as exc:
            return decline(ex, rc.FORMAT_ERROR, str(exc))
        ledger = self.ledger
        currency = _text(request, 49)
        if self.rates and currency is not None:
            card = await ledger.card(pan)
            if card is not None and card.currency and card.currency != currency:
                converted = self.rates.convert(amount, currency, card.currency)
                if converted is not None:
                    amount = converted[0]
                    if standing is not None:
                        standing = (
                            self.rates.convert(standing, currency, card.currency) or converted
                        )[0]
        original = await ledger.find_original(
            terminal=terminal,
            stan=stan,
            tx_time=tx_time,
            rrn=rrn,
            pan_ref=ledger.pan_refs(pan),
            amount=amount,
        )
        if original is None:
            other = await ledger.find_original(
                terminal=terminal, stan=stan, tx_time=tx_time, rrn=rrn
            )
            if other is not None:
                reason = "the original is another card's or another amount's"
                return self._reverses_nothing(ex, advice, rc.UNABLE_TO_LOCATE_RECORD, reason)
            await ledger.remember_reversal(
                ex.id,
                terminal=terminal,
                stan=stan,
                tx_time=tx_time,
                rrn=rrn,
                pan_ref=ledger.pan_ref(pan),
                amount=amount,
                expires_in=self.window,
            )
            ex.set("early", True, durable=True)
            return CONTINUE
        ex.set("original_state", original.state)
        if original.state == HoldState.CREDITED:
            reason = "a refund cannot be reversed here (the money it credited may be spent)"
            return self._reverses_nothing(ex, advice, rc.INVALID_TRANSACTION, reason)
        if original.state in (HoldState.RELEASED, HoldState.REFUNDED):
            return SKIP  # already reversed (or never approved): answer 00, change nothing
        if standing is not None:
            if standing >= original.first_amount:
                return self._reverses_nothing(
                    ex, advice, rc.INVALID_AMOUNT, "field 95: the actual amount is not lower"
                )
            if standing >= original.amount:
                return SKIP  # this partial reversal (or a deeper one) is done: change nothing
            ex.set("reverse_to", standing, durable=True)
        ex.set("original", original.txn_id, durable=True)
        return CONTINUE

    def _reverses_nothing(self, ex: Exchange, advice: bool, code: str, reason: str) -> Result:
        if not advice:
            return decline(ex, code, reason)
        return _for_review(ex, "reversal advice", f"reverses nothing: {reason}")

    async def commit(self, ex: Exchange) -> None:
        original = ex.get("original")
        if original is None:
            return  # a remembered reversal: nothing to undo yet
        standing = ex.get("reverse_to")
        if standing is None:
            await self.ledger.reverse(original)
        else:
            await self.ledger.reduce(original, standing)

    async def abort(self, ex: Exchange) -> None:
        if ex.get("early"):
            await self.ledger.forget_reversal(ex.id)

    async def recover(self, ex: Exchange, committing: bool) -> None:
        if committing:
            await self.commit(ex)
        else:
            await self.abort(ex)
