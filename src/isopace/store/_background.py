"""Stopping a store's background tasks (lease renewal, purge, listeners) when it closes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable


async def stop_tasks(tasks: Iterable[asyncio.Task[object]]) -> None:
    """Cancel every task, then wait for each; what they end with is not the closer's concern."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
