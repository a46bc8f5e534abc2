"""Writes docs/options.md, the table of every ``isopace serve`` option, from the host's own
option list (`isopace.host.config.option_help`), so the guide cannot drift from the code: the
test suite renders it again and fails when the committed page differs. Run
``./scripts/docs-options`` after adding or changing an option."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from isopace.host.config import option_help, option_name

PAGE = Path(__file__).resolve().parents[1] / "docs" / "options.md"
HEAD = """# Host options

Every option of `isopace serve`, as a flag and as a key of the TOML file given with `--config`
(dashes or underscores; flags win over the file). This page is generated from the host's option
list by `./scripts/docs-options`; the test suite checks that it is current.

```toml title="isopace.toml"
port = 9000
spec = "ascii-binary-bitmap"
db = "data/host.db"
journal-retention = 90
bin = { "4" = "visa", "5" = "mastercard" }
rate = { "978:840" = "1.0842" }
```

```sh
isopace serve --config isopace.toml --port 9001   # flags win: this host listens on 9001
```

| Flag and TOML key | Default | What it sets |
|---|---|---|
"""


def _default(value: Any) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, dict):
        return " ".join(f"`{k}={v}`" for k, v in value.items()) or "none"
    if isinstance(value, list):
        if not value:
            return "none"
        return "`" + ",".join(str(v) for v in value) + "`"
    return f"`{value}`"


def render() -> str:
    rows = []
    for name, (default, text, metavar) in option_help().items():
        flag = "--" + option_name(name).replace("_", "-")
        metavar = metavar or option_name(name).upper()
        shown = f"`{flag}`" if isinstance(default, bool) else f"`{flag} {metavar}`"
        cell = text.replace("|", "\\|")
        rows.append(f"| {shown} | {_default(default)} | {cell} |")
    return HEAD + "\n".join(rows) + "\n"


if __name__ == "__main__":
    PAGE.write_text(render())
    print(f"wrote {PAGE}", file=sys.stderr)
