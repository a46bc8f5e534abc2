"""Idempotency claims in Redis (redis-py asyncio), shared by several nodes.

``redis`` is imported here only: install ``isopace[redis]``.

One Redis key per idempotency key, ``<prefix>k:<key>``, holding either ``C<owner>`` (a claim, with
the lease as its expiry) or the answer, with the TTL as its expiry:
``A<n>:<fingerprint><response JSON>``, where ``<n>`` is the fingerprint's length in characters
(empty: no fingerprint) and the response is protected by
:func:`isopace.store.protect.stored_json` (empty: the run committed without a response, an answer
that is still replayed); an earlier version's ``R<response JSON>`` is read as an answer without a
fingerprint. Redis expires both by
itself: a crashed owner's claim disappears ``lease`` seconds after its last renewal; nothing needs
purging.

- ``claim``: ``SET k C<owner> NX PX lease`` -- atomic on the server, so exactly one node gets a
  free key. Otherwise ``GET k``: an answer is replayed; a claim is waited for.
- ``complete`` / ``release`` are Lua scripts (atomic check of the owner, then ``SET ... PX ttl``
  or ``DEL``) that ``PUBLISH`` the key on ``<prefix>done``.
- Waiters: each store holds one pub/sub subscription (one connection) to ``<prefix>done`` and
  wakes its local waiters of the published key, which re-check at once. No busy polling: a waiter
  only re-checks on a notification, at the holder's lease expiry, or every ``recheck`` seconds as
  a safety net (after a lost connection the subscription is re-established and every waiter
  re-checks, since notifications may have been missed).
- Live claims' leases are renewed in the background (every ``lease / 3``) by a script that checks
  the owner.

A pooled connection found dead (server restarted, connection killed) is reconnected and the
command retried (a few times, with back-off; every command here is safe to repeat, and a claim
whose reply was lost is recognised by its owner token). Errors that persist (server down) raise
:class:`IdempotencyError`. Redis keeps claims and responses only as durably as it is
configured to (``appendonly yes`` with ``appendfsync always`` to survive a Redis crash).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import TracebackType
from typing import TYPE_CHECKING, Self

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from isopace._cardtext import error_text
from isopace.store._answer import stored_answer
from isopace.store._background import stop_tasks
from isopace.store._owners import OwnerTokens
from isopace.store.errors import IdempotencyError, LeaseLostError
from isopace.store.protect import stored_json
from isopace.store.records import default_node

if TYPE_CHECKING:
    from isopace.flow import Stored
    from isopace.iso8583 import Message

__all__ = ["RedisIdempotencyStore"]

log = logging.getLogger("isopace.store")

_COMPLETE = """
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, 1) == 'C' and v ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('DEL', KEYS[1])
    redis.call('PUBLISH', ARGV[2], ARGV[3])
    return 1
end
return 0
"""

_RENEW = """
local n = 0
for i, k in ipairs(KEYS) do
    if redis.call('GET', k) == ARGV[i + 1] then
        redis.call('PEXPIRE', k, ARGV[1])
        n = n + 1
    end
end
return n
"""

_ERRORS = (RedisError, OSError, asyncio.TimeoutError)


def _answer(value: str) -> Stored:
    """A stored answer's value (see the module docstring) read back."""
    if value[0] == "R":  # an earlier version's: a response, no fingerprint
        return stored_answer(value[1:], None)
    length, _, rest = value[1:].partition(":")
    if not length:
        return stored_answer(rest or None, None)
    n = int(length)
    return stored_answer(rest[n:] or None, rest[:n])


class RedisIdempotencyStore:
    """The flow's ``IdempotencyStore`` protocol on Redis (see the module docstring).

    ``url_or_client``: a ``redis://`` URL (the store then owns its client) or a
    ``redis.asyncio.Redis``; ``prefix`` namespaces the keys and the channel. An owned client
    uses a blocking pool of ``max_connections`` (callers wait for a free connection).
    """

    def __init__(
        self,
        url_or_client: str | aioredis.Redis,
        *,
        prefix: str = "isopace:idem:",
        ttl: float = 24 * 3600.0,
        lease: float = 30.0,
        recheck: float = 1.0,
        node: str | None = None,
        max_connections: int = 50,
    ) -> None:
        if ttl <= 0 or lease <= 0:
            raise ValueError("ttl and lease must be positive")
        if isinstance(url_or_client, str):
            pool = aioredis.BlockingConnectionPool.from_url(
                url_or_client,
                max_connections=max_connections,
                timeout=10,
                client_name=f"isopace-idem-{prefix.strip(':')}",
                # a pooled connection found dead (server restarted, CLIENT KILL) is reconnected
                # and the command retried; every command here is safe to repeat
                retry=Retry(ExponentialBackoff(cap=0.5, base=0.01), 3),
                retry_on_error=[RedisConnectionError, RedisTimeoutError],
            )
            self._client: aioredis.Redis = aioredis.Redis(connection_pool=pool)
            self._owns_client = True
        else:
            self._client = url_or_client
            self._owns_client = False
        self.prefix = prefix
        self.ttl = ttl
        self.lease = lease
        self._recheck = recheck
        self._node = node if node is not None else default_node()
        self._owners = OwnerTokens(self._node)
        self._channel = f"{prefix}done"
        self._complete = self._client.register_script(_COMPLETE)
        self._release = self._client.register_script(_RELEASE)
        self._renew = self._client.register_script(_RENEW)
        self._held: dict[str, str] = {}
        self._waiters: dict[str, list[asyncio.Event]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._subscribed = asyncio.Event()
        self._closed = False

    def _key(self, key: str) -> str:
        return f"{self.prefix}k:{key}"

    def _error(self, what: str, key: str, exc: BaseException) -> IdempotencyError:
        err = IdempotencyError(f"redis idempotency {self.prefix!r}: {what} of key {key!r}: {exc}")
        err.__cause__ = exc
        return err

    # -- background: subscription and lease renewal ---------------------------------------------

    def _start(self) -> None:
        if self._closed:
            raise IdempotencyError(f"redis idempotency {self.prefix!r}: closed")
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._listen()), loop.create_task(self._maintain())]

    async def _listen(self) -> None:
        delay = 0.05
        while not self._closed:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel)
                self._subscribed.set()
                delay = 0.05
                self._wake_all()  # anything published while not subscribed was missed
                while True:
                    message = await pubsub.get_message(timeout=None)
                    if message is not None and message.get("type") == "message":
                        data = message["data"]
                        key = data.decode() if isinstance(data, bytes) else str(data)
                        self._wake(key)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._subscribed.clear()
                self._wake_all()
                if self._closed:
                    break
                log.warning(
                    "idempotency: redis subscription lost (%s); reconnecting", error_text(exc)
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def _maintain(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.lease / 3)
            if not self._held:
                continue
            items = list(self._held.items())
            try:
                await self._renew(
                    keys=[self._key(k) for k, _ in items],
                    args=[int(self.lease * 1000), *(f"C{o}" for _, o in items)],
                )
            except _ERRORS as exc:
                log.warning("idempotency: renewing leases failed: %s", error_text(exc))

    def _wake(self, key: str) -> None:
        for event in self._waiters.pop(key, ()):
            event.set()

    def _wake_all(self) -> None:
        waiters, self._waiters = self._waiters, {}
        for events in waiters.values():
            for event in events:
                event.set()

    # -- the IdempotencyStore protocol ----------------------------------------------------------

    async def claim(self, key: str) -> Stored | None:
        """Claim ``key`` (None: the caller owns it), or get the stored answer to replay."""
        self._start()
        rkey = self._key(key)
        while True:
            event = asyncio.Event()
            self._waiters.setdefault(key, []).append(event)  # before the check: no lost wake-up
            try:
                if key in self._held:  # a run of this process holds it
                    timeout = self._recheck
                else:
                    owner = self._owners.next()
                    try:
                        got = await self._client.set(
                            rkey, f"C{owner}", nx=True, px=int(self.lease * 1000)
                        )
                        if got:
                            self._held[key] = owner
                            return None
                        value, pttl = await self._peek(rkey)
                    except _ERRORS as exc:
                        raise self._error("claim", key, exc) from exc
                    if value is None:
                        continue  # released or expired meanwhile: try again at once
                    if value == f"C{owner}".encode():  # our SET succeeded, its reply was lost
                        self._held[key] = owner
                        return None
                    if value[:1] in (b"A", b"R"):
                        return _answer(value.decode())
                    timeout = min(max(pttl, 0) / 1000 + 0.005, self._recheck)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), timeout)
            finally:
                events = self._waiters.get(key)
                if events is not None and event in events:
                    events.remove(event)
                    if not events:
                        del self._waiters[key]

    async def _peek(self, rkey: str) -> tuple[bytes | None, int]:
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.get(rkey)
            pipe.pttl(rkey)
            value, pttl = await pipe.execute()
        if isinstance(value, str):
            value = value.encode()
        return value, int(pttl)

    async def complete(
        self, key: str, response: Message | None, fingerprint: str | None = None
    ) -> None:
        """Store the answer for ``key`` (for ``ttl``) and notify every node's waiters."""
        owner = self._held.get(key)
        answer = "A:" if fingerprint is None else f"A{len(fingerprint)}:{fingerprint}"
        if response is not None:
            answer += stored_json(response)
        try:
            ok = await self._complete(
                keys=[self._key(key)],
                args=[
                    f"C{owner}" if owner else "",
                    answer,
                    int(self.ttl * 1000),
                    self._channel,
                    key,
                ],
            )
        except _ERRORS as exc:
            raise self._error("complete", key, exc) from exc
        finally:
            if self._held.get(key) == owner:
                self._held.pop(key, None)
            self._wake(key)
        if not ok:
            raise LeaseLostError(key)

    async def release(self, key: str) -> None:
        """Give the claim on ``key`` up; waiters (on any node) try to claim it again."""
        owner = self._held.pop(key, None)
        try:
            if owner is not None:
                await self._release(keys=[self._key(key)], args=[f"C{owner}", self._channel, key])
        except _ERRORS as exc:
            raise self._error("release", key, exc) from exc
        finally:
            self._wake(key)

    # -- life cycle -----------------------------------------------------------------------------

    async def ping(self) -> None:
        """Check the server answers (raises IdempotencyError)."""
        try:
            await self._client.ping()
        except _ERRORS as exc:
            raise self._error("ping", "*", exc) from exc

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await stop_tasks(self._tasks)
        self._wake_all()
        if self._owns_client:
            with contextlib.suppress(Exception):
                await self._client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
