"""``isopace send`` (one request, the response described) and ``isopace describe`` (decode)."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import random
import sys
from decimal import Decimal, InvalidOperation
from typing import Any

from isopace.cli._output import Output
from isopace.cli._spec import add_spec_flags, chosen_spec

FRAMINGS = ("binary2", "binary4", "ascii2", "ascii4", "bcd2", "vmlh")


def add_connection_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="host address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8583, help="host port (default: 8583)")
    p.add_argument(
        "--framing", choices=FRAMINGS, default="binary2", help="length header (default: binary2)"
    )
    add_spec_flags(p)
    p.add_argument(
        "--tls", action="store_true", help="connect with TLS (system trust store, or --tls-ca)"
    )
    p.add_argument("--tls-ca", metavar="FILE", help="CA file to verify the host's certificate")
    p.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for an answer (default: 10)"
    )


def client_ssl(args: argparse.Namespace) -> Any:
    if not args.tls and not args.tls_ca:
        return None
    import ssl

    from isopace.host.errors import ConfigError

    try:
        ctx = ssl.create_default_context(cafile=args.tls_ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TLS CA file {args.tls_ca}: cannot load: {exc}") from exc
    return ctx


def make_client(args: argparse.Namespace, **kw: Any) -> Any:
    from isopace.net import Client, Framing, LengthHeader

    return Client(
        chosen_spec(args),
        host=args.host,
        port=args.port,
        framing=Framing(header=LengthHeader(args.framing)),
        ssl=client_ssl(args),
        timeout=args.timeout,
        connect_timeout=min(args.timeout, 5.0),
        reconnect=False,
        **kw,
    )


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "send",
        help="send one message and print the response",
        description=(
            "Build one ISO 8583 request, send it to a host and print the request and the "
            "response described (card data masked). Missing fields get sensible values: DE 7 and "
            "12/13 from the clock, a random STAN, an RRN derived from them."
        ),
    )
    add_connection_flags(p)
    p.add_argument("--mti", default="0200", help="0100, 0200, 0400, 0420 or 0800 (default: 0200)")
    p.add_argument("--pan", help="card number (DE 2)")
    p.add_argument("--amount", help="amount in major units, e.g. 25.00 (DE 4)")
    p.add_argument("--processing-code", default="000000", help="DE 3 (default: 000000, purchase)")
    p.add_argument("--currency", default="840", help="DE 49 (default: 840)")
    p.add_argument("--stan", help="DE 11 (default: random)")
    p.add_argument("--time", dest="tx_time", help="DE 7 MMDDhhmmss (default: now, UTC)")
    p.add_argument("--terminal", default="TERM0001", help="DE 41 (default: TERM0001)")
    p.add_argument("--merchant", default="MERCHANT0000001", help="DE 42")
    p.add_argument("--rrn", help="DE 37 (default: derived from DE 7 and DE 11)")
    p.add_argument(
        "--original-stan", help="reversal: the original's STAN (builds DE 90 with --original-time)"
    )
    p.add_argument("--original-time", help="reversal: the original's DE 7 (MMDDhhmmss)")
    p.add_argument("--original-mti", default="0200", help="reversal: the original's MTI")
    p.add_argument(
        "--network-code", default="301", help="0800: DE 70 (301 echo, 001 sign-on, 002 sign-off)"
    )
    p.add_argument(
        "--field",
        "-f",
        action="append",
        default=[],
        metavar="N=VALUE",
        help="set any field (repeatable; wins over the options above); N= removes it",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the response as one JSON object (masked) instead of a table",
    )
    p.add_argument("--repeat", type=int, default=1, help="send the same message N times")
    p.set_defaults(func=run_send)


def _amount(text: str, currency: str) -> str:
    """DE 4 for ``--amount`` in major units: exact, or an error (never rounded, never inf/nan).

    The decimals allowed are the currency's (two for a currency the table does not know)."""
    from isopace.iso8583 import minor_units

    try:
        value = Decimal(text)
    except InvalidOperation:
        raise ValueError(f"--amount {text!r}: not a number") from None
    if not value.is_finite():
        raise ValueError(f"--amount {text!r}: not a finite amount")
    exponent = minor_units(currency)
    decimals = 2 if exponent is None else exponent
    minor = value.scaleb(decimals)
    if minor != minor.to_integral_value():
        raise ValueError(
            f"--amount {text!r}: currency {currency} has {decimals} decimals, the amount has more"
        )
    if minor < 0 or minor >= 10**12:
        raise ValueError(f"--amount {text!r}: out of range (0 to 12 digits of minor units)")
    return f"{int(minor):012d}"


def build_message(args: argparse.Namespace) -> Any:
    from isopace.iso8583 import Message

    now = dt.datetime.now(dt.UTC)
    tx_time = args.tx_time or now.strftime("%m%d%H%M%S")
    stan = args.stan or f"{random.randint(1, 999_999):06d}"
    fields: dict[int, str] = {7: tx_time, 11: stan}
    if args.mti.startswith("08"):
        fields[70] = args.network_code
    else:
        if args.pan:
            fields[2] = args.pan
        fields[3] = args.processing_code
        if args.amount is not None:
            fields[4] = _amount(args.amount, args.currency)
        fields[12] = now.strftime("%H%M%S")
        fields[13] = now.strftime("%m%d")
        fields[37] = args.rrn or (tx_time[4:] + stan)[-12:].rjust(12, "0")
        fields[41] = args.terminal
        fields[42] = args.merchant
        fields[49] = args.currency
        if args.original_stan:
            original_time = args.original_time or tx_time
            fields[90] = args.original_mti + args.original_stan.zfill(6) + original_time + "0" * 22
    message = Message(args.mti, fields)
    for item in args.field:
        n, sep, value = item.partition("=")
        if not sep or not n.strip().isdigit():
            raise ValueError(f"--field {item!r}: expected N=VALUE")
        message = message.set(int(n), value) if value else message.remove(int(n))
    return message


def _masked(message: Any) -> dict[str, str]:
    return dict(message.to_masked_dict())


def run_send(args: argparse.Namespace) -> int:
    from isopace.host.errors import ConfigError

    try:
        message = build_message(args)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return asyncio.run(_send(args, message))


async def _send(args: argparse.Namespace, message: Any) -> int:
    """Sends ``--repeat`` times; exit status 0 when every answer approves, 1 when one declines
    (any DE 39 outside the approval codes, or none), 2 for an error (raised to ``main``)."""
    from isopace.iso8583 import is_approval
    from isopace.net import NetError

    out = Output()
    client = make_client(args)
    try:
        await client.connect()
    except (NetError, OSError) as exc:
        from isopace.host.errors import StartupError

        raise StartupError(f"cannot connect to {args.host}:{args.port}: {exc}") from exc
    approved = True
    try:
        for _ in range(max(1, args.repeat)):
            try:
                response = await client.request(message, timeout=args.timeout)
            except NetError as exc:
                from isopace.host.errors import HostError

                raise HostError(f"no response from {args.host}:{args.port}: {exc}") from exc
            code = response.get(39)
            verdict = _verdict(code)
            approved = approved and is_approval(code)
            if args.json:
                doc = {"request": _masked(message), "response": _masked(response)}
                print(json.dumps({**doc, "result": verdict}))
            else:
                out.line("request:")
                out.line(message.describe())
                out.line("response:")
                out.line(response.describe())
                out.line(f"result: {verdict}")
    finally:
        await client.close()
    return 0 if approved else 1


def _verdict(code: str | None) -> str:
    """``51 insufficient funds (declined)``: the answer's DE 39, what it means, and the verdict."""
    from isopace.iso8583 import is_approval, meaning

    if code is None:
        return "no response code (DE 39 absent): declined"
    kind = "approved" if is_approval(code) else "declined"
    return f"{code} {meaning(code)} ({kind})"


# -- describe ------------------------------------------------------------------------------------


def add_describe_parser(sub: Any) -> None:
    p = sub.add_parser(
        "describe",
        help="decode a message and describe it (masked)",
        description=(
            "Decode one ISO 8583 message given as hex on the command line or in a file (hex text "
            "or raw bytes) and print its fields with descriptions, card data masked."
        ),
    )
    p.add_argument("hex", nargs="?", help="the message as hex digits")
    p.add_argument("--file", help="read the message from FILE (hex text or raw bytes); - = stdin")
    add_spec_flags(p)
    p.add_argument(
        "--framed",
        choices=FRAMINGS,
        help="the data starts with a length header of this kind (stripped before decoding)",
    )
    p.add_argument("--json", action="store_true", help="print the masked fields as JSON")
    p.set_defaults(func=run_describe)


def _read_input(args: argparse.Namespace) -> bytes:
    from isopace.host.errors import ConfigError

    if (args.hex is None) == (args.file is None):
        raise ConfigError("give the message as HEX or with --file (one of them)")
    if args.hex is not None:
        text = "".join(args.hex.split())
        try:
            return bytes.fromhex(text)
        except ValueError:
            raise ConfigError("HEX: not hexadecimal digits") from None
    try:
        if args.file == "-":
            raw = sys.stdin.buffer.read()
        else:
            with open(args.file, "rb") as fh:
                raw = fh.read()
    except OSError as exc:
        raise ConfigError(f"--file {args.file}: {exc.strerror or exc}") from exc
    stripped = b"".join(raw.split())
    try:
        if stripped and all(c in b"0123456789abcdefABCDEF" for c in stripped):
            return bytes.fromhex(stripped.decode())
    except ValueError:
        pass
    return raw


def run_describe(args: argparse.Namespace) -> int:
    from isopace.host.errors import ConfigError
    from isopace.iso8583 import Iso8583Error

    data = _read_input(args)
    if args.framed:
        from isopace.net import Framing, LengthHeader, NetError

        decoder = Framing(header=LengthHeader(args.framed)).decoder()
        try:
            frames = decoder.frames(data)
        except NetError as exc:
            raise ConfigError(f"frame: {exc}") from exc
        if not frames:
            raise ConfigError("frame: incomplete (the length header asks for more bytes)")
        data = frames[0].payload
    try:
        message = chosen_spec(args).decode(data)
        message.fields()  # decode every field now, so errors surface here
        text = message.describe()
    except Iso8583Error as exc:
        raise ConfigError(f"cannot decode: {exc}") from exc
    if args.json:
        print(json.dumps(_masked(message)))
    else:
        Output().line(text)
    return 0
