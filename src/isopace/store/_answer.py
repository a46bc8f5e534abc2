"""A stored idempotency answer read back: one reading for every backend.

Each backend keeps an answer as the protected response JSON (``stored_json``; NULL for a run
that committed without a response) and the request's fingerprint (NULL without one). Reading it
back is the same everywhere, so it is written once: a ``Stored`` even when there is no response,
since the flow replays such an answer rather than run its transaction again.
"""

from __future__ import annotations

from isopace.flow import Stored


def stored_answer(response_json: str | bytes | None, fingerprint: str | bytes | None) -> Stored:
    """The ``Stored`` answer of a row: the response rebuilt (card data refilled on replay from
    the duplicate's request, see ``isopace.flow.refill``), the fingerprint as stored."""
    response = None
    if response_json is not None:
        from isopace.iso8583 import Message

        if isinstance(response_json, bytes):
            response_json = response_json.decode()
        response = Message.from_json(response_json)
    if isinstance(fingerprint, bytes):
        fingerprint = fingerprint.decode()
    return Stored(response, fingerprint)
