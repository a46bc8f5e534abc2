"""``isopace serve --spec`` / ``--spec-file``: the host speaks the wire format it is started with,
and says so when a peer speaks another.

pyiso8583 is the client of the layouts other libraries use: its ``default_ascii`` (``--spec
ascii``), its ``default`` (ASCII data, binary bitmap: ``--spec ascii-binary-bitmap``) and a
network's variant of ``default`` with binary length prefixes, written as JSON (``--spec-file``),
each over a plain socket with the host's framing (a 2-byte big-endian length). Each purchase is
checked against the ledger: debited by exactly its amount, once for a retransmission, and given
back by its reversal. ``bcd`` and ``ebcdic`` go through ``isopace send`` (purchase, replay, echo,
decline) and ``bench --spec``, the metrics, the journal, and recovery after a crash.

Inputs tried: a purchase, its retransmission and its reversal in each layout; frames of
pyiso8583's ``default`` at a host expecting ``ascii`` and the reverse, several on one connection;
``isopace send`` in ``ascii`` at a ``bcd`` host; TOML keys against their flags, ``bin`` and its
old name ``bins``, ``spec`` against ``spec_file`` in the file and on the command line.
"""

from __future__ import annotations

import copy
import json
import re
import socket
import struct
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from iso8583.specs import default, default_ascii

import iso8583
from isopace.cli import build_parser
from isopace.host.config import HostConfig, load_config, option_help, option_name
from isopace.host.errors import ConfigError

from .conftest import PAN_BENCH, PAN_LOW, PAN_OK, cli, cli_json, free_port
from .test_restart import _leave_in_doubt

TERMINAL = "TERMPY01"


def _network_spec() -> dict[str, Any]:
    """pyiso8583's ``default`` with one-byte binary length prefixes on DE 2, 32 and 35: a layout
    no built-in spec reads, so only the spec file can."""
    spec = copy.deepcopy(default)
    for n in ("2", "32", "35"):
        spec[n]["len_enc"] = "b"
    return spec


def _balance(db: str, account: str = "ACC-1001") -> int:
    ledger = cli_json("ledger", "--db", db)
    assert ledger["ok"], ledger["problems"]
    return int(next(a for a in ledger["accounts"] if a["id"] == account)["balance"])


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise AssertionError(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def _send_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(struct.pack(">H", len(payload)) + payload)


def _read_frame(sock: socket.socket) -> bytes:
    (length,) = struct.unpack(">H", _recv_exact(sock, 2))
    return _recv_exact(sock, length)


def _exchange(port: int, doc: dict[str, str], spec: dict[str, Any]) -> dict[str, str]:
    """Encode ``doc`` with pyiso8583, send it framed, decode the answer with pyiso8583."""
    raw, _ = iso8583.encode(dict(doc), spec)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        _send_frame(sock, bytes(raw))
        answer, _ = iso8583.decode(bytearray(_read_frame(sock)), spec)
    return dict(answer)


def _purchase(stan: str, amount: int) -> dict[str, str]:
    return {
        "t": "0200",
        "2": PAN_OK,
        "3": "000000",
        "4": f"{amount:012d}",
        "7": "1129101010",
        "11": stan,
        "12": "101010",
        "13": "1129",
        "37": f"{stan:0>12}",
        "41": TERMINAL,
        "42": "MERCHANT0000001",
        "49": "840",
    }


def _serve_flags(layout: str, tmp_path: Path) -> tuple[list[str], dict[str, Any]]:
    if layout == "spec-file":
        path = tmp_path / "network.json"
        path.write_text(json.dumps(_network_spec()))
        return ["--spec-file", str(path)], _network_spec()
    return ["--spec", layout], {"ascii": default_ascii, "ascii-binary-bitmap": default}[layout]


@pytest.mark.parametrize("layout", ["ascii", "ascii-binary-bitmap", "spec-file"])
def test_pyiso8583_purchase_retransmission_and_reversal(
    layout: str, tmp_path: Path, db: str, spawn: Any
) -> None:
    flags, spec = _serve_flags(layout, tmp_path)
    host = spawn(*flags, "--db", db)
    before = _balance(db)

    request = _purchase("100006", 2500)
    answer = _exchange(host.port, request, spec)
    assert answer["t"] == "0210"
    assert answer["39"] == "00", answer
    assert (answer["11"], answer["41"], answer["4"]) == ("100006", TERMINAL, "000000002500")
    assert len(answer["38"]) == 6
    assert _balance(db) == before - 2500

    again = _exchange(host.port, request, spec)  # a retransmission: replayed, not applied again
    assert (again["39"], again["38"], again["11"]) == ("00", answer["38"], "100006")
    assert _balance(db) == before - 2500

    reversal = {
        "t": "0400",
        "2": PAN_OK,
        "3": "000000",
        "4": "000000002500",
        "7": "1129101020",
        "11": "100007",
        "41": TERMINAL,
        "49": "840",
        "90": "0200" + "100006" + "1129101010" + "0" * 22,
    }
    reversed_ = _exchange(host.port, reversal, spec)
    assert (reversed_["t"], reversed_["39"], reversed_["11"]) == ("0410", "00", "100007")
    assert reversed_["41"] == TERMINAL
    assert _balance(db) == before
    assert PAN_OK not in host.output
    assert f"(spec {flags[1]}, framing binary2;" in host.output  # the start-up line


@pytest.mark.parametrize(
    ("host_spec", "peer", "named"),
    [("ascii", default, "ascii-binary-bitmap"), ("ascii-binary-bitmap", default_ascii, "ascii")],
)
def test_a_peer_in_another_layout_gets_one_warning_naming_its_spec_and_no_answer(
    host_spec: str, peer: dict[str, Any], named: str, db: str, spawn: Any
) -> None:
    host = spawn("--spec", host_spec, "--db", db)
    own = {"ascii": default_ascii, "ascii-binary-bitmap": default}[host_spec]
    before = _balance(db)
    with socket.create_connection(("127.0.0.1", host.port), timeout=10) as sock:
        for stan in range(200001, 200006):  # five purchases the host cannot read
            raw, _ = iso8583.encode(_purchase(str(stan), 1000), peer)
            _send_frame(sock, bytes(raw))
        # the same connection, in the host's layout: its answer is the first thing to come back
        raw, _ = iso8583.encode(_purchase("200009", 700), own)
        _send_frame(sock, bytes(raw))
        answer, _ = iso8583.decode(bytearray(_read_frame(sock)), own)
        assert (answer["t"], answer["39"], answer["11"]) == ("0210", "00", "200009")
        sock.settimeout(1.0)
        with pytest.raises(TimeoutError):  # and nothing else, no invented answer: the frames
            sock.recv(1)  # of the other layout were dropped
    assert _balance(db) == before - 700  # only the readable purchase moved money
    hint = f"the bytes decode as {named}: start the host with --spec {named}"
    warnings = [line for line in host.output.splitlines() if "unparseable frame" in line]
    assert len(warnings) == 1, host.output
    assert "WARNING" in warnings[0] and hint in warnings[0]
    assert f" under the spec {host_spec}: DecodeError: " in warnings[0]
    assert "malformed" not in host.output and PAN_OK not in host.output
    counts = cli_json("journal", "--db", db, "--counts")
    assert counts["COMMITTED"] == 1  # the dropped frames left no transaction


@pytest.mark.parametrize("name", ["bcd", "ebcdic"])
def test_bcd_and_ebcdic_hosts_with_send_bench_metrics_and_journal(
    name: str, db: str, spawn: Any
) -> None:
    metrics = free_port()
    host = spawn("--spec", name, "--db", db, "--metrics-port", str(metrics))
    port = str(host.port)
    before = _balance(db)
    common = ["--port", port, "--spec", name, "--pan", PAN_OK, "--amount", "12.34"]
    fixed = ["--stan", "300001", "--time", "1129111111", "--json"]
    first = cli("send", *common, *fixed)
    assert first.returncode == 0, first.stderr
    response = json.loads(first.stdout.splitlines()[-1])["response"]
    assert (response["39"], response["11"], response["41"]) == ("00", "300001", "TERM0001")
    again = json.loads(cli("send", *common, *fixed, check=True).stdout.splitlines()[-1])
    assert again["response"]["38"] == response["38"]  # replayed
    assert _balance(db) == before - 1234
    echo = cli("send", "--port", port, "--spec", name, "--mti", "0800", "--json", check=True)
    assert '"mti": "0810"' in echo.stdout and '"39": "00"' in echo.stdout
    low = cli("send", "--port", port, "--spec", name, "--pan", PAN_LOW, "--amount", "500.00")
    assert low.returncode == 1 and "51 insufficient funds" in low.stdout, low.stdout
    assert _balance(db, "ACC-1003") == 1_000  # the seeded 10.00, untouched

    bench_before = _balance(db, "ACC-9000")
    bench = cli_json("bench", "--port", port, "--spec", name, "-c", "2", "-d", "1", "--no-progress")
    assert bench["complete"] is True and bench["codes"] == {"00": bench["answered"]}
    assert _balance(db, "ACC-9000") == bench_before - 100 * bench["answered"]  # 1.00 each
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    committed = re.search(r'_transactions_total\{outcome="committed",code="00"\} (\d+)', text)
    assert committed and int(committed[1]) >= 1 + bench["answered"], text
    records = cli("journal", "--db", db, "--pan", PAN_OK, "--json", check=True).stdout
    assert '"rc": "00"' in records and PAN_OK not in records

    # a client in the default ascii layout gets no answer, and the log says what to do
    wrong = cli("send", "--port", port, "--pan", PAN_OK, "--amount", "1.00", "--timeout", "1")
    assert wrong.returncode == 2 and "no response" in wrong.stderr
    assert "the bytes decode as ascii: start the host with --spec ascii" in host.output
    assert _balance(db) == before - 1234


def test_recovery_and_replay_under_the_spec_the_host_is_started_with(
    tmp_path: Path, db: str, spawn: Any
) -> None:
    """A crashed run's transactions, stored as field values, are finished by a host started with
    ``--spec bcd``; the answer recovery stored is replayed to a retransmission in bcd."""
    first = spawn("--spec", "bcd", "--db", db)  # makes the data and its key files
    before = _balance(db, "ACC-9000")
    assert first.stop() == 0
    _leave_in_doubt(db, "crashed-node:1")  # 7.00 committing (stan 1), 7.00 preparing (stan 2)
    host = spawn("--spec", "bcd", "--db", db)
    assert re.search(r"recovery: 1 committed, 1 aborted", host.output), host.output
    assert _balance(db, "ACC-9000") == before - 700
    retransmission = cli(
        "send", "--port", str(host.port), "--spec", "bcd", "--pan", PAN_BENCH,
        "--amount", "7.00", "--stan", "000001", "--time", "1129235959", "--terminal", "DOUBT001",
        "-f", "12=", "-f", "13=", "-f", "37=", "-f", "42=", "--json",
    )  # fmt: skip
    assert retransmission.returncode == 0, retransmission.stderr
    answer = json.loads(retransmission.stdout.splitlines()[-1])["response"]
    assert (answer["39"], answer["11"], answer["41"]) == ("00", "000001", "DOUBT001")
    assert _balance(db, "ACC-9000") == before - 700  # replayed, not debited again


# -- the configuration: flags and TOML keys ---------------------------------------------------


def _serve_parser() -> Any:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices["serve"]  # type: ignore[attr-defined]


def test_every_serve_flag_is_a_toml_key_of_the_same_name(tmp_path: Path) -> None:
    """The help says every option has the same name in the file: each flag, read as a key."""
    flags = {
        opt
        for action in _serve_parser()._actions
        for opt in action.option_strings
        if opt.startswith("--") and not opt.startswith("--no-")
    } - {"--help", "--config"}
    assert len(flags) == len(option_help())  # one flag per option, no other
    samples = {"bool": "true", "int": "1", "float": "1.5", "str": '"x"', "list[int]": "[41]"}
    for flag in sorted(flags):
        key = flag[2:]
        name = next(n for n in option_help() if option_name(n).replace("_", "-") == key)
        kind = str(HostConfig.__dataclass_fields__[name].type).replace(" | None", "")
        value = samples.get(kind, "{}")
        path = tmp_path / f"{key}.toml"
        path.write_text(f"{key} = {value}\n")
        try:
            load_config(str(path))
        except ConfigError as exc:  # a value the option refuses is fine; an unknown key is not
            assert "unknown key" not in str(exc), exc


def test_bin_is_the_key_of_bin_and_bins_an_alias(tmp_path: Path) -> None:
    path = tmp_path / "host.toml"
    path.write_text('bin = ["4=visa", "55=mastercard"]\n')
    assert load_config(str(path)).bins == {"4": "visa", "55": "mastercard"}
    path.write_text('bin = { "4" = "visa" }\n')
    assert load_config(str(path)).bins == {"4": "visa"}
    path.write_text('bins = { "5" = "mastercard" }\n')
    assert load_config(str(path)).bins == {"5": "mastercard"}
    path.write_text('bins = { "5" = "mastercard" }\nbin = { "4" = "visa" }\n')
    with pytest.raises(ConfigError, match="'bin' repeats an earlier key"):
        load_config(str(path))
    path.write_text('bin = ["4visa"]\n')
    with pytest.raises(ConfigError, match="bin '4visa': expected BIN=GROUP"):
        load_config(str(path))


def test_spec_and_spec_file_replace_each_other_flags_over_the_file(tmp_path: Path) -> None:
    spec_file = tmp_path / "network.json"
    spec_file.write_text(json.dumps(_network_spec()))
    path = tmp_path / "host.toml"
    path.write_text(f'spec-file = "{spec_file}"\n')
    cfg = load_config(str(path))
    assert cfg.wire_spec().name == "network"
    cfg = load_config(str(path), {"spec": "bcd"})  # --spec bcd
    assert (cfg.spec, cfg.spec_file, cfg.wire_spec().name) == ("bcd", None, "ISO87_BINARY")
    path.write_text('spec = "ebcdic"\n')
    cfg = load_config(str(path), {"spec_file": str(spec_file)})  # --spec-file
    assert cfg.wire_spec().name == "network"
    assert load_config(str(path)).wire_spec().name.startswith("ISO87_EBCDIC")
    assert load_config().wire_spec().name == "ISO87_ASCII"


def test_serve_help_names_the_default_wire_format_and_port() -> None:
    text = " ".join(cli("serve", "--help", check=True).stdout.split())
    assert "--spec NAME" in text and "(default: ascii)" in text
    assert "pyiso8583's default_ascii" in text and "--spec-file PATH" in text
    assert "--framing KIND" in text and "(default: binary2)" in text
    assert "default 127.0.0.1:8583" in text
