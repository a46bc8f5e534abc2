"""What both ledger backends share: the value types, the `Ledger` interface, and the SQL and
checks that read the same on SQLite and PostgreSQL."""

from __future__ import annotations

import abc
import dataclasses
import enum
import time
from collections.abc import Iterable, Sequence
from typing import Any

from isopace.host.errors import LedgerError
from isopace.store.keys import REKEY_BATCH, Key, KeyRing, KeyUsage, key_id_sql, rekey_value

#: Version 1: accounts, cards, holds, captures. Version 2: holds.idem_key and
#: holds.approval_code, with a unique index on the live holds' keys. Version 3: holds.pan_ref,
#: the card's keyed hash, which a reversal must match. Version 4: the card key leaves
#: ``ledger_meta`` for a key file, and new ``pan_ref`` values carry their key's id
#: (``<id>:<hmac>``, see `isopace.store.keys`); upgrades are applied on open, the key is moved
#: by the host (`legacy_card_key`, `drop_legacy_card_key`). Version 5: holds.original_amount
#: (the amount first held, once a partial reversal has lowered ``amount``) and the
#: ``early_reversals`` table (reversals that arrived before their original). Version 6:
#: holds.kind (the transaction type of DE 3: purchase, cash, cashback, refund) and holds.cash
#: (the cash part, counted against the card's daily cash limit); a refund's credit is a hold in
#: state ``credited`` with a negative capture; holds.completed_by (the completion that claimed
#: an authorization, `Ledger.claim_completion`) and the ``expired`` state (`Ledger.expire`),
#: with the indexes they are found by.
SCHEMA_VERSION = 6


class HoldState(enum.StrEnum):
    """The life of a hold (see the package docstring)."""

    PENDING = "pending"
    AUTHORIZED = "authorized"
    CAPTURED = "captured"
    RELEASED = "released"
    REFUNDED = "refunded"
    CREDITED = "credited"
    """A refund (DE 3 = 20) posted to the account: its capture row is negative."""
    EXPIRED = "expired"
    """An authorization nobody completed in time: released by the expiry sweep."""


OPEN_STATES = (HoldState.PENDING.value, HoldState.AUTHORIZED.value)


class Kind(enum.StrEnum):
    """What a hold was made for: the transaction type of the request's DE 3."""

    PURCHASE = "purchase"
    CASH = "cash"
    CASHBACK = "cashback"
    REFUND = "refund"


class ReserveStatus(enum.Enum):
    """What `Ledger.reserve` decided."""

    APPROVED = "approved"
    INSUFFICIENT_FUNDS = "insufficient_funds"
    NO_ACCOUNT = "no_account"
    DUPLICATE = "duplicate"
    """A live hold already carries this idempotency key: ``ReserveResult.original``."""
    OVER_CASH_LIMIT = "over_cash_limit"
    """The cash part would take the card over its daily cash limit: nothing is held."""
    REVERSED = "reversed"
    """A reversal of this very transaction (same terminal, STAN + transmission time or RRN,
    card and amount) arrived before it (`Ledger.remember_reversal`): nothing is held."""


@dataclasses.dataclass(frozen=True, slots=True)
class ReserveResult:
    """The outcome of a reservation and the funds available after it."""

    status: ReserveStatus
    available: int | None = None
    original: Hold | None = None

    @property
    def approved(self) -> bool:
        return self.status is ReserveStatus.APPROVED


@dataclasses.dataclass(frozen=True, slots=True)
class Card:
    """A card as the ledger knows it: no clear PAN, only its keyed hash and masked form."""

    pan_ref: str
    masked_pan: str
    account_id: str
    status: str
    currency: str = ""
    """Its account's currency (ISO 4217 numeric): requests in another are declined."""

    @property
    def blocked(self) -> bool:
        return self.status != "active"


@dataclasses.dataclass(frozen=True, slots=True)
class Account:
    """An account's figures in minor units."""

    id: str
    currency: str
    opening: int
    balance: int
    held: int

    @property
    def available(self) -> int:
        return self.balance - self.held


@dataclasses.dataclass(frozen=True, slots=True)
class HoldDetails:
    """What a hold keeps of its request besides the money: the identifiers a reversal, a
    completion or a retransmission finds it by (DE 41, 11, 7, 37, the idempotency key, the
    card's `pan_ref`), its MTI and the approval code it was answered with. One value passed to
    `Ledger.reserve` and `Ledger.credit` rather than eight keywords each, in the order of the
    holds table's columns (`columns`), which both backends write as they are."""

    mti: str | None = None
    terminal: str | None = None
    stan: str | None = None
    tx_time: str | None = None
    rrn: str | None = None
    idem_key: str | None = None
    approval_code: str | None = None
    pan_ref: str | None = None

    def columns(self) -> tuple[str | None, ...]:
        """The values of the holds table's ``mti`` .. ``pan_ref`` columns, in order."""
        return (self.mti, self.terminal, self.stan, self.tx_time, self.rrn, self.idem_key,
                self.approval_code, self.pan_ref)  # fmt: skip


#: a hold that records nothing of its request (tests, and the seeding of demo data)
NO_DETAILS = HoldDetails()


@dataclasses.dataclass(frozen=True, slots=True)
class Hold:
    """A reservation, keyed by the transaction id that made it."""

    txn_id: str
    account_id: str
    amount: int
    state: str
    mti: str | None = None
    terminal: str | None = None
    stan: str | None = None
    tx_time: str | None = None
    rrn: str | None = None
    idem_key: str | None = None
    approval_code: str | None = None
    pan_ref: str | None = None
    """The card's keyed hash (None on holds made before schema version 3)."""
    original_amount: int | None = None
    """The amount first held, once a partial reversal lowered ``amount`` (None: never)."""
    kind: str | None = None
    """The transaction type (`Kind`; None on holds made before schema version 6)."""
    cash: int = 0
    """The cash part of the amount (a withdrawal's whole amount, a cashback's DE 54 part)."""

    @property
    def first_amount(self) -> int:
        """The amount of the original transaction, whatever partial reversals left of it."""
        return self.amount if self.original_amount is None else self.original_amount


@dataclasses.dataclass(frozen=True, slots=True)
class SeedCard:
    """A demo card with its account, created on first start."""

    pan: str
    account_id: str
    balance: int
    currency: str = "840"
    status: str = "active"
    label: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class LedgerCheck:
    """The result of `Ledger.check`: every invariant that failed, and the holds still pending."""

    accounts: int
    holds: int
    pending: int
    problems: tuple[str, ...]
    expired: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclasses.dataclass(frozen=True, slots=True)
class RekeyReport:
    """What `Ledger.rekey` did: cards and holds moved to the current key, and the fingerprints
    left under another key (its key missing, or a number too long to recover)."""

    cards: int
    holds: int
    left: int


class Ledger(abc.ABC):
    """The operations the host's stages need; every method is a coroutine (see the package doc).

    Card numbers are found by their fingerprint under the card keys (`use_keys`, a
    `isopace.store.keys.KeyRing` that never comes from the database): ``pan_ref`` under the
    current key, and a lookup tries every key of the ring, so cards not yet re-keyed after a
    rotation are still found."""

    _keys: KeyRing | None = None
    _last_ref: tuple[Key, str, str] | None = None

    def use_keys(self, keys: KeyRing) -> None:
        """The card keys (current first); the card cache is dropped (a rotated key)."""
        self._keys = keys
        self._last_ref = None
        self.__dict__.pop("_card_cache", None)

    @property
    def keys(self) -> KeyRing:
        if self._keys is None:
            raise LedgerError("ledger: no card key (give the ledger a key ring: keys=...)")
        return self._keys

    def pan_ref(self, pan: str) -> str:
        """The keyed hash that identifies a card without storing its number (current key).

        The last one is remembered: a transaction asks for its card's twice in a row (the card
        lookup of the risk stage, then the reserve's hold), one keyed hash instead of two."""
        keys = self.keys
        current = keys.current  # a ring reloaded in place has a new current key
        last = self._last_ref
        if last is not None and last[0] is current and last[1] == pan:
            return last[2]
        ref = keys.fingerprint(pan)
        self._last_ref = (current, pan, ref)
        return ref

    def pan_refs(self, pan: str) -> list[str]:
        """Every form a card's ``pan_ref`` may have under the ring's keys (current first)."""
        return self.keys.candidates(pan)

    async def __aenter__(self) -> Ledger:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect, create or upgrade the schema, load the card key."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections and threads (pending operations finish first)."""

    @abc.abstractmethod
    async def seed(self, cards: Iterable[SeedCard]) -> list[SeedCard]:
        """Create the cards and accounts that do not exist yet; returns the ones created."""

    #: Seconds a card looked up stays cached in this process (0: no cache). A card blocked by
    #: another process is seen within this time; one blocked through this ledger at once.
    card_cache_ttl: float = 2.0
    _card_cache: dict[str, tuple[float, Card | None]]

    async def card(self, pan: str) -> Card | None:
        """The card with this PAN, or None (cached for `card_cache_ttl` seconds, under its
        ``pan_ref``: the forms it has under older keys are computed on a miss only)."""
        if self.card_cache_ttl <= 0:
            return await self._fetch_card(self.pan_refs(pan))
        ref = self.pan_ref(pan)
        cache: dict[str, tuple[float, Card | None]] = self.__dict__.setdefault("_card_cache", {})
        now = time.monotonic()
        hit = cache.get(ref)
        if hit is not None and hit[0] > now:
            return hit[1]
        card = await self._fetch_card(self.pan_refs(pan))
        if len(cache) >= 100_000:
            cache.clear()
        cache[ref] = (now + self.card_cache_ttl, card)
        return card

    def _forget_card(self, pan: str) -> None:
        self.__dict__.get("_card_cache", {}).pop(self.pan_ref(pan), None)

    @abc.abstractmethod
    async def _fetch_card(self, pan_refs: Sequence[str]) -> Card | None:
        """The card with one of these keyed PAN hashes (`pan_refs`), from the database."""

    # -- keys ----------------------------------------------------------------------------------

    @abc.abstractmethod
    async def legacy_card_key(self) -> bytes | None:
        """The card key an earlier version kept in ``ledger_meta`` (None once moved out)."""

    @abc.abstractmethod
    async def drop_legacy_card_key(self) -> None:
        """Delete the card key from ``ledger_meta`` (once it is safe in its key file), leaving no
        copy in the database's files."""

    @abc.abstractmethod
    async def sample_pan_ref(self) -> str | None:
        """One card's ``pan_ref`` (None: no card yet, nothing protected)."""

    @abc.abstractmethod
    async def key_usage(self) -> KeyUsage:
        """Fingerprints in cards and holds per key id (None: made before key ids)."""

    @abc.abstractmethod
    async def _stale_cards(self, current: str, after: str, limit: int) -> list[tuple[str, str]]:
        """Up to ``limit`` cards ``(pan_ref, masked_pan)`` not under key id ``current``, with
        ``pan_ref > after``, by ``pan_ref``."""

    @abc.abstractmethod
    async def _move_ref(self, old: str, new: str | None, batch: int) -> tuple[int, int]:
        """Re-key one card: its holds ``old`` -> ``new`` in transactions of ``batch`` rows, then
        the card itself (``new`` None: nothing moves). Returns (cards, holds) updated."""

    async def rekey(self, batch: int = REKEY_BATCH) -> RekeyReport:
        """Move every card and hold fingerprint to the current key, a card (and up to ``batch``
        of its holds) per database transaction, while the host may run: a card's number is
        recovered from its masked form under its old key (`isopace.store.keys.rekey_value`).
        Holds are re-keyed before their card, so a lookup finds the card under either key
        meanwhile (a lookup tries every key)."""
        ring = self.keys
        cards = holds = 0
        after = ""
        while stale := await self._stale_cards(ring.current.id, after, batch):
            for old, masked in stale:
                new = rekey_value(ring, old, masked)
                if new is not None:
                    c, h = await self._move_ref(old, new, batch)
                    cards += c
                    holds += h
            after = stale[-1][0]
        self.__dict__.pop("_card_cache", None)
        usage = await self.key_usage()
        left = sum(n for kid, n in usage.items() if kid != ring.current.id)
        return RekeyReport(cards, holds, left)

    @abc.abstractmethod
    async def set_card_status(self, pan: str, status: str) -> bool:
        """Block (``"blocked"``) or unblock (``"active"``) a card; False when unknown."""

    @abc.abstractmethod
    async def account(self, account_id: str) -> Account | None:
        """One account's figures."""

    @abc.abstractmethod
    async def accounts(self) -> list[Account]:
        """Every account, by id."""

    @abc.abstractmethod
    async def reserve(
        self,
        txn_id: str,
        account_id: str,
        amount: int,
        details: HoldDetails = NO_DETAILS,
        *,
        kind: Kind = Kind.PURCHASE,
        cash: int = 0,
        cash_limit: int = 0,
    ) -> ReserveResult:
        """Hold ``amount`` on the account for this transaction, if the available funds allow.

        ``cash`` (the cash part of a withdrawal or cashback) counts against the card's daily
        cash limit ``cash_limit`` (0: none): the cash of the card's live holds (pending,
        authorized, captured) made since midnight UTC plus ``cash`` must not exceed it, else
        OVER_CASH_LIMIT. The check and the hold are one atomic step per card, so concurrent
        withdrawals cannot pass the limit together.

        ``details.idem_key`` (the request's idempotency key) makes the ledger refuse a second
        live hold for the same request: it answers DUPLICATE with the original hold (and its
        ``approval_code``) instead. This catches a retransmission the idempotency store could
        not replay, e.g. one whose original was finished by crash recovery. ``details.pan_ref``
        (the card's `pan_ref`) is kept on the hold so a reversal can be matched to the card."""

    @abc.abstractmethod
    async def authorize(self, txn_id: str) -> bool:
        """pending -> authorized (an authorization committed; the funds stay held)."""

    @abc.abstractmethod
    async def capture(self, txn_id: str) -> bool:
        """pending/authorized -> captured: post the amount to the balance. Idempotent."""

    @abc.abstractmethod
    async def release(self, txn_id: str) -> bool:
        """pending/authorized -> released: free the held funds. Idempotent."""

    @abc.abstractmethod
    async def refund(self, txn_id: str) -> bool:
        """captured -> refunded: give the posted amount back. Idempotent."""

    @abc.abstractmethod
    async def credit(
        self,
        txn_id: str,
        account_id: str,
        amount: int,
        details: HoldDetails = NO_DETAILS,
    ) -> bool:
        """Post a refund: ``amount`` added to the account's balance, recorded as a hold in state
        ``credited`` (for reversals and the journal) with a negative capture (so the balance
        still equals the opening balance minus the captures). Idempotent: False, and nothing
        posted, when this transaction, or another of the same ``idem_key``, has credited
        already (crash recovery may run it again; a retransmission may race its original)."""

    @abc.abstractmethod
    async def hold_by_key(self, idem_key: str) -> Hold | None:
        """The live hold (or credit) made for the request of this idempotency key, if any."""

    @abc.abstractmethod
    async def reduce(self, txn_id: str, amount: int) -> bool:
        """A partial reversal: the transaction now stands at ``amount`` (lower than it stands):
        an open hold holds less, a capture gives the difference back to the balance (and its
        capture row is lowered to match). The amount first held is kept in ``original_amount``.
        False (nothing changed) when the hold is gone, released or refunded, or already at or
        below ``amount``, so a repeated partial reversal changes nothing."""

    @abc.abstractmethod
    async def remember_reversal(
        self,
        txn_id: str,
        *,
        terminal: str,
        stan: str | None,
        tx_time: str | None,
        rrn: str | None,
        pan_ref: str,
        amount: int,
        expires_in: float,
    ) -> bool:
        """Remember, for ``expires_in`` seconds, a reversal (transaction ``txn_id``) whose
        original has not been seen: the original's terminal, STAN + transmission time (DE 90)
        or RRN, card (``pan_ref``, current key) and amount. A `reserve` that matches it answers
        REVERSED and holds nothing. False when ``txn_id`` is remembered already. Also drops a
        few expired entries (the table holds only reversals that overtook their original)."""

    @abc.abstractmethod
    async def forget_reversal(self, txn_id: str) -> bool:
        """Undo `remember_reversal` (the reversal's transaction aborted)."""

    # -- completions and expiry ------------------------------------------------------------------

    @abc.abstractmethod
    async def claim_completion(self, txn_id: str, by: str) -> bool:
        """Mark the open hold ``txn_id`` (an authorization) as being completed by transaction
        ``by`` (``holds.completed_by``), so no other completion and no expiry takes it
        meanwhile; no money moves. True when ``by`` holds the claim (again: idempotent); False
        when the hold is gone, no longer open, or claimed by another completion."""

    @abc.abstractmethod
    async def complete(self, by: str, amount: int) -> bool:
        """Capture the hold claimed by ``by`` up to ``amount`` (at most what it holds): the
        balance is debited the captured amount, the whole hold is freed (the rest released),
        and the amount first held is kept in ``original_amount`` when less is captured. One
        conditional transition: False (nothing changed) when no open hold carries the claim,
        so a completion run again, as recovery may, captures nothing twice."""

    @abc.abstractmethod
    async def unclaim_completion(self, by: str) -> bool:
        """Undo `claim_completion` (the completion aborted): the hold stays open as it was."""

    @abc.abstractmethod
    async def expire(self, older_than: float, *, batch: int = 100) -> int:
        """Release the authorizations nobody completed: ``authorized`` holds made more than
        ``older_than`` seconds ago become ``expired`` and free their funds. A hold claimed by
        a completion is left alone unless the claim itself is that old (its completion died
        with no journal record). Pending holds are never touched (crash recovery ends them).
        Runs ``batch`` holds per database transaction and yields to the event loop between
        batches, so the transactions being served are never held up for long; returns how
        many expired."""

    @abc.abstractmethod
    async def expired_holds(self, limit: int = 100) -> list[Hold]:
        """The most recently expired holds, newest first (for ``isopace ledger --expired``)."""

    @abc.abstractmethod
    async def hold(self, txn_id: str) -> Hold | None:
        """The hold made by this transaction, if any."""

    @abc.abstractmethod
    async def find_original(
        self,
        *,
        terminal: str,
        stan: str | None = None,
        tx_time: str | None = None,
        rrn: str | None = None,
        pan_ref: str | Sequence[str] | None = None,
        amount: int | None = None,
        approval_code: str | None = None,
    ) -> Hold | None:
        """The most recent hold of this terminal with this STAN (+ transmission time) or RRN,
        else (``approval_code``: a completion that names its authorization by DE 38) with this
        approval code.

        ``amount`` is matched against the amount the transaction was made for
        (`Hold.first_amount`), so a full reversal after a partial one still finds it. With
        ``pan_ref`` (the card's `pan_ref`, or all its forms, `pan_refs`: a hold made before
        a key rotation finished carries the old one) and ``amount``, only a hold of that card and
        that
        amount matches (a hold made before schema version 3, without a card reference, matches
        when the card belongs to the hold's account), so a reversal cannot reach another card's
        transaction."""

    @abc.abstractmethod
    async def pending_holds(self) -> list[Hold]:
        """Holds whose transaction's outcome is not known to the ledger yet."""

    @abc.abstractmethod
    async def check(self) -> LedgerCheck:
        """Verify the ledger balances: balance = opening - live captures, held = open holds."""

    async def reverse(self, txn_id: str) -> str:
        """Undo a committed transaction: release an authorization, refund a capture.

        Returns the transition applied (``"released"``, ``"refunded"``) or ``"none"`` when the
        transaction was already reversed (a repeated reversal changes nothing).
        """
        if await self.release(txn_id):
            return "released"
        if await self.refund(txn_id):
            return "refunded"
        return "none"


#: Version 6: the completion that claimed a hold is found by its transaction id (recovery), and
#: the expiry sweep finds the oldest authorizations; both partial, so a purchase (never
#: claimed, never ``authorized``) adds nothing to maintain on the way in.
COMPLETION_INDEXES = (
    "CREATE INDEX IF NOT EXISTS holds_by_completion ON holds (completed_by) "
    "WHERE completed_by IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS holds_authorized ON holds (created_at) WHERE state = 'authorized'",
)

KEY_INDEX = """
CREATE UNIQUE INDEX IF NOT EXISTS holds_by_key ON holds (idem_key)
    WHERE idem_key IS NOT NULL AND state <> 'released'
"""

HOLD_COLUMNS = (
    "txn_id, account_id, amount, state, mti, terminal, stan, tx_time, rrn, idem_key, approval_code,"
    " pan_ref, original_amount, kind, cash"
)

#: The live holds' cash of a card since a time: what its daily cash limit counts.
CASH_STATES = ("pending", "authorized", "captured")

#: Partial reversals: the condition a hold must meet to be lowered to a new amount.
REDUCIBLE_STATES = ("pending", "authorized", "captured")

CHECK_SQL = """
SELECT a.id, a.opening, a.balance, a.held,
       COALESCE((SELECT SUM(amount) FROM captures c
                 WHERE c.account_id = a.id AND c.refunded_at IS NULL), 0),
       COALESCE((SELECT SUM(amount) FROM holds h
                 WHERE h.account_id = a.id AND h.state IN ('pending', 'authorized')), 0)
FROM accounts a ORDER BY a.id
"""

CAPTURE_MISMATCH_SQL = """
SELECT COUNT(*) FROM holds h
WHERE (h.state IN ('captured', 'refunded', 'credited'))
      <> EXISTS (SELECT 1 FROM captures c WHERE c.txn_id = h.txn_id)
"""


def refs_of(pan_ref: str | Sequence[str]) -> list[str]:
    """``find_original``'s ``pan_ref`` as a list of forms."""
    return [pan_ref] if isinstance(pan_ref, str) else list(pan_ref)


#: Fingerprints per key id in cards and holds: rows of (key id, count).
KEY_USAGE_SQL = f"""
SELECT k, COUNT(*) FROM (
    SELECT {key_id_sql("pan_ref")} AS k FROM cards
    UNION ALL
    SELECT {key_id_sql("pan_ref")} AS k FROM holds WHERE pan_ref IS NOT NULL
) AS refs GROUP BY k
"""


def usage_of(rows: Iterable[Sequence[Any]]) -> KeyUsage:
    """``{key id: count}`` from rows of (key id, count) (key id None: made before key ids)."""
    return KeyUsage({row[0]: int(row[1]) for row in rows})


def check_rows(
    rows: Sequence[Sequence[Any]], holds: int, pending: int, mismatched: int, expired: int = 0
) -> LedgerCheck:
    problems: list[str] = []
    for account_id, opening, balance, held, captured, open_holds in rows:
        if balance != opening - captured:
            problems.append(
                f"account {account_id}: balance {balance} != opening {opening}"
                f" - captures {captured}"
            )
        if held != open_holds:
            problems.append(f"account {account_id}: held {held} != open holds {open_holds}")
        if balance - held < 0:
            problems.append(f"account {account_id}: overdrawn (available {balance - held})")
    if mismatched:
        problems.append(f"{mismatched} hold(s) disagree with the captures table")
    return LedgerCheck(len(rows), holds, pending, tuple(problems), expired)
