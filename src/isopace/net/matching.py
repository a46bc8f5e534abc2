"""Sans-IO request/response matching.

A :class:`Matcher` remembers the requests in flight on one connection by a *key* computed from the
message, and hands back the waiting token (a future, in the asyncio client) when the response with
the same key arrives. It has no clock and no I/O: deadlines are numbers the caller passes in and
:meth:`Matcher.expire` removes the entries whose deadline has passed.

Decisions:

- The key function is applied to the request and to the response alike, so it must use fields the
  response echoes. Default :func:`stan_terminal_key` (DE 11 systems trace audit number + DE 41 card
  acceptor terminal id; DE 41 may be absent, as in 0800 network messages); :func:`rrn_key`
  (DE 37 retrieval reference number) is the alternative. A key function returns None when the
  message has no key: a request then is refused with :class:`MatchKeyError`, a response is
  unmatched.
- A second request with a key already in flight is refused with :class:`DuplicateKeyError`
  (a response could not tell them apart).
- Entries leave on match, on :meth:`remove` (a timeout or a cancelled caller) and on
  :meth:`expire`; :meth:`drain` empties the matcher when the connection is lost.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Generic, TypeVar

from isopace.net.errors import DuplicateKeyError, MatchKeyError

if TYPE_CHECKING:
    from isopace.iso8583 import Message

__all__ = ["KeyFunc", "Matcher", "rrn_key", "stan_terminal_key"]

KeyFunc = Callable[["Message"], Hashable | None]
"""Computes a message's matching key; None when the message has none."""

T = TypeVar("T")


def stan_terminal_key(message: Message) -> Hashable | None:
    """DE 11 (STAN) and DE 41 (terminal id, None when absent); None without DE 11."""
    stan = message.get(11)
    if stan is None:
        return None
    return (stan, message.get(41))


def rrn_key(message: Message) -> Hashable | None:
    """DE 37 (retrieval reference number); None without it."""
    rrn: Hashable | None = message.get(37)
    return rrn


class Matcher(Generic[T]):
    """Requests in flight on one connection, by key. ``T`` is whatever the caller waits on."""

    __slots__ = ("_deadlines", "_entries", "key")

    def __init__(self, key: KeyFunc = stan_terminal_key) -> None:
        self.key = key
        self._entries: dict[Hashable, tuple[T, float | None]] = {}
        self._deadlines: list[tuple[float, int, Hashable]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def request_key(self, request: Message) -> Hashable:
        """The key of ``request``; raises :class:`MatchKeyError` if it has none."""
        key = self.key(request)
        if key is None:
            raise MatchKeyError(
                f"message {request.mti} has no matching key (the key function "
                f"{getattr(self.key, '__name__', self.key)!s} found none)"
            )
        return key

    def add(self, request: Message, token: T, deadline: float | None = None) -> Hashable:
        """Register ``request`` as in flight and return its key. Raises :class:`MatchKeyError`
        without a key and :class:`DuplicateKeyError` if the key is already in flight."""
        key = self.request_key(request)
        self.add_key(key, token, deadline)
        return key

    def add_key(self, key: Hashable, token: T, deadline: float | None = None) -> None:
        """Register an already computed key (see :meth:`add`)."""
        if key in self._entries:
            raise DuplicateKeyError(key)
        self._entries[key] = (token, deadline)
        if deadline is not None:
            heap = self._deadlines
            if len(heap) > 2 * len(self._entries) + 64:
                # Matched entries leave stale heap items behind: rebuild from the live ones.
                heap[:] = [(d, id(t), k) for k, (t, d) in self._entries.items() if d is not None]
                heapq.heapify(heap)
            heapq.heappush(heap, (deadline, id(token), key))

    def match(self, response: Message) -> T | None:
        """Remove and return the token waiting for ``response``, or None if nothing waits."""
        key = self.key(response)
        if key is None:
            return None
        entry = self._entries.pop(key, None)
        return None if entry is None else entry[0]

    def remove(self, key: Hashable) -> T | None:
        """Remove the entry of ``key`` (timeout, cancelled caller); its token or None."""
        entry = self._entries.pop(key, None)
        return None if entry is None else entry[0]

    def next_deadline(self) -> float | None:
        """The earliest deadline still pending, or None."""
        heap = self._deadlines
        entries = self._entries
        while heap:
            deadline, ident, key = heap[0]
            entry = entries.get(key)
            if entry is not None and entry[1] == deadline and id(entry[0]) == ident:
                return deadline
            heapq.heappop(heap)
        return None

    def expire(self, now: float) -> list[tuple[Hashable, T]]:
        """Remove and return the entries whose deadline is at or before ``now``."""
        out: list[tuple[Hashable, T]] = []
        heap = self._deadlines
        entries = self._entries
        while heap and heap[0][0] <= now:
            deadline, ident, key = heapq.heappop(heap)
            entry = entries.get(key)
            if entry is not None and entry[1] == deadline and id(entry[0]) == ident:
                del entries[key]
                out.append((key, entry[0]))
        return out

    def drain(self) -> list[tuple[Hashable, T]]:
        """Remove and return every entry (the connection is gone)."""
        out = [(key, token) for key, (token, _) in self._entries.items()]
        self._entries.clear()
        self._deadlines.clear()
        return out
