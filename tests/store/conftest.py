"""Fixtures for the store tests: real PostgreSQL and Redis on 127.0.0.1 (never skipped: a test
that needs a service fails loudly when it is down; ``.ci/run`` starts them)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from tests.store.helpers import PG_HOST, REDIS_URL, pg_dsn


@pytest.fixture
async def pg() -> AsyncIterator[tuple[str, str]]:
    """(dsn, schema): a fresh schema, dropped after the test."""
    import asyncpg

    dsn = await pg_dsn()
    schema = f"t_{uuid.uuid4().hex[:12]}"
    yield dsn, schema
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await conn.close()


@pytest.fixture
async def redis_prefix() -> AsyncIterator[tuple[str, str]]:
    """(url, prefix): a unique key prefix, its keys deleted after the test."""
    import redis.asyncio as aioredis

    prefix = f"isopace-test:{uuid.uuid4().hex[:12]}:"
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except Exception as exc:
        pytest.fail(f"Redis is not reachable at {REDIS_URL}: {exc}")
    yield REDIS_URL, prefix
    keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


__all__ = ["PG_HOST"]
