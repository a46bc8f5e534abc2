"""Your own stage inside ``isopace serve`` (``--extension``): a real host loads a file that adds a
fraud rule to the ``authorize`` group, which declines before any money is held; the start is
refused with one line for an extension that does not import, names no function, or raises; and
the loader's own rules (``isopace.host.extensions``) in process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from isopace.host.config import load_config
from isopace.host.errors import ConfigError, StartupError
from isopace.host.extensions import apply_extensions, check_extension, load_extension
from tests.host.conftest import accounts, cli, send
from tests.host.test_cli_errors import one_line_error

FRAUD_RULE = '''
from isopace.host.stages import decline
from isopace.iso8583 import response_codes as rc

class NoThirteen:
    """Declines amounts ending in .13 (a rule of the merchant's acquirer, say)."""
    name = "no-thirteen"

    def prepare(self, ex):
        if ex.get("amount", 0) % 100 == 13:
            return decline(ex, rc.DO_NOT_HONOUR, "amount ends in .13")
        return None

def extend(flow, ledger, config):
    flow.group("authorize", NoThirteen())
'''


def test_an_extension_stage_declines_before_money_is_held(spawn: Any, tmp_path: Path) -> None:
    rule = tmp_path / "fraud.py"
    rule.write_text(FRAUD_RULE)
    db = str(tmp_path / "data" / "h.db")
    host = spawn("--db", db, "--extension", f"{rule}:extend")
    store = ["--db", db]
    before = accounts(store)["ACC-1001"]
    assert send(host.port, "--pan", "4111111111111111", "--amount", "1.13")["39"] == "05"
    assert accounts(store)["ACC-1001"] == before  # nothing held, nothing captured
    assert send(host.port, "--pan", "4111111111111111", "--amount", "1.00")["39"] == "00"
    after = accounts(store)["ACC-1001"]
    assert (after["balance"], after["held"]) == (before["balance"] - 100, before["held"])
    assert "no-thirteen" in host.output  # the profile in the transaction's log line names it


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ("import no_such_module_anywhere\n", "cannot import"),
        ("def other(flow, ledger, config):\n    pass\n", "has no function extend"),
        ("def extend(flow, ledger, config):\n    raise RuntimeError('no rules today')\n",
         "failed: no rules today"),
    ],
)  # fmt: skip
def test_a_broken_extension_stops_the_start(tmp_path: Path, source: str, needle: str) -> None:
    rule = tmp_path / "broken.py"
    rule.write_text(source)
    proc = cli(
        "serve", "--port", "0", "--db", str(tmp_path / "h.db"), "--extension", f"{rule}:extend"
    )
    one_line_error(proc, "extension", needle)


@pytest.mark.parametrize("text", ["mystage", "mystage:", ":extend", "my-stage:extend", "a:b:c"])
def test_an_extension_names_a_module_and_a_function(text: str) -> None:
    with pytest.raises(ConfigError, match="MODULE:FUNCTION"):
        check_extension(text)
    with pytest.raises(ConfigError, match="extension"):
        load_config(None, {"extensions": [text]})


def test_modules_load_from_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "ext_here.py").write_text("def extend(flow, ledger, config):\n    flow.seen = 1\n")
    monkeypatch.chdir(tmp_path)
    extension = load_extension("ext_here:extend")
    with pytest.raises(StartupError, match="cannot import ext_elsewhere"):
        load_extension("ext_elsewhere:extend")

    class Flow:
        seen = 0

    flow = Flow()
    apply_extensions(flow, None, load_config(None, {"extensions": ["ext_here:extend"]}))  # type: ignore[arg-type]
    assert flow.seen == 1 and extension.__name__ == "extend"
