"""Advices that complete or stand in for an authorization: an 0120 (held, approved in stand-in)
and a completion (an 0220, or an 0200 naming its 0100 in DE 90) that captures an authorization.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from isopace.flow import CONTINUE, SKIP, Result
from isopace.host.ledger import HoldState, Ledger, ReserveStatus
from isopace.host.stages._common import (
    AUTHORIZATION_MTIS,
    _approval_code,
    _for_review,
    _hold_details,
    _original_keys,
    _text,
    _undo_later,
    decline,
    log,
)
from isopace.iso8583 import card_number
from isopace.iso8583 import response_codes as rc
from isopace.iso8583.mti import is_advice, original_mti

if TYPE_CHECKING:
    from isopace.flow import Exchange


__all__ = ["AuthorizationAdvice", "Completion"]


class _AdviceHold:
    """What the two advice stages share: a hold of their own for the advice's amount, keyed by
    the transaction id (and the request's idempotency key, so a retransmission whose stored
    answer was lost holds nothing twice), captured or kept in commit, released in abort.

    Durable properties (for recovery): ``hold`` (the transaction id) and ``capture``."""

    what = "advice"

    def __init__(self, ledger: Ledger, key: Callable[[Exchange], str | None] | None = None) -> None:
        self.ledger = ledger
        self.key = key

    async def _hold(self, ex: Exchange, amount: int, capture: bool, reason: str) -> Result:
        """Hold ``amount`` on the card's account for this advice; CONTINUE when held, else
        the advice is acknowledged for review (`_for_review`) with ``reason`` first."""
        request = ex.request
        ledger = self.ledger
        pan = card_number(request) or ""
        card = ex.get("card") or await ledger.card(pan)
        if card is None:
            return _for_review(ex, self.what, f"{reason}; no such card: nothing posted")
        if card.blocked:
            log.warning(
                "%s %s: card %s is %s, and the sender approved it (review it)",
                self.what,
                ex.id,
                card.masked_pan,
                card.status,
                extra={"tx_id": ex.id},
            )
        code = _text(request, 38) or _approval_code()
        try:
            result = await ledger.reserve(
                ex.id,
                card.account_id,
                amount,
                _hold_details(
                    request,
                    idem_key=self.key(ex) if self.key is not None else None,
                    approval_code=code,
                    pan_ref=ledger.pan_ref(pan),
                ),
            )
        except BaseException:
            _undo_later(self.what, lambda: ledger.release(ex.id))
            raise
        status = result.status
        if status is ReserveStatus.DUPLICATE and result.original is not None:
            log.info(
                "%s %s repeats %s (%s): acknowledged, not posted again",
                self.what,
                ex.id,
                result.original.txn_id,
                result.original.state,
                extra={"tx_id": ex.id, "original": result.original.txn_id},
            )
            ex.set("approval_code", result.original.approval_code)
            return SKIP
        if status is ReserveStatus.REVERSED:
            return SKIP  # reversed before it arrived: void, acknowledged, nothing held
        if status is not ReserveStatus.APPROVED:
            why = "no account" if status is ReserveStatus.NO_ACCOUNT else "insufficient funds"
            return _for_review(ex, self.what, f"{reason}; {why}: nothing posted")
        ex.set("hold", ex.id, durable=True)
        ex.set("capture", capture, durable=True)
        ex.set("approval_code", code)
        return CONTINUE

    async def _settle(self, ex: Exchange) -> None:
        if ex.get("hold") is None:
            return
        if ex.get("capture"):
            await self.ledger.capture(ex.id)
        else:
            await self.ledger.authorize(ex.id)


class AuthorizationAdvice(_AdviceHold):
    """An 0120 (0121: its repeat): the acquirer, or the network standing in for the issuer,
    approved an authorization while this host could not be asked, and reports it. It is posted
    as an authorization would have been: the amount held on the card's account (state
    ``authorized``, so a completion captures it and the expiry sweep releases it if none
    comes), under the approval code the advice carries (DE 38, which a completion may name
    it by; a new one when absent), and acknowledged (0130, 00).

    An advice reports what already happened, so it is never declined: a blocked card's is
    held and logged for review; one the host cannot hold (unknown card, no account, funds
    short) is acknowledged with nothing held and logged as a WARNING for review; a
    retransmission (a live hold of its idempotency key) is acknowledged and not held again.
    Risk and velocity checks do not apply (nothing is being asked)."""

    name = "authorization-advice"
    what = "authorization advice"

    async def prepare(self, ex: Exchange) -> Result:
        return await self._hold(ex, ex.get("amount", 0), False, "a stand-in approval")

    async def commit(self, ex: Exchange) -> None:
        await self._settle(ex)

    async def abort(self, ex: Exchange) -> None:
        await self.ledger.release(ex.id)

    async def recover(self, ex: Exchange, committing: bool) -> None:
        if committing:
            await self._settle(ex)
        else:
            await self.ledger.release(ex.id)


class Completion(_AdviceHold):
    """Completes an authorization: captures its hold up to the completion's amount (DE 4) and
    releases the rest (`Ledger.complete`), in one conditional transition.

    **What is a completion.** ISO 8583:1987's financial transaction advice (0220; 0221 its
    repeat) is how an acquirer reports the final amount of a pre-authorized transaction (hotel,
    car rental, fuel, e-commerce shipment); network specifications carry the authorized amount
    in DE 54 and the authorization's approval code in DE 38 of their 022x. An 0220 with no
    authorization behind it reports a purchase approved offline (below the floor limit, or in
    stand-in). An 0200 is a completion only when it says so: its DE 90 (original data
    elements) names an authorization, original MTI 0100 (or 0120); any other 0200 is a
    purchase, so nothing is added to the purchase path but that test.

    **Which authorization** (the same card always, DE 2 or track 2, under any card key): on
    the same terminal (DE 41), by DE 90's original STAN + transmission date and time, as a
    reversal finds its original (DE 90 is the element ISO 8583 defines to identify an earlier
    transaction); else by DE 37 (the RRN, which acquirers keep across an authorization's life
    cycle); else by DE 38 (the approval code the authorization was answered with, which is what
    IFSF-style and terminal-originated completions carry). The amount is not matched: a
    completion's amount differs from its authorization's by design. A hold found that way that
    was not made by an authorization (a purchase) is not completed.

    **Outcomes** (an advice cannot be declined: the goods are gone, and the sender repeats it
    until acknowledged; so every advice that could be read is answered 0230 / 00, and whatever
    the host cannot apply as reported is logged as a WARNING for review):

    - *Open authorization, amount at most what it holds*: captured at the completion's amount,
      the rest released (a partial completion). The answer carries the authorization's
      approval code.
    - *Amount above what it holds*: an 0200 is declined 13 (invalid amount: the acquirer may
      ask again as a purchase for the excess). An advice captures the authorized amount and
      no more, and logs the excess for review: the issuer approved that much, the excess was
      never approved, and moving it automatically would make any advice an approval of any
      amount; networks allow a tolerance (a tip, fuel) by their own rules, which belong in a
      configuration this host does not have yet.
    - *No authorization found* (an offline approval), or *its authorization expired*: an
      advice is posted as a stand-in capture (a hold of its own, captured in commit, like a
      purchase) when the funds allow, else logged for review with nothing posted; the
      merchant delivered on an approval, and an expired hold only means the completion came
      late, not that it is void. An 0200 is declined 25 (unable to locate the original): a
      request can be asked again as a purchase.
    - *Its authorization already completed, reversed or released* (states captured, refunded,
      released), or claimed by another completion in flight: posting would charge the card
      twice, or charge what the acquirer voided. Nothing moves; an advice is logged for review,
      an 0200 declined 25.
    - *Its authorization still pending* (its 0100 in flight): it is claimed all the same and
      the completion wins: the 0100's commit, or its abort, then finds it captured and changes
      nothing.

    **Never twice.** The claim (`Ledger.claim_completion`, in prepare) marks the authorization
    with this transaction's id, so two completions racing for one authorization cannot both
    capture it, and the expiry sweep leaves it alone; `Ledger.complete` (commit) captures only
    the hold this transaction claimed and only while it is open, so recovery may run it again.
    A retransmission is replayed by the idempotency store; one that reaches the stage (its
    answer lost) finds its authorization completed, and captures nothing again. Abort (and
    recovery's abort) drops the claim (`Ledger.unclaim_completion`) and any stand-in hold,
    both found by the transaction id alone.

    Durable properties (for recovery): ``completes`` (the amount to capture from the claimed
    authorization), or ``hold`` and ``capture`` (a stand-in capture)."""

    name = "completion"
    what = "completion advice"

    async def prepare(self, ex: Exchange) -> Result:
        request = ex.request
        advice = is_advice(request.mti)
        ledger = self.ledger
        amount = ex.get("amount", 0)
        stan, tx_time, rrn = _original_keys(request)
        found = await ledger.find_original(
            terminal=_text(request, 41) or "",
            stan=stan,
            tx_time=tx_time,
            rrn=rrn,
            pan_ref=ledger.pan_refs(card_number(request) or ""),
            approval_code=_text(request, 38),
        )
        if found is not None and original_mti(found.mti or "") not in AUTHORIZATION_MTIS:
            found = None  # a purchase's (or another advice's) hold: nothing to complete
        if found is None:
            return await self._stand_in(ex, advice, amount, "no authorization to complete")
        if found.state == HoldState.EXPIRED:
            reason = f"its authorization {found.txn_id} expired"
            return await self._stand_in(ex, advice, amount, reason)
        if found.state not in (HoldState.PENDING, HoldState.AUTHORIZED):
            reason = f"its authorization {found.txn_id} is {found.state}: nothing posted"
            return self._nothing(ex, advice, reason)
        captured = amount
        if amount > found.amount:
            excess = f"{amount} is above the {found.amount} authorized"
            if not advice:
                return decline(ex, rc.INVALID_AMOUNT, excess)
            log.warning(
                "completion advice %s: %s; the authorized amount is captured, the excess is "
                "left for review",
                ex.id,
                excess,
                extra={"tx_id": ex.id, "authorization": found.txn_id},
            )
            captured = found.amount
        try:
            claimed = await ledger.claim_completion(found.txn_id, ex.id)
        except BaseException:
            _undo_later(self.what, lambda: ledger.unclaim_completion(ex.id))
            raise
        if not claimed:
            reason = f"its authorization {found.txn_id} was completed or released meanwhile"
            return self._nothing(ex, advice, reason)
        ex.set("completes", captured, durable=True)
        ex.set("approval_code", found.approval_code)
        return CONTINUE

    async def _stand_in(self, ex: Exchange, advice: bool, amount: int, reason: str) -> Result:
        if not advice:
            return decline(ex, rc.UNABLE_TO_LOCATE_RECORD, reason)
        return await self._hold(ex, amount, True, reason)

    def _nothing(self, ex: Exchange, advice: bool, reason: str) -> Result:
        if not advice:
            return decline(ex, rc.UNABLE_TO_LOCATE_RECORD, reason)
        return _for_review(ex, self.what, reason)

    async def commit(self, ex: Exchange) -> None:
        captured = ex.get("completes")
        if captured is not None:
            if not await self.ledger.complete(ex.id, captured):
                log.warning(
                    "completion %s: its authorization was released before the capture "
                    "(a reversal or an abort won): nothing captured",
                    ex.id,
                    extra={"tx_id": ex.id},
                )
            return
        await self._settle(ex)

    async def abort(self, ex: Exchange) -> None:
        if ex.get("completes") is not None:
            await self.ledger.unclaim_completion(ex.id)
        if ex.get("hold") is not None:
            await self.ledger.release(ex.id)

    async def recover(self, ex: Exchange, committing: bool) -> None:
        if committing:
            captured = ex.get("completes")
            if captured is not None:
                await self.ledger.complete(ex.id, captured)
            else:
                await self._settle(ex)
            return
        # the prepare may have died anywhere: both undos, each a no-op when nothing is there
        await self.ledger.unclaim_completion(ex.id)
        await self.ledger.release(ex.id)
