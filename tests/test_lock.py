"""The set-up installs from uv.lock only: a lock that no longer matches pyproject.toml stops it.

Runs the real scripts/_venv.sh in a copy of the project whose pyproject.toml asks for something the
lock does not have, with the uv that scripts/_uv.sh bootstrapped for this checkout.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _copy_project(dest: Path) -> None:
    for name in ("pyproject.toml", "uv.lock", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    shutil.copytree(ROOT / "scripts", dest / "scripts")
    (dest / ".venv-uv").symlink_to(ROOT / ".venv-uv")


def _set_up(project: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", "source scripts/_venv.sh && echo installed"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_stale_lock_stops_the_set_up_with_one_line(tmp_path: Path) -> None:
    _copy_project(tmp_path)
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"rich>=13"', '"rich>=13", "six>=1.16"'))

    run = _set_up(tmp_path)

    assert run.returncode == 1
    assert "installed" not in run.stdout
    assert run.stderr.strip().splitlines() == [
        "uv.lock does not match pyproject.toml: run ./scripts/upgrade "
        "(or .venv-uv/bin/uv lock) and commit uv.lock"
    ]
    assert not (tmp_path / ".venv").exists()  # nothing was resolved or installed behind it
    assert (tmp_path / "uv.lock").read_bytes() == (ROOT / "uv.lock").read_bytes()


def test_the_committed_lock_matches_pyproject() -> None:
    run = subprocess.run(
        [str(ROOT / ".venv-uv" / "bin" / "uv"), "lock", "--check", "--offline"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
