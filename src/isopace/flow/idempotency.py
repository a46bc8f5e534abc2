"""Idempotency: a duplicate request is answered with the response its first run produced.

The protocol is claim-based so that a durable backend can make it atomic (an ``INSERT ... ON
CONFLICT``, a Redis ``SET NX PX``):

- ``claim(key)`` returns ``None`` when the caller now owns the key (it runs the transaction, then
  calls ``complete`` or ``release``), or the stored response of a finished run (the caller
  replays it). While another run holds the claim, ``claim`` waits until it completes (and
  returns its response) or releases (and tries to claim again). A claim has a lease, so the
  claim of an owner that died expires.
- ``complete(key, response)`` stores the response (for the store's TTL) and wakes the waiters.
- ``release(key)`` gives the key up without a response (aborted without one, cancelled); the
  waiters try to claim it again, so one of them runs the transaction.

The flow stores the response of a committed transaction and of a declined one (a stage set
the response and called ``ex.abort()``); any other aborted run is released, so a retransmission
is processed afresh. A durable store keeps
the response without card data (``isopace.store.stored_json``: card fields dropped, a card
number in another field masked, each named in ``redacted``); on replay the flow fills each
field named in ``stored.redacted`` back from the duplicate's own request, which carries the
same card data.

``MemoryStore`` is the single-process store: bounded (least recently used entries go first)
with a TTL. Messages are immutable, so it stores and returns them as they are.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

from isopace.flow.exchange import Exchange

if TYPE_CHECKING:
    from isopace.iso8583 import Message

KeyFunc: TypeAlias = Callable[[Exchange], "str | None"]
"""Derives the idempotency key of an exchange; ``None``: this exchange is not idempotent."""


class IdempotencyStore(Protocol):
    """Remembers responses by key; see the module documentation for the claim protocol."""

    async def claim(self, key: str) -> Message | None: ...

    async def complete(self, key: str, response: Message) -> None: ...

    async def release(self, key: str) -> None: ...


class _Claim:
    __slots__ = ("expires", "waiters")

    def __init__(self, expires: float) -> None:
        self.expires = expires
        self.waiters: asyncio.Future[None] | None = None


class MemoryStore:
    """In-process ``IdempotencyStore``: at most ``max_entries`` stored responses, each kept for
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
        self._done: OrderedDict[str, tuple[float, Any]] = OrderedDict()
        self._claims: dict[str, _Claim] = {}

    async def claim(self, key: str) -> Message | None:
        while True:
            now = self._clock()
            entry = self._done.get(key)
            if entry is not None:
                if entry[0] > now:
                    self._done.move_to_end(key)
                    response: Message = entry[1]
                    return response
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

    async def complete(self, key: str, response: Message) -> None:
        self._done[key] = (self._clock() + self.ttl, response)
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
