"""Card data in free text: the one masker every layer uses (standard library only).

Error messages, log lines and journal columns are built from text of unknown origin: an exception
raised with a track in its message, a durable property holding a PAN. :func:`mask_text` is the
last line of defence for all of them, used by ``isopace.iso8583`` (re-exported from
``isopace.iso8583.masking``), ``isopace.flow`` (flow logs, ``LoggingJournal``) and
``isopace.store`` (journals' error column). It sits at the package root, below every layer, so
that ``flow`` and ``store`` share it without importing ``iso8583`` at run time.

- :func:`luhn_ok` / :func:`luhn_check_digit`: the Luhn check.
- :func:`mask_pan`: at most the first 6 and last 4 digits, at least 3 hidden (13 characters or
  more: first 6 + ``*`` + last 4; 8 to 12: last 4 only; fewer: everything masked).
- :func:`mask_text`: every 13-19 digit run (optionally grouped by single spaces or dashes) that
  passes Luhn is masked as a PAN, and the track data that follows such a PAN (``=...``,
  ``D...``, ``^NAME^...``: expiry, service code, discretionary data, name) becomes ``****``.
- :func:`holds_card_number`: whether binary data carries a card number, read as packed BCD
  digits (its hex, ``F``-padded or not) or, when it is ASCII, as text, by :func:`mask_text`'s
  rule; such data cannot hold a masked value, so callers hide or drop it.
- :func:`mask_json`: a JSON-like value (durable properties) with :func:`mask_text` applied to
  every string and to every integer of 13 digits or more.
- :func:`may_hold_card_number`: False when text has no run of 13 digits at all, so that
  :func:`mask_text` would return it, and every part of it, unchanged: one search answers most
  text, or a whole JSON document (digits, spaces and dashes are written as they are).
- :func:`error_text`: an exception as text for a log line or a record, masked with
  :func:`mask_text`; with ``traceback=True`` the whole formatted traceback (chained causes,
  notes and exception group members included), formatted first and then masked. Loggers never
  get the raw exception: ``exc_info=`` / ``logger.exception`` would format it unmasked.
"""

from __future__ import annotations

import re
import traceback as _traceback

__all__ = [
    "HIDDEN",
    "bcd_digits",
    "error_text",
    "holds_card_number",
    "luhn_check_digit",
    "luhn_ok",
    "mask_json",
    "mask_pan",
    "mask_text",
    "mask_track",
    "may_hold_card_number",
    "printable",
    "track_text",
]

HIDDEN = "****"
"""What replaces a value that is hidden entirely (PIN block, discretionary data, names)."""


# ------------------------------------------------------------------------------------- Luhn


def luhn_ok(digits: str) -> bool:
    """True when ``digits`` (ASCII digits only, at least 2) ends with a valid Luhn check digit."""
    if len(digits) < 2 or not (digits.isascii() and digits.isdigit()):
        return False
    return _luhn_sum(digits, double_first=False) % 10 == 0


def luhn_check_digit(partial: str) -> str:
    """The Luhn check digit to append to ``partial`` (ASCII digits); ``ValueError`` otherwise."""
    if not (partial.isascii() and partial.isdigit()):
        raise ValueError("Luhn check digit needs a non-empty string of ASCII digits")
    return str((10 - _luhn_sum(partial, double_first=True) % 10) % 10)


def _luhn_sum(digits: str, *, double_first: bool) -> int:
    # Walk from the right: the rightmost digit is doubled when computing a check digit
    # (it will sit next to the check digit), not when verifying a complete number.
    total = 0
    double = double_first
    for ch in reversed(digits):
        d = ord(ch) - 48
        if double:
            d *= 2
            if d > 9:
                d -= 9
        total += d
        double = not double
    return total


def mask_pan(pan: str) -> str:
    """``4761739001010010`` -> ``476173******0010``. Never shows more than first 6 + last 4."""
    pan = printable(pan)
    n = len(pan)
    if n >= 13:
        return pan[:6] + "*" * (n - 10) + pan[-4:]
    if n >= 8:
        return "*" * (n - 4) + pan[-4:]
    return "*" * n


def printable(text: str) -> str:
    """``text`` with non-printable characters escaped (``\\x00``, ``\\t``...)."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


# ------------------------------------------------------------------------------------ text

_DIGIT_GROUPS = re.compile(r"[0-9]+(?:[ -][0-9]+)*")
_GROUP = re.compile(r"[0-9]+")
# The least a card number needs: 13 digits, one space or dash at most between two of them. Most
# text (names, merchant ids, amounts) has no such run, and one search answers it at C speed.
# Written out, with possessive separators (a separator is never a digit, so taking it is never
# undone): the same matches as "[0-9](?:[ -]?[0-9]){12}", found in about 60% of its time.
_CANDIDATE = re.compile("[0-9]" + "[ -]?+[0-9]" * 12)


def _mask_groups(match: re.Match[str]) -> str:
    found = match.group(0)
    groups = [(m.start(), m.end()) for m in _GROUP.finditer(found)]
    if len(groups) == 1:
        n = len(found)
        return mask_pan(found) if 13 <= n <= 19 and luhn_ok(found) else found
    # Several groups ("4761 7390 0101 0010", "stan 123456 4761-7390-..."): mask the longest
    # run of whole groups holding 13-19 digits that passes Luhn, left to right.
    out: list[str] = []
    pos = 0
    i = 0
    while i < len(groups):
        # candidates start at group i and grow while they hold at most 19 digits
        hit = -1
        hit_digits = ""
        digits = ""
        for j in range(i, len(groups)):
            a, b = groups[j]
            digits += found[a:b]
            if len(digits) > 19:
                break
            if len(digits) >= 13 and luhn_ok(digits):
                hit, hit_digits = j, digits
        if hit < 0:
            i += 1
            continue
        out.append(found[pos : groups[i][0]])
        out.append(mask_pan(hit_digits))
        pos = groups[hit][1]
        i = hit + 1
    out.append(found[pos:])
    return "".join(out)


# A masked PAN followed by track data: "=" / "D" and digits (track 2, EMV 57), or "^name^digits"
# (track 1). The tail carries expiry, service code and discretionary data (CVV): hidden too.
# The tail may itself have been masked as a PAN (discretionary data that happens to pass Luhn,
# "=251210*******0000"): "*" belongs to it, so none of its digits stay in clear.
_TRACK_TAIL = re.compile(
    r"([0-9]{6}\*{3,9}[0-9]{4})(?:([=D])[0-9][0-9A-F*]*|(\^)[^^\r\n]{0,26}\^[0-9*]*)"
)


def _hide_tail(match: re.Match[str]) -> str:
    return match.group(1) + (match.group(2) or match.group(3)) + HIDDEN


def mask_text(text: str) -> str:
    """Mask every 13-19 digit run that passes Luhn, as :func:`mask_pan` does, and the track data
    that follows such a PAN (``=25121010...``, ``D2512...``, ``^NAME^2512...`` become ``=****``...).

    A run is a maximal sequence of ASCII digits, or of digit groups joined by single spaces or
    dashes (whole groups are combined: ``4761 7390 0101 0010``). Digits glued to a longer digit
    run (20 or more with no separator, e.g. inside a hex dump) are not a PAN candidate. Other text
    is returned unchanged."""
    if len(text) < 13 or _CANDIDATE.search(text) is None:  # may_hold_card_number, inline
        return text  # no 13 digits in a row (single spaces or dashes between): no card number
    out = _DIGIT_GROUPS.sub(_mask_groups, text)
    if out == text:
        return text
    return _TRACK_TAIL.sub(_hide_tail, out)


def may_hold_card_number(text: str) -> bool:
    """False when ``text`` has no 13 digits in a row (single spaces or dashes between them):
    then it holds no card number, nor does any part of it, and :func:`mask_text` returns it as
    it is. True does not mean a card number is there (the Luhn check has not run)."""
    return len(text) >= 13 and _CANDIDATE.search(text) is not None


def holds_card_number(data: bytes) -> bool:
    """True when :func:`mask_text` finds a card number in ``data`` read as packed BCD (its hex:
    ``4761739001010010``, ``378282246310005F``) or, for ASCII data, read as text."""
    packed = data.hex()
    if mask_text(packed) != packed:
        return True
    if data.isascii():
        text = data.decode("ascii")
        return mask_text(text) != text
    return False


def mask_json(value: object) -> object:
    """``value`` (str, int, list, dict... as JSON holds them) with every string masked by
    :func:`mask_text`, and every integer long enough to be a card number masked as text."""
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return value
    if isinstance(value, int):
        if -(10**12) < value < 10**12:
            return value
        text = str(value)
        masked = mask_text(text)
        return value if masked == text else masked
    if isinstance(value, dict):
        return {k: mask_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [mask_json(v) for v in value]
    return mask_text(str(value))


def error_text(exc: BaseException, *, traceback: bool = False) -> str:
    """``"ValueError: bad 476173******0010=****"``: ``exc`` as ``Type: message`` (the type alone
    when the message is empty) with card data masked; ``traceback=True``: the formatted
    traceback (as ``logger.exception`` would print it), masked."""
    if traceback:
        return mask_text("".join(_traceback.format_exception(exc)).rstrip("\n"))
    name = type(exc).__name__
    try:
        text = str(exc)
    except Exception:
        text = "<str() failed>"
    return mask_text(f"{name}: {text}") if text else name


_TRACK_PREFIXES = frozenset({"", ";", "%", "B", "b", "%B", "%b"})
_TRACK_SEPARATORS = frozenset("=Dd^")


def mask_track(value: str | bytes) -> str:
    """Track 1/2/3 (or an EMV track 2 equivalent): ``4761739001010010=25121010000012300000`` ->
    ``476173******0010=****``."""
    text = track_text(value)
    i = 0
    n = len(text)
    while i < n and not ("0" <= text[i] <= "9"):
        i += 1
    prefix = text[:i]
    if prefix not in _TRACK_PREFIXES:
        return HIDDEN
    j = i
    while j < n and "0" <= text[j] <= "9":
        j += 1
    pan = text[i:j]
    rest = text[j:]
    if not rest:
        return prefix + mask_pan(pan)
    if rest[0] in _TRACK_SEPARATORS:
        return prefix + mask_pan(pan) + rest[0] + HIDDEN
    return HIDDEN


def track_text(value: str | bytes) -> str:
    """A track as text: ASCII as it is, binary (EMV 57 style: packed digits, D separator, F
    padding) as its hex digits."""
    if isinstance(value, str):
        return value
    if value.isascii() and value.decode("ascii").isprintable():
        return value.decode("ascii")
    # Binary (EMV 57 style, packed digits with D separator and F padding).
    return value.hex().upper().rstrip("F")


def bcd_digits(value: bytes) -> str:
    """Packed digits (F-padded) as text."""
    return value.hex().upper().rstrip("F")
