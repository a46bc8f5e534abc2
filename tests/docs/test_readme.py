"""Every ```python block of README.md runs, and prints the ```text block that follows it.

A broken example in the README is a bug a newcomer meets first, so the suite runs each one in a
fresh interpreter (as a reader would paste it) and compares its output exactly.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
EXAMPLE = re.compile(r"```python\n(?P<code>.*?)```\n(?:(?!```).)*?```text\n(?P<out>.*?)```", re.S)


def examples() -> list[tuple[str, str]]:
    found = [(m["code"], m["out"]) for m in EXAMPLE.finditer(README.read_text())]
    assert found, "README.md has no python example followed by its output"
    return found


@pytest.mark.parametrize(("code", "expected"), examples())
def test_readme_example_prints_what_the_readme_says(code: str, expected: str) -> None:
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == expected
