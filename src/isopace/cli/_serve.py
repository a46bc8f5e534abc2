"""``isopace serve``: run the authorization host until SIGINT / SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from typing import Any

from isopace.cli._output import Output, money
from isopace.cli._spec import add_spec_flags
from isopace.host.config import HostConfig, load_config, option_help, option_name, parse_bins


def _int_list(text: str) -> list[int]:
    try:
        return [int(p) for p in text.replace(" ", "").split(",") if p]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated field numbers") from None


def add_config_flags(parser: argparse.ArgumentParser, only: set[str] | None = None) -> None:
    """Add ``--config`` and one flag per `HostConfig` option (or just those in ``only``), named
    as the option (`option_name`: the TOML key too), its value stored under the attribute."""
    parser.add_argument(
        "--config", metavar="FILE", help="TOML file with any of these options (flags win)"
    )
    for name, (default, text, metavar) in option_help().items():
        if only is not None and name not in only:
            continue
        flag = "--" + option_name(name).replace("_", "-")
        shown = f" (default: {default})" if default not in (None, "") else ""
        if name == "spec":
            add_spec_flags(parser, default=None)  # and --spec-file: one choice, as the clients'
        elif name == "spec_file":
            continue
        elif isinstance(default, dict):  # a table: one KEY=VALUE entry a flag
            entries = " ".join(f"{k}={v}" for k, v in default.items()) or "none"
            parser.add_argument(
                flag,
                dest=name,
                action="append",
                metavar=metavar,
                help=f"{text}; repeat for each entry (default: {entries})",
            )
        elif HostConfig.__dataclass_fields__[name].type == "list[str]":  # one entry a flag
            parser.add_argument(
                flag, dest=name, action="append", metavar=metavar, help=f"{text}; repeat for each"
            )
        elif name == "idempotency_key":
            parser.add_argument(
                flag,
                type=_int_list,
                metavar="N,N,...",
                help=f"{text} (default: 41,11,7)",
            )
        elif isinstance(default, bool):
            parser.add_argument(
                flag,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=text + shown,
            )
        else:
            kind = HostConfig.__dataclass_fields__[name].type
            conv: Any = str
            if "int" in str(kind):
                conv = int
            elif "float" in str(kind):
                conv = float
            if metavar is None:
                metavar = {int: "N", float: "N"}.get(conv, "TEXT")
            parser.add_argument(flag, dest=name, type=conv, metavar=metavar, help=text + shown)


def config_from_args(args: argparse.Namespace) -> HostConfig:
    overrides: dict[str, Any] = {}
    for name in option_help():
        value = getattr(args, name, None)
        if value is None:
            continue
        if isinstance(value, list) and HostConfig.__dataclass_fields__[name].type.startswith(
            "dict"
        ):
            value = parse_bins(value, "--" + option_name(name).replace("_", "-"))
        overrides[name] = value
    return load_config(getattr(args, "config", None), overrides)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run the authorization host",
        description=(
            "Run the reference authorization host: ISO 8583 over TCP, a ledger (SQLite by default, "
            "PostgreSQL with --postgres), a durable journal with crash recovery at start-up, "
            "idempotent replay of retransmissions (SQLite, PostgreSQL or --redis), Prometheus "
            "metrics with --metrics-port. It speaks ISO 8583 in the wire format of --spec (default "
            "ascii: ASCII data, ASCII-hex bitmap) or --spec-file, each message behind the length "
            "header of --framing (default binary2), on --host / --port (default 127.0.0.1:8583). "
            "Every option can also be set in the --config TOML file "
            "under the same name (dashes or underscores). Keys: the card and journal "
            "fingerprints' keys live in key files (<name>.card.key, <name>.journal.key next to "
            "--db, mode 0600, or --card-key-file / --journal-key-file) or in $ISOPACE_CARD_KEY / "
            "$ISOPACE_JOURNAL_KEY (hex), never in the database; the data directory is 0700 and "
            "its files 0600 (isopace keys shows and rotates the keys)."
        ),
    )
    add_config_flags(p)
    p.set_defaults(func=run)


def _setup_logging(level: str) -> None:
    from isopace.cli import _logging

    _logging.setup(getattr(logging, level.upper(), logging.INFO), sys.stderr)


def run(args: argparse.Namespace) -> int:
    from isopace.net import raise_open_file_limit

    config = config_from_args(args)
    # whatever the caller's umask, what the host creates is its user's alone (the host also
    # creates its files 0600 explicitly: isopace.host.datadir)
    os.umask(0o077)
    _setup_logging(config.log_level)
    sys.setswitchinterval(config.switch_interval)
    # a server's descriptors: the default --max-connections is a share of this limit
    raise_open_file_limit()
    if config.uvloop:
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            logging.getLogger("isopace.host").warning("uvloop is not installed; using asyncio")
    return asyncio.run(_serve(config))


async def _serve(config: HostConfig) -> int:
    from isopace.host import AuthorizationHost

    out = Output()
    host = AuthorizationHost(config)
    await host.start()
    # Everything built at start-up (specs, stages, connections) lives as long as the process:
    # keep it out of the cyclic collector, whose full passes over it paused the loop ~20 ms.
    gc.collect()
    gc.freeze()
    try:
        if host.seeded:
            out.table(
                "demo ledger created (test cards):",
                ["card", "account", "balance", "status", "note"],
                [
                    (
                        _mask(c.pan),
                        c.account_id,
                        money(c.balance, c.currency),
                        c.status,
                        c.label,
                    )
                    for c in host.seeded
                ],
            )
        if host.recovery is not None and host.recovery.total:
            out.line(str(host.recovery))
        where = f"PostgreSQL schema {config.postgres_schema}" if config.postgres else config.db
        idem = "Redis" if config.redis else ("PostgreSQL" if config.postgres else "SQLite")
        wire = config.spec_file or config.spec
        out.line(
            f"isopace host listening on {config.host}:{host.port} "
            f"(spec {wire}, framing {config.framing}; ledger and journal: {where}; "
            f"idempotency: {idem}; node {host.node})"
        )
        if host.metrics_port is not None:
            out.line(f"metrics on http://{config.metrics_host}:{host.metrics_port}/metrics")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        out.line("stopping: finishing in-flight transactions")
    finally:
        await host.close()
    return 0


def _mask(pan: str) -> str:
    from isopace.iso8583 import mask_pan

    return mask_pan(pan)
