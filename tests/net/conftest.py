"""Helpers for the network tests: the default spec, requests, a reply handler, raw sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from isopace.iso8583 import ISO87_ASCII, Message, Spec
from isopace.net import Framing, Server

SPEC: Spec = ISO87_ASCII


def make_request(stan: int, terminal: str = "TERM0001", mti: str = "0200") -> Message:
    return Message(
        mti,
        {
            2: "4761739001010119",
            3: "000000",
            4: "000000002500",
            11: f"{stan:06d}",
            41: terminal,
            49: "978",
        },
    )


async def reply_handler(request: Message) -> Message:
    return request.reply().set(39, "00")


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    async with Server(SPEC, reply_handler) as srv:
        yield srv


async def raw_exchange(
    port: int, data: bytes, framing: Framing | None = None, count: int = 1, chunk: int = 0
) -> list[bytes]:
    """Write ``data`` (in ``chunk``-byte pieces when chunk > 0), read ``count`` frames back."""
    framing = framing or Framing()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if chunk:
            for i in range(0, len(data), chunk):
                writer.write(data[i : i + chunk])
                await writer.drain()
                await asyncio.sleep(0)
        else:
            writer.write(data)
        decoder = framing.decoder()
        frames: list[bytes] = []
        while len(frames) < count:
            got = await asyncio.wait_for(reader.read(65536), 5)
            if not got:
                break
            frames += [f.payload for f in decoder.frames(got)]
        return frames
    finally:
        writer.close()


PAN = "4761739001010119"
TRACK2 = PAN + "=2512101123"  # short discretionary data
TRACK1 = "B" + PAN + "^DOE/JOHN^25121011234"
CARD_SECRETS = (PAN, "2512101123", "DOE/JOHN", "25121011234")


def assert_no_card_data(caplog: pytest.LogCaptureFixture) -> None:
    """Neither the formatted log nor any record's fields hold the PAN or track data."""
    text = caplog.text + repr([r.__dict__ for r in caplog.records])
    for secret in CARD_SECRETS:
        assert secret not in text, secret
