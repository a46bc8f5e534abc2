"""How a request that failed is answered: the fields an answer echoes, the response code an
error maps to, and the one function that builds the error answer. The server (a frame that does
not decode, a request that fails validation, a handler that raised) and the host (a decline, a
transaction that failed) answer through it, so every answer a peer gets is built alike.

Decisions:

- :data:`ECHO_FIELDS` (defined beside :meth:`Message.reply`, which copies them by default, and
  re-exported here) are the request's fields an answer carries back (those the acquirer matches
  the answer by, DE 11 and 41 among them, and those it checks: DE 2, 3, 4, 49, a reversal's
  DE 90 and 95...).
  :meth:`Message.reply` copies them; :func:`error_reply` too.
- An error answer echoes only what was located reliably. A decoded message's fields were all
  located by the spec (every length read, the frame's bytes accounted for), so each echo field
  that decodes is echoed and one that does not is left out. The fields :meth:`Spec.decode_partial`
  recovers from a frame that does not decode are, by its rule, only those whose position does
  not depend on the bytes in doubt. A value read past a failure is never echoed: a misread DE 11
  could pair the answer with another transaction the acquirer has in flight, which is worse
  than an answer it cannot pair.
- Each error of this layer names the response code it maps to (:attr:`Iso8583Error.response_code`),
  as a protocol error carries the status to answer with: bad input from the peer (a field that
  does not decode, a value that is not an amount, an MTI no request has) is 30, format error; a
  message this side built and cannot encode is 96, system malfunction. :func:`response_code_for`
  turns any exception into DE 39: 96 for anything that is not this layer's.
- The answer's MTI is :func:`isopace.iso8583.mti.answer_mti`: an MTI that is no request's is
  answered as received. The answer keeps the request's header.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from isopace.iso8583 import response_codes as rc
from isopace.iso8583.errors import Iso8583Error
from isopace.iso8583.message import ECHO_FIELDS, Message
from isopace.iso8583.mti import answer_mti

if TYPE_CHECKING:
    from isopace.iso8583.message import Value

__all__ = ["ECHO_FIELDS", "error_reply", "response_code_for"]


def response_code_for(exc: BaseException) -> str:
    """DE 39 for a request that failed with ``exc``: the code an :class:`Iso8583Error` names
    (30 for the peer's bad input, 96 for a message this side cannot encode), 96 otherwise."""
    if isinstance(exc, Iso8583Error):
        return exc.response_code
    return rc.SYSTEM_MALFUNCTION


def error_reply(request: Message, code: str) -> Message:
    """The answer to ``request`` with DE 39 = ``code``: its :data:`ECHO_FIELDS` that decode, the
    MTI from :func:`~isopace.iso8583.mti.answer_mti`, the request's header.

    For a decoded request whose echo fields all decode this is ``request.reply()`` (the echoed
    values copied as bytes when encoded with the same spec); otherwise the fields that decode
    are copied one by one and the others left out."""
    mti = answer_mti(request.mti)
    try:
        return request.reply(mti).set(39, code)
    except Iso8583Error:
        pass
    fields: dict[int, Value] = {}
    for n in ECHO_FIELDS:
        try:
            value = request.get(n)
        except Iso8583Error:
            continue
        if value is not None:
            fields[n] = value
    fields[39] = code
    return Message(mti, fields, header=request.header)
