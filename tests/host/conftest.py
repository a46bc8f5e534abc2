"""Helpers for the host's end-to-end tests: real ``isopace serve`` processes and CLI runs."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from isopace.iso8583 import APPROVALS, Message, meaning
from isopace.store.keys import Key, write_key_file

ROOT = Path(__file__).resolve().parents[2]
PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/0"

PAN_OK = "4111111111111111"  # ACC-1001, 1,000.00
PAN_MC = "5555555555554444"  # ACC-1002, 2,500.00
PAN_LOW = "5105105105105100"  # ACC-1003, 10.00
PAN_BLOCKED = "4012888888881881"  # ACC-1004, blocked
PAN_BENCH = "4000056655665556"  # ACC-9000
PAN_UNKNOWN_BIN = "6011111111111117"  # Discover: no route in the default BIN table
PAN_UNKNOWN_CARD = "4242424242424242"  # routes to visa, not in the ledger


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def cli(*args: str, timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``python -m isopace ARGS`` and return the finished process (text output)."""
    proc = subprocess.run(
        [sys.executable, "-m", "isopace", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        cwd=ROOT,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"isopace {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def cli_json(*args: str, timeout: float = 60) -> Any:
    proc = cli(*args, "--json", timeout=timeout, check=True)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return json.loads(lines[-1])


class HostProcess:
    """One ``isopace serve`` child process; ``prefix``: a command that runs it (``prlimit ...``)."""

    def __init__(self, port: int, args: list[str], log: Path, prefix: Sequence[str] = ()) -> None:
        self.port = port
        self.args = args
        self.log = log
        self.prefix = list(prefix)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> HostProcess:
        self._fh = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                *self.prefix,
                sys.executable,
                "-m",
                "isopace",
                "serve",
                "--port",
                str(self.port),
                *self.args,
            ],
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            env=_env(),
            cwd=ROOT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"isopace serve exited {self.proc.returncode}:\n{self.output}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return self
            time.sleep(0.05)
        raise AssertionError(f"isopace serve did not open port {self.port}:\n{self.output}")

    @property
    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._fh.close()
        return self.proc.returncode

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._fh.close()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Any]:
    """``spawn(*args, port=None, prefix=())`` starts a host; every one is stopped at the end of
    the test."""
    hosts: list[HostProcess] = []

    def start(*args: str, port: int | None = None, prefix: Sequence[str] = ()) -> HostProcess:
        log = tmp_path / f"serve-{len(hosts)}.log"
        host = HostProcess(port or free_port(), list(args), log, prefix)
        hosts.append(host)
        return host.start()

    yield start
    for host in hosts:
        host.stop()


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "data" / "host.db")


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A unique PostgreSQL schema, dropped afterwards."""
    schema = f"t_host_{uuid.uuid4().hex[:10]}"
    yield schema
    import asyncio

    import asyncpg

    async def drop() -> None:
        conn = await asyncpg.connect(PG_DSN)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        finally:
            await conn.close()

    asyncio.run(drop())


@pytest.fixture
def pg_card_key(tmp_path: Path) -> str:
    """A card key file for PostgreSQL hosts (the nodes share one; they never make one)."""
    path = str(tmp_path / "shared.card.key")
    write_key_file(path, [Key.generate()])
    return path


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    prefix = f"t-host-{uuid.uuid4().hex[:10]}:"
    yield prefix
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        for key in client.scan_iter(match=prefix + "*"):
            client.delete(key)
    finally:
        client.close()


class Backend:
    """Where a test host keeps its data: ``sqlite`` (files under ``tmp``) or ``postgres``
    (PostgreSQL, a unique schema, with Redis, a unique key prefix, for idempotency). ``store``:
    the flags of ``isopace ledger`` / ``journal`` / ``recover``; ``serve``: those of
    ``isopace serve``. The services must be up: a test fails, never skips, when they are not."""

    def __init__(self, kind: str, tmp: Path) -> None:
        self.kind = kind
        tag = uuid.uuid4().hex[:10]
        if kind == "sqlite":
            self.db = str(tmp / "data" / "host.db")
            self.store = ["--db", self.db]
            self.serve = list(self.store)
        else:
            self.schema = f"t_host_{tag}"
            self.prefix = f"t-host-{tag}:"
            # the nodes share one card key file (PostgreSQL hosts never make one themselves)
            self.card_key = str(tmp / f"{tag}.card.key")
            write_key_file(self.card_key, [Key.generate()])
            self.store = [
                "--postgres",
                PG_DSN,
                "--postgres-schema",
                self.schema,
                "--card-key-file",
                self.card_key,
            ]
            self.serve = [*self.store, "--redis", REDIS_URL, "--redis-prefix", self.prefix]

    def fetch(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """Rows of a query on the ledger's tables (``?`` placeholders, unqualified names)."""
        if self.kind == "sqlite":
            import sqlite3

            conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
            try:
                return [tuple(r) for r in conn.execute(sql, params).fetchall()]
            finally:
                conn.close()
        import asyncio

        import asyncpg

        parts = sql.split("?")
        pg_sql = parts[0] + "".join(f"${i}{p}" for i, p in enumerate(parts[1:], 1))

        async def run() -> list[tuple[Any, ...]]:
            conn = await asyncpg.connect(PG_DSN, server_settings={"search_path": self.schema})
            try:
                return [tuple(r) for r in await conn.fetch(pg_sql, *params)]
            finally:
                await conn.close()

        return asyncio.run(run())

    def drop(self) -> None:
        if self.kind == "sqlite":
            return
        import asyncio

        import asyncpg
        import redis

        async def drop() -> None:
            conn = await asyncpg.connect(PG_DSN)
            try:
                await conn.execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")
            finally:
                await conn.close()

        asyncio.run(drop())
        client = redis.Redis.from_url(REDIS_URL)
        try:
            for key in client.scan_iter(match=self.prefix + "*"):
                client.delete(key)
        finally:
            client.close()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Each backend in turn (see `Backend`), cleaned up afterwards."""
    store = Backend(request.param, tmp_path)
    yield store
    store.drop()


def purchase(
    pan: str,
    amount: int,
    stan: int,
    terminal: str = "TERME2E1",
    tx_time: str = "1129101010",
    *,
    mti: str = "0200",
) -> Message:
    """A purchase (or, with ``mti``, another request) as a terminal sends it: the idempotency key
    is ``terminal`` + ``stan`` + ``tx_time``; DE 37 (RRN) is the STAN."""
    return Message(
        mti,
        {
            2: pan,
            3: "000000",
            4: f"{amount:012d}",
            7: tx_time,
            11: f"{stan:06d}",
            37: f"{stan:012d}",
            41: terminal,
            49: "840",
        },
    )


# -- one host (SQLite) or two sharing PostgreSQL + Redis, per test module ------------------------


@dataclasses.dataclass
class E2E:
    proc: HostProcess
    peer: HostProcess  # the second host sharing PostgreSQL + Redis (SQLite: ``proc`` itself)
    backend: Backend
    metrics: int


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def e2e(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2E]:
    tmp = tmp_path_factory.mktemp(f"e2e-{request.param}")
    backend = Backend(request.param, tmp)
    metrics = free_port()
    hosts: list[HostProcess] = []
    try:
        proc = HostProcess(
            free_port(), [*backend.serve, "--metrics-port", str(metrics)], tmp / "serve.log"
        )
        hosts.append(proc.start())
        peer = proc
        if request.param == "postgres":
            peer = HostProcess(free_port(), backend.serve, tmp / "peer.log")
            hosts.append(peer.start())
        yield E2E(proc, peer, backend, metrics)
        for h in hosts:
            assert h.stop() == 0, h.output
    finally:
        for h in hosts:
            h.stop()
        backend.drop()


@pytest.fixture(scope="module")
def host(e2e: E2E) -> tuple[HostProcess, list[str], int]:
    """(the host, the flags of ``isopace ledger`` for its data, its metrics port)."""
    return e2e.proc, e2e.backend.store, e2e.metrics


def send(port: int, *args: str) -> dict[str, str]:
    """``isopace send --json``: its exit status is 0 for an approval, 1 for a decline."""
    proc = cli("send", "--port", str(port), *args, "--json")
    assert proc.returncode in (0, 1), proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    response: dict[str, str] = out["response"]
    assert proc.returncode == (0 if response.get("39") in APPROVALS else 1)
    assert out["result"].startswith(f"{response.get('39')} {meaning(response.get('39', ''))}")
    return response


def accounts(store: list[str]) -> dict[str, dict[str, Any]]:
    data = cli_json("ledger", *store)
    assert data["ok"], data["problems"]
    return {a["id"]: a for a in data["accounts"]}
