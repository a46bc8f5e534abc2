"""A pool of client connections to one or several hosts.

Decisions: every connection is a :class:`Client` with the same options, ``size`` connections per
address. A request goes to the connected client with the fewest requests in flight (round robin
among equals); when none is connected it waits for one within its own timeout. The pool refuses a
key already in flight on any of its connections, since the host side may share state across them.
Clients that cannot connect keep retrying in the background (backoff and jitter) while the others
serve; :meth:`ClientPool.connect` fails (and stops them) only when none connects in time. A
request that fails is not re-sent elsewhere: the caller decides (the host may have processed it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from isopace.net.client import Client
from isopace.net.errors import DuplicateKeyError, MatchKeyError, NotConnectedError
from isopace.net.matching import KeyFunc, stan_terminal_key

if TYPE_CHECKING:
    from isopace.iso8583 import Message, Spec

__all__ = ["ClientPool"]


class ClientPool:
    """``ClientPool(spec, [(host, port), ...], size=2, **client_options)``."""

    def __init__(
        self,
        spec: Spec,
        addresses: Sequence[tuple[str, int]],
        *,
        size: int = 1,
        key: KeyFunc = stan_terminal_key,
        timeout: float = 30.0,
        **client_options: Any,
    ) -> None:
        if not addresses:
            raise ValueError("a pool needs at least one address")
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size}")
        self.key = key
        self.timeout = timeout
        self.clients: list[Client] = [
            Client(spec, host=host, port=port, key=key, timeout=timeout, **client_options)
            for host, port in addresses
            for _ in range(size)
        ]
        self._keys: set[Hashable] = set()
        self._next = 0
        self._stan = 0

    @property
    def connected(self) -> int:
        """How many connections are up."""
        return sum(1 for c in self.clients if c.connected)

    @property
    def in_flight(self) -> int:
        return len(self._keys)

    def next_stan(self) -> str:
        """The next systems trace audit number, unique across the pool's connections."""
        self._stan = self._stan % 999999 + 1
        return f"{self._stan:06d}"

    async def connect(self, timeout: float | None = None) -> None:
        """Start every connection; return when at least one is up. If none is up within
        ``timeout`` (default: the clients' connect timeout), stop them all and raise
        :class:`NotConnectedError`."""
        for client in self.clients:
            client.start()
        if timeout is None:
            timeout = self.clients[0].connect_timeout
        try:
            await self._wait_any(asyncio.get_running_loop().time() + timeout, timeout)
        except NotConnectedError:
            await self.close()
            raise

    async def _wait_any(self, deadline: float, timeout: float) -> Client:
        loop = asyncio.get_running_loop()
        while True:
            client = self._pick()
            if client is not None:
                return client
            left = deadline - loop.time()
            if left <= 0:
                raise NotConnectedError(
                    f"no connection to {', '.join(sorted({c.address for c in self.clients}))} "
                    f"within {timeout:g} s"
                )
            waiters = [loop.create_task(c.wait_connected()) for c in self.clients]
            try:
                await asyncio.wait(waiters, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
                await asyncio.gather(*waiters, return_exceptions=True)

    def _pick(self) -> Client | None:
        clients = self.clients
        n = len(clients)
        best: Client | None = None
        start = self._next
        for i in range(n):
            client = clients[(start + i) % n]
            if client.connected and (best is None or client.in_flight < best.in_flight):
                best = client
        self._next = (start + 1) % n
        return best

    async def request(self, message: Message, *, timeout: float | None = None) -> Message:
        """Send ``message`` on the least loaded connection and return the matching response."""
        if timeout is None:
            timeout = self.timeout
        key = self.key(message)
        if key is None:
            raise MatchKeyError(f"message {message.mti} has no matching key")
        if key in self._keys:
            raise DuplicateKeyError(key)
        self._keys.add(key)
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            client = self._pick() or await self._wait_any(deadline, timeout)
            return await client.request(message, timeout=max(deadline - loop.time(), 0.0))
        finally:
            self._keys.discard(key)

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clients))

    async def __aenter__(self) -> ClientPool:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
