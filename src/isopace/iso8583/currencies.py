"""Currency minor units (ISO 4217): how many decimals DE 4 and the other amounts carry.

An amount field holds an integer in the currency's minor unit (cents for 840, yen for 392, fils
for 048), so reading or writing ``25.00`` needs the currency's exponent. The table covers the
numeric codes card networks commonly carry; :func:`minor_units` answers ``None`` for any other,
and each caller decides what that means (``isopace send`` assumes two decimals for a code it
does not know, since it is a test tool that must be able to send unusual currencies).
"""

from __future__ import annotations

from typing import Final

__all__ = ["MINOR_UNITS", "format_amount", "minor_units"]

_ZERO = "108 152 174 262 324 352 392 410 548 600 646 704 800 950 952 953"
_THREE = "048 368 400 414 434 512 788"
_TWO = (
    "032 036 124 156 170 203 208 344 348 356 360 376 404 458 484 554 566 578 604 608 643 682 "
    "702 710 752 756 764 784 818 826 840 901 949 978 985 986"
)

MINOR_UNITS: Final[dict[str, int]] = {
    **{code: 0 for code in _ZERO.split()},
    **{code: 2 for code in _TWO.split()},
    **{code: 3 for code in _THREE.split()},
}
"""Decimals of each ISO 4217 numeric currency code in the table."""


def minor_units(currency: str) -> int | None:
    """The number of decimals of ``currency`` (numeric ISO 4217 code), None when not known."""
    return MINOR_UNITS.get(currency)


def format_amount(minor: int, currency: str | None, grouped: bool = False) -> str:
    """``minor`` units of ``currency`` in its major unit, with the currency's decimals: 2500 in
    840 -> ``25.00``, 1000 in 392 -> ``1000``, 1234 in 048 -> ``1.234`` (``grouped``: thousands
    separated by commas). A currency the table does not know is shown with two decimals, the
    common case, rather than refused: this is for reading, not for posting."""
    exponent = MINOR_UNITS.get(currency or "", 2)
    sign = "-" if minor < 0 else ""
    whole, part = divmod(abs(minor), 10**exponent)
    text = f"{whole:,}" if grouped else str(whole)
    return f"{sign}{text}.{part:0{exponent}d}" if exponent else f"{sign}{text}"
