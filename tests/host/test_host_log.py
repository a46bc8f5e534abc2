"""The host's per-transaction log line masks card data quoted by a stage's error.

Inputs tried: a ledger failure whose text quotes the PAN, its track 2 equivalent data
(``PAN=YYMM...``) and a track 1 name/expiry (``^NAME^YYMM...``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from isopace.host import AuthorizationHost
from isopace.host.config import HostConfig
from isopace.iso8583 import Message

from .conftest import PAN_OK


async def test_stage_error_with_card_data_is_masked_in_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = HostConfig(port=0, db=str(tmp_path / "host.db"), synchronous="NORMAL")
    track2 = f"{PAN_OK}=25121010000012300000"
    track1 = f"B{PAN_OK}^CARDHOLDER/TEST^2512101000001230"
    async with AuthorizationHost(config) as host:
        assert host.ledger is not None

        async def failing_card(pan: str) -> None:
            raise RuntimeError(f"card lookup failed for {pan}: track2 {track2} track1 {track1}")

        host.ledger.card = failing_card  # type: ignore[method-assign]
        request = Message(
            "0200",
            {
                2: PAN_OK,
                3: "000000",
                4: "000000000100",
                7: "1129101010",
                11: "000001",
                41: "TERMLOG1",
                49: "840",
            },
        )
        with caplog.at_level(logging.INFO):
            response = await host.handle(request)
    assert response is not None and response[39] == "96"
    lines = [r.getMessage() for r in caplog.records]
    line = next(text for text in lines if text.startswith("txn ") and " cause=" in text)
    assert "card lookup failed for 411111******1111" in line
    text = "\n".join(lines)
    assert PAN_OK not in text
    assert "25121010000012300000" not in text
    assert "2512101000001230" not in text


class _CountingStream:
    """A text stream that counts its flushes and what was flushed by then."""

    def __init__(self) -> None:
        self.text = ""
        self.flushed: list[str] = []

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        self.flushed.append(self.text)


def test_serve_log_flushes_once_per_loop_turn_and_at_once_elsewhere() -> None:
    import asyncio

    from isopace.cli._logging import FORMAT, TurnFlushed

    stream = _CountingStream()
    handler = TurnFlushed(stream)  # type: ignore[arg-type]
    handler.setFormatter(logging.Formatter(FORMAT))
    log = logging.getLogger("isopace.test.turns")
    log.propagate = False
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        log.info("before the loop")
        assert stream.flushed == [stream.text]  # off the loop: at once

        async def turns() -> None:
            for n in range(50):
                log.info("turn one %d", n)
            assert len(stream.flushed) == 1  # written, not yet flushed
            await asyncio.sleep(0)
            assert len(stream.flushed) == 2 and stream.flushed[-1].count("turn one") == 50
            log.info("turn two")
            # the loop stops before the turn's flush runs

        asyncio.run(turns())
        log.info("after the loop")
        assert stream.flushed[-1].endswith("after the loop\n")

        async def next_loop() -> None:
            log.info("a later loop")
            await asyncio.sleep(0)  # its own flush, not the stopped loop's

        asyncio.run(next_loop())
        assert stream.flushed[-1].endswith("a later loop\n")
        assert "INFO    isopace.test.turns: turn one 49" in stream.text
    finally:
        log.removeHandler(handler)
        log.propagate = True
