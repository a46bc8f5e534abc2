"""The host's configuration: one TOML file (stdlib ``tomllib``), every option also a flag.

`HostConfig` lists every option once, with its type, default and help text; the command line
builds its ``isopace serve`` flags from that list (``db`` -> ``--db``, ``metrics_port`` ->
``--metrics-port``), so the file and the flags cannot drift apart. Precedence: flag, then file,
then default.

The file uses the flags' names (dashes or underscores), at the top level (no sections), e.g.::

    port = 8583
    spec = "ascii-binary-bitmap"
    db = "isopace-data/isopace.db"
    metrics_port = 9100
    idempotency_key = [41, 11, 7]
    bin = { "4" = "visa", "5" = "mastercard" }   # or ["4=visa", "5=mastercard"], as --bin

An option's name is its attribute's unless its metadata says otherwise (``bins`` is ``bin``, as
its flag ``--bin``, one entry each); a name an earlier version used stays accepted as an alias
(``bins``). Unknown keys and values of the wrong type are rejected with a one-line `ConfigError`
naming the key and the file.

The wire format is ``spec`` (a built-in spec by name) or ``spec_file``: one replaces the other,
so a ``--spec`` flag overrides a ``spec_file`` in the file and the reverse; both in one file is
an error. `wire_spec` loads it, for ``isopace serve`` and the commands that speak to a host
alike, with the same one-line errors.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import ssl
import tomllib
from collections.abc import Mapping
from typing import Any

from isopace.host.conversion import Rates
from isopace.host.errors import ConfigError
from isopace.host.extensions import check_extension
from isopace.iso8583 import SPECS, Iso8583Error, Spec, load_spec_file, spec_by_name
from isopace.net.limits import (
    DEFAULT_FRAME_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_BUFFERED_BYTES,
    RESERVED_FILES,
)

__all__ = [
    "DEFAULT_BINS",
    "HostConfig",
    "load_config",
    "option_help",
    "option_name",
    "parse_bins",
    "wire_spec",
]

DEFAULT_BINS: dict[str, str] = {"4": "visa", "5": "mastercard"}


DEFAULT_SPEC = "ascii"

SPEC_HELP = (
    "wire format, a built-in spec: ascii (ASCII data, ASCII-hex bitmap: pyiso8583's "
    "default_ascii), ascii-binary-bitmap (ASCII data, 8-byte binary bitmap: pyiso8583's "
    "default), bcd (numbers packed BCD, binary bitmap) or ebcdic"
)
SPEC_FILE_HELP = (
    "wire format from a file instead of --spec: isopace's JSON spec format, or a pyiso8583 spec "
    "dict written as JSON"
)


def _opt(
    default: Any,
    help: str,
    *,
    metavar: str | None = None,
    name: str | None = None,
    aliases: tuple[str, ...] = (),
) -> Any:
    """One option: ``name`` is its flag's and TOML key's name when not the attribute's;
    ``aliases`` are older TOML keys still accepted."""
    meta = {"help": help, "metavar": metavar, "name": name, "aliases": aliases}
    if isinstance(default, list | dict):
        frozen = default

        def factory() -> Any:
            return type(frozen)(frozen)

        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(slots=True)
class HostConfig:
    """Every option of ``isopace serve`` (see the module docstring for the file format)."""

    host: str = _opt("127.0.0.1", "address to listen on", metavar="ADDR")
    port: int = _opt(8583, "TCP port for ISO 8583 traffic (0 picks a free port)")
    framing: str = _opt(
        "binary2",
        "length header: binary2 (2-byte big-endian), binary4, ascii2, ascii4, bcd2 or vmlh",
        metavar="KIND",
    )
    spec: str = _opt(DEFAULT_SPEC, SPEC_HELP, metavar="NAME")
    spec_file: str | None = _opt(None, SPEC_FILE_HELP, metavar="PATH")
    tls_cert: str | None = _opt(
        None, "PEM certificate chain: serve TLS (needs --tls-key)", metavar="FILE"
    )
    tls_key: str | None = _opt(None, "PEM private key of --tls-cert", metavar="FILE")
    max_in_flight: int = _opt(256, "requests processed at once per connection (back-pressure)")
    idle_timeout: float = _opt(
        DEFAULT_IDLE_TIMEOUT,
        "close a connection that sends no complete frame (keep-alives count) for this long, "
        "unless it waits for an answer; 0: never",
        metavar="SECONDS",
    )
    frame_timeout: float = _opt(
        DEFAULT_FRAME_TIMEOUT,
        "close a connection that starts a frame and does not finish it within this time (also "
        "the deadline of a TLS handshake); 0: never",
        metavar="SECONDS",
    )
    max_connections: int | None = _opt(
        None,
        "most connections open at once on the port; more are closed as soon as accepted (one "
        "WARNING with their count per 10 s); default: the open-file limit (raised to its hard "
        f"limit at start) minus {RESERVED_FILES} for the database, logs and keys",
        metavar="N",
    )
    max_buffered_bytes: int = _opt(
        DEFAULT_MAX_BUFFERED_BYTES,
        "most bytes of unfinished frames held across all connections; past it the connection "
        "holding the most is closed; 0: no cap",
        metavar="BYTES",
    )
    timeout: float = _opt(5.0, "deadline of one transaction in seconds", metavar="SECONDS")
    db: str = _opt(
        "isopace-data/isopace.db",
        "SQLite file of the ledger, the journal and the idempotency store",
        metavar="PATH",
    )
    synchronous: str = _opt("FULL", "SQLite synchronous level: NORMAL, FULL or EXTRA")
    postgres: str | None = _opt(
        None,
        "PostgreSQL DSN: ledger and journal in PostgreSQL instead of SQLite "
        "(several hosts may share it)",
        metavar="DSN",
    )
    postgres_schema: str = _opt("isopace", "PostgreSQL schema of the ledger and journal tables")
    redis: str | None = _opt(
        None, "Redis URL for the idempotency store (shared by several hosts)", metavar="URL"
    )
    redis_prefix: str = _opt("isopace:", "prefix of the Redis idempotency keys")
    node: str | None = _opt(
        None,
        "this host's name in the journal; default: the host name with SQLite (one host process "
        "per SQLite database; start-up recovery ends every node's transactions in it), "
        "hostname:port with PostgreSQL (start-up recovery ends this node's own)",
    )
    card_key_file: str | None = _opt(
        None,
        "key file of the ledger's card fingerprints (cards.pan_ref, holds.pan_ref; never in the "
        "database): one '<id> <hex key>' a line, current first, mode 0600. Default: "
        "$ISOPACE_CARD_KEY (hex keys, comma-separated, current first), else <name>.card.key "
        "next to --db (made on the first SQLite start; PostgreSQL nodes share one file or "
        "variable and never make one themselves)",
        metavar="FILE",
    )
    journal_key_file: str | None = _opt(
        None,
        "key file of the journal's PAN fingerprints (isopace journal --pan), same format. "
        "Default: $ISOPACE_JOURNAL_KEY, else <name>.journal.key next to --db (made on the first "
        "SQLite start); with PostgreSQL, derived from the card keys when neither exists",
        metavar="FILE",
    )
    new_card_key: bool = _opt(
        False,
        "create a new card key file when it is missing, on purpose (cards protected under a "
        "lost key can no longer be found); never replaces an existing file",
    )
    new_journal_key: bool = _opt(
        False,
        "create a new journal key file when it is missing, on purpose (records protected under "
        "a lost key can no longer be searched by card); never replaces an existing file",
    )
    journal_wait_final: bool = _opt(
        False,
        "wait for the journal's COMMITTED / ABORTED records to be durable before answering "
        "(off: they go with the next batch; a crash that loses one leaves the transaction in "
        "doubt and recovery ends it the same way: BEGIN and COMMITTING are always awaited)",
    )
    journal_retention: float = _opt(
        400.0,
        "days the journal keeps an ended transaction (committed, aborted, replayed) before the "
        "host prunes it, in small batches in the background; never one in doubt (0: keep all)",
        metavar="DAYS",
    )
    journal_prune_interval: float = _opt(
        600.0, "seconds between two pruning runs of the journal", metavar="SECONDS"
    )
    idempotency_key: list[int] = _opt(  # noqa: RUF009
        [41, 11, 7], "fields whose values (with the MTI class) identify a retransmission"
    )
    idempotency_ttl: float = _opt(
        86400.0, "how long answers are kept for replay", metavar="SECONDS"
    )
    idempotency_lease: float = _opt(
        30.0,
        "how long a claim of a crashed host blocks its retransmissions before it expires",
        metavar="SECONDS",
    )
    cash_daily_limit: int = _opt(
        50_000,
        "most cash per card per UTC day in minor units (withdrawals, DE 3 = 01, and the cash "
        "part of a purchase with cashback, 09), else 61 (0: no limit)",
        metavar="AMOUNT",
    )
    rates: dict[str, str] = _opt(  # noqa: RUF009
        {},
        "conversion rate from a request's currency (DE 49) to an account's, e.g. 978:840=1.0842; "
        "without one such a request is declined 57 (isopace.host.conversion)",
        metavar="FROM:TO=RATE",
        name="rate",
        aliases=("rates",),
    )
    early_reversal_window: float = _opt(
        86400.0,
        "how long a reversal whose original was not seen is remembered, so the late original "
        "is declined (12) and holds nothing",
        metavar="SECONDS",
    )
    hold_expiry: float = _opt(
        7 * 86400.0,
        "how long an authorization nobody completed keeps its hold before the host's "
        "background sweep releases it (state expired, listed by isopace ledger --expired); "
        "0: never",
        metavar="SECONDS",
    )
    hold_sweep_interval: float = _opt(
        60.0, "seconds between two runs of the hold expiry sweep", metavar="SECONDS"
    )
    bins: dict[str, str] = _opt(  # noqa: RUF009
        dict(DEFAULT_BINS),
        "BIN prefix -> network group (longest prefix wins)",
        metavar="BIN=GROUP",
        name="bin",
        aliases=("bins",),
    )
    unknown_bin_code: str = _opt("14", "response code for a PAN no BIN routes", metavar="CODE")
    velocity_window: float = _opt(60.0, "window of the per-card velocity limits", metavar="SECONDS")
    velocity_max_count: int = _opt(0, "most transactions per card per window (0: off), else 65")
    velocity_max_amount: int = _opt(
        0, "most spent per card per window in minor units (0: off), else 61"
    )
    extensions: list[str] = _opt(  # noqa: RUF009
        [],
        "a module of your own that adds stages to the host's flow: MODULE:FUNCTION, called as "
        "FUNCTION(flow, ledger, config) at start-up (isopace.host.extensions)",
        metavar="MODULE:FUNCTION",
        name="extension",
        aliases=("extensions",),
    )
    seed_demo: bool = _opt(True, "create and print demo cards when the ledger is empty")
    metrics_host: str = _opt("127.0.0.1", "address of the Prometheus metrics endpoint")
    metrics_port: int | None = _opt(
        None, "serve Prometheus metrics on this port (0: free port)", metavar="PORT"
    )
    log_level: str = _opt("INFO", "DEBUG, INFO, WARNING or ERROR")
    log_transactions: bool = _opt(True, "log one masked line per transaction with its profile")
    uvloop: bool = _opt(False, "run on uvloop if installed (the uvloop extra)")
    switch_interval: float = _opt(
        0.001,
        "interpreter thread switch interval: lower hands finished database work back sooner "
        "(lower latency under load); Python's default is 0.005",
        metavar="SECONDS",
    )

    def validate(self) -> HostConfig:
        """Check values that types alone do not; raises `ConfigError`."""
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} out of range 0..65535")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port {self.metrics_port} out of range 0..65535")
        if self.spec not in SPECS:
            wire_spec(self.spec)  # raises, naming the known specs
        if self.framing not in {"binary2", "binary4", "ascii2", "ascii4", "bcd2", "vmlh"}:
            raise ConfigError(f"framing {self.framing!r}: not one of binary2, binary4, ascii2, ...")
        if self.synchronous.upper() not in {"NORMAL", "FULL", "EXTRA"}:
            raise ConfigError(f"synchronous {self.synchronous!r}: use NORMAL, FULL or EXTRA")
        for extension in self.extensions:
            check_extension(extension)
        if not 0 < self.switch_interval <= 1:
            raise ConfigError(f"switch_interval {self.switch_interval}: between 0 and 1 second")
        if self.idempotency_lease <= 0 or self.idempotency_ttl <= 0:
            raise ConfigError("idempotency_lease and idempotency_ttl must be positive")
        if self.journal_retention < 0:
            raise ConfigError(f"journal_retention {self.journal_retention}: days, 0 or more")
        if self.journal_prune_interval <= 0:
            raise ConfigError(
                f"journal_prune_interval must be positive, not {self.journal_prune_interval}"
            )
        if self.hold_expiry < 0:
            raise ConfigError(f"hold_expiry {self.hold_expiry}: seconds, 0 (never) or more")
        if self.hold_sweep_interval <= 0:
            raise ConfigError(
                f"hold_sweep_interval must be positive, not {self.hold_sweep_interval}"
            )
        if self.timeout <= 0:
            raise ConfigError(f"timeout must be positive, not {self.timeout}")
        if self.max_in_flight < 1:
            raise ConfigError(f"max_in_flight must be at least 1, not {self.max_in_flight}")
        for name in ("idle_timeout", "frame_timeout", "max_buffered_bytes"):
            if (value := getattr(self, name)) < 0:
                raise ConfigError(f"{name} must be 0 (no limit) or positive, not {value}")
        if self.max_connections is not None and self.max_connections < 1:
            raise ConfigError(f"max_connections must be at least 1, not {self.max_connections}")
        if not self.idempotency_key or any(not 1 <= f <= 128 for f in self.idempotency_key):
            raise ConfigError(f"idempotency_key {self.idempotency_key}: fields 1..128 expected")
        Rates(self.rates)  # a rate that is no number or whose currencies are unknown
        for prefix, group in self.bins.items():
            if not prefix.isdigit() or not group:
                raise ConfigError(f"bin: {prefix!r} = {group!r}: digits = group name expected")
        if not (len(self.unknown_bin_code) == 2 and self.unknown_bin_code.isalnum()):
            raise ConfigError(f"unknown_bin_code {self.unknown_bin_code!r}: two characters")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key go together: give both or neither")
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ConfigError(f"log_level {self.log_level!r}: DEBUG, INFO, WARNING or ERROR")
        return self

    def wire_spec(self) -> Spec:
        """The spec the host decodes requests and encodes answers with (`wire_spec`)."""
        return wire_spec(self.spec, self.spec_file)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The server's TLS context, or None; bad files raise a one-line `ConfigError`."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        for path in (self.tls_cert, self.tls_key):
            if not os.path.isfile(path):
                raise ConfigError(f"TLS file {path}: not found")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ctx.load_cert_chain(self.tls_cert, self.tls_key)
        except (ssl.SSLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise ConfigError(
                f"TLS files {self.tls_cert}, {self.tls_key}: cannot load: {reason}"
            ) from exc
        return ctx

    @property
    def node_name(self) -> str:
        """``node``, else the default name (see "Nodes" in `isopace.host.app`): hostname:port
        with PostgreSQL, the hostname with SQLite."""
        if self.node:
            return self.node
        return f"{socket.gethostname()}:{self.port}" if self.postgres else socket.gethostname()

    @property
    def legacy_paths(self) -> tuple[str, str]:
        """Where an earlier isopace kept the journal and the idempotency store, apart from the
        ledger (``<name>.journal.db``, ``<name>.idem.db``); the host refuses to start next to
        them rather than leave their transactions behind."""
        return _sibling(self.db, "journal"), _sibling(self.db, "idem")


def wire_spec(name: str, path: str | None = None) -> Spec:
    """The spec file at ``path`` if given, else the built-in spec ``name``; one-line
    `ConfigError` naming the file (or listing the known names) when it cannot be had."""
    try:
        return load_spec_file(path) if path else spec_by_name(name)
    except Iso8583Error as exc:
        raise ConfigError(str(exc)) from exc


def _sibling(path: str, kind: str) -> str:
    root, ext = os.path.splitext(path)
    return f"{root}.{kind}{ext or '.db'}"


def option_help() -> dict[str, tuple[Any, str, str | None]]:
    """Each option's default, help text and metavar by attribute, in declaration order (for the
    CLI; `option_name` gives the flag's name)."""
    out: dict[str, tuple[Any, str, str | None]] = {}
    for f in dataclasses.fields(HostConfig):
        factory: Any = f.default_factory
        default = factory() if f.default is dataclasses.MISSING else f.default
        out[f.name] = (default, f.metadata["help"], f.metadata["metavar"])
    return out


def option_name(attribute: str) -> str:
    """The name of an option's flag and TOML key (``bins`` -> ``bin``), underscores for dashes."""
    return _NAMES[attribute]


_TYPES: dict[str, str] = {f.name: str(f.type) for f in dataclasses.fields(HostConfig)}
_NAMES: dict[str, str] = {
    f.name: f.metadata["name"] or f.name for f in dataclasses.fields(HostConfig)
}
#: TOML key (dashes read as underscores) -> attribute: each option's name and its aliases.
_KEYS: dict[str, str] = {
    key: f.name
    for f in dataclasses.fields(HostConfig)
    for key in (_NAMES[f.name], *f.metadata["aliases"])
}
#: A table option's entry form, by its flag's name (``bin`` -> ``BIN=NET``), for its errors.
_METAVARS: dict[str, str] = {
    _NAMES[f.name]: f.metadata["metavar"] or "KEY=VALUE"
    for f in dataclasses.fields(HostConfig)
    if str(f.type).startswith("dict")
}
#: Options that replace each other: the one given in a later layer (flags over the file) wins.
_EXCLUSIVE: dict[str, str] = {"spec": "spec_file", "spec_file": "spec"}


def _coerce(name: str, value: Any, where: str) -> Any:
    kind = _TYPES[name]
    optional = "None" in kind
    base = kind.replace(" | None", "")
    if value is None and optional:
        return None
    expected = base.replace("list[int]", "list of integers").replace("list[str]", "list of strings")
    if base == "dict[str, str]":
        expected = "a table of strings, or a list of 'KEY=VALUE' strings"
    bad = ConfigError(f"{where}: {option_name(name)} = {value!r}: expected {expected}")
    if base == "bool":
        if not isinstance(value, bool):
            raise bad
        return value
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if base == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        return float(value)
    if base == "str":
        if not isinstance(value, str):
            raise bad
        return value
    if base == "list[int]":
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise bad
        return list(value)
    if base == "list[str]":  # a list of strings, or one
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad
        return list(value)
    if base == "dict[str, str]":
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return parse_bins(value, option_name(name))
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise bad
        return dict(value)
    raise bad  # pragma: no cover - every declared type is handled above


def parse_bins(items: list[str], what: str = "--bin") -> dict[str, str]:
    """A table option's entries: ``["4=visa", "5=mastercard"]`` -> ``{"4": "visa", "5":
    "mastercard"}`` (``--bin``, ``--rate``: each split at its first ``=``)."""
    out: dict[str, str] = {}
    for item in items:
        prefix, sep, group = item.partition("=")
        if not sep:
            form = _METAVARS.get(what.lstrip("-").replace("-", "_"), "KEY=VALUE")
            raise ConfigError(f"{what} {item!r}: expected {form}")
        out[prefix.strip()] = group.strip()
    return out


def load_config(path: str | None = None, overrides: Mapping[str, Any] | None = None) -> HostConfig:
    """Defaults, then the TOML file at ``path`` (if any), then ``overrides`` (None: not given)."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError as exc:
            raise ConfigError(f"config {path}: not found") from exc
        except OSError as exc:
            raise ConfigError(f"config {path}: cannot read: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config {path}: not valid TOML: {exc}") from exc
        for key, value in data.items():
            name = _KEYS.get(key.replace("-", "_"))
            if name is None:
                raise ConfigError(f"config {path}: unknown key {key!r}")
            if name in values:
                raise ConfigError(f"config {path}: {key!r} repeats an earlier key (an alias)")
            values[name] = _coerce(name, value, f"config {path}")
        for name, other in _EXCLUSIVE.items():
            if name in values and other in values:
                raise ConfigError(f"config {path}: {name} and {other}: give one of them")
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        if name not in _TYPES:
            raise ConfigError(f"unknown option {name!r}")
        values.pop(_EXCLUSIVE.get(name, ""), None)
        values[name] = _coerce(name, value, "option")
    return HostConfig(**values).validate()
