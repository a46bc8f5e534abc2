"""Every example in README.md and docs/ runs in the suite, as a reader would run it.

A broken example is the first bug a newcomer meets, so:

- the ```python blocks of a page run in order in one fresh interpreter (a page's later blocks
  build on its earlier ones, as a reader pasting them would), in an empty working directory, and
  each prints exactly the ```text block that follows it (before the next code block), or nothing
  when none follows; a block with a title (```python title="authorize.py") is a file the reader
  saves: it is written to the working directory when its turn comes, for later blocks to use;
- every ``isopace ...`` line of a ```sh block is parsed by the command line's own parser, so a
  renamed option or a bad value fails here; a ``./scripts/...`` line names a script that exists.

``mkdocs build --strict`` (in ``scripts/test``) checks the links.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from isopace.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(
    r'^```(?P<lang>[\w-]*)(?: title="(?P<title>[^"]+)")?\n(?P<body>.*?)^```\n', re.S | re.M
)
#: the separator the driver prints after each block, so the output is split per block
END = "\x00--isopace-docs-block-end--\x00"
DRIVER = f"""
import json, sys
blocks = json.load(sys.stdin)
namespace = {{"__name__": "__main__"}}
for block in blocks:
    if block["file"]:
        with open(block["file"], "w") as f:
            f.write(block["code"])
    else:
        exec(compile(block["code"], block["where"], "exec"), namespace)
    sys.stdout.flush()
    sys.stdout.write({END!r})
    sys.stdout.flush()
"""


@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int
    expected: str | None = None  # for python blocks: the text block that follows
    file: str | None = None  # ```python title="name.py": saved as that file, not run


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    found: list[Block] = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        if m["lang"] == "text" and found and found[-1].lang == "python":
            last = found[-1]
            if last.expected is None and last.file is None:
                found[-1] = Block(last.lang, last.code, last.line, m["body"])
                continue
        found.append(Block(m["lang"], m["body"], line, file=m["title"]))
    return found


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def test_every_page_has_an_example_or_is_reference() -> None:
    """A guide page without a runnable example is allowed only for the API reference."""
    bare = [
        _name(p)
        for p in PAGES
        if "reference" not in p.parts and not any(b.lang in ("python", "sh") for b in blocks(p))
    ]
    assert not bare, bare


@pytest.mark.parametrize(
    "page", [p for p in PAGES if any(b.lang == "python" for b in blocks(p))], ids=_name
)
def test_python_examples_print_what_the_page_says(page: Path, tmp_path: Path) -> None:
    python = [b for b in blocks(page) if b.lang == "python"]
    payload = [{"code": b.code, "where": f"{_name(page)}:{b.line}", "file": b.file} for b in python]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    )
    run = subprocess.run(
        [sys.executable, "-c", DRIVER],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        cwd=tmp_path,
        env=env,
    )
    outputs = run.stdout.split(END)
    for block, out in zip(python, outputs, strict=False):
        assert out == (block.expected or ""), f"{_name(page)}:{block.line} printed:\n{out}"
    assert run.returncode == 0, f"{_name(page)}: {run.stderr}"
    assert len(outputs) == len(python) + 1


def _commands(page: Path) -> list[tuple[int, list[str]]]:
    found = []
    for block in blocks(page):
        if block.lang != "sh":
            continue
        for offset, raw in enumerate(block.code.splitlines()):
            words = shlex.split(raw, comments=True)
            if words:
                found.append((block.line + 1 + offset, words))
    return found


@pytest.mark.parametrize("page", [p for p in PAGES if _commands(p)], ids=_name)
def test_shell_examples_name_real_commands_and_options(page: Path) -> None:
    parser = build_parser()
    wrong = []
    for line, words in _commands(page):
        if words[0] == "isopace":
            try:
                parser.parse_args(words[1:])
            except SystemExit:
                wrong.append(f"{_name(page)}:{line}: {shlex.join(words)}")
        elif words[0].startswith("./scripts/"):
            script = ROOT / words[0]
            if not (script.is_file() and os.access(script, os.X_OK)):
                wrong.append(f"{_name(page)}:{line}: no script {words[0]}")
    assert not wrong, wrong
