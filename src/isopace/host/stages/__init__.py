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


The stages live in one module per concern: `request` (parse, dispatch, network management,
respond), `risk` (risk, transaction type, BIN route), `money` (reserve, refund, balance inquiry),
`reversal`, and `advice` (authorization advices and completions); `_common` holds what they
share.
"""

from isopace.host.stages._common import (
    Declined,
    additional_amount,
    additional_amounts,
    decline,
)
from isopace.host.stages.advice import AuthorizationAdvice, Completion
from isopace.host.stages.money import BalanceInquiry, Refund, Reserve
from isopace.host.stages.request import (
    Dispatch,
    NetworkManagement,
    Parse,
    Respond,
)
from isopace.host.stages.reversal import Reversal
from isopace.host.stages.risk import BinRoute, Risk, TransactionType, Velocity

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
