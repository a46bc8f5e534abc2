"""Idempotency: a duplicate request is answered with the outcome its first run stored.

The protocol is claim-based so that a durable backend can make it atomic (an ``INSERT ... ON
CONFLICT``, a Redis ``SET NX PX``):

- ``claim(key)`` returns ``None`` when the caller now owns the key (it runs the transaction, then
  calls ``complete`` or ``release``), or the :class:`Stored` answer of a finished run (the caller
  replays it). A stored answer may hold no response (``Stored.response`` is None): that is still
  an answer found, not a key to run again. While another run holds the claim, ``claim`` waits
  until it completes (and returns its answer) or releases (and tries to claim again). A claim
  has a lease, so the claim of an owner that died expires.
- ``complete(key, response, fingerprint)`` stores the answer (for the store's TTL): the
  response or None, and the request's fingerprint or None; then wakes the waiters.
- ``release(key)`` gives the key up without an answer (aborted without a response, cancelled);
  the waiters try to claim it again, so one of them runs the transaction.

What the flow stores, as the seed does and beyond it: the outcome of every committed
transaction, with its response or without one (a stage need not build a response: its
retransmission is still replayed, never run again, so its commits never run twice), and a
decline (a stage set the response and called ``ex.abort()``), since a retransmitted declined
request must get the same decline. Any other aborted run is released, so a retransmission is
processed afresh.

Duplicates by content: a key says which requests are retransmissions of one another, but keys
are made of a few fields (a terminal and a trace number) that another request may reuse. With a
``fingerprint`` function (:data:`FingerprintFunc`, chosen by the caller like the key: a digest
of what makes the request the transaction it is) the answer keeps the request's fingerprint, and
a duplicate whose fingerprint differs is neither replayed nor run: the flow ends it with
:class:`~isopace.flow.errors.FingerprintMismatchError` on ``ex.error`` and no response, and the
caller decides what it gets (the host declines it 94). A fingerprint function may also have a
``matches(ex, stored)`` method, asked before a stored fingerprint that differs is called a
mismatch (the host's fingerprints are keyed, and one made under a key rotated out since is
checked under that key). A stored answer without a fingerprint (stored by a flow without one)
is replayed as before. A fingerprint is stored as given, so it must hold no card data in clear
(a keyed hash, never a plain hash of a card number: a million guesses reverse that).

A durable store keeps the response without card data (``isopace.store.stored_json``: card fields
dropped, a card number in another field masked, each named in ``redacted``); on replay the flow
fills each field named in ``stored.redacted`` back from the duplicate's own request, which
carries the same card data.

``MemoryStore`` is the single-process store: bounded (least recently used entries go first)
with a TTL. Messages are immutable, so it stores and returns them as they are.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeAlias

from isopace.flow.exchange import Exchange

if TYPE_CHECKING:
    from isopace.iso8583 import Message

KeyFunc: TypeAlias = Callable[[Exchange], "str | None"]
"""Derives the idempotency key of an exchange; ``None``: this exchange is not idempotent."""

FingerprintFunc: TypeAlias = Callable[[Exchange], "str | None"]
"""Derives the fingerprint of an exchange's request (see the module documentation); ``None``:
nothing to compare, a stored answer is replayed."""

FINGERPRINT_PROPERTY = "idempotency.fingerprint"
"""The durable property under which a journalled run keeps its request's fingerprint, so that
crash recovery can store it with the answer of a transaction it finishes."""


@dataclass(frozen=True, slots=True)
class Stored:
    """The answer a finished run left under a key: its response (None: it built none, and a
    duplicate is still replayed, not run again) and its request's fingerprint (None: none
    was taken)."""

    response: Message | None
    fingerprint: str | None = None


class IdempotencyStore(Protocol):
    """Remembers answers by key; see the module documentation for the claim protocol."""

    async def claim(self, key: str) -> Stored | None: ...

    async def complete(
        self, key: str, response: Message | None, fingerprint: str | None = None
    ) -> None: ...

    async def release(self, key: str) -> None: ...


class _Claim:
    __slots__ = ("expires", "waiters")

    def __init__(self, expires: float) -> None:
        self.expires = expires
        self.waiters: asyncio.Future[None] | None = None


class MemoryStore:
    """In-process ``IdempotencyStore``: at most ``max_entries`` stored answers, each kept for
    ``ttl`` seconds; a claim not completed or released within ``lease`` seconds expires.

    Not shared between processes: use a durable store for that.
    """

    def __init__(
        self,
        max_entries: int = 100_000,
        ttl: float = 24 * 3600.0,
        *,
        lease: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise ValueError("flow: MemoryStore max_entries must be at least 1")
        if ttl <= 0 or lease <= 0:
            raise ValueError("flow: MemoryStore ttl and lease must be positive")
        self.max_entries = max_entries
        self.ttl = ttl
        self.lease = lease
        self._clock = clock
        self._done: OrderedDict[str, tuple[float, Stored]] = OrderedDict()
        self._claims: dict[str, _Claim] = {}

    async def claim(self, key: str) -> Stored | None:
        while True:
            now = self._clock()
            entry = self._done.get(key)
            if entry is not None:
                if entry[0] > now:
                    self._done.move_to_end(key)
                    return entry[1]
                del self._done[key]
            held = self._claims.get(key)
            if held is None or held.expires <= now:
                if held is not None:
                    _wake(held)
                self._claims[key] = _Claim(now + self.lease)
                return None
            if held.waiters is None:
                held.waiters = asyncio.get_running_loop().create_future()
            # asyncio.wait neither cancels the shared future when this waiter is cancelled nor
            # raises on timeout: the loop above then re-checks (the lease may have expired).
            await asyncio.wait((held.waiters,), timeout=max(held.expires - now, 0.0))

    async def complete(
        self, key: str, response: Message | None, fingerprint: str | None = None
    ) -> None:
        self._done[key] = (self._clock() + self.ttl, Stored(response, fingerprint))
        self._done.move_to_end(key)
        while len(self._done) > self.max_entries:
            self._done.popitem(last=False)
        held = self._claims.pop(key, None)
        if held is not None:
            _wake(held)

    async def release(self, key: str) -> None:
        held = self._claims.pop(key, None)
        if held is not None:
            _wake(held)

    def __len__(self) -> int:
        return len(self._done)

    def __contains__(self, key: object) -> bool:
        entry = self._done.get(key)  # type: ignore[call-overload]
        return entry is not None and entry[0] > self._clock()


def _wake(claim: _Claim) -> None:
    waiters = claim.waiters
    if waiters is not None and not waiters.done():
        waiters.set_result(None)


def refill(stored: Message, request: Message) -> Message:
    """``stored`` with each field it lost to redaction (``stored.redacted``) taken back from
    ``request``; ``stored`` itself when nothing was redacted."""
    redacted = getattr(stored, "redacted", None)
    if not redacted:
        return stored
    values = {}
    for field in sorted(redacted):
        value = request.get(field)
        if value is not None:
            values[field] = value
    return stored.set_many(values) if values else stored
