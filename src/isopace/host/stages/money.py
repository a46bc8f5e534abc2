"""The stages that move money for a request: reserve (purchases, cash, cashback: a hold in
prepare, captured or kept in commit, released in abort), refund and balance inquiry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from isopace.flow import CONTINUE, SKIP, Result
from isopace.host.ledger import HoldState, Kind, Ledger, ReserveStatus
from isopace.host.stages._common import (
    AVAILABLE_BALANCE,
    LEDGER_BALANCE,
    _approval_code,
    _card_of,
    _hold_details,
    _text,
    _undo_later,
    additional_amount,
    decline,
    log,
)
from isopace.iso8583 import Iso8583Error, card_number
from isopace.iso8583 import response_codes as rc

if TYPE_CHECKING:
    from isopace.flow import Exchange


__all__ = ["BalanceInquiry", "Refund", "Reserve"]


class Reserve:
    """Holds the amount on the card's account in prepare (keyed by the transaction id), captures
    it in commit (0200) or keeps it as an authorization (0100), releases it in abort. Declines 14
    for an unknown card and 51 for insufficient funds; on success sets the approval code (DE 38).

    With ``key`` (the flow's idempotency key function) the hold carries the request's key, and the
    ledger refuses a second live hold for it: a retransmission that reaches this stage (its
    stored answer was lost, e.g. the original was finished by crash recovery before the answer was
    stored) gets the original's approval code and is not debited again; one whose original is
    still pending is declined 09 (request in progress).

    Durable properties (for recovery): ``hold`` (the transaction id) and ``capture`` (0200: post
    the amount; 0100: keep it held)."""

    name = "reserve"

    def __init__(
        self,
        ledger: Ledger,
        key: Callable[[Exchange], str | None] | None = None,
        cash_limit: int = 0,
    ) -> None:
        self.ledger = ledger
        self.key = key
        self.cash_limit = cash_limit

    async def prepare(self, ex: Exchange) -> Result:
        request = ex.request
        card = await _card_of(self.ledger, ex)
        if card is None:
            return decline(ex, rc.INVALID_CARD_NUMBER, "no such card")
        amount = ex.get("amount", 0)
        idem_key = self.key(ex) if self.key is not None else None
        code = _approval_code()
        try:
            result = await self.ledger.reserve(
                ex.id,
                card.account_id,
                amount,
                _hold_details(
                    request,
                    idem_key=idem_key,
                    approval_code=code,
                    # under the current key, not the card row's (a card not re-keyed yet after a
                    # rotation): a hold made after the hosts took a new key is never left behind
                    pan_ref=self.ledger.pan_ref(card_number(request) or ""),
                ),
                kind=ex.get("kind", Kind.PURCHASE),
                cash=ex.get("cash", 0),
                cash_limit=self.cash_limit,
            )
        except BaseException:
            # Cancelled or failed mid-call: the hold may exist; undo it in the background (a
            # no-op if it does not), since a prepare that raised does not join.
            ledger = self.ledger
            _undo_later(self.name, lambda: ledger.release(ex.id))
            raise
        if result.status is ReserveStatus.DUPLICATE and result.original is not None:
            original = result.original
            if original.state == HoldState.PENDING:
                reason = f"the original {original.txn_id} is still in progress"
                return decline(ex, rc.REQUEST_IN_PROGRESS, reason)
            log.info(
                "reserve: %s repeats %s (%s); answered with its approval, not debited again",
                ex.id,
                original.txn_id,
                original.state,
                extra={"tx_id": ex.id, "original": original.txn_id},
            )
            ex.set("approval_code", original.approval_code)
            ex.set("duplicate_of", original.txn_id)
            return SKIP
        if result.status is ReserveStatus.OVER_CASH_LIMIT:
            reason = f"card {card.masked_pan}: over its daily cash limit"
            return decline(ex, rc.EXCEEDS_AMOUNT_LIMIT, reason)
        if result.status is ReserveStatus.REVERSED:
            # the acquirer reversed it before it arrived (it timed out there): it is void
            return decline(ex, rc.INVALID_TRANSACTION, "reversed before it arrived; nothing held")
        if result.status is ReserveStatus.NO_ACCOUNT:
            return decline(ex, rc.INVALID_CARD_NUMBER, f"card {card.masked_pan}: no account")
        if result.status is ReserveStatus.INSUFFICIENT_FUNDS:
            return decline(ex, rc.INSUFFICIENT_FUNDS, f"card {card.masked_pan}: insufficient funds")
        ex.set("hold", ex.id, durable=True)
        ex.set("capture", request.mti.startswith("02"), durable=True)
        ex.set("approval_code", code)
        return CONTINUE

    async def commit(self, ex: Exchange) -> None:
        if ex.get("capture", True):
            await self.ledger.capture(ex.id)
        else:
            await self.ledger.authorize(ex.id)

    async def abort(self, ex: Exchange) -> None:
        await self.ledger.release(ex.id)

    async def recover(self, ex: Exchange, committing: bool) -> None:
        if not committing:
            await self.ledger.release(ex.id)
            return
        capture = ex.get("capture")
        if capture is None:
            request = ex.request
            capture = request is None or request.mti.startswith("02")
        if capture:
            await self.ledger.capture(ex.id)
        else:
            await self.ledger.authorize(ex.id)


class Refund:
    """A refund (DE 3 = 20): credits the card's account with DE 4, in commit (nothing is held:
    a credit cannot overdraw), answered 00 with an approval code. Declines 14 for an unknown
    card. A reversal of a refund is not supported (the credited money may be spent): declined
    12 by the reversal stage.

    With ``key`` (the flow's idempotency key function) the credit carries the request's key, as
    a reserve's hold does: a retransmission whose stored answer was lost (the original was
    finished by crash recovery) finds the credit made, is answered with its approval code and
    credits nothing; and the ledger refuses a second credit of one key however the two race.

    Durable properties (for recovery): ``credit_to`` (the account), ``credit_key`` (the
    idempotency key), ``approval_code``."""

    name = "refund"

    def __init__(self, ledger: Ledger, key: Callable[[Exchange], str | None] | None = None) -> None:
        self.ledger = ledger
        self.key = key

    async def prepare(self, ex: Exchange) -> Result:
        card = await _card_of(self.ledger, ex)
        if card is None:
            return decline(ex, rc.INVALID_CARD_NUMBER, "no such card")
        idem_key = self.key(ex) if self.key is not None else None
        if idem_key is not None:
            done = await self.ledger.hold_by_key(idem_key)
            if done is not None and done.txn_id != ex.id:
                ex.set("approval_code", done.approval_code)
                ex.set("duplicate_of", done.txn_id)
                return SKIP  # credited already: its answer again, nothing more
            ex.set("credit_key", idem_key, durable=True)
        ex.set("credit_to", card.account_id, durable=True)
        ex.set("credit_amount", ex.get("amount", 0), durable=True)  # converted, if it was
        ex.set("approval_code", _approval_code(), durable=True)
        return CONTINUE

    async def commit(self, ex: Exchange) -> None:
        request = ex.request
        try:  # in recovery the journal's request holds no card number: no fingerprint then
            pan = card_number(request)
        except Iso8583Error:
            pan = None
        await self.ledger.credit(
            ex.id,
            ex.get("credit_to"),
            ex.get("credit_amount", None) or request.amount(4),
            _hold_details(
                request,
                idem_key=ex.get("credit_key"),
                approval_code=ex.get("approval_code"),
                pan_ref=self.ledger.pan_ref(pan) if pan else None,
            ),
        )

    async def recover(self, ex: Exchange, committing: bool) -> None:
        if committing:
            await self.commit(ex)


class BalanceInquiry:
    """A balance inquiry (DE 3 = 30 or 31): no money moves; answered 00 with the account's
    ledger balance (amount type 01) and available balance (02) in DE 54, in its currency, for
    the account type the request named (DE 3 positions 3-4). Declines 14 for an unknown card.
    Votes SKIP."""

    name = "inquiry"

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    async def prepare(self, ex: Exchange) -> Result:
        card = await _card_of(self.ledger, ex)
        account = await self.ledger.account(card.account_id) if card is not None else None
        if account is None:
            return decline(ex, rc.INVALID_CARD_NUMBER, "no such card")
        account_type = (_text(ex.request, 3) or "000000")[2:4]
        ex.set(
            "answer_fields",
            {
                54: additional_amount(
                    account_type, LEDGER_BALANCE, account.currency, account.balance
                )
                + additional_amount(
                    account_type, AVAILABLE_BALANCE, account.currency, account.available
                )
            },
        )
        return SKIP
