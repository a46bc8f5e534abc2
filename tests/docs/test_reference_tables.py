"""The guide's reference tables say what the code does: the options page is the host's own option
list rendered again, its TOML example loads, and the host page's response-code table names every
code the host answers, each with the meaning `isopace.iso8583.response_codes` gives it."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

from isopace.host.config import load_config
from isopace.iso8583 import response_codes as rc

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "isopace"


def test_options_page_is_the_option_list_rendered() -> None:
    render = runpy.run_path(str(ROOT / "scripts" / "docs_options.py"))["render"]
    page = (ROOT / "docs" / "options.md").read_text()
    assert page == render(), "docs/options.md is stale: run ./scripts/docs-options"


def test_options_page_toml_example_loads(tmp_path: Path) -> None:
    page = (ROOT / "docs" / "options.md").read_text()
    m = re.search(r'^```toml title="(?P<name>[^"]+)"\n(?P<body>.*?)^```$', page, re.S | re.M)
    assert m is not None
    path = tmp_path / m["name"]
    path.write_text(m["body"])
    cfg = load_config(str(path))
    assert (cfg.port, cfg.spec, cfg.journal_retention) == (9000, "ascii-binary-bitmap", 90.0)
    assert cfg.bins == {"4": "visa", "5": "mastercard"} and cfg.rates == {"978:840": "1.0842"}


def _code_table() -> dict[str, str]:
    page = (ROOT / "docs" / "host.md").read_text().partition("**Response codes**")[2]
    rows = re.findall(r"^\| `(\d\d)` \| ([^|]+) \|", page, re.M)
    assert rows, "no response-code table in docs/host.md"
    return {code: meaning.strip() for code, meaning in rows}


def test_response_code_table_gives_each_code_its_meaning() -> None:
    table = _code_table()
    wrong = {c: m for c, m in table.items() if m != rc.meaning(c)}
    assert not wrong, wrong


def test_response_code_table_names_every_code_the_host_answers() -> None:
    used = set()
    for package in ("host", "net"):
        for path in (SRC / package).rglob("*.py"):
            used.update(re.findall(r"\brc\.([A-Z_]+)\b", path.read_text()))
    answered = {getattr(rc, name) for name in used}
    answered |= {rc.FORMAT_ERROR, rc.SYSTEM_MALFUNCTION}  # error_reply's, through Iso8583Error
    missing = answered - set(_code_table())
    assert not missing, f"codes the host answers that docs/host.md does not list: {missing}"
