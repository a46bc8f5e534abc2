"""Retrying a stage's prepare.

``retry(stage, RetryPolicy(...))`` wraps a stage so its prepare is tried again after a transient
failure. It stops on success, when the prepare called ``ex.abort()`` (a decision, not a
transient failure), on an error the policy says is not retryable, and after the last attempt;
then the last error propagates as the prepare's own. ``backoff(n)`` gets the 1-based number of
the attempt that just failed. The wait is an ``asyncio.sleep`` on the run's task, so the run's
deadline and a cancellation interrupt it. The wrapper keeps the inner stage's name, and forwards
``commit``, ``abort`` and ``recover`` (each run once, as the inner stage defines them).

Retrying a prepare assumes it is safe to repeat: keep effects that must happen once in commit.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from isopace.flow._resolve import is_async
from isopace.flow.exchange import Exchange
from isopace.flow.result import Result

_log = logging.getLogger("isopace.flow")


def fixed_backoff(seconds: float) -> Callable[[int], float]:
    """The same delay after every failed attempt."""
    if seconds < 0:
        raise ValueError("flow: backoff must not be negative")

    def backoff(attempt: int) -> float:
        return seconds

    return backoff


def exponential_backoff(
    base: float = 0.05, factor: float = 2.0, maximum: float = 2.0, jitter: bool = True
) -> Callable[[int], float]:
    """``base * factor ** (attempt - 1)`` capped at ``maximum``; with ``jitter`` a uniformly
    random delay between zero and that ("full jitter"), which spreads retries of many runs."""
    if base < 0 or factor < 1 or maximum < 0:
        raise ValueError("flow: exponential_backoff needs base >= 0, factor >= 1, maximum >= 0")

    def backoff(attempt: int) -> float:
        delay = min(maximum, base * factor ** (attempt - 1))
        return random.uniform(0.0, delay) if jitter else delay

    return backoff


def _always(error: BaseException) -> bool:
    return True


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How to retry a prepare: at most ``max_attempts`` attempts in all (the first included),
    waiting ``backoff(n)`` seconds after failed attempt ``n``, only for errors ``retryable``
    accepts. Defaults: 3 attempts, a fixed 50 ms, every error."""

    max_attempts: int = 3
    backoff: Callable[[int], float] = field(default=fixed_backoff(0.05))
    retryable: Callable[[BaseException], bool] = field(default=_always)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("flow: RetryPolicy max_attempts must be at least 1")


class RetryStage:
    """A stage whose prepare is retried per policy; made by :func:`retry`."""

    name: str
    commit: Callable[[Exchange], Any]
    abort: Callable[[Exchange], Any]
    recover: Callable[[Exchange, bool], Any]

    def __init__(self, inner: Any, policy: RetryPolicy) -> None:
        name = getattr(inner, "name", None)
        prepare = getattr(inner, "prepare", None)
        if not isinstance(name, str) or not name or not callable(prepare):
            raise TypeError(f"flow: retry() needs a stage (name and prepare), got {inner!r}")
        self.name = name
        self.inner = inner
        self.policy = policy
        self._prepare = prepare
        self._prepare_async = is_async(prepare)
        for attr in ("commit", "abort", "recover"):
            method = getattr(inner, attr, None)
            if method is not None:
                setattr(self, attr, method)

    async def prepare(self, ex: Exchange) -> Result | None:
        policy = self.policy
        attempt = 1
        while True:
            try:
                result = self._prepare(ex)
                if self._prepare_async:
                    result = await result
                return result  # type: ignore[no-any-return]
            except Exception as exc:
                if ex.aborted or attempt >= policy.max_attempts or not policy.retryable(exc):
                    raise
                delay = policy.backoff(attempt)
                _log.info(
                    "flow: retrying stage %s after attempt %d failed: %s",
                    self.name,
                    attempt,
                    type(exc).__name__,
                    extra={
                        "stage": self.name,
                        "exchange_id": ex.id,
                        "attempt": attempt,
                        "delay": delay,
                    },
                )
            if delay > 0:
                await asyncio.sleep(delay)
            attempt += 1

    def __repr__(self) -> str:
        return f"retry({self.inner!r}, {self.policy!r})"


def retry(stage: Any, policy: RetryPolicy | None = None) -> RetryStage:
    """Wrap ``stage`` so its prepare is retried per ``policy`` (default ``RetryPolicy()``)."""
    return RetryStage(stage, policy or RetryPolicy())
