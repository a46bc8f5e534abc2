"""The stages every request meets: parse (what a request must pass before anything moves),
dispatch (the group each MTI goes to), network management (0800) and respond (the answer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from isopace.flow import SKIP, Result, route
from isopace.host.stages._common import (
    AUTHORIZATION_MTIS,
    MONEY_TRANSACTIONS,
    SUPPORTED_MTIS,
    _text,
    decline,
)
from isopace.iso8583 import Iso8583Error
from isopace.iso8583 import response_codes as rc
from isopace.iso8583.mti import is_advice, original_mti

if TYPE_CHECKING:
    from isopace.flow import Exchange
    from isopace.host.idempotency import IdempotencyKey
    from isopace.iso8583 import Message, Spec


__all__ = ["Dispatch", "NetworkManagement", "Parse", "Respond", "completes_authorization"]


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
