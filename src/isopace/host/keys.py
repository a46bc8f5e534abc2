"""Where the host's keys come from, checked at start-up (the key format: `isopace.store.keys`).

Two rings: the card keys (the ledger's ``cards.pan_ref`` / ``holds.pan_ref``) and the journal
keys (the journal's ``pan_hmac``). Each comes, first match wins, from

1. ``--card-key-file`` / ``--journal-key-file`` (a key file; several PostgreSQL nodes are given
   copies of one file);
2. ``$ISOPACE_CARD_KEY`` / ``$ISOPACE_JOURNAL_KEY`` (hex, comma-separated, current first);
3. the default file next to the database, ``<name>.card.key`` / ``<name>.journal.key`` (with
   ``--postgres``, next to ``--db`` too), when it exists;
4. with PostgreSQL, journal keys only: derived from the card keys (as earlier versions derived
   the journal's key from the ledger's), so one secret serves every node.

When no key is found:

- an earlier version's card key still in ``ledger_meta`` is moved out: written to the default
  file (0600, fsynced), then its row deleted (`Ledger.drop_legacy_card_key`);
- ``--new-card-key`` / ``--new-journal-key`` create a new key file on purpose;
- with SQLite, a database that protects no card yet (the very first start) gets a new key file;
- otherwise the start is refused with one line naming the file and the flag: a lost key is never
  replaced silently (everything protected under it could no longer be found), and PostgreSQL
  nodes must share a key, never each make their own.

A key file that group or others may read is refused (``chmod 600``); ``--new-*-key`` never
replaces an existing file; a key ring that lacks the key a stored row names is warned about (the
wrong file, or a key lost and replaced on purpose).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from isopace.host.errors import ConfigError
from isopace.store.keys import Key, KeyFileError, KeyRing, split_fingerprint, write_key_file

if TYPE_CHECKING:
    from isopace.host.config import HostConfig

__all__ = ["CARD_ENV", "JOURNAL_ENV", "card_keys", "derived_journal_keys", "journal_keys"]

log = logging.getLogger("isopace.host")

CARD_ENV = "ISOPACE_CARD_KEY"
JOURNAL_ENV = "ISOPACE_JOURNAL_KEY"


def default_path(cfg: HostConfig, kind: str) -> str:
    """``<name>.card.key`` / ``<name>.journal.key`` next to the SQLite database."""
    return os.path.splitext(cfg.db)[0] + f".{kind}.key"


def card_keys(
    cfg: HostConfig,
    *,
    sample: str | None,
    legacy: bytes | None = None,
    create: bool = True,
    environ: dict[str, str] | None = None,
) -> KeyRing:
    """The card keys (module docstring). ``sample``: one stored ``pan_ref`` (None: no card
    yet); ``legacy``: the key an earlier version kept in ``ledger_meta``; ``create``: False for
    commands that must never make a key."""
    return _resolve(
        cfg,
        "card",
        explicit=cfg.card_key_file,
        env=CARD_ENV,
        new=cfg.new_card_key,
        sample=sample,
        legacy=legacy,
        create=create,
        environ=environ,
        what="the ledger's cards",
    )


def journal_keys(
    cfg: HostConfig,
    card: KeyRing | None,
    *,
    sample: str | None,
    create: bool = True,
    environ: dict[str, str] | None = None,
) -> KeyRing:
    """The journal keys (module docstring); ``card``: the card keys, from which PostgreSQL
    derives them when none is configured."""
    env = os.environ if environ is None else environ
    if (
        cfg.postgres
        and card is not None
        and not (cfg.journal_key_file or cfg.new_journal_key or JOURNAL_ENV in env)
        and not os.path.exists(default_path(cfg, "journal"))
    ):
        ring = derived_journal_keys(card)
        _check_holds(ring, sample, "the journal's records")
        return ring
    return _resolve(
        cfg,
        "journal",
        explicit=cfg.journal_key_file,
        env=JOURNAL_ENV,
        new=cfg.new_journal_key,
        sample=sample,
        legacy=None,
        create=create,
        environ=environ,
        what="the journal's records",
    )


def derived_journal_keys(card: KeyRing) -> KeyRing:
    """The journal keys of PostgreSQL nodes that configure none: one per card key."""
    return KeyRing(
        [k.derive("journal") for k in card.keys],
        source=f"derived from {card.source}",
        parent=card,
    )


def _resolve(
    cfg: HostConfig,
    kind: str,
    *,
    explicit: str | None,
    env: str,
    new: bool,
    sample: str | None,
    legacy: bytes | None,
    create: bool,
    environ: dict[str, str] | None,
    what: str,
) -> KeyRing:
    flag = f"--{kind}-key-file"
    new_flag = f"--new-{kind}-key"
    try:
        if explicit is None:
            from_env = KeyRing.from_env(env, environ)
            if from_env is not None:
                if new:
                    raise ConfigError(f"{new_flag}: the {kind} keys come from ${env}")
                _check_legacy(from_env, legacy)
                _check_holds(from_env, sample, what)
                return from_env
        path = explicit or default_path(cfg, kind)
        if os.path.exists(path):
            if new:
                raise ConfigError(
                    f"{new_flag}: {path} exists; a key is never replaced (move the file away "
                    "first, knowing that what it protects can no longer be found)"
                )
            ring = KeyRing.from_file(path)
            _check_legacy(ring, legacy)
            _check_holds(ring, sample, what)
            return ring
        if legacy is not None and create:
            key = Key.of(legacy)
            log.warning(
                "%s key %s moved from the database to %s (mode 0600)%s",
                kind,
                key.id,
                path,
                ": give every node a copy (--card-key-file)" if cfg.postgres else "",
                extra={"key_id": key.id, "path": path},
            )
            return _create(path, key, kind)
        if new and create:
            key = Key.generate()
            log.warning("new %s key %s created in %s (mode 0600)", kind, key.id, path)
            return _create(path, key, kind)
        if sample is not None:
            kid = split_fingerprint(sample)[0]
            under = f" under key {kid}" if kid else ""
            raise ConfigError(
                f"{kind} key file {path}: not found, and {what} are protected{under}; restore "
                f"the file (or give {flag} / ${env}), or start with {new_flag} to make a new "
                "key (what the lost key protects can then no longer be found)"
            )
        if cfg.postgres or not create:
            raise ConfigError(
                f"no {kind} key: give {flag} FILE (every node sharing the database gets a copy) "
                f"or ${env} (hex), or start once with {new_flag} to create {path}"
            )
        key = Key.generate()
        return _create(path, key, kind)
    except KeyFileError as exc:
        raise ConfigError(str(exc)) from exc
    except OSError as exc:  # e.g. the file went away between the check and the read
        raise ConfigError(f"{kind} key file: {exc.strerror or exc}: {exc.filename}") from exc


def _create(path: str, key: Key, kind: str) -> KeyRing:
    if not write_key_file(path, [key], purpose=kind, exclusive=True):
        log.info("%s key file %s was made by another process meanwhile: using it", kind, path)
    return KeyRing.from_file(path)


def _check_legacy(ring: KeyRing, legacy: bytes | None) -> None:
    if legacy is not None and ring.key(Key.of(legacy).id) is None:
        raise ConfigError(
            f"the database still holds the card key of an earlier isopace ({Key.of(legacy).id}) "
            f"and {ring.source} does not have it; start once without {ring.source} to move it "
            "out, or add it to that file"
        )


def _check_holds(ring: KeyRing, sample: str | None, what: str) -> None:
    """Warn when the ring lacks the key a stored row names: the wrong file, or rows left under
    a key lost and replaced on purpose (``--new-*-key``), which a refusal would make
    unrecoverable for ever."""
    kid = split_fingerprint(sample)[0] if sample else None
    if kid is not None and ring.key(kid) is None:
        log.warning(
            "%s does not hold key %s, under which %s are protected (keys in it: %s): those "
            "cannot be found (the wrong key file?)",
            ring.source,
            kid,
            what,
            ", ".join(ring.ids),
        )
