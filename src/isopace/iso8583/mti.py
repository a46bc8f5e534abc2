"""What an MTI says: the rules every layer reads an MTI by (request or answer, repeat, advice,
the answer's MTI), written once.

An MTI is four digits: version (0 = 1987, 1 = 1993, 2 = 2003), class (1 authorization, 2
financial, 4 reversal, 8 network management...), function and origin. The function digit says
what the message asks: 0 a request, 2 an advice, 4 a notification (each wants an answer), 1, 3
and 5 their answers. The origin digit says who sent it, and whether it is a repeat: 0 acquirer,
2 issuer, 4 other; 1, 3 and 5 the same origins sending a repeat (0201, 0421).

Decisions:

- The answer to a repeat has the answer MTI of its original (0201 -> 0210, 0421 -> 0430): the
  repeat asks the same question again, the acquirer matches the answer to the transaction it is
  waiting for, and ISO 8583:1987 defines no "answer to a repeat" MTI.
- An MTI that is no request's (``9999``, ``ABCD``, a response) has no answer MTI:
  :func:`response_mti` raises, and :func:`answer_mti` (what an error answer carries) gives it back
  as received, because an invented MTI would mislead the peer about what is being answered.
- The checks are on ``str`` and cheap: the server applies them to every frame, and
  :func:`response_mti` remembers what it derived (a bounded table: MTIs come from the wire).
"""

from __future__ import annotations

from isopace.iso8583.errors import Iso8583Error

__all__ = [
    "answer_mti",
    "is_advice",
    "is_repeat",
    "is_request",
    "is_response",
    "mti_problems",
    "original_mti",
    "response_mti",
]

_ANSWERS: dict[str, str] = {}


def mti_problems(mti: str) -> list[str]:
    """What is wrong with ``mti`` as an MTI (empty when nothing): four digits, version 0/1/2,
    class 1..9, function 0..5, origin 0..5. ``validate``'s ``mti`` rule; the server uses it to
    tell a request it can answer from bytes that only look like one."""
    if not (len(mti) == 4 and mti.isascii() and mti.isdigit()):
        return ["MTI must be four digits"]
    out = []
    if mti[0] not in "012":
        out.append(f"MTI version {mti[0]} is not 0, 1 or 2")
    if mti[1] == "0":
        out.append("MTI class 0 is reserved")
    if mti[2] not in "012345":
        out.append(f"MTI function {mti[2]} is not 0..5")
    if mti[3] not in "012345":
        out.append(f"MTI origin {mti[3]} is not 0..5")
    return out


def is_request(mti: str) -> bool:
    """True for four digits whose function digit wants an answer (request, advice,
    notification: 0, 2, 4), e.g. 0200, 0421. Says nothing of the other digits."""
    return len(mti) == 4 and mti.isascii() and mti.isdigit() and mti[2] in "024"


def is_response(mti: str) -> bool:
    """True for four digits whose function digit marks an answer (1, 3, 5), e.g. 0210, 0430."""
    return len(mti) == 4 and mti.isascii() and mti.isdigit() and mti[2] in "135"


def is_advice(mti: str) -> bool:
    """True for an advice or its answer (function digit 2 or 3: 0120, 0220, 0420, 0430): the
    sender reports what already happened and will repeat it until it is acknowledged."""
    return len(mti) == 4 and mti.isascii() and mti.isdigit() and mti[2] in "23"


def is_repeat(mti: str) -> bool:
    """True for a repeat (origin digit 1, 3 or 5: 0101, 0201, 0421): sent again because no
    answer came; the same transaction as its :func:`original_mti`."""
    return len(mti) == 4 and mti.isascii() and mti.isdigit() and mti[3] in "135"


def original_mti(mti: str) -> str:
    """The MTI of what a repeat repeats (0201 -> 0200, 0421 -> 0420); any other MTI as given."""
    if is_repeat(mti):
        return mti[:3] + chr(ord(mti[3]) - 1)
    return mti


def response_mti(mti: str) -> str:
    """The answer's MTI to a request: function digit + 1, a repeat answered as its original
    (0200 -> 0210, 0201 -> 0210, 0420 -> 0430). :class:`Iso8583Error` for an MTI that is no
    request's."""
    answer = _ANSWERS.get(mti)
    if answer is not None:
        return answer
    if not is_request(mti):
        raise Iso8583Error(f"MTI {mti!r} is not a request MTI")
    original = original_mti(mti)
    answer = original[:2] + chr(ord(original[2]) + 1) + original[3]
    if len(_ANSWERS) < 1024:
        _ANSWERS[mti] = answer
    return answer


def answer_mti(mti: str) -> str:
    """The MTI an error answer to a message of MTI ``mti`` carries: :func:`response_mti` for a
    request, ``mti`` itself for anything else (nothing can be derived from it)."""
    answer = _ANSWERS.get(mti)
    if answer is not None:
        return answer
    return response_mti(mti) if is_request(mti) else mti
