"""The SQLite host's data directory and the modes of its files: 0700 and 0600, whatever the umask.

Why: the database holds masked card numbers, fingerprints, amounts and the journal; its files and
the key files beside it are for the host's user alone. SQLite creates the ``-wal`` and ``-shm``
files with the mode of the database file, so creating the database file 0600 before SQLite
first opens it is enough for them; the lock and key files are created 0600 by the host (with
``fchmod``, so a umask cannot widen or narrow them). ``isopace serve`` also sets the process
umask to 0o077, for anything SQLite or Python might create besides.

On an existing directory, each of the host's own files (database, ``-wal``, ``-shm``, lock) that
group or others may access is set back to 0600 with a WARNING naming the file and its old mode:
nothing else should read them, and leaving them open is never what an operator wants. The
directory itself is only warned about (it may be a directory the host did not make, the current
one for ``--db host.db``); a new one is made 0700. Key files are stricter: one that group or
others may read refuses the start (`isopace.store.keys`), since tightening it would hide that it
was exposed.
"""

from __future__ import annotations

import logging
import os
import stat

from isopace.host.errors import StartupError

__all__ = ["lock_path", "prepare_data"]

log = logging.getLogger("isopace.host")


def lock_path(db: str) -> str:
    """``<name>.lock`` next to the database (see "Nodes" in `isopace.host.app`)."""
    return os.path.splitext(db)[0] + ".lock"


def prepare_data(db: str) -> None:
    """Make the data directory (0700) and the database file (0600) if missing; tighten the
    existing files that are wider, with a warning (module docstring)."""
    directory = os.path.dirname(os.path.abspath(db))
    try:
        if not os.path.isdir(directory):
            os.makedirs(directory, mode=0o700, exist_ok=True)
            os.chmod(directory, 0o700)
        else:
            mode = stat.S_IMODE(os.stat(directory).st_mode)
            if mode & 0o077:
                log.warning(
                    "data directory %s is mode %04o: group or others may list it (chmod 700 %s)",
                    directory,
                    mode,
                    directory,
                    extra={"path": directory, "mode": f"{mode:04o}"},
                )
        if not os.path.exists(db):
            try:
                fd = os.open(db, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # another process made it meanwhile
                pass
            else:
                os.fchmod(fd, 0o600)
                os.close(fd)
        for path in (db, db + "-wal", db + "-shm", lock_path(db)):
            tighten(path)
    except OSError as exc:
        raise StartupError(f"database {db}: cannot open: {exc.strerror or exc}") from exc


def tighten(path: str) -> None:
    """Set ``path`` to 0600 if group or others may access it, with a WARNING (no-op if absent)."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return
    if mode & 0o077:
        os.chmod(path, 0o600)
        log.warning(
            "%s was mode %04o (group or others could read it): set to 0600",
            path,
            mode,
            extra={"path": path, "mode": f"{mode:04o}"},
        )
