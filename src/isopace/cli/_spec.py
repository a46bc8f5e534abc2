"""``--spec NAME`` / ``--spec-file PATH``: the one choice of wire format of every command that
speaks ISO 8583 (``serve``, ``send``, ``bench``, ``describe``, and ``recover``, which runs the
host's flow).

The names, help texts and loading are the host configuration's (`isopace.host.config`: the
``spec`` and ``spec_file`` options, `wire_spec`), so a name or a file means the same to the host
and to its clients, and fails with the same one-line error.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from isopace.host.config import DEFAULT_SPEC, SPEC_FILE_HELP, SPEC_HELP, wire_spec

if TYPE_CHECKING:
    from isopace.iso8583 import Spec

__all__ = ["add_spec_flags", "chosen_spec"]


def add_spec_flags(p: argparse.ArgumentParser, *, default: str | None = DEFAULT_SPEC) -> None:
    """Add the two flags, mutually exclusive. ``default=None`` (``serve``): an absent flag leaves
    the choice to the configuration file; the help still names the default. A name is checked
    when the spec is chosen (`chosen_spec`, `HostConfig.validate`), not by argparse, so an unknown
    one is the same one-line error, listing the known names, as in the file."""
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--spec",
        default=default,
        metavar="NAME",
        help=f"{SPEC_HELP} (default: {DEFAULT_SPEC})",
    )
    group.add_argument("--spec-file", metavar="PATH", help=SPEC_FILE_HELP)


def chosen_spec(args: argparse.Namespace) -> Spec:
    """The spec ``add_spec_flags`` chose; a spec file that cannot be read is a one-line error."""
    return wire_spec(args.spec or DEFAULT_SPEC, getattr(args, "spec_file", None))
