"""``--spec NAME`` and ``--spec-file PATH`` on the commands that speak ISO 8583 (here ``describe``;
``send`` and ``bench`` share the same flags), with pyiso8583 building the bytes."""

from __future__ import annotations

import json
from pathlib import Path

from iso8583.specs import default

import iso8583

from .conftest import cli

DOC = {"t": "0200", "2": "4111111111111111", "4": "000000002500", "11": "100006", "41": "TERM0001"}


def _default_bytes() -> bytes:
    raw, _ = iso8583.encode(dict(DOC), default)
    return bytes(raw)


def test_describe_reads_pyiso8583_default_with_its_spec_name() -> None:
    described = json.loads(
        cli("describe", _default_bytes().hex(), "--spec", "ascii-binary-bitmap", "--json").stdout
    )
    assert described["11"] == "100006" and described["41"] == "TERM0001"
    assert described["2"] == "411111******1111"


def test_describe_under_the_wrong_spec_is_a_one_line_error() -> None:
    run = cli("describe", _default_bytes().hex(), "--spec", "ascii")
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and "cannot decode" in run.stderr
    assert "4111111111111111" not in run.stderr


def test_describe_with_a_pyiso8583_spec_file(tmp_path: Path) -> None:
    path = tmp_path / "acquirer.json"
    path.write_text(json.dumps(default))
    described = json.loads(
        cli("describe", _default_bytes().hex(), "--spec-file", str(path), "--json").stdout
    )
    assert described["11"] == "100006"


def test_a_bad_spec_file_or_name_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text("{nope")
    run = cli("describe", "00", "--spec-file", str(path))
    assert run.returncode == 2
    assert run.stderr.strip().endswith(
        "invalid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"
    )
    assert run.stderr.count("\n") == 1
    known = "(known: ascii, ascii-binary-bitmap, bcd, ebcdic)"
    run = cli("describe", "00", "--spec", "binary")
    assert run.returncode == 2
    assert run.stderr == f"isopace: error: spec 'binary' is not a built-in spec {known}\n"
    run = cli("describe", "00", "--spec", "ascii", "--spec-file", str(path))
    assert run.returncode == 2 and "not allowed with argument" in run.stderr


def test_serve_refuses_a_bad_spec_name_or_file_in_one_line(tmp_path: Path) -> None:
    """``serve`` takes the same flags and TOML keys; it stops before opening anything."""
    db = tmp_path / "data" / "host.db"
    broken = tmp_path / "broken.json"
    broken.write_text("{nope")
    config = tmp_path / "host.toml"
    cases: list[tuple[list[str], str]] = [
        (["--spec", "binary"], "spec 'binary' is not a built-in spec (known: ascii, "),
        (["--spec-file", str(broken)], f"spec file {broken}: invalid JSON: "),
        (["--spec-file", str(tmp_path / "none.json")], "none.json: No such file or directory"),
        (["--config", str(config)], f"config {config}: spec and spec_file: give one of them"),
    ]
    config.write_text(f'spec = "bcd"\nspec-file = "{broken}"\n')
    for flags, text in cases:
        run = cli("serve", "--port", "0", "--db", str(db), *flags)
        assert run.returncode == 2, run.stderr
        assert run.stderr.count("\n") == 1 and text in run.stderr, run.stderr
    assert not db.exists()
