"""isopace._cardtext.error_text: exceptions as log text, card data masked."""

from __future__ import annotations

from isopace._cardtext import error_text

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
