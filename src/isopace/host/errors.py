"""Errors of the authorization host: configuration, ledger and start-up problems.

Every message is one line that names what is wrong (the option, the file, the address), so the
command line can print it as it is and exit with status 2.
"""

from __future__ import annotations

from isopace.errors import IsopaceError
from isopace.iso8583.masking import mask_text


class HostError(IsopaceError):
    """Base class of the host's errors."""


class ConfigError(HostError, ValueError):
    """A bad configuration: unknown key, wrong type, unreadable file, bad TLS files."""


class LedgerError(HostError):
    """The ledger database cannot be opened or used (unreachable, read-only, wrong schema)."""


class StartupError(HostError):
    """The host cannot start: port in use, database unreachable, recovery failed."""


def one_line(exc: BaseException) -> str:
    """The exception's text on one line, with card numbers and track data masked (a stage's or a
    driver's error may quote them)."""
    return mask_text(" ".join(str(exc).split())) or type(exc).__name__
