"""Key files, key ids, stored fingerprints and re-keying (`isopace.store.keys`), and the journal's
search across keys on a real SQLite file."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

import pytest

from isopace.flow import Event, EventKind, Exchange
from isopace.iso8583 import Message
from isopace.store import SqliteJournal
from isopace.store.keys import (
    Key,
    KeyFileError,
    KeyRing,
    key_id,
    pan_candidates,
    rekey_value,
    split_fingerprint,
    write_key_file,
)

PAN = "4761739001010010"


def test_key_file_round_trip_mode_0600_whatever_the_umask(tmp_path: Path) -> None:
    path = str(tmp_path / "d" / "x.card.key")
    keys = [Key.generate(), Key.generate()]
    old = os.umask(0o000)
    try:
        assert write_key_file(path, keys, exclusive=True)
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.stat(tmp_path / "d").st_mode & 0o777 == 0o700
    ring = KeyRing.from_file(path)
    assert ring.keys == tuple(keys) and ring.current == keys[0]
    assert not write_key_file(path, [Key.generate()], exclusive=True)  # never replaced
    assert KeyRing.from_file(path).keys == tuple(keys)
    assert keys[0].material.hex() not in repr(ring.current)  # repr shows the id only


def test_key_file_problems_are_named(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    write_key_file(str(path), [Key.generate()])
    path.chmod(0o640)
    with pytest.raises(KeyFileError, match=f"chmod 600 {path}"):
        KeyRing.from_file(str(path))
    path.write_text("deadbeef 00112233445566778899aabbccddeeff\n")
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match="id deadbeef does not match"):
        KeyRing.from_file(str(path))
    path.write_text("# only a comment\n")
    with pytest.raises(KeyFileError, match="no key"):
        KeyRing.from_file(str(path))
    short = Key.of(b"short")
    path.write_text(f"{short.id} {short.material.hex()}\n{short.id} zz\n")
    with pytest.raises(KeyFileError, match="key 2: expected"):
        KeyRing.from_file(str(path))


def test_earlier_single_secret_file_is_one_key_of_its_text(tmp_path: Path) -> None:
    """The ``<name>.journal.key`` of earlier versions: its text is the HMAC key (as they used
    it), so records they wrote are still found."""
    path = tmp_path / "h.journal.key"
    secret = "ab" * 32
    path.write_text(secret + "\n")
    path.chmod(0o600)
    ring = KeyRing.from_file(str(path))
    assert ring.current.material == secret.encode()
    bare = hmac.new(secret.encode(), PAN.encode(), hashlib.sha256).hexdigest()
    assert bare in ring.candidates(PAN)


def test_environment_variable_keys() -> None:
    a, b = Key.generate(), Key.generate()
    ring = KeyRing.from_env("K", {"K": f"{a.material.hex()}, {b.material.hex()}"})
    assert ring is not None and ring.keys == (a, b) and ring.source == "$K"
    assert KeyRing.from_env("K", {}) is None
    for bad in ("xyz", "abc", "00" * 8):
        with pytest.raises(KeyFileError, match=r"\$K"):
            KeyRing.from_env("K", {"K": bad})


def test_key_id_is_domain_separated_and_not_an_hmac() -> None:
    key = Key.generate()
    assert (
        key.id
        == key_id(key.material)
        == hashlib.sha256(b"isopace key id\x00" + key.material).hexdigest()[:8]
    )
    assert key.id != hashlib.sha256(key.material).hexdigest()[:8]
    assert key.id != hmac.new(key.material, b"", hashlib.sha256).hexdigest()[:8]


def test_fingerprint_names_its_key_and_candidates_cover_every_key() -> None:
    old, new = Key.generate(), Key.generate()
    ring = KeyRing([new, old], source="test")
    fp = ring.fingerprint(PAN)
    assert split_fingerprint(fp) == (
        new.id,
        hmac.new(new.material, PAN.encode(), "sha256").hexdigest(),
    )
    forms = ring.candidates(PAN)
    assert forms[0] == fp
    assert KeyRing([old], source="t").fingerprint(PAN) in forms
    assert split_fingerprint("a" * 64) == (None, "a" * 64)


def test_pan_candidates_are_exactly_the_luhn_valid_middles() -> None:
    masked = PAN[:6] + "******" + PAN[-4:]
    found = list(pan_candidates(masked))
    assert len(found) == len(set(found)) == 10**5
    assert PAN in found

    def luhn(n: str) -> bool:
        total = 0
        for i, ch in enumerate(reversed(n)):
            d = int(ch) * (2 if i % 2 else 1)
            total += d - 9 if d > 9 else d
        return total % 10 == 0

    assert all(luhn(p) and p[:6] == PAN[:6] and p[-4:] == PAN[-4:] for p in found[::997])
    assert list(pan_candidates("12345")) == [] or all(luhn(p) for p in pan_candidates("12345"))


def test_rekey_value_recovers_the_number_with_the_old_key_only() -> None:
    old, new, stranger = Key.generate(), Key.generate(), Key.generate()
    masked = PAN[:6] + "******" + PAN[-4:]
    ring = KeyRing([new, old], source="t")
    before = KeyRing([old], source="t").fingerprint(PAN)
    assert rekey_value(ring, before, masked) == ring.fingerprint(PAN)
    bare = hmac.new(old.material, PAN.encode(), "sha256").hexdigest()
    assert rekey_value(ring, bare, masked) == ring.fingerprint(PAN)  # made before key ids
    unknown = KeyRing([stranger], source="t").fingerprint(PAN)
    assert rekey_value(ring, unknown, masked) is None  # its key is not in the ring
    assert rekey_value(ring, before, None) is None
    assert rekey_value(ring, ring.fingerprint(PAN), masked) == ring.fingerprint(PAN)


async def test_journal_finds_a_card_under_old_and_new_keys_and_counts_unknown_ones(
    tmp_path: Path,
) -> None:
    path = tmp_path / "j.db"
    old, new, lost = Key.generate(), Key.generate(), Key.generate()

    def request(stan: str) -> Message:
        return Message("0200", {2: PAN, 4: "000000000100", 11: stan, 41: "T1"})

    async with SqliteJournal(path, hmac_key=KeyRing([lost], source="t"), node="n") as journal:
        await journal.record(Exchange("t0", request("000000")), Event(EventKind.BEGIN))
        journal.keys.use(KeyRing([old], source="t"))
        await journal.record(Exchange("t1", request("000001")), Event(EventKind.BEGIN))
        journal.keys.use(KeyRing([new, old], source="t"))
        await journal.record(Exchange("t2", request("000002")), Event(EventKind.BEGIN))
        assert {r.tx_id for r in await journal.by_pan(PAN)} == {"t1", "t2"}
        usage = await journal.key_usage()
        assert usage == {lost.id: 1, old.id: 1, new.id: 1}
        assert usage.unknown(KeyRing([new, old], source="t")) == {lost.id: 1}
        assert await journal.rekey() == 1  # the old one; the lost key's record stays
        usage = await journal.key_usage()
        assert usage == {lost.id: 1, new.id: 2}
        journal.keys.use(KeyRing([new], source="t"))
        assert {r.tx_id for r in await journal.by_pan(PAN)} == {"t1", "t2"}
