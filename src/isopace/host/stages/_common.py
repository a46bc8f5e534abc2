"""What the stages share: the MTIs the host accepts, how a stage declines, the card of a request,
what a hold keeps of it, DE 54 amounts, approval codes, and undoing in the background what a
cancelled ledger call may have left.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from isopace.flow import SKIP, Result
from isopace.host.errors import HostError
from isopace.host.ledger import Card, HoldDetails, Ledger
from isopace.iso8583 import Iso8583Error, card_number, error_reply

if TYPE_CHECKING:
    from isopace.flow import Exchange
    from isopace.iso8583 import Message


__all__ = ["Declined", "additional_amount", "additional_amounts", "decline"]


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


_codes = random.Random(secrets.randbits(64))


def _approval_code() -> str:
    """Six hex digits; not a secret (it is printed on receipts), so no CSPRNG per transaction."""
    return f"{_codes.getrandbits(24):06X}"


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


def _original_keys(m: Message) -> tuple[str | None, str | None, str | None]:
    """(STAN, transmission date-time, RRN) of the original, from DE 90 (else DE 37)."""
    stan = tx_time = None
    de90 = _text(m, 90)
    if de90 and len(de90) >= 20 and de90[:20].isdigit():
        stan, tx_time = de90[4:10], de90[10:20]
    return stan, tx_time, _text(m, 37)
