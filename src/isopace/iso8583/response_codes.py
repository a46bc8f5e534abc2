"""Response codes (DE 39, ISO 8583:1987) as named constants, with their meanings.

Every layer that answers a request names its code here instead of writing ``"30"`` or ``"96"``
where it decides, so a reader sees *why* a request was refused, and ``isopace send`` can print
the meaning beside the code. The table holds the 1987 codes a host or switch commonly sends;
:func:`meaning` answers any other two-character code as "not a code of ISO 8583:1987" rather
than guessing, since networks assign private codes differently.

:data:`APPROVALS` are the codes that approve (in full, in part, or with a condition the
merchant checked): a client treats those as success, every other code as a decline.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "APPROVALS",
    "APPROVED",
    "DO_NOT_HONOUR",
    "DUPLICATE_TRANSMISSION",
    "EXCEEDS_AMOUNT_LIMIT",
    "EXCEEDS_FREQUENCY_LIMIT",
    "EXPIRED_CARD",
    "FORMAT_ERROR",
    "FUNCTION_NOT_SUPPORTED",
    "INSUFFICIENT_FUNDS",
    "INVALID_AMOUNT",
    "INVALID_CARD_NUMBER",
    "INVALID_TRANSACTION",
    "ISSUER_INOPERATIVE",
    "MEANINGS",
    "NO_SUCH_ISSUER",
    "REQUEST_IN_PROGRESS",
    "SYSTEM_MALFUNCTION",
    "TRANSACTION_NOT_PERMITTED",
    "UNABLE_TO_LOCATE_RECORD",
    "is_approval",
    "meaning",
]

APPROVED: Final = "00"
DO_NOT_HONOUR: Final = "05"
REQUEST_IN_PROGRESS: Final = "09"
INVALID_TRANSACTION: Final = "12"
INVALID_AMOUNT: Final = "13"
INVALID_CARD_NUMBER: Final = "14"
NO_SUCH_ISSUER: Final = "15"
UNABLE_TO_LOCATE_RECORD: Final = "25"
FORMAT_ERROR: Final = "30"
FUNCTION_NOT_SUPPORTED: Final = "40"
INSUFFICIENT_FUNDS: Final = "51"
EXPIRED_CARD: Final = "54"
TRANSACTION_NOT_PERMITTED: Final = "57"
EXCEEDS_AMOUNT_LIMIT: Final = "61"
EXCEEDS_FREQUENCY_LIMIT: Final = "65"
ISSUER_INOPERATIVE: Final = "91"
DUPLICATE_TRANSMISSION: Final = "94"
SYSTEM_MALFUNCTION: Final = "96"

MEANINGS: Final[dict[str, str]] = {
    "00": "approved",
    "01": "refer to card issuer",
    "02": "refer to card issuer, special condition",
    "03": "invalid merchant",
    "04": "pick up card",
    "05": "do not honour",
    "06": "error",
    "07": "pick up card, special condition",
    "08": "honour with identification",
    "09": "request in progress",
    "10": "approved for partial amount",
    "11": "approved (VIP)",
    "12": "invalid transaction",
    "13": "invalid amount",
    "14": "invalid card number",
    "15": "no such issuer",
    "16": "approved, update track 3",
    "17": "customer cancellation",
    "19": "re-enter transaction",
    "21": "no action taken",
    "25": "unable to locate record",
    "30": "format error",
    "31": "bank not supported by switch",
    "33": "expired card, pick up",
    "34": "suspected fraud, pick up",
    "39": "no credit account",
    "40": "requested function not supported",
    "41": "lost card, pick up",
    "43": "stolen card, pick up",
    "51": "insufficient funds",
    "52": "no checking account",
    "53": "no savings account",
    "54": "expired card",
    "55": "incorrect PIN",
    "56": "no card record",
    "57": "transaction not permitted to cardholder",
    "58": "transaction not permitted to terminal",
    "59": "suspected fraud",
    "61": "exceeds withdrawal amount limit",
    "62": "restricted card",
    "63": "security violation",
    "65": "exceeds withdrawal frequency limit",
    "68": "response received too late",
    "75": "allowable number of PIN tries exceeded",
    "90": "cut-off in progress",
    "91": "issuer or switch inoperative",
    "92": "no route to the institution",
    "93": "transaction cannot be completed, violation of law",
    "94": "duplicate transmission",
    "96": "system malfunction",
}
"""The meaning of each ISO 8583:1987 response code isopace names."""

APPROVALS: Final = frozenset({"00", "08", "10", "11", "16"})
"""The codes that approve: in full, with identification, in part, as VIP, with a track update."""


def meaning(code: str) -> str:
    """What ``code`` means, or that it is not one of ISO 8583:1987's (a network's private code)."""
    return MEANINGS.get(code, "not a code of ISO 8583:1987 (network-specific?)")


def is_approval(code: str | None) -> bool:
    """Whether ``code`` approves the transaction (see :data:`APPROVALS`)."""
    return code in APPROVALS
