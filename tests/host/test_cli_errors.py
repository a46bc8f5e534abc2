"""The command line's one-line errors (exit status 2) and its help.

Inputs tried: a config file with an unknown key, with a value of the wrong type, with broken TOML,
a missing config file; a port already in use; TLS files missing, garbage, or only one of the pair;
a PostgreSQL server that is not there; a SQLite path that cannot be created; ``send`` to a closed
port; ``describe`` of non-hex input and of a truncated message; ``journal`` of a database that does
not exist.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from .conftest import cli, free_port

COMMANDS = ["serve", "send", "bench", "describe", "journal", "recover", "ledger", "keys"]


def one_line_error(proc: object, *needles: str) -> None:
    assert getattr(proc, "returncode", None) == 2, (proc.stdout, proc.stderr)  # type: ignore[attr-defined]
    stderr: str = proc.stderr  # type: ignore[attr-defined]
    errors = [line for line in stderr.splitlines() if line.startswith("isopace: error: ")]
    assert len(errors) == 1, stderr
    assert stderr.rstrip().endswith(errors[0])  # the last line (log lines may precede it)
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_help_of_every_command() -> None:
    top = cli("--help")
    assert top.returncode == 0
    for command in COMMANDS:
        assert command in top.stdout
        proc = cli(command, "--help")
        assert proc.returncode == 0, proc.stderr
        assert "usage: isopace " + command in proc.stdout
    serve = cli("serve", "--help").stdout
    for flag in ("--config", "--port", "--db", "--postgres", "--redis", "--tls-cert",
                 "--metrics-port", "--bin", "--idempotency-key"):  # fmt: skip
        assert flag in serve


def test_unknown_config_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('port = 9000\nbogus_option = "x"\n')
    one_line_error(cli("serve", "--config", str(config)), "unknown key 'bogus_option'", str(config))


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('port = "eighty"\n', "port = 'eighty'"),
        ("port = [\n", "not valid TOML"),
        ('idempotency_key = [41, "x"]\n', "idempotency_key"),
        ('framing = "smoke-signals"\n', "framing"),
    ],
)
def test_bad_config_values(tmp_path: Path, text: str, needle: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)
    one_line_error(cli("serve", "--config", str(config)), needle)


def test_missing_config_file(tmp_path: Path) -> None:
    one_line_error(cli("serve", "--config", str(tmp_path / "nope.toml")), "not found")


def test_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = cli("serve", "--port", str(port), "--db", str(tmp_path / "h.db"))
    one_line_error(proc, f"port {port}", "already in use")
    assert not (tmp_path / "h.db").exists()  # failed before opening any database


def test_bad_tls_files(tmp_path: Path) -> None:
    db = str(tmp_path / "h.db")
    missing = cli("serve", "--port", "0", "--db", db, "--tls-cert", str(tmp_path / "c.pem"),
                  "--tls-key", str(tmp_path / "k.pem"))  # fmt: skip
    one_line_error(missing, "TLS file", "not found")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    key.write_text("not a key\n")
    garbage = cli("serve", "--port", "0", "--db", db, "--tls-cert", str(cert),
                  "--tls-key", str(key))  # fmt: skip
    one_line_error(garbage, "TLS files", "cannot load")
    half = cli("serve", "--port", "0", "--db", db, "--tls-cert", str(cert))
    one_line_error(half, "tls_cert and tls_key go together")


def test_database_unreachable(tmp_path: Path) -> None:
    closed = free_port()
    proc = cli(
        "serve", "--port", "0", "--postgres", f"postgresql://postgres@127.0.0.1:{closed}/test"
    )
    one_line_error(proc, "cannot connect to PostgreSQL")
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = cli("serve", "--port", "0", "--db", str(blocker / "sub" / "h.db"))
    one_line_error(proc, "database", "h.db: cannot open", "Not a directory")


def test_send_to_closed_port() -> None:
    proc = cli("send", "--port", str(free_port()), "--pan", "4111111111111111", "--amount", "1")
    one_line_error(proc, "cannot connect")


def test_describe_errors(tmp_path: Path) -> None:
    one_line_error(cli("describe", "zz-not-hex"), "not hexadecimal")
    one_line_error(cli("describe"), "HEX or with --file")
    truncated = (b"0200" + b"4000000000000000" + b"16411111").hex()
    one_line_error(cli("describe", truncated), "cannot decode", "field 2")
    one_line_error(cli("describe", "--file", str(tmp_path / "none.bin")), "--file")


def test_journal_of_missing_database(tmp_path: Path) -> None:
    one_line_error(cli("journal", "--db", str(tmp_path / "none.db")), "no such database")
    one_line_error(cli("ledger", "--db", str(tmp_path / "none.db")), "no such database")


def test_files_of_the_earlier_three_file_layout_are_refused(tmp_path: Path) -> None:
    """An earlier isopace kept the journal and the idempotency keys in files of their own next
    to the ledger; a host that started without them would leave their transactions behind."""
    db = tmp_path / "h.db"
    for legacy in ("h.journal.db", "h.idem.db"):
        (tmp_path / legacy).write_bytes(b"")
        proc = cli("serve", "--port", "0", "--db", str(db))
        one_line_error(proc, legacy, "earlier isopace", "isopace recover", "move these files")
        (tmp_path / legacy).unlink()
    assert not db.exists()  # refused before anything was created


@pytest.mark.parametrize(
    ("amount", "currency", "expected"),
    [
        ("inf", "840", "--amount 'inf': not a finite amount"),
        ("nan", "840", "--amount 'nan': not a finite amount"),
        ("Infinity", "840", "--amount 'Infinity': not a finite amount"),
        ("1.005", "840", "--amount '1.005': currency 840 has 2 decimals, the amount has more"),
        ("100.5", "392", "--amount '100.5': currency 392 has 0 decimals, the amount has more"),
        ("1.0005", "048", "--amount '1.0005': currency 048 has 3 decimals, the amount has more"),
        ("1e12", "840", "--amount '1e12': out of range"),
        ("-1", "840", "--amount '-1': out of range"),
        ("ten", "840", "--amount 'ten': not a number"),
    ],
)
def test_send_refuses_an_amount_it_cannot_send_exactly(
    amount: str, currency: str, expected: str
) -> None:
    proc = cli(
        "send", "--port", str(free_port()), "--pan", "4111111111111111",
        "--amount", amount, "--currency", currency,
    )  # fmt: skip
    one_line_error(proc, expected)


def test_send_amounts_in_the_currencys_minor_units() -> None:
    from isopace.cli._send import _amount

    assert _amount("25.00", "840") == "000000002500"
    assert _amount("2500", "392") == "000000002500"
    assert _amount("1.234", "048") == "000000001234"
    assert _amount("1.5", "999") == "000000000150"  # a code the table does not know: 2 decimals
