"""Card keys never sit beside what they protect, and the data's file modes.

Against real ``isopace serve`` processes (SQLite files, the real PostgreSQL): the recovery an
attacker would run on every database file the host wrote finds no card number (and does find
every one on a database made the way the code before key files made it, so the test can fail);
an earlier database's key moves out to a 0600 key file at first start and its cards still pay;
a missing or world-readable key file refuses the start with one line; files are 0600 and the
directory 0700 under umask 022; a rotation runs while the host serves; ``journal --pan`` says
how many records were made under keys it does not have.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import re
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import asyncpg

from isopace.iso8583 import ISO87_ASCII, Message
from isopace.net import Client
from isopace.store.keys import Key, KeyRing, pan_candidates, write_key_file
from tests.host.conftest import (
    PAN_MC,
    PAN_OK,
    PG_DSN,
    ROOT,
    Backend,
    HostProcess,
    _env,
    cli,
    cli_json,
    free_port,
    purchase,
)
from tests.host.test_cli_errors import one_line_error

# -- the attacker's recovery -----------------------------------------------------------------------

_HEX_RUN = re.compile(rb"[0-9a-fA-F]{32,}")
_KEYLIKE = re.compile(rb"^[^\s{}\[\]\"',]{16,128}$")


def key_material(values: Iterable[object], raw: Iterable[bytes] = ()) -> set[bytes]:
    """Every candidate key an attacker finds in a database: each value of each column (as bytes,
    and hex-decoded) that could be a key (16 to 128 bytes, no spaces or JSON punctuation), each
    hex run of 32+ digits inside any value, and in the raw bytes of the files (free pages, WAL
    frames of deleted rows)."""
    out: set[bytes] = set()
    blobs = list(raw)
    for v in values:
        if v is None:
            continue
        b = v if isinstance(v, bytes) else str(v).encode()
        blobs.append(b)
        if _KEYLIKE.match(b):
            out.add(b)
    for b in blobs:
        for run in _HEX_RUN.findall(b):
            for text in {run, run[: len(run) - len(run) % 2]}:
                out.add(text)
                if len(text) % 2 == 0:
                    out.add(bytes.fromhex(text.decode()))
        if _KEYLIKE.match(b) and re.fullmatch(rb"[0-9a-fA-F]+", b) and len(b) % 2 == 0:
            out.add(bytes.fromhex(b.decode()))
    return {k for k in out if len(k) >= 16}


def targets(pairs: Iterable[tuple[object, object]]) -> dict[str, set[str]]:
    """masked PAN -> the HMACs stored for it (the hex part of ``<id>:<hmac>`` too)."""
    out: dict[str, set[str]] = {}
    for masked, fp in pairs:
        if masked and fp:
            out.setdefault(str(masked), set()).add(str(fp).rsplit(":", 1)[-1])
    return out


def _hmac_states(key: bytes) -> tuple[Any, Any]:
    """HMAC-SHA256 (RFC 2104) keyed inner and outer states, so each try is two state copies."""
    block = hashlib.sha256(key).digest() if len(key) > 64 else key
    block = block.ljust(64, b"\0")
    return (
        hashlib.sha256(bytes(b ^ 0x36 for b in block)),
        hashlib.sha256(bytes(b ^ 0x5C for b in block)),
    )


def _first_hit(states: tuple[Any, Any], pans: list[bytes], wanted: set[str]) -> str | None:
    inner0, outer0 = states
    for pan in pans:
        inner = inner0.copy()
        inner.update(pan)
        outer = outer0.copy()
        outer.update(inner.digest())
        if outer.hexdigest() in wanted:
            return pan.decode()
    return None


def brute_force(found: dict[str, set[str]], keys: set[bytes]) -> set[str]:
    """For each candidate key, try every Luhn-valid middle of the masked PAN with the most
    fingerprints (a right key recovers it; one that does not is not the key), then every card."""
    assert found, "nothing to attack: the database holds no fingerprint"
    masked = max(found, key=lambda m: len(found[m]))
    first = [p.encode() for p in pan_candidates(masked)]
    recovered: set[str] = set()
    for key in keys:
        states = _hmac_states(key)
        pan = _first_hit(states, first, found[masked])
        if pan is None:
            continue
        recovered.add(pan)
        for other, want in found.items():
            hit = _first_hit(states, [p.encode() for p in pan_candidates(other)], want)
            if hit is not None:
                recovered.add(hit)
    return recovered


def attack_sqlite(db: str) -> set[str]:
    """The recovery on every file of a SQLite host: the database read through SQLite (its WAL
    included) and the raw bytes of the database and ``-wal`` files."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        values: list[object] = []
        for table in tables:
            for row in conn.execute(f'SELECT * FROM "{table}"'):
                values.extend(row)
        pairs: list[tuple[object, object]] = []
        if "cards" in tables:
            pairs += conn.execute("SELECT masked_pan, pan_ref FROM cards").fetchall()
        if "journal" in tables:
            pairs += conn.execute("SELECT pan_masked, pan_hmac FROM journal").fetchall()
    finally:
        conn.close()
    raw = [Path(p).read_bytes() for p in (db, db + "-wal") if os.path.exists(p)]
    return brute_force(targets(pairs), key_material(values, raw))


def attack_postgres(schema: str) -> set[str]:
    """The recovery on every table of the PostgreSQL schema (every value of every column)."""

    async def run() -> tuple[list[object], list[tuple[object, object]]]:
        conn = await asyncpg.connect(PG_DSN)
        try:
            tables = [
                r[0]
                for r in await conn.fetch(
                    "SELECT tablename FROM pg_tables WHERE schemaname = $1", schema
                )
            ]
            values: list[object] = []
            for table in tables:
                for row in await conn.fetch(f'SELECT * FROM {schema}."{table}"'):
                    values.extend(row.values())
            pairs: list[tuple[object, object]] = []
            pairs += [
                tuple(r)
                for r in await conn.fetch(f"SELECT masked_pan, pan_ref FROM {schema}.cards")
            ]
            if "journal" in tables:
                pairs += [
                    tuple(r)
                    for r in await conn.fetch(f"SELECT pan_masked, pan_hmac FROM {schema}.journal")
                ]
            return values, pairs
        finally:
            await conn.close()

    values, pairs = asyncio.run(run())
    return brute_force(targets(pairs), key_material(values))


# -- a database made by the code before key files -------------------------------------------------

#: The ledger schema statements of isopace before key files (schema version 3), as data.
LEGACY_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS accounts (
    id TEXT PRIMARY KEY,
    currency TEXT NOT NULL,
    opening INTEGER NOT NULL,
    balance INTEGER NOT NULL,
    held INTEGER NOT NULL DEFAULT 0,
    CHECK (held >= 0),
    CHECK (balance - held >= 0)
);
CREATE TABLE IF NOT EXISTS cards (
    pan_ref TEXT PRIMARY KEY,
    masked_pan TEXT NOT NULL,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    status TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS holds (
    txn_id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    amount INTEGER NOT NULL CHECK (amount >= 0),
    state TEXT NOT NULL,
    mti TEXT,
    terminal TEXT,
    stan TEXT,
    tx_time TEXT,
    rrn TEXT,
    idem_key TEXT,
    approval_code TEXT,
    pan_ref TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS holds_by_stan ON holds (terminal, stan, tx_time);
CREATE INDEX IF NOT EXISTS holds_by_rrn ON holds (terminal, rrn);
CREATE INDEX IF NOT EXISTS holds_pending ON holds (state) WHERE state = 'pending';
CREATE TABLE IF NOT EXISTS captures (
    txn_id TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts (id),
    amount INTEGER NOT NULL,
    captured_at TEXT NOT NULL,
    refunded_at TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS holds_by_key ON holds (idem_key)
    WHERE idem_key IS NOT NULL AND state <> 'released';
"""

LEGACY_PG_SCHEMA = (
    LEGACY_SQLITE_SCHEMA.replace("INTEGER", "BIGINT")
    .replace(
        "created_at TEXT NOT NULL,\n    updated_at TEXT NOT NULL",
        "created_at TIMESTAMPTZ NOT NULL DEFAULT now(),\n"
        "    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()",
    )
    .replace(
        "captured_at TEXT NOT NULL,\n    refunded_at TEXT",
        "captured_at TIMESTAMPTZ NOT NULL DEFAULT now(),\n    refunded_at TIMESTAMPTZ",
    )
)

#: The demo cards as that code seeded them: (pan, account, balance, status).
DEMO = [
    ("4111111111111111", "ACC-1001", 100_000, "active"),
    ("5555555555554444", "ACC-1002", 250_000, "active"),
    ("5105105105105100", "ACC-1003", 1_000, "active"),
    ("4012888888881881", "ACC-1004", 50_000, "blocked"),
    ("4000056655665556", "ACC-9000", 1_000_000_000, "active"),
]
LEGACY_KEY_HEX = "5be0c6a1d2f34e8897ab10cd2e3f4a5b6c7d8e9fa0b1c2d3e4f5061728394a5b"


def _legacy_rows() -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    key = bytes.fromhex(LEGACY_KEY_HEX)
    accounts = [(acc, "840", bal, bal) for _, acc, bal, _ in DEMO]
    cards = [
        (
            hmac.new(key, pan.encode(), hashlib.sha256).hexdigest(),
            pan[:6] + "******" + pan[-4:],
            acc,
            st,
        )
        for pan, acc, _, st in DEMO
    ]
    return accounts, cards


def make_legacy_sqlite(db: str) -> None:
    """A database as the code before key files left it: the key in ``ledger_meta``."""
    os.makedirs(os.path.dirname(db), exist_ok=True)
    accounts, cards = _legacy_rows()
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.executescript(LEGACY_SQLITE_SCHEMA)
    conn.execute(
        "INSERT INTO ledger_meta VALUES ('schema_version', '3'), ('pan_key', ?)", (LEGACY_KEY_HEX,)
    )
    conn.executemany(
        "INSERT INTO accounts (id, currency, opening, balance) VALUES (?, ?, ?, ?)", accounts
    )
    conn.executemany("INSERT INTO cards VALUES (?, ?, ?, ?)", cards)
    conn.commit()
    conn.close()


def make_legacy_postgres(schema: str) -> None:
    accounts, cards = _legacy_rows()

    async def run() -> None:
        conn = await asyncpg.connect(PG_DSN)
        try:
            await conn.execute(f"CREATE SCHEMA {schema}")
            await conn.execute(f"SET search_path TO {schema}")
            await conn.execute(LEGACY_PG_SCHEMA)
            await conn.execute(
                "INSERT INTO ledger_meta VALUES ('schema_version', '3'), ('pan_key', $1)",
                LEGACY_KEY_HEX,
            )
            await conn.executemany(
                "INSERT INTO accounts (id, currency, opening, balance) VALUES ($1, $2, $3, $4)",
                accounts,
            )
            await conn.executemany("INSERT INTO cards VALUES ($1, $2, $3, $4)", cards)
        finally:
            await conn.close()

    asyncio.run(run())


def pg_fetch(schema: str, sql: str) -> list[tuple[Any, ...]]:
    async def run() -> list[tuple[Any, ...]]:
        conn = await asyncpg.connect(PG_DSN, server_settings={"search_path": schema})
        try:
            return [tuple(r) for r in await conn.fetch(sql)]
        finally:
            await conn.close()

    return asyncio.run(run())


# -- helpers ---------------------------------------------------------------------------------------


async def _ask(port: int, messages: list[Message]) -> list[Message]:
    async with Client(ISO87_ASCII, port=port) as client:
        return [await client.request(m, timeout=15) for m in messages]


def pay(port: int, pan: str, amount: int, stan: int, terminal: str = "TERMKEY1") -> str:
    (response,) = asyncio.run(_ask(port, [purchase(pan, amount, stan, terminal)]))
    return str(response.get(39))


def mode(path: str | Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def balances(store: list[str]) -> dict[str, int]:
    data = cli_json("ledger", *store)
    assert data["ok"], data["problems"]
    return {a["id"]: a["balance"] for a in data["accounts"]}


def journal_pan(store: list[str], pan: str) -> tuple[list[dict[str, Any]], str]:
    proc = cli("journal", *store, "--pan", pan, "--json", "--limit", "100000", check=True)
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()], proc.stderr


# -- the tests -------------------------------------------------------------------------------------


def test_brute_force_recovers_every_card_of_a_database_made_before_key_files(
    tmp_path: Path,
) -> None:
    """The test can fail: on a database made as before, the recovery gives back every card."""
    db = str(tmp_path / "old" / "host.db")
    make_legacy_sqlite(db)
    assert attack_sqlite(db) == {pan for pan, *_ in DEMO}


def test_sqlite_host_files_give_no_card_number_back(tmp_path: Path) -> None:
    db = str(tmp_path / "data" / "host.db")
    host = HostProcess(free_port(), ["--db", db], tmp_path / "serve.log").start()
    try:
        for n, pan in enumerate([PAN_OK, PAN_MC, PAN_OK], 1):
            assert pay(host.port, pan, 100 + n, n) == "00"
        assert attack_sqlite(db) == set()  # while it runs: the WAL holds the recent writes
    finally:
        assert host.stop() == 0, host.output
    assert attack_sqlite(db) == set()
    conn = sqlite3.connect(db)
    try:
        assert (
            conn.execute("SELECT * FROM ledger_meta WHERE key <> 'schema_version'").fetchall() == []
        )
        refs = [r[0] for r in conn.execute("SELECT pan_ref FROM cards")]
        hmacs = [
            r[0] for r in conn.execute("SELECT pan_hmac FROM journal WHERE pan_hmac IS NOT NULL")
        ]
    finally:
        conn.close()
    card_id = KeyRing.from_file(str(tmp_path / "data" / "host.card.key")).current.id
    journal_id = KeyRing.from_file(str(tmp_path / "data" / "host.journal.key")).current.id
    assert refs and all(r.startswith(card_id + ":") for r in refs)  # the key id with the value
    assert hmacs and all(h.startswith(journal_id + ":") for h in hmacs)


def test_postgres_tables_give_no_card_number_back(
    tmp_path: Path, pg_schema: str, pg_card_key: str
) -> None:
    store = ["--postgres", PG_DSN, "--postgres-schema", pg_schema, "--card-key-file", pg_card_key]
    host = HostProcess(
        free_port(), [*store, "--db", str(tmp_path / "h.db")], tmp_path / "s.log"
    ).start()
    try:
        for n, pan in enumerate([PAN_OK, PAN_MC, PAN_OK], 1):
            assert pay(host.port, pan, 100 + n, n) == "00"
    finally:
        assert host.stop() == 0, host.output
    assert attack_postgres(pg_schema) == set()
    assert pg_fetch(pg_schema, "SELECT key FROM ledger_meta") == [("schema_version",)]
    # the test can fail: the same attack, given the key file, gets the cards back
    key = KeyRing.from_file(pg_card_key).current.material
    found = targets(pg_fetch(pg_schema, "SELECT masked_pan, pan_ref FROM cards"))
    assert PAN_OK in brute_force(found, {key})


def test_sqlite_database_of_the_earlier_version_migrates_at_first_start(tmp_path: Path) -> None:
    db = str(tmp_path / "data" / "host.db")
    make_legacy_sqlite(db)
    host = HostProcess(free_port(), ["--db", db], tmp_path / "serve.log").start()
    try:
        key_file = tmp_path / "data" / "host.card.key"
        assert mode(key_file) == 0o600
        ring = KeyRing.from_file(str(key_file))
        assert ring.keys == (Key.of(bytes.fromhex(LEGACY_KEY_HEX)),)
        assert pay(host.port, PAN_OK, 2_500, 1) == "00"  # an old card, found by its old pan_ref
        assert pay(host.port, PAN_OK, 1_000_000, 2) == "51"  # and its balance is the old one
    finally:
        assert host.stop() == 0, host.output
    assert "moved from the database to" in host.output
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("SELECT key FROM ledger_meta").fetchall() == [("schema_version",)]
    finally:
        conn.close()
    assert balances(["--db", db])["ACC-1001"] == 100_000 - 2_500
    assert attack_sqlite(db) == set()  # no copy of the key left in the files (free pages, WAL)


def test_postgres_database_of_the_earlier_version_migrates_at_first_start(
    tmp_path: Path, pg_schema: str
) -> None:
    make_legacy_postgres(pg_schema)
    assert attack_postgres(pg_schema) == {pan for pan, *_ in DEMO}  # as it was
    key_file = tmp_path / "nodes.card.key"  # not there yet: the migration writes it
    store = ["--postgres", PG_DSN, "--postgres-schema", pg_schema, "--card-key-file", str(key_file)]
    host = HostProcess(
        free_port(), [*store, "--db", str(tmp_path / "h.db")], tmp_path / "s.log"
    ).start()
    try:
        assert mode(key_file) == 0o600
        assert KeyRing.from_file(str(key_file)).keys == (Key.of(bytes.fromhex(LEGACY_KEY_HEX)),)
        assert pay(host.port, PAN_MC, 4_000, 1) == "00"
    finally:
        assert host.stop() == 0, host.output
    assert pg_fetch(pg_schema, "SELECT key FROM ledger_meta") == [("schema_version",)]
    assert balances(store)["ACC-1002"] == 250_000 - 4_000
    assert attack_postgres(pg_schema) == set()


def test_postgres_without_a_key_is_refused_naming_the_flags(tmp_path: Path, pg_schema: str) -> None:
    proc = cli(
        "serve", "--port", "0", "--postgres", PG_DSN, "--postgres-schema", pg_schema,
        "--db", str(tmp_path / "none.db"),
    )  # fmt: skip
    one_line_error(proc, "--card-key-file", "$ISOPACE_CARD_KEY", "--new-card-key")
    # on purpose: a new key file, which the next node is given
    key_file = tmp_path / "made.card.key"
    host = HostProcess(
        free_port(),
        ["--postgres", PG_DSN, "--postgres-schema", pg_schema, "--card-key-file", str(key_file),
         "--new-card-key", "--db", str(tmp_path / "none.db")],
        tmp_path / "s.log",
    ).start()  # fmt: skip
    try:
        assert mode(key_file) == 0o600
        assert pay(host.port, PAN_OK, 100, 1) == "00"
    finally:
        host.stop()
    # the variable works as well as the file (hex); a bad one is named
    env_key = KeyRing.from_file(str(key_file)).current.material.hex()
    bad = subprocess.run(
        [sys.executable, "-m", "isopace", "serve", "--port", "0", "--postgres", PG_DSN,
         "--postgres-schema", pg_schema, "--db", str(tmp_path / "none.db")],
        env={**_env(), "ISOPACE_CARD_KEY": "not-hex"}, capture_output=True, text=True, cwd=ROOT,
        timeout=60,
    )  # fmt: skip
    one_line_error(bad, "$ISOPACE_CARD_KEY", "hex")
    port = free_port()
    proc2 = subprocess.Popen(
        [sys.executable, "-m", "isopace", "serve", "--port", str(port), "--postgres", PG_DSN,
         "--postgres-schema", pg_schema, "--db", str(tmp_path / "none.db")],
        env={**_env(), "ISOPACE_CARD_KEY": env_key}, cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_port(port, proc2)
        assert pay(port, PAN_OK, 100, 2) == "00"  # the same cards, found under the same key
    finally:
        proc2.terminate()
        proc2.wait(15)


def _wait_port(port: int, proc: subprocess.Popen[Any]) -> None:
    import socket

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, "isopace serve exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("no port")


def test_missing_key_file_refuses_the_start_naming_the_file_and_the_flag(tmp_path: Path) -> None:
    db = str(tmp_path / "data" / "host.db")
    args = ["serve", "--port", "0", "--db", db]
    host = HostProcess(free_port(), ["--db", db], tmp_path / "serve.log").start()
    assert pay(host.port, PAN_OK, 100, 1) == "00"
    host.stop()
    card_key = tmp_path / "data" / "host.card.key"
    journal_key = tmp_path / "data" / "host.journal.key"
    saved = card_key.read_bytes()
    card_key.unlink()
    one_line_error(cli(*args, timeout=60), str(card_key), "--new-card-key", "not found")
    assert not card_key.exists()  # never replaced silently
    card_key.write_bytes(saved)
    card_key.chmod(0o600)
    journal_key.unlink()
    one_line_error(cli(*args, timeout=60), str(journal_key), "--new-journal-key", "not found")
    # on purpose: a new journal key; the old records are then under a key it does not have
    again = HostProcess(free_port(), ["--db", db, "--new-journal-key"], tmp_path / "s2.log").start()
    again.stop()
    assert mode(journal_key) == 0o600
    one_line_error(cli(*args, "--new-journal-key", timeout=60), "never replaced", str(journal_key))


def test_key_file_readable_by_others_refuses_the_start(tmp_path: Path) -> None:
    db = str(tmp_path / "data" / "host.db")
    HostProcess(free_port(), ["--db", db], tmp_path / "serve.log").start().stop()
    for name in ("host.card.key", "host.journal.key"):
        path = tmp_path / "data" / name
        path.chmod(0o644)
        one_line_error(cli("serve", "--port", "0", "--db", db, timeout=60), str(path), "chmod 600")
        path.chmod(0o600)


def test_modes_under_umask_022(tmp_path: Path) -> None:
    db = tmp_path / "data" / "host.db"
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "isopace", "serve", "--port", str(port), "--db", str(db)],
        env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=lambda: os.umask(0o022),
    )  # fmt: skip
    try:
        _wait_port(port, proc)
        assert pay(port, PAN_OK, 100, 1) == "00"
        assert mode(db.parent) == 0o700
        files = [
            "host.db",
            "host.db-wal",
            "host.db-shm",
            "host.lock",
            "host.card.key",
            "host.journal.key",
        ]
        for name in files:
            assert mode(db.parent / name) == 0o600, name
        assert sorted(p.name for p in db.parent.iterdir()) == sorted(files)
    finally:
        proc.terminate()
        proc.wait(15)


def test_wider_existing_files_are_named_in_a_warning_and_set_to_0600(tmp_path: Path) -> None:
    db = tmp_path / "data" / "host.db"
    HostProcess(free_port(), ["--db", str(db)], tmp_path / "serve.log").start().stop()
    db.chmod(0o644)
    (tmp_path / "data" / "host.lock").chmod(0o666)
    db.parent.chmod(0o755)
    host = HostProcess(free_port(), ["--db", str(db)], tmp_path / "s2.log").start()
    try:
        assert mode(db) == 0o600 and mode(tmp_path / "data" / "host.lock") == 0o600
    finally:
        host.stop()
    warnings = [line for line in host.output.splitlines() if "WARNING" in line]
    assert any(f"{db} was mode 0644" in w for w in warnings), host.output
    assert any("host.lock was mode 0666" in w for w in warnings), host.output
    assert any(f"data directory {db.parent} is mode 0755" in w for w in warnings), host.output


def test_rotation_while_the_host_serves(backend: Backend, tmp_path: Path) -> None:
    """``isopace keys rotate`` while purchases keep coming: none fails, every old fingerprint is
    re-keyed, the old keys leave the files, ``journal --pan`` finds every record (SQLite: two
    key files; PostgreSQL: one shared card key file, the journal keys derived from it)."""
    local = ["--db", str(tmp_path / "data" / "host.db")]  # where SQLite data and key files are
    store = backend.store if backend.kind == "sqlite" else [*backend.store, *local]
    serve = backend.serve if backend.kind == "sqlite" else [*backend.serve, *local]
    host = HostProcess(free_port(), serve, tmp_path / "serve.log").start()
    try:
        before = balances(store)
        for n in range(1, 4):
            assert pay(host.port, PAN_OK, 100, n) == "00"
        old = cli_json("keys", "status", *store)
        codes: list[str] = []
        stop = threading.Event()

        def traffic() -> None:  # purchases keep coming during the rotation
            n = 100
            while not stop.is_set():
                codes.append(pay(host.port, PAN_OK, 10, n, terminal="TERMROT1"))
                n += 1

        thread = threading.Thread(target=traffic)
        thread.start()
        try:
            rotated = cli("keys", "rotate", *store, "--wait", "2", timeout=120)
        finally:
            stop.set()
            thread.join(30)
        assert rotated.returncode == 0, rotated.stdout + rotated.stderr
        assert codes and set(codes) == {"00"}, codes
        after = [pay(host.port, PAN_OK, 100, n) for n in range(4, 7)]  # and after it
        assert after == ["00", "00", "00"]
        status = cli_json("keys", "status", *store)
        for kind in ("card", "journal"):
            new = status[kind]
            assert new["keys"] == [new["current"]], new  # the old key left the file
            assert new["current"] not in old[kind]["keys"]
            assert set(new["rows"]) == {new["current"]}, new  # every old fingerprint re-keyed
        records, stderr = journal_pan(store, PAN_OK)
        committed = {r["tx_id"] for r in records if r["kind"] == "COMMITTED"}
        assert len(committed) == 6 + len(codes), (len(committed), len(codes))
        assert stderr == ""
        spent = 6 * 100 + 10 * len(codes)
        assert balances(store)["ACC-1001"] == before["ACC-1001"] - spent
    finally:
        assert host.stop() == 0, host.output
    assert "keys reloaded" in host.output
    # no key reached the database (the full attack runs on smaller databases above: with this
    # many transactions it would take minutes)
    card_file = backend.card_key if backend.kind == "postgres" else local[1][:-3] + ".card.key"
    card_key = KeyRing.from_file(card_file).current
    keys = {card_key.material, card_key.derive("journal").material}
    if backend.kind == "sqlite":
        keys.add(KeyRing.from_file(local[1][:-3] + ".journal.key").current.material)
        db = local[1]
        data = b"".join(Path(p).read_bytes() for p in (db, db + "-wal") if os.path.exists(p))
        for material in keys:
            assert material not in data and material.hex().encode() not in data
    else:
        values = [
            v
            for t in ("ledger_meta", "cards", "holds", "journal")
            for r in pg_fetch(backend.schema, f"SELECT * FROM {t}")
            for v in r
        ]
        assert not keys & key_material(values)


def test_journal_pan_reports_records_under_a_key_it_does_not_have(tmp_path: Path) -> None:
    db = str(tmp_path / "data" / "host.db")
    store = ["--db", db]
    host = HostProcess(free_port(), store, tmp_path / "serve.log").start()
    for n in range(1, 3):
        assert pay(host.port, PAN_MC, 100, n) == "00"
    host.stop()
    key_file = db.replace(".db", ".journal.key")
    lost = KeyRing.from_file(key_file).current.id
    os.unlink(key_file)
    write_key_file(key_file, [Key.generate()])  # the old key is lost
    records, stderr = journal_pan(store, PAN_MC)
    assert records == []
    assert f"under key(s) {lost} (" in stderr, stderr
    count = int(stderr.split("isopace: ")[1].split(" record")[0])
    assert count >= 2


def test_a_card_key_replaced_on_purpose_keeps_the_host_starting(tmp_path: Path) -> None:
    """--new-card-key on a ledger whose key is lost: the host starts (its old cards are no
    longer found: declined 14), and later starts without the flag warn about the lost key."""
    db = str(tmp_path / "data" / "host.db")
    HostProcess(free_port(), ["--db", db], tmp_path / "s0.log").start().stop()
    key_file = Path(db.replace(".db", ".card.key"))
    lost = KeyRing.from_file(str(key_file)).current.id
    key_file.unlink()
    host = HostProcess(free_port(), ["--db", db, "--new-card-key"], tmp_path / "s1.log").start()
    try:
        assert pay(host.port, PAN_OK, 100, 1) == "14"  # the card was protected under the lost key
    finally:
        host.stop()
    assert "new card key" in host.output
    again = HostProcess(free_port(), ["--db", db], tmp_path / "s2.log").start()
    again.stop()
    assert f"does not hold key {lost}" in again.output, again.output
