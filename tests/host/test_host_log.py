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


def test_the_queued_log_renders_off_the_calling_thread_in_order_and_flushes_on_stop() -> None:
    """``isopace serve``'s log: the caller only queues the record; its message (the
    transaction's profile among the arguments) is rendered by the writer thread; every line
    queued before ``stop()`` is written, in order; ``stop()`` gives logging back as it was."""
    import io
    import threading

    from isopace.cli._logging import QueuedLog

    rendered_on: list[int] = []

    class Lazy:
        def __str__(self) -> str:
            rendered_on.append(threading.get_ident())
            return "lazy"

    root = logging.getLogger()
    before = (root.handlers[:], root.level, logging.logThreads)
    stream = io.StringIO()
    queued = QueuedLog(logging.INFO, stream)
    try:
        log = logging.getLogger("isopace.test.queued")
        for n in range(200):
            log.info("line %d %s", n, Lazy())
        log.debug("below the level")
    finally:
        queued.stop()
    queued.stop()  # a second stop does nothing
    lines = stream.getvalue().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == [f"line {n} lazy" for n in range(200)]
    assert " INFO    isopace.test.queued: " in lines[0]
    assert rendered_on and threading.get_ident() not in rendered_on
    assert (root.handlers, root.level, logging.logThreads) == before


async def test_the_transaction_line_defers_its_profile(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The line's profile argument is built when the line is rendered (by the writer thread
    under ``isopace serve``), and renders what ``ex.profile()`` says."""
    config = HostConfig(port=0, db=str(tmp_path / "host.db"), synchronous="NORMAL")
    request = Message(
        "0200",
        {2: PAN_OK, 3: "000000", 4: "000000000100", 7: "1129101010", 11: "000002",
         41: "TERMLOG1", 49: "840"},
    )  # fmt: skip
    with caplog.at_level(logging.INFO):  # from the start: the host profiles when it logs
        async with AuthorizationHost(config) as host:
            response = await host.handle(request)
    assert response is not None and response[39] == "00"
    record = next(r for r in caplog.records if r.getMessage().startswith("txn "))
    profile = record.args[-1]  # type: ignore[index]
    assert not isinstance(profile, str)
    assert "reserve/prepare=" in str(profile)
    assert str(profile) in record.getMessage()
    assert PAN_OK not in record.getMessage()
