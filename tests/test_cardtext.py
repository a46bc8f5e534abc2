"""isopace._cardtext: error_text (exceptions as log text, card data masked) and the search for
text that may hold a card number."""

from __future__ import annotations

import random
import re

from isopace._cardtext import error_text, mask_text, may_hold_card_number

PAN = "4761739001010010"
TRACK2 = PAN + "=2512101123"
TRACK1 = "B" + PAN + "^DOE/JOHN^25121011234"
SECRETS = (PAN, "2512101123", "DOE/JOHN", "25121011234")


def _raised() -> BaseException:
    try:
        try:
            raise KeyError(TRACK1)
        except KeyError as inner:
            error = ValueError(f"bad {TRACK2}")
            error.add_note(f"while reading {PAN}")
            raise error from inner
    except ValueError as exc:
        return exc


def test_error_text_short_and_traceback() -> None:
    exc = _raised()
    assert error_text(exc) == "ValueError: bad 476173******0010=****"
    assert error_text(RuntimeError()) == "RuntimeError"
    tb = error_text(exc, traceback=True)
    assert tb.startswith("Traceback (most recent call last):")
    assert "KeyError: 'B476173******0010^****'" in tb  # the cause
    assert "while reading 476173******0010" in tb  # the note
    assert tb.endswith("while reading 476173******0010")
    group = ExceptionGroup("commits failed", [exc, RuntimeError(f"on {PAN}")])
    for text in (tb, error_text(group, traceback=True), error_text(group)):
        for secret in SECRETS:
            assert secret not in text, secret


def test_error_text_of_an_exception_whose_str_fails() -> None:
    class Odd(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert error_text(Odd()) == "Odd: <str() failed>"


def test_may_hold_card_number_is_the_plain_rule_and_mask_text_trusts_it() -> None:
    """13 digits in a row, one space or dash at most between two: what the written-out search
    finds is what the plain pattern finds; text it rules out is never changed by mask_text."""
    plain = re.compile(r"[0-9](?:[ -]?[0-9]){12}")
    rng = random.Random(8583)
    for _ in range(20_000):
        text = "".join(rng.choice("0123456789 -=Dx") for _ in range(rng.randint(0, 40)))
        assert may_hold_card_number(text) == bool(plain.search(text)), text
        if not may_hold_card_number(text):
            assert mask_text(text) is text
    assert may_hold_card_number(f"SHOP {PAN[:4]} {PAN[4:8]}-{PAN[8:12]} {PAN[12:]}")
    assert not may_hold_card_number("4761 7390  0101 0010")  # two spaces break the run
