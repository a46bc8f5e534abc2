"""Currency exponents (ISO 4217) and the one formatter of amounts the CLI and the host's log
use: zero, two and three decimals, negative amounts, grouping, a currency the table lacks."""

from __future__ import annotations

import pytest

from isopace.iso8583 import format_amount, minor_units


@pytest.mark.parametrize(
    ("minor", "currency", "grouped", "text"),
    [
        (2500, "840", False, "25.00"),
        (5, "978", False, "0.05"),
        (-1234, "840", False, "-12.34"),
        (1000, "392", False, "1000"),  # yen: no minor unit
        (1000, "392", True, "1,000"),
        (1234, "048", False, "1.234"),  # Bahraini dinar: three decimals
        (123456789, "840", True, "1,234,567.89"),
        (7, "999", False, "0.07"),  # unknown: shown with two decimals
        (7, None, False, "0.07"),
    ],
)
def test_format_amount(minor: int, currency: str | None, grouped: bool, text: str) -> None:
    assert format_amount(minor, currency, grouped=grouped) == text


def test_minor_units() -> None:
    assert (minor_units("840"), minor_units("392"), minor_units("048")) == (2, 0, 3)
    assert minor_units("999") is None
