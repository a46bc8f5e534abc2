"""The host's ledger: accounts, cards, holds keyed by transaction id, and captures.

Two backends with one interface (`Ledger`): `SqliteLedger` (standard library, the default) and
`PostgresLedger` (asyncpg, the ``postgres`` extra) for several host processes sharing one database.

Money model (amounts in minor units, integers):

- ``accounts``: ``opening`` (the balance when the account was created), ``balance`` (posted) and
  ``held`` (the sum of open holds). Available funds are ``balance - held``; the database refuses
  any row where that goes negative (a CHECK constraint), as a last line of defence.
- ``holds``: one row per transaction id (the flow's exchange id), the reservation made in the
  prepare pass. States: ``pending`` (prepared, outcome not known yet), ``authorized`` (an 0100
  committed: the funds stay held), ``captured`` (an 0200 committed: posted to the balance),
  ``released`` (aborted or an authorization reversed), ``refunded`` (a captured transaction
  reversed) and ``expired`` (an authorization nobody completed, released by the host's sweep,
  `Ledger.expire`). A completion captures an authorization's hold itself (``authorized`` ->
  ``captured``, at the completion's amount, the rest released), after claiming it
  (``completed_by``: the completion's transaction id) so no other completion or expiry takes
  it meanwhile.
- ``captures``: one row per captured transaction (the posting), with ``refunded_at`` once reversed.

Concurrency: a hold is taken by one conditional statement, ``UPDATE accounts SET held = held +
:amount WHERE id = :account AND balance - held >= :amount``, in the same database transaction as
the hold's INSERT (on PostgreSQL a single ``WITH ... UPDATE ... INSERT`` statement). Two holds
racing for the last funds cannot both succeed: the database serialises the row update and re-checks
the condition.

Idempotency: ``capture``, ``authorize``, ``release``, ``refund``, ``complete`` and ``expire``
are conditional state transitions (``UPDATE holds ... WHERE txn_id = ? AND state IN (...)``);
running one twice, as crash recovery may, changes nothing the second time. ``reserve`` of a
transaction id that already has a hold returns the existing outcome instead of holding twice.

Card numbers are never stored in clear: cards are keyed by an HMAC-SHA256 of the PAN under the
card key, ``<key id>:<hmac>``, with the masked PAN (first 6 / last 4) for display. The key is
never in the database (a key file or an environment variable, `isopace.store.keys`; a production
issuer keeps it in an HSM or KMS): beside the masked PAN it would give every card number back.

The SQLite backend runs every operation on one writer thread that batches whatever is queued into
one SQLite transaction (group commit, ``synchronous=FULL`` by default); when an operation fails,
the batch is rolled back and run again with each operation inside its own SAVEPOINT, so one
failure does not affect its neighbours. Operations apply in the order they
were submitted, so a release queued after a reserve always sees the hold.
"""

from isopace.host.ledger._common import (
    Account,
    Card,
    Hold,
    HoldDetails,
    HoldState,
    Kind,
    Ledger,
    LedgerCheck,
    ReserveResult,
    ReserveStatus,
    SeedCard,
)
from isopace.host.ledger._postgres import PostgresLedger
from isopace.host.ledger._sqlite import SqliteLedger

__all__ = [
    "Account",
    "Card",
    "Hold",
    "HoldDetails",
    "HoldState",
    "Kind",
    "Ledger",
    "LedgerCheck",
    "PostgresLedger",
    "ReserveResult",
    "ReserveStatus",
    "SeedCard",
    "SqliteLedger",
]
