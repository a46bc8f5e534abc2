"""The stages of the reference authorization flow, each a small class (copy them).

The flow `isopace.host.build_flow` assembles (groups in brackets)::

    [main]       parse, dispatch
                   0800      -> [netmgmt]    netmgmt
                   0100/0200 -> [authorize]  risk, txn-type
                                  DE 3 00/01/09, by BIN -> [visa] or [mastercard]  reserve
                                                             -> [respond]
                                  DE 3 20       -> [refund]    refund -> [respond]
                                  DE 3 30/31    -> [inquiry]   inquiry -> [respond]
                   0400/0420 -> [reversal]   reversal -> [respond]
                   0120      -> [authorization-advice]  authorization-advice -> [respond]
                   0220, or 0200 completing an 0100 (DE 90)
                             -> [completion]  completion -> [respond]
    [respond]    respond

Declines: a stage that declines builds the response itself (the request's reply with DE 39 set)
and calls ``ex.abort(Declined(code, reason))``, so the flow rolls back what joined, and the
idempotency store keeps the decline for a retransmission. A transaction that fails without a
response (a stage raised, the deadline passed) is answered 96 by the host and not stored for replay.

Response codes used: 00 approved, 05 do not honour (blocked card), 09 request in progress (a
retransmission whose original is still pending), 12 invalid transaction (a transaction type
this host does not handle, a refund as an authorization, a reversal of a refund, an original
its reversal overtook), 13 invalid amount (zero on a purchase, cash or refund; cashback above
DE 4; a partial reversal not lower; an 0200 completion above its authorization), 14 invalid
card number (no such card, or no BIN route: configurable), 25 unable to locate the original (a
reversal's; an 0200 completion's open authorization), 40 function not supported (transfers), 57
transaction not permitted (a currency other than the account's), 30 format error (which
includes a DE 55 that is not BER-TLV, a DE 7 / 12 / 13 that is no real date or time, an MTI
that is no request's, a currency no table knows), 51 insufficient funds, 61 exceeds amount
limit (velocity, and the daily cash limit), 65 exceeds frequency limit, 96 system malfunction.

Stages that hold or post something for a transaction (``reserve``, ``refund``, ``reversal``,
``completion``, ``authorization-advice``) implement ``recover(ex, committing)``: crash recovery
calls it with the exchange rebuilt from the journal (the id, the protected request, the durable
properties) to finish or undo it. Holds are keyed by the transaction id, so recovery finds them
even if the process died in the middle of the prepare pass.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from isopace.flow import CONTINUE, SKIP, Result, route
from isopace.host.conversion import Rates
from isopace.host.errors import HostError
from isopace.host.ledger import Card, HoldDetails, HoldState, Kind, Ledger, ReserveStatus
from isopace.iso8583 import Iso8583Error, card_number, error_reply, minor_units
from isopace.iso8583 import response_codes as rc
from isopace.iso8583.mti import is_advice, original_mti

if TYPE_CHECKING:
    from isopace.flow import Exchange
    from isopace.host.idempotency import IdempotencyKey
    from isopace.iso8583 import Message, Spec

__all__ = [
    "AuthorizationAdvice",
    "BalanceInquiry",
    "BinRoute",
    "Completion",
    "Declined",
    "Dispatch",
    "NetworkManagement",
    "Parse",
    "Refund",
    "Reserve",
    "Respond",
    "Reversal",
    "Risk",
    "TransactionType",
    "Velocity",
    "additional_amount",
    "additional_amounts",
    "decline",
]

log = logging.getLogger("isopace.host")

#: MTIs the host accepts: authorizations and their advices (stand-in approvals), financial
#: requests and advices (completions), reversals and reversal advices, network management, and
#: the repeats of all but the last (0101, 0121, 0201, 0221, 0401, 0421). A repeat is the same
#: transaction as its original (`isopace.iso8583.mti`): it has the original's idempotency key
#: (the MTI class), so it is replayed when the original was seen and processed as the original
#: when not, never twice; its answer has the original's answer MTI (0210 to an 0201, 0430 to an
#: 0421).
SUPPORTED_MTIS = frozenset(
    {
        "0100", "0101", "0120", "0121", "0200", "0201", "0220", "0221",
        "0400", "0401", "0420", "0421", "0800",
    }
)  # fmt: skip

#: What a completion completes (the original MTI in its DE 90, the MTI a hold was made by): an
#: authorization, or the advice of one approved in stand-in.
AUTHORIZATION_MTIS = frozenset({"0100", "0120"})

#: Transaction types (DE 3, first two digits) that move money, so an amount of zero is declined
#: 13: purchase (00), cash withdrawal (01), purchase with cash back (09), refund (20). An 0100
#: of amount zero is one of them too: this host does no account verification, and a hold of
#: nothing approved would only look like one.
MONEY_TRANSACTIONS = frozenset({"00", "01", "09", "20"})

#: DE 54 amount types (ISO 8583:1987 additional amounts).
LEDGER_BALANCE, AVAILABLE_BALANCE, CASHBACK = "01", "02", "40"


class Declined(HostError):
    """Why a transaction was declined: the response code and a reason for the log."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"declined {code}: {reason}")
        self.code = code
        self.reason = reason


def decline(ex: Exchange, code: str, reason: str) -> Result:
    """Answer ``code`` and roll back: sets ``ex.response`` (`isopace.iso8583.error_reply`, the
    answer every layer builds alike), aborts with `Declined`; returns SKIP."""
    ex.response = error_reply(ex.request, code)
    ex.abort(Declined(code, reason))
    return SKIP


async def _card_of(ledger: Ledger, ex: Exchange) -> Card | None:
    """The request's card: the one the risk stage found, else looked up (a flow without it)."""
    card: Card | None = ex.get("card")
    if card is None:
        card = await ledger.card(card_number(ex.request) or "")
    return card


def _text(m: Message, n: int) -> str | None:
    value = m.get(n)
    if value is None:
        return None
    return value if isinstance(value, str) else value.hex()


def _hold_details(
    m: Message, *, idem_key: str | None, approval_code: str | None, pan_ref: str | None
) -> HoldDetails:
    """What the ledger keeps of request ``m`` on its hold: MTI, DE 41, 11, 7 and 37 as sent."""
    return HoldDetails(
        mti=m.mti,
        terminal=_text(m, 41),
        stan=_text(m, 11),
        tx_time=_text(m, 7),
        rrn=_text(m, 37),
        idem_key=idem_key,
        approval_code=approval_code,
        pan_ref=pan_ref,
    )


class Parse:
    """Checks the request: a supported MTI (`SUPPORTED_MTIS`, the host's own policy), the spec's
    rules (its table of required fields, DE 55 well-formed BER-TLV, real dates and times in DE
    7, 12 and 13 among them), what the idempotency key needs (``key``, asked through its
    ``missing``, so Parse requires exactly what the key reads: without it a retransmission could
    not be told from a new transaction, so a repeat would be debited again), a readable amount.
    Anything wrong is declined 30 (format error) naming the fields; an amount of zero on an
    authorization or financial request that moves money (`MONEY_TRANSACTIONS`) is declined 13
    (invalid amount). Votes SKIP (it holds nothing)."""

    name = "parse"

    def __init__(self, spec: Spec, key: IdempotencyKey | None = None) -> None:
        self.spec = spec
        self.key = key

    def prepare(self, ex: Exchange) -> Result:
        m = ex.request
        if m.mti not in SUPPORTED_MTIS:
            return decline(ex, rc.FORMAT_ERROR, f"MTI {m.mti} not supported")
        problems = [v.message for v in self.spec.validate(m)]
        missing = self.key.missing(m) if self.key is not None else None
        if missing:
            problems.append(f"field(s) {', '.join(missing)} missing (the idempotency key)")
        if problems:
            return decline(ex, rc.FORMAT_ERROR, "; ".join(problems[:5]))  # each names its field
        if 4 in m:
            try:
                amount = m.amount(4)
            except Iso8583Error:
                return decline(ex, rc.FORMAT_ERROR, "field 4: not an amount")
            money = (_text(m, 3) or "")[:2] in MONEY_TRANSACTIONS
            # an advice reports what happened (a zero completion releases its authorization):
            # it is never declined for its amount
            if amount == 0 and m.mti[1] in "12" and money and not is_advice(m.mti):
                return decline(ex, rc.INVALID_AMOUNT, "field 4: amount zero")
            ex.set("amount", amount)
        return SKIP


class Dispatch:
    """Routes by message class: 08xx to ``netmgmt``, 04xx to ``reversal``, advices of class 01
    (0120) to ``authorization-advice`` and of class 02 (0220) to ``completion``, an 0200 whose
    DE 90 names an authorization (`completes_authorization`) to ``completion`` too, the other
    01xx/02xx to ``authorize``; each followed by ``respond``."""

    name = "dispatch"

    def prepare(self, ex: Exchange) -> Result:
        request = ex.request
        cls = request.mti[:2]
        if cls == "08":
            return route("netmgmt")
        if cls == "04":
            return route("reversal", "respond")
        if is_advice(request.mti):
            return route("completion" if cls == "02" else "authorization-advice", "respond")
        if cls == "02" and 90 in request and completes_authorization(request):
            return route("completion", "respond")
        return route("authorize")


def completes_authorization(m: Message) -> bool:
    """True when DE 90's original MTI (its first four digits) is an authorization's
    (`AUTHORIZATION_MTIS`, or their repeats): an 0200 that carries it is a completion."""
    de90 = _text(m, 90)
    return de90 is not None and original_mti(de90[:4]) in AUTHORIZATION_MTIS


class NetworkManagement:
    """Answers 0800 (echo, sign-on, sign-off; DE 70 says which) with 0810, DE 39 = 00, echoing
    DE 70."""

    name = "netmgmt"

    def prepare(self, ex: Exchange) -> Result:
        request = ex.request
        reply = request.reply().set(39, rc.APPROVED)
        info = request.get(70)
        if info is not None:
            reply = reply.set(70, info)
        ex.response = reply
        return SKIP


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


def additional_amount(account_type: str, amount_type: str, currency: str, amount: int) -> str:
    """One 20-character DE 54 entry (ISO 8583:1987): account type (2), amount type (2),
    currency (3), ``C`` (credit, zero or more) or ``D`` (debit), the amount in minor units (12)."""
    sign = "C" if amount >= 0 else "D"
    return f"{account_type:0>2.2}{amount_type}{currency:0>3.3}{sign}{abs(amount):012d}"


def additional_amounts(value: str) -> dict[str, int]:
    """DE 54's entries by amount type (signed, minor units). `Iso8583Error` naming DE 54 when
    it is not a run of 20-character entries."""
    if len(value) % 20 or not value:
        raise Iso8583Error(f"field 54: {len(value)} characters, not 20-character entries")
    out = {}
    for i in range(0, len(value), 20):
        entry = value[i : i + 20]
        sign, digits = entry[7], entry[8:]
        if sign not in "CD" or not (digits.isascii() and digits.isdigit()):
            raise Iso8583Error(
                f"field 54: entry {i // 20 + 1} is not <type><currency><C|D><12 digits>"
            )
        out[entry[2:4]] = int(digits) if sign == "C" else -int(digits)
    return out


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


_codes = random.Random(secrets.randbits(64))


def _approval_code() -> str:
    """Six hex digits; not a secret (it is printed on receipts), so no CSPRNG per transaction."""
    return f"{_codes.getrandbits(24):06X}"


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


def _original_keys(m: Message) -> tuple[str | None, str | None, str | None]:
    """(STAN, transmission date-time, RRN) of the original, from DE 90 (else DE 37)."""
    stan = tx_time = None
    de90 = _text(m, 90)
    if de90 and len(de90) >= 20 and de90[:20].isdigit():
        stan, tx_time = de90[4:10], de90[10:20]
    return stan, tx_time, _text(m, 37)


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


_background: set[asyncio.Task[None]] = set()


def _undo_later(what: str, *undo: Callable[[], Awaitable[object]]) -> None:
    """Run ``undo`` in the background (now, and again a second later: a statement still in
    flight elsewhere may land late): a prepare cancelled or failed in the middle of a ledger
    call may have left a hold or a claim, and a prepare that raised does not join, so no abort
    comes. Each undo is a no-op when there is nothing to undo."""

    async def run() -> None:
        try:
            for _ in range(2):
                for fn in undo:
                    await fn()
                await asyncio.sleep(1.0)
        except Exception as exc:
            log.warning("%s: undo failed: %s (recovery will retry)", what, exc)

    try:
        task = asyncio.get_running_loop().create_task(run())
    except RuntimeError:
        return
    _background.add(task)
    task.add_done_callback(_background.discard)


def _for_review(ex: Exchange, what: str, reason: str) -> Result:
    """An advice that cannot be applied as it stands is still acknowledged (the sender repeats
    it until it is): 00, nothing moves, and a WARNING names it for review. Votes SKIP."""
    log.warning("%s %s acknowledged, %s (review it)", what, ex.id, reason, extra={"tx_id": ex.id})
    return SKIP


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


class Respond:
    """Builds the approval: the request's reply (0110/0210/0410/0430, echo fields) with DE 39 = 00
    and the approval code in DE 38 when the reserve stage made one. Votes SKIP."""

    name = "respond"

    def __init__(self, extra_echo: Sequence[int] = ()) -> None:
        self.extra_echo = tuple(extra_echo)

    def prepare(self, ex: Exchange) -> Result:
        request = ex.request
        reply = request.reply().set(39, rc.APPROVED)
        code = ex.get("approval_code")
        if code is not None:
            reply = reply.set(38, code)
        for n in self.extra_echo:
            value = request.get(n)
            if value is not None:
                reply = reply.set(n, value)
        answer_fields = ex.get("answer_fields")
        if answer_fields:
            reply = reply.set_many(answer_fields)
        ex.response = reply
        return SKIP
