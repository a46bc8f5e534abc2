"""isopace.host: the reference authorization host built on the flow.

- `build_flow` / `isopace.host.stages`: the authorization flow (parse, network management, risk,
  BIN routing, reserve, reversal, respond), each stage a small documented class to copy.
- `SqliteLedger` / `PostgresLedger`: accounts, cards, holds keyed by transaction id, captures;
  balances that cannot overdraw under concurrency, idempotent capture / release for recovery.
- `HostConfig` / `load_config`: one TOML file, every option also a command-line flag.
- `Metrics` / `MetricsServer`: Prometheus text exposition fed by the flow's listener hook.
- `AuthorizationHost`: wires ledger, journal, idempotency store, recovery, server and metrics
  (what ``isopace serve`` runs). Logger: ``isopace.host``.
- `Stores` (`isopace.host.stores`): the ledger, the journal (`HostJournal`) and the idempotency
  store (`HostIdempotencyStore`) opened as the host opens them, with their keys and the SQLite
  data's lock (`lock_data`); `RecoveryPolicy` (`isopace.host.startup`): whose transactions
  recovery ends. The host and every operator command (``isopace journal``, ``recover``,
  ``ledger``, ``keys``) use these, so the rules are written once.
"""

from isopace.host.app import (
    BENCH_PAN,
    DEMO_CARDS,
    AuthorizationHost,
    build_flow,
    build_server,
    idempotency_key,
)
from isopace.host.config import HostConfig, load_config
from isopace.host.errors import ConfigError, HostError, LedgerError, StartupError
from isopace.host.ledger import (
    Account,
    Card,
    Hold,
    HoldState,
    Ledger,
    LedgerCheck,
    PostgresLedger,
    ReserveResult,
    ReserveStatus,
    SeedCard,
    SqliteLedger,
)
from isopace.host.metrics import Metrics, MetricsServer
from isopace.host.stages import (
    BinRoute,
    Declined,
    Dispatch,
    NetworkManagement,
    Parse,
    Reserve,
    Respond,
    Reversal,
    Risk,
    Velocity,
)
from isopace.host.startup import RecoveryPolicy
from isopace.host.stores import HostIdempotencyStore, HostJournal, Stores, lock_data

__all__ = [
    "BENCH_PAN",
    "DEMO_CARDS",
    "Account",
    "AuthorizationHost",
    "BinRoute",
    "Card",
    "ConfigError",
    "Declined",
    "Dispatch",
    "Hold",
    "HoldState",
    "HostConfig",
    "HostError",
    "HostIdempotencyStore",
    "HostJournal",
    "Ledger",
    "LedgerCheck",
    "LedgerError",
    "Metrics",
    "MetricsServer",
    "NetworkManagement",
    "Parse",
    "PostgresLedger",
    "RecoveryPolicy",
    "Reserve",
    "ReserveResult",
    "ReserveStatus",
    "Respond",
    "Reversal",
    "Risk",
    "SeedCard",
    "SqliteLedger",
    "StartupError",
    "Stores",
    "Velocity",
    "build_flow",
    "build_server",
    "idempotency_key",
    "load_config",
    "lock_data",
]
