"""Several processes opening one new SQLite file at the same instant all succeed: the switch
to WAL mode can be refused at once (``database is locked``) while another process makes it,
and a host starting next to another one must not fail for that."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.store.test_crash import ROOT

PROCESSES = 8
ROUNDS = 5


@pytest.mark.parametrize("kind", ["idempotency", "journal"])
def test_processes_open_one_new_file_at_once(kind: str, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'src'}")
    for round_ in range(ROUNDS):
        path = tmp_path / f"{kind}{round_}.db"
        start_at = time.time() + 1.0  # every child is imported and waiting by then
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "tests.store.open_child", kind, str(path), str(start_at)],
                cwd=ROOT,
                env=env,
                stderr=subprocess.PIPE,
            )
            for _ in range(PROCESSES)
        ]
        errors = []
        for proc in procs:
            _, err = proc.communicate(timeout=60)
            if proc.returncode != 0:
                errors.append(err.decode()[-400:])
        assert not errors, f"round {round_}: {len(errors)} of {PROCESSES} failed:\n" + errors[0]
