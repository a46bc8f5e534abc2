"""The ``isopace`` command line (also ``python -m isopace``).

Commands: ``serve`` (the authorization host), ``send`` (one request), ``bench`` (load),
``describe`` (decode a message), ``journal`` (query the journal), ``recover`` (offline crash
recovery), ``ledger`` (accounts, balance check, block / unblock a card) and ``keys`` (show, rotate
and re-key the card and journal keys). ``isopace <command>
--help`` explains each option.

Errors the user can fix (port in use, database unreachable, bad config key, bad TLS files, bad
input) are printed as one line, ``isopace: error: ...``, with exit status 2. ``rich`` (the ``cli``
extra) is used for tables and the progress bar when installed; plain text otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from isopace import __version__
from isopace.cli import _bench, _ops, _send, _serve
from isopace.cli._output import error
from isopace.errors import IsopaceError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    parser = argparse.ArgumentParser(
        prog="isopace",
        description="ISO 8583 card payment processing: an authorization host and its tools.",
    )
    parser.add_argument("--version", action="version", version=f"isopace {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _serve.add_parser(sub)
    _send.add_parser(sub)
    _bench.add_parser(sub)
    _send.add_describe_parser(sub)
    _ops.add_journal_parser(sub)
    _ops.add_recover_parser(sub)
    _ops.add_ledger_parser(sub)
    _ops.add_keys_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (``isopace ledger | head``): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except IsopaceError as exc:
        error(str(exc))
        return 2
    except OSError as exc:
        error(f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""))
        return 2
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
