"""What the server makes of a frame, read with its spec only: a message (to the handler, or
dropped when it is a response), a malformed request (answered 30), or no message of the spec
(dropped, with one WARNING per connection however many come).

Inputs tried, under the ASCII and the BCD spec: MTIs 9999 and ABCD on otherwise valid messages,
framed HTTP text, 50 frames of garbage on one connection, a valid request MTI followed by a
bitmap of garbage, and (BCD) a valid MTI whose fields are cut short.
"""

from __future__ import annotations

import logging

import pytest

from isopace.iso8583 import ISO87_BINARY, Message, Spec, error_reply
from isopace.net import Framing, Server

from .conftest import SPEC, make_request, raw_exchange, reply_handler

HTTP = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


async def format_error_handler(request: Message) -> Message:
    """Answers a valid request 00 and anything else 30 (as the host's parse stage does)."""
    if request.mti in ("0200", "0100"):
        return request.reply().set(39, "00")
    return error_reply(request, "30")


@pytest.mark.parametrize("spec", [SPEC, ISO87_BINARY], ids=["ascii", "bcd"])
@pytest.mark.parametrize("mti", ["9999", "ABCD"])
async def test_decoded_message_with_no_request_mti_reaches_the_handler(
    spec: Spec, mti: str
) -> None:
    seen: list[str] = []

    async def handler(request: Message) -> Message:
        seen.append(request.mti)
        return await format_error_handler(request)

    async with Server(spec, handler) as server:
        wire = spec.encode(make_request(31).with_mti(mti))
        (raw,) = await raw_exchange(server.port, Framing().encode_frame(wire))
    reply = spec.decode(raw)
    assert seen == [mti]
    # the MTI as received: nothing else derives from it
    assert (reply.mti, reply[39], reply[11], reply[41]) == (mti, "30", "000031", "TERM0001")


@pytest.mark.parametrize("spec", [SPEC, ISO87_BINARY], ids=["ascii", "bcd"])
async def test_frames_that_are_no_message_of_the_spec_are_dropped_with_one_warning(
    spec: Spec, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "isopace.net")
    framing = Framing()
    garbage = [bytes([0xDE, 0xAD, i, 0x20]) + b"not iso 8583" for i in range(49)]
    wire = b"".join(framing.encode_frame(p) for p in [HTTP, *garbage])
    wire += framing.encode_frame(spec.encode(make_request(32)))
    async with Server(spec, reply_handler) as server:
        (raw,) = await raw_exchange(server.port, wire)
    # never an answer with an MTI read from another encoding (HTTP's "GE" is BCD 4745)
    assert spec.decode(raw)[11] == "000032"
    drops = [r for r in caplog.records if "unparseable frame" in r.getMessage()]
    assert len(drops) == 1, [r.getMessage() for r in drops]
    assert drops[0].levelno == logging.WARNING
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_later_drops_are_counted_in_the_next_warning(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import isopace.net.server as server_module

    monkeypatch.setattr(server_module, "DROP_LOG_INTERVAL", 0.0)  # every drop may log
    caplog.set_level(logging.WARNING, "isopace.net")
    framing = Framing()
    async with Server(SPEC, reply_handler) as server:
        wire = framing.encode_frame(HTTP) * 2 + framing.encode_frame(SPEC.encode(make_request(3)))
        await raw_exchange(server.port, wire)
    drops = [r for r in caplog.records if "unparseable frame" in r.getMessage()]
    assert len(drops) == 2 and all(getattr(r, "dropped", None) == 1 for r in drops)


@pytest.mark.parametrize("spec", [SPEC, ISO87_BINARY], ids=["ascii", "bcd"])
async def test_valid_request_mti_in_a_frame_that_does_not_decode_gets_a_format_error(
    spec: Spec,
) -> None:
    good = spec.encode(make_request(33))
    cut = good[:-3]  # the last field cut short: DE 11 and 41 still recovered where they can be
    async with Server(spec, reply_handler) as server:
        (raw,) = await raw_exchange(server.port, Framing().encode_frame(cut))
    reply = spec.decode(raw)
    assert (reply.mti, reply[39]) == ("0210", "30")
