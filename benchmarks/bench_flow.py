"""isopace.flow overhead against calling the same stage methods directly, in the same run.

Run: ``./scripts/bench flow`` (= ``python -m benchmarks flow``).

Pipeline: 5 stages, each with a prepare (returns None: CONTINUE) and a commit (bumps a counter),
in a sync variant (``def``) and an async variant (``async def``). The baseline is a coroutine
that calls the 5 prepares then the 5 commits in a loop (awaiting them in the async variant);
both sides build a fresh ``Exchange`` per transaction and let the event loop turn once every 64
transactions. Times are per transaction, the best of
several repeats; the ratio is flow time / direct time (targets: <= 1.5x without journal and
profiler, <= 2x with ``MemoryJournal`` + ``profiler=True``).

Then transactions per second of ``flow.run`` (async pipeline, no journal) with 1, 100 and 1000
concurrent runs (``asyncio.gather``), and of the idempotent-hit path (``MemoryStore`` replay).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from isopace.flow import Exchange, Flow, MemoryJournal, MemoryStore

STAGES = 5
REPEAT = 25


class SyncStage:
    def __init__(self, name: str) -> None:
        self.name = name
        self.commits = 0

    def prepare(self, ex: Exchange) -> None:
        return None

    def commit(self, ex: Exchange) -> None:
        self.commits += 1


class AsyncStage:
    def __init__(self, name: str) -> None:
        self.name = name
        self.commits = 0

    async def prepare(self, ex: Exchange) -> None:
        return None

    async def commit(self, ex: Exchange) -> None:
        self.commits += 1


def direct_sync(stages: list[SyncStage]) -> Callable[[Exchange], Awaitable[None]]:
    async def run(ex: Exchange) -> None:
        for s in stages:
            s.prepare(ex)
        for s in stages:
            s.commit(ex)

    return run


def direct_async(stages: list[AsyncStage]) -> Callable[[Exchange], Awaitable[None]]:
    async def run(ex: Exchange) -> None:
        for s in stages:
            await s.prepare(ex)
        for s in stages:
            await s.commit(ex)

    return run


async def per_txn(*runs: Callable[[Exchange], Awaitable[Any]], loops: int) -> list[float]:
    """Best seconds per transaction of ``await run(Exchange(...))`` in a sequential loop, for
    each of ``runs``; the runs take turns in each repeat so that noise hits them alike."""
    best = [float("inf")] * len(runs)
    request = "0200"
    for _ in range(REPEAT):
        for n, run in enumerate(runs):
            t0 = time.perf_counter()
            for i in range(loops):
                await run(Exchange("t", request))
                if not i & 63:
                    # Let the event loop turn now and then, as a server's does: it purges
                    # cancelled timer handles (the deadline's) from its heap.
                    await asyncio.sleep(0)
            best[n] = min(best[n], (time.perf_counter() - t0) / loops)
    return best


async def tps(run: Callable[[Exchange], Awaitable[Any]], concurrency: int, total: int) -> float:
    """Transactions per second with ``concurrency`` runs gathered at a time (one task each;
    sequential awaits in the caller's task for a concurrency of 1)."""
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        done = 0
        while done < total:
            if concurrency == 1:
                await run(Exchange("t", "0200"))
            else:
                await asyncio.gather(*(run(Exchange("t", "0200")) for _ in range(concurrency)))
            done += concurrency
        best = max(best, done / (time.perf_counter() - t0))
    return best


def fmt(seconds: float) -> str:
    return f"{seconds * 1e6:6.2f} µs"


async def overhead() -> list[tuple[str, float, float]]:
    rows = []
    loops = 5_000
    for variant, make, direct in (
        ("sync", SyncStage, direct_sync),
        ("async", AsyncStage, direct_async),
    ):
        stages: list[Any] = [make(f"s{i}") for i in range(STAGES)]
        plain = Flow().group("main", *stages)
        full = Flow(journal=MemoryJournal(max_entries=1000), profiler=True).group("main", *stages)

        async def with_deadline(ex: Exchange, run: Any = plain.run) -> Any:
            return await run(ex, timeout=10.0)

        base, plain_t, full_t, deadline_t = await per_txn(
            direct(stages), plain.run, full.run, with_deadline, loops=loops
        )
        rows.append((f"{variant} stages, no journal/profiler", base, plain_t))
        rows.append((f"{variant} stages, MemoryJournal+profiler", base, full_t))
        rows.append((f"{variant} stages, timeout= (no target)", base, deadline_t))
    return rows


async def throughput() -> list[tuple[str, float, float]]:
    """(label, flow tps, tps of the direct calls at the same concurrency)."""
    stages = [AsyncStage(f"s{i}") for i in range(STAGES)]
    direct = direct_async(stages)
    flow = Flow().group("main", *stages)
    rows = []
    for n in (1, 100, 1000):
        rows.append(
            (f"{n:>4} concurrent", await tps(flow.run, n, 20_000), await tps(direct, n, 20_000))
        )
    store = MemoryStore()
    idem = Flow(idempotency=store, key=lambda ex: "dup").group("main", *stages)
    await store.claim("dup")
    await store.complete("dup", "0210")  # type: ignore[arg-type]
    for n in (1, 100):
        label = f"idempotent hit, {n:>3} concurrent"
        rows.append((label, await tps(idem.run, n, 20_000), await tps(direct, n, 20_000)))
    return rows


async def amain() -> None:
    print("flow.run overhead per transaction (5 stages, prepare + commit), best of", REPEAT)
    targets = {"no journal/profiler": 1.5, "MemoryJournal+profiler": 2.0}
    for label, base, flow_t in await overhead():
        target = next((v for k, v in targets.items() if k in label), None)
        ratio = flow_t / base
        verdict = ""
        if target is not None:
            verdict = f" (target <= {target}x) {'ok' if ratio <= target else 'MISSED'}"
        print(f"  {label:<42} direct {fmt(base)}  flow {fmt(flow_t)}  ratio {ratio:4.2f}x{verdict}")
    print("flow.run throughput (async 5-stage pipeline, no journal), transactions per second")
    for label, value, base in await throughput():
        print(f"  {label:<32} {value:>10,.0f} tps   (direct calls: {base:>10,.0f} tps)")


def main() -> None:
    asyncio.run(amain())


if __name__ == "__main__":
    main()
