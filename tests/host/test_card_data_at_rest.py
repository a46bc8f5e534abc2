"""Card data at rest: a real ``isopace serve`` (SQLite; then PostgreSQL + Redis) is sent requests
with a card number in every text field its spec has, approved and declined, demo cards and
others, a retransmission, and a request reusing the idempotency key with another card (answered
94, its fingerprint compared with the stored one); then every file the host wrote (database,
-wal, -shm, lock, key file, log), every column of every PostgreSQL table of its schema and every
Redis value under its prefix are searched for each card number as ASCII, packed BCD (F-padded when
odd) and hex text of its ASCII digits (both cases). Nothing is found.

The text fields are those of the host's spec (ISO87_ASCII) of kind n, an, ans, z (and x+n) that
can hold 13 digits or more; a fixed numeric field longer than 19 digits (DE 90) cannot hold a
card number the masker would see (digits glued into a longer run are not one: the log's rule),
so it is left out. Fixed fields get a card number of their length (13-19 digits, Luhn-valid)
padded as their kind allows.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from isopace._cardtext import luhn_check_digit
from isopace.iso8583 import ISO87_ASCII, Message
from isopace.net import Client

from .conftest import PAN_LOW, PAN_OK, PG_DSN, REDIS_URL, Backend

OTHER = "4761739001010010"  # Luhn-valid, not a demo card: declined 14
TEXT_KINDS = {"n", "an", "ans", "z", "x+n"}


def _sized(pan: str, n: int) -> str:
    """A Luhn-valid card number of ``n`` digits (13-19) made from ``pan``."""
    body = (pan * 2)[: n - 1]
    return body + luhn_check_digit(body)


def _text_fields() -> dict[int, Any]:
    out = {}
    for n in range(2, 129):
        fd = ISO87_ASCII.field(n)
        if fd is None or fd.content not in TEXT_KINDS or fd.max_len < 13:
            continue
        if fd.len_type == 0 and fd.content == "n" and fd.max_len > 19:
            continue  # see the module docstring
        out[n] = fd
    return out


def loaded(
    pan: str, card: str, stan: int, amount: int = 1000, mti: str = "0200"
) -> tuple[Message, set[str]]:
    """A request for ``card`` with ``pan`` in every text field; and every number it carries."""
    numbers = {pan, card}
    values: dict[int, str] = {}
    for n, fd in _text_fields().items():
        if n == 2:
            continue
        if n == 35:
            values[n] = f"{pan}=25121010000012300000"
        elif n == 45:
            values[n] = f"B{pan}^DOE/JOHN^25121010000000123000000"
        elif fd.content == "x+n":
            values[n] = "C" + pan.rjust(fd.max_len - 1, "0")[-(fd.max_len - 1) :]
            if fd.max_len - 1 < len(pan):
                raise AssertionError(f"DE {n} too short")
        elif fd.len_type == 0:  # fixed length
            size = fd.max_len
            if size <= 19:
                number = _sized(pan, size)
                numbers.add(number)
                values[n] = number
            else:
                pad = " " if fd.content == "ans" else "A"
                values[n] = pan + pad * (size - len(pan))
        else:
            values[n] = f"x {pan} y" if fd.max_len >= len(pan) + 4 else pan
    values.update(
        {
            2: card,
            3: "000000",
            4: f"{amount:012d}",
            7: "1206101010",
            11: f"{stan:06d}",
            37: f"{stan:012d}",
            41: "TERMREST",
            49: "840",
        }
    )
    return Message(mti, values), numbers


def forms(number: str) -> list[bytes]:
    bcd = bytes.fromhex(number if len(number) % 2 == 0 else number + "F")
    hexed = number.encode().hex()
    return [number.encode(), bcd, hexed.encode(), hexed.upper().encode()]


def find(numbers: set[str], blobs: dict[str, bytes]) -> list[str]:
    return [
        f"{number} as {form!r} in {where}"
        for where, blob in blobs.items()
        for number in sorted(numbers)
        for form in forms(number)
        if form in blob
    ]


def files(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def postgres_dump(schema: str) -> dict[str, bytes]:
    import asyncpg

    async def run() -> dict[str, bytes]:
        conn = await asyncpg.connect(PG_DSN)
        try:
            tables = [
                r[0]
                for r in await conn.fetch(
                    "SELECT table_name FROM information_schema.tables WHERE table_schema = $1",
                    schema,
                )
            ]
            out = {}
            for table in tables:
                parts = []
                for row in await conn.fetch(f'SELECT * FROM {schema}."{table}"'):
                    for value in row.values():
                        if isinstance(value, bytes | bytearray | memoryview):
                            parts.append(bytes(value))
                        elif value is not None:
                            parts.append(str(value).encode())
                out[f"{schema}.{table}"] = b"\n".join(parts)
            assert {"journal", "inflight", "cards", "holds"} <= set(tables), tables
            return out
        finally:
            await conn.close()

    return asyncio.run(run())


def redis_dump(prefix: str) -> dict[str, bytes]:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        out = {}
        for key in client.scan_iter(match=prefix + "*"):
            kind = client.type(key)
            if kind == b"string":
                out[key.decode()] = client.get(key) or b""
            else:
                out[key.decode()] = repr(client.dump(key)).encode()
        return out
    finally:
        client.close()


async def _exchange(port: int, messages: list[Message]) -> list[Message]:
    async with Client(ISO87_ASCII, port=port) as client:
        return [await client.request(m, timeout=15) for m in messages]


def _run(spawn: Any, backend: Backend, tmp_path: Path) -> None:
    host = spawn(*backend.serve, "--log-level", "DEBUG")
    approved, numbers = loaded(PAN_OK, PAN_OK, 1)
    other_approved, more = loaded(OTHER, PAN_OK, 2)
    numbers |= more
    unknown, more = loaded(OTHER, OTHER, 3)
    numbers |= more
    low, more = loaded(PAN_LOW, PAN_LOW, 4, amount=500_000)
    numbers |= more
    reuse, more = loaded(OTHER, PAN_LOW, 1)  # the key of ``approved``, another card
    numbers |= more
    sent = [approved, other_approved, unknown, low, approved, reuse]
    answers = asyncio.run(_exchange(host.port, sent))
    assert [a.get(39) for a in answers] == ["00", "00", "14", "51", "00", "94"]
    assert answers[4].get(38) == answers[0].get(38)  # the retransmission was replayed
    assert answers[5].get(38) is None
    assert len(_text_fields()) > 40
    if backend.kind == "sqlite":  # every stored answer keeps its fingerprint (searched below)
        stored = backend.fetch("SELECT fingerprint FROM idempotency_keys WHERE state = 'done'")
        assert len(stored) == 4 and all(fp for (fp,) in stored), stored

    def search(when: str) -> None:
        blobs = files(tmp_path)
        if backend.kind == "postgres":
            blobs |= postgres_dump(backend.schema)
            answers = redis_dump(backend.prefix)
            # answers with a fingerprint: A<length>:<fingerprint><response>
            assert sum(v[:2] != b"A:" and v.startswith(b"A") for v in answers.values()) == 4
            blobs |= answers
        assert any("serve-" in k for k in blobs)
        found = find(numbers, blobs)
        assert not found, f"{when}: " + "; ".join(found[:20])

    search("while serving")
    host.stop()
    search("after the host stopped")


def test_no_card_number_at_rest_sqlite(spawn: Any, tmp_path: Path) -> None:
    backend = Backend("sqlite", tmp_path)
    _run(spawn, backend, tmp_path)
    data = Path(backend.db).parent
    names = {p.name for p in data.iterdir()}
    assert "host.db" in names and any(n.endswith(".key") for n in names), names


def test_no_card_number_at_rest_postgres_redis(spawn: Any, tmp_path: Path) -> None:
    backend = Backend("postgres", tmp_path)
    try:
        _run(spawn, backend, tmp_path)
    finally:
        backend.drop()
