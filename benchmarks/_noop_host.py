"""The no-op host of ``bench_host``: ``isopace serve``'s wire and nothing behind it.

The durable host is only worth what it adds to the part no host can avoid: accepting the
connections, framing, decoding the 0200 and encoding its 0210. This process does exactly that
part, built the way ``isopace serve`` builds it (`isopace.host.build_server`: the default
configuration's spec, framing and port limits, the collector frozen after start-up, the same
switch interval, uvloop when asked), and answers every request at once with ``request.reply()``
and DE 39 = 00, as the host's ``Respond`` stage does. Its throughput under the same ``isopace
bench`` load is the ceiling the durable host is measured against.

Run: ``python -m benchmarks._noop_host PORT [--uvloop]`` (``bench_host`` starts and stops it).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import signal
import sys

from isopace.host import build_server
from isopace.host.config import load_config
from isopace.iso8583 import Message
from isopace.iso8583 import response_codes as rc
from isopace.net import raise_open_file_limit


async def _approve(request: Message) -> Message:
    return request.reply().set(39, rc.APPROVED)


async def _serve(port: int) -> None:
    config = load_config()
    server = build_server(config, config.wire_spec(), _approve, port=port)
    await server.start()
    gc.collect()
    gc.freeze()  # as isopace serve does after start-up
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.close()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks._noop_host")
    parser.add_argument("port", type=int)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop (as serve --uvloop)")
    args = parser.parse_args(argv)
    sys.setswitchinterval(load_config().switch_interval)
    raise_open_file_limit()
    if args.uvloop:
        import uvloop

        uvloop.install()
    asyncio.run(_serve(args.port))


if __name__ == "__main__":
    main(sys.argv[1:])
