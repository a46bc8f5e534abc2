"""Response codes: named, with meanings; approvals told from declines in one place."""

from __future__ import annotations

from isopace.iso8583 import APPROVALS, is_approval, meaning, response_codes


def test_named_codes_have_meanings() -> None:
    assert response_codes.FORMAT_ERROR == "30" and meaning("30") == "format error"
    assert response_codes.SYSTEM_MALFUNCTION == "96" and meaning("96") == "system malfunction"
    assert meaning(response_codes.INSUFFICIENT_FUNDS) == "insufficient funds"
    named = {v for k, v in vars(response_codes).items() if k.isupper() and isinstance(v, str)}
    assert named <= set(response_codes.MEANINGS)


def test_approvals_and_declines() -> None:
    assert {"00", "08", "10", "11", "16"} == APPROVALS
    assert is_approval("00") and is_approval("10")
    assert not is_approval("05") and not is_approval("51") and not is_approval(None)
    assert not is_approval("0") and not is_approval("")


def test_an_unknown_code_is_said_to_be_unknown() -> None:
    assert meaning("Z9") == "not a code of ISO 8583:1987 (network-specific?)"
