"""Keys of the PAN fingerprints: kept outside every database, named by an id stored with what
they protect.

Why: a fingerprint is a keyed HMAC-SHA256 of the card number, stored beside the masked number
(first 6 / last 4). Whoever holds the key and the masked number recovers the card by trying the
10^5 Luhn-valid middles of a 16-digit PAN, in well under a second. A key kept in the same
database as the fingerprints therefore makes every card number in it recoverable from a copy of
that database alone. So no key material ever goes into a database: keys come from a key file
(mode 0600, refused when group or others may read it) or an environment variable, and a database
holds only each key's *id*.

Key id: the first 8 hex digits of ``SHA-256("isopace key id" 0x00 key)``. It names a key in rows,
messages and files and says nothing about it (the key is 32 random bytes; the id a 32-bit piece
of a hash of it under its own label, never an HMAC with it).

A stored fingerprint is ``<id>:<64 hex digits>`` (:meth:`KeyRing.fingerprint`): the id travels
with the value, so every store keeping fingerprints (ledger cards and holds, journal rows; SQLite
or PostgreSQL) records which key made each one without a column of its own, and a lookup by
exact value keeps using its index. A bare 64-hex value was made before key ids existed; lookups
try it under every key too (:meth:`KeyRing.candidates`), and rotation rewrites it.

A key file is text, one key per line, the current key first (it protects what is written from
now on), then previous keys still kept readable for rows not yet re-keyed::

    # isopace card key (...)
    3f2a9c1d 5be0...64 hex digits...

A file whose only line is a bare secret (the ``<name>.journal.key`` of earlier versions) is read
as one key whose bytes are that text, as those versions used it. Files are written to a
temporary file of mode 0600, fsynced and renamed into place (``link`` when it must not exist yet,
so processes starting at once agree on one key), so a reader never sees a partial file.

An environment variable holds hex keys separated by commas, current first (16 bytes at least).

Rotation (``isopace keys rotate``): a new key goes first in the file, the old ones stay;
every fingerprint made under an old key is re-keyed (:func:`rekey_value`): the card number is
recovered from its masked form with the old key, exactly as an attacker holding that key would
(:func:`recover_pan`), and fingerprinted under the new key. A masked number with more than 7
hidden digits (a 18-19 digit PAN) would take too long and is left under its key. Only when no
row references an old key is it dropped from the file. A running host re-reads its key files
when they change (:meth:`KeyRing.reload_if_changed`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence

from isopace.store.errors import StoreError
from isopace.store.protect import CardDataProtector

__all__ = [
    "REKEY_BATCH",
    "Key",
    "KeyFileError",
    "KeyRing",
    "KeyUsage",
    "StoreKeys",
    "key_id",
    "key_id_sql",
    "pan_candidates",
    "recover_pan",
    "rekey_value",
    "split_fingerprint",
    "write_key_file",
]

#: The fewest bytes a key may have.
MIN_KEY_BYTES = 16
#: Rows re-keyed per database transaction (small: a host keeps running meanwhile).
REKEY_BATCH = 500
#: Masked numbers with more hidden digits than this are not re-keyed (10^7 HMACs and more).
MAX_HIDDEN_DIGITS = 7

_ID_LABEL = b"isopace key id\x00"
_HEX = re.compile(r"^[0-9a-fA-F]+$")
_ID = re.compile(r"^[0-9a-f]{8}$")


class KeyFileError(StoreError, ValueError):
    """A key file or variable is missing, unreadable, too open, or not in the key format."""


def key_id(material: bytes) -> str:
    """The id of a key: 8 hex digits of a domain-separated SHA-256 (see the module docstring)."""
    return hashlib.sha256(_ID_LABEL + material).hexdigest()[:8]


@dataclasses.dataclass(frozen=True, slots=True)
class Key:
    """One key: its id and its bytes (never printed: ``repr`` shows the id only)."""

    id: str
    material: bytes = dataclasses.field(repr=False)

    @classmethod
    def of(cls, material: bytes) -> Key:
        return cls(key_id(material), material)

    @classmethod
    def generate(cls) -> Key:
        return cls.of(secrets.token_bytes(32))

    def derive(self, purpose: str) -> Key:
        """A key for another use, HMAC-SHA256 of a per-purpose label under this key (as hex
        text, the form earlier versions used for the journal's key on PostgreSQL)."""
        label = b"isopace derived key: " + purpose.encode()
        return Key.of(hmac.new(self.material, label, hashlib.sha256).hexdigest().encode())


def split_fingerprint(value: str) -> tuple[str | None, str]:
    """``"<id>:<hex>"`` -> ``(id, hex)``; a bare value (before key ids) -> ``(None, value)``."""
    head, sep, tail = value.partition(":")
    if sep and _ID.match(head):
        return head, tail
    return None, value


def key_id_sql(column: str) -> str:
    """SQL (SQLite and PostgreSQL) for the key id of a stored fingerprint (NULL when bare)."""
    return f"CASE WHEN substr({column}, 9, 1) = ':' THEN substr({column}, 1, 8) END"


class KeyUsage(dict[str | None, int]):
    """Stored fingerprints per key id (None: made before key ids, tried under every key)."""

    def unknown(self, ring: KeyRing) -> dict[str, int]:
        """The ids (and counts) of keys ``ring`` does not have: those rows cannot be found."""
        return {
            k: n
            for k, n in sorted(self.items(), key=lambda kv: str(kv[0]))
            if k and ring.key(k) is None
        }

    def describe(self) -> str:
        return (
            ", ".join(
                f"{k or 'no id'}: {n}" for k, n in sorted(self.items(), key=lambda kv: str(kv[0]))
            )
            or "none"
        )


class KeyRing:
    """The keys of one purpose (card keys, journal keys): the current one first.

    ``source`` says where they come from (a file's path, ``$VARIABLE``, or what they are derived
    from), for messages; ``path`` is the key file, if any (a ring from a file can be reloaded and
    rotated); ``parent`` the ring these keys are derived from, if they are."""

    __slots__ = ("_protectors", "_stamp", "keys", "parent", "path", "source", "version")

    def __init__(
        self,
        keys: Sequence[Key],
        *,
        source: str,
        path: str | None = None,
        parent: KeyRing | None = None,
    ) -> None:
        if not keys:
            raise KeyFileError(f"{source}: no key")
        self.source = source
        self.path = path
        self.parent = parent
        self.keys: tuple[Key, ...] = ()
        self.version = 0
        self._protectors: dict[str, CardDataProtector] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._set(keys)

    def _set(self, keys: Sequence[Key]) -> None:
        self.keys = tuple(keys)
        self._protectors = {k.id: CardDataProtector(k.material) for k in self.keys}
        self.version += 1

    @classmethod
    def generate(cls, source: str = "a generated key") -> KeyRing:
        """A ring of one new random key, kept in memory only (tests, throw-away ledgers)."""
        return cls([Key.generate()], source=source)

    @property
    def current(self) -> Key:
        return self.keys[0]

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(k.id for k in self.keys)

    def key(self, key_id: str) -> Key | None:
        return next((k for k in self.keys if k.id == key_id), None)

    def raw(self, key: Key, pan: str) -> str:
        """The bare HMAC-SHA256 (hex) of ``pan`` under ``key``."""
        fp = self._protectors[key.id].fingerprint(pan)
        assert fp is not None
        return fp

    def fingerprint(self, pan: str) -> str:
        """What a store keeps for ``pan``: ``<id>:<hmac>`` under the current key."""
        current = self.keys[0]
        return f"{current.id}:{self.raw(current, pan)}"

    def candidates(self, pan: str) -> list[str]:
        """Every stored form ``pan`` may have under these keys (current first): ``<id>:<hmac>``
        for each key, and the bare HMAC of rows made before key ids."""
        out: list[str] = []
        for k in self.keys:
            raw = self.raw(k, pan)
            out.append(f"{k.id}:{raw}")
        out.extend(split_fingerprint(v)[1] for v in list(out))
        return out

    def replace(self, keys: Sequence[Key]) -> None:
        """Use ``keys`` from now on (a derived ring following its parent)."""
        if tuple(keys) != self.keys:
            self._set(keys)

    # -- files -----------------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str) -> KeyRing:
        """The keys in ``path``; `KeyFileError` (one line naming the file) if it is missing,
        readable by group or others, or not in the key format."""
        ring = cls.__new__(cls)
        ring.source, ring.path, ring.version, ring.parent = path, path, 0, None
        ring._stamp = None
        keys, stamp = _read_key_file(path)
        ring._set(keys)
        ring._stamp = stamp
        return ring

    @classmethod
    def from_env(cls, name: str, environ: dict[str, str] | None = None) -> KeyRing | None:
        """The keys in environment variable ``name`` (hex, comma-separated), or None if unset."""
        text = (os.environ if environ is None else environ).get(name)
        if text is None:
            return None
        keys = []
        for part in text.split(","):
            part = part.strip()
            if not part or len(part) % 2 or not _HEX.match(part):
                raise KeyFileError(
                    f"${name}: expected hex keys separated by commas (e.g. 64 hex digits)"
                )
            material = bytes.fromhex(part)
            if len(material) < MIN_KEY_BYTES:
                raise KeyFileError(f"${name}: a key of {len(material)} bytes; {MIN_KEY_BYTES}+")
            keys.append(Key.of(material))
        return cls(keys, source=f"${name}")

    def reload_if_changed(self) -> bool:
        """Re-read the key file if it changed since it was read (True when the keys changed).
        A ring without a file never changes here. Raises `KeyFileError` like `from_file`."""
        if self.path is None:
            return False
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise KeyFileError(f"key file {self.path}: {exc.strerror or exc}") from exc
        if (st.st_ino, st.st_mtime_ns, st.st_size) == self._stamp:
            return False
        keys, stamp = _read_key_file(self.path)
        self._stamp = stamp
        if tuple(keys) == self.keys:
            return False
        self._set(keys)
        return True

    def save(self, keys: Sequence[Key]) -> None:
        """Replace the key file's keys (atomically) and use them."""
        if self.path is None:
            raise KeyFileError(f"{self.source}: not a key file; keys from it cannot be changed")
        write_key_file(self.path, keys, purpose=_purpose_of(self.path))
        self._set(keys)
        with contextlib.suppress(OSError):
            st = os.stat(self.path)
            self._stamp = (st.st_ino, st.st_mtime_ns, st.st_size)


class StoreKeys:
    """The keys a store fingerprints with (shared by the journals): a `KeyRing` (current key,
    ``<id>:`` first; searches try every key) or one bare key as before key ids."""

    __slots__ = ("protector", "ring")

    def __init__(self, protector: CardDataProtector) -> None:
        self.protector = protector
        self.ring: KeyRing | None = None

    def use(self, keys: KeyRing | bytes | str | None) -> None:
        if isinstance(keys, KeyRing):
            self.ring = keys
            self.protector.use_key(keys.current.material, key_id=keys.current.id)
        else:
            self.ring = None
            self.protector.use_key(keys)

    def refresh(self) -> None:
        """Follow the ring's current key (after it was reloaded or rotated)."""
        if self.ring is not None:
            self.use(self.ring)

    def forms(self, pan: str, where: str) -> list[str]:
        """Every stored form of ``pan``'s fingerprint; `StoreError` naming ``where`` without
        a key."""
        if self.ring is not None:
            return self.ring.candidates(pan)
        fingerprint = self.protector.fingerprint(pan)
        if fingerprint is None:
            raise StoreError(f"{where}: searching by PAN needs an hmac_key")
        return [fingerprint]

    def require_ring(self, where: str) -> KeyRing:
        if self.ring is None:
            raise StoreError(f"{where}: re-keying needs a key ring")
        return self.ring


def _purpose_of(path: str) -> str:
    name = os.path.basename(path)
    return "journal" if ".journal." in name else "card"


def check_file_mode(path: str, st: os.stat_result | None = None) -> None:
    """Refuse a key file that group or others may read or write (one line naming ``chmod``)."""
    st = st if st is not None else os.stat(path)
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise KeyFileError(
            f"key file {path}: mode {mode:04o} lets group or others read it; run chmod 600 {path}"
        )


def _read_key_file(path: str) -> tuple[list[Key], tuple[int, int, int]]:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise KeyFileError(f"key file {path}: cannot read: {exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)
        check_file_mode(path, st)
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read()
    finally:
        os.close(fd)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise KeyFileError(f"key file {path}: not text (one '<id> <hex key>' per line)") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if not lines:
        raise KeyFileError(f"key file {path}: no key in it")
    keys: list[Key] = []
    if len(lines) == 1 and len(lines[0].split()) == 1:
        keys.append(Key.of(lines[0].encode()))  # the single secret of earlier versions
    else:
        for n, line in enumerate(lines, 1):
            parts = line.split()
            if len(parts) != 2 or not _HEX.match(parts[1]) or len(parts[1]) % 2:
                raise KeyFileError(f"key file {path}: key {n}: expected '<id> <hex key>'")
            key = Key.of(bytes.fromhex(parts[1]))
            if key.id != parts[0].lower():
                raise KeyFileError(f"key file {path}: key {n}: id {parts[0]} does not match it")
            keys.append(key)
    for key in keys:
        if len(key.material) < MIN_KEY_BYTES:
            raise KeyFileError(f"key file {path}: key {key.id} is shorter than 16 bytes")
    return keys, (st.st_ino, st.st_mtime_ns, st.st_size)


def write_key_file(
    path: str, keys: Sequence[Key], *, purpose: str = "card", exclusive: bool = False
) -> bool:
    """Write ``keys`` (current first) to ``path``, mode 0600, atomically and durably.

    ``exclusive``: only if ``path`` does not exist yet; returns False (and writes nothing) when
    another process made it first. The directory is created 0700 if missing."""
    directory = os.path.dirname(os.path.abspath(path))
    body = (
        f"# isopace {purpose} key: the first key protects what is written from now on; the\n"
        "# others are kept until no row uses them (isopace keys rotate). Mode 0600; keep a\n"
        "# copy: without it the card fingerprints it made cannot be searched.\n"
        + "".join(f"{k.id} {k.material.hex()}\n" for k in keys)
    )
    tmp = f"{path}.{secrets.token_hex(4)}.tmp"
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            os.write(fd, body.encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
        else:
            os.replace(tmp, path)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise KeyFileError(f"key file {path}: cannot write: {exc.strerror or exc}") from exc
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return True


# -- re-keying -----------------------------------------------------------------------------------


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def pan_candidates(masked: str) -> Iterator[str]:
    """Every Luhn-valid number that masks to ``masked`` (digits with ``*`` for hidden ones):
    the hidden digits but one are enumerated and the last is solved for, so a 16-digit PAN with
    six hidden digits gives exactly 10^5 candidates."""
    if not masked or any(c not in "0123456789*" for c in masked):
        return
    hidden = [i for i, c in enumerate(masked) if c == "*"]
    if not hidden:
        if _luhn_ok(masked):
            yield masked
        return
    n = len(masked)
    solve = hidden[-1]
    doubled = (n - 1 - solve) % 2 == 1
    # the digit at `solve` contributing each value mod 10
    contrib = {((d * 2 - 9 if d > 4 else d * 2) if doubled else d) % 10: d for d in range(10)}
    free = hidden[:-1]
    base = list(masked)
    for combo in range(10 ** len(free)):
        text = str(combo).zfill(len(free)) if free else ""
        for pos, ch in zip(free, text, strict=True):
            base[pos] = ch
        base[solve] = "0"
        total = 0
        for i in range(n):
            d = ord(base[n - 1 - i]) - 48
            if i % 2:
                d = d * 2 - 9 if d > 4 else d * 2
            total += d
        base[solve] = str(contrib[(-total) % 10])
        yield "".join(base)


def recover_pan(masked: str, match: Callable[[str], bool]) -> str | None:
    """The number masking to ``masked`` for which ``match`` is true, or None (also when too many
    digits are hidden to try them all, see `MAX_HIDDEN_DIGITS`)."""
    if masked.count("*") > MAX_HIDDEN_DIGITS:
        return None
    for pan in pan_candidates(masked):
        if match(pan):
            return pan
    return None


def rekey_value(ring: KeyRing, value: str, masked: str | None) -> str | None:
    """``value`` (a stored fingerprint) under ``ring``'s current key, or None when it cannot be
    re-keyed: its key is not in the ring, there is no masked number, or the number is too long.
    A value already under the current key is returned as it is."""
    kid, raw = split_fingerprint(value)
    if kid == ring.current.id:
        return value
    if not masked:
        return None
    keys: Iterable[Key]
    if kid is not None:
        key = ring.key(kid)
        if key is None:
            return None
        keys = (key,)
    else:
        keys = ring.keys
    for key in keys:
        pan = recover_pan(masked, _matcher(ring, key, raw))
        if pan is not None:
            return ring.fingerprint(pan)
    return None


def _matcher(ring: KeyRing, key: Key, raw: str) -> Callable[[str], bool]:
    def match(pan: str) -> bool:
        return ring.raw(key, pan) == raw

    return match
