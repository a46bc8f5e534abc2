"""Child process of the cross-process duplicate tests.

``python -m tests.store.dup_child <store-spec> <keys> <start-at> <out-file>``: waits until the
wall-clock time ``start-at``, then runs one transaction per key (all at once) through a flow with
the idempotency store; the stage appends ``processed <key>`` to the out file each time it runs,
and every finished run appends ``<outcome> <key> <response DE 38>``.
Store specs: ``postgres:<dsn>#<schema>``, ``redis:<url>#<prefix>``, ``sqlite:<path>``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid

from isopace.flow import CONTINUE, Exchange, Flow
from isopace.iso8583 import Message
from tests.store.helpers import request


def open_store(spec: str) -> object:
    kind, _, rest = spec.partition(":")
    if kind == "postgres":
        from isopace.store import PostgresIdempotencyStore

        dsn, _, schema = rest.partition("#")
        return PostgresIdempotencyStore(dsn, schema=schema, lease=10, max_size=20)
    if kind == "redis":
        from isopace.store import RedisIdempotencyStore

        url, _, prefix = rest.partition("#")
        return RedisIdempotencyStore(url, prefix=prefix, lease=10)
    if kind == "sqlite":
        from isopace.store import SqliteIdempotencyStore

        return SqliteIdempotencyStore(rest, lease=10)
    raise ValueError(spec)


async def main(spec: str, keys: int, start_at: float, out_path: str) -> None:
    store = open_store(spec)
    if hasattr(store, "open"):
        await store.open()
    out = os.open(out_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    me = uuid.uuid4().hex[:8]

    class Process:
        name = "process"

        async def prepare(self, ex: Exchange) -> object:
            os.write(out, f"processed {ex.id}\n".encode())
            await asyncio.sleep(0.005)
            ex.response = Message("0210", {11: ex.request[11], 38: me, 39: "00"})
            return CONTINUE

    flow = Flow(idempotency=store, key=lambda ex: ex.id).group("main", Process())  # type: ignore[arg-type]

    async def one(i: int) -> None:
        ex = Exchange(f"key-{i}", request(i))
        outcome = await flow.run(ex)
        code = ex.response[38] if ex.response is not None else "-"
        os.write(out, f"{outcome.name} key-{i} {code}\n".encode())

    await asyncio.sleep(max(0.0, start_at - time.time()))
    await asyncio.gather(*(one(i) for i in range(keys)))
    await store.close()  # type: ignore[attr-defined]


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]))
