"""Duplicates across processes: two processes send the same keys at the same moment through a
shared store; each key is processed exactly once and both get the same response."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from tests.store.test_crash import ROOT

KEYS = 150


def _run_pair(spec: str, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'src'}")
    start_at = time.time() + 1.5  # both children are up by then
    outs = [tmp_path / f"out{i}.txt" for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.store.dup_child", spec, str(KEYS), str(start_at), str(o)],
            cwd=ROOT,
            env=env,
            stderr=subprocess.PIPE,
        )
        for o in outs
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
    lines = [line.split() for o in outs for line in o.read_text().splitlines()]
    processed = Counter(parts[1] for parts in lines if parts[0] == "processed")
    assert len(processed) == KEYS
    assert set(processed.values()) == {1}, [k for k, n in processed.items() if n > 1][:5]
    results = [parts for parts in lines if parts[0] != "processed"]
    assert len(results) == 2 * KEYS
    by_key: dict[str, set[str]] = {}
    for outcome, key, code in results:
        assert outcome in ("COMMITTED", "REPLAYED")
        by_key.setdefault(key, set()).add(code)
    assert all(len(codes) == 1 for codes in by_key.values())  # one response per key
    both = Counter(parts[0] for parts in results)
    assert both["COMMITTED"] == KEYS and both["REPLAYED"] == KEYS


def test_duplicates_across_processes_postgres(tmp_path: Path, pg: tuple[str, str]) -> None:
    dsn, schema = pg
    _run_pair(f"postgres:{dsn}#{schema}", tmp_path)


def test_duplicates_across_processes_redis(tmp_path: Path, redis_prefix: tuple[str, str]) -> None:
    url, prefix = redis_prefix
    _run_pair(f"redis:{url}#{prefix}", tmp_path)


def test_duplicates_across_processes_sqlite(tmp_path: Path) -> None:
    _run_pair(f"sqlite:{tmp_path / 'idem.db'}", tmp_path)
