"""The ISO port of a real ``isopace serve`` that no client can starve.

Inputs tried: a flood of idle connections past the process's descriptor limit (``prlimit
--nofile``), once with ``--max-connections`` above that limit (the host runs out of descriptors:
accepting pauses) and once with the default (the flood is refused before the limit); half a
frame then nothing; an idle connection; keep-alives only; partial frames past
``--max-buffered-bytes``; the limits set from a TOML file; negative and mistyped values.
Each time a new client's purchase must still be answered within a second, the log must stay
short (no traceback, no ERROR), and the metrics must count what happened.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from isopace.iso8583 import ISO87_ASCII, Message
from isopace.net import Framing
from isopace.net.limits import RESERVED_FILES

from .conftest import PAN_OK, HostProcess, cli, free_port, purchase
from .test_cli_errors import one_line_error

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")

FRAMING = Framing()
NOFILE = 200  # the host's descriptor limit in the flood tests (it uses about 20 when idle)
FLOOD = 300


def _limited(nofile: int) -> list[str]:
    """A command prefix running the host with ``nofile`` descriptors at most (soft = hard)."""
    if shutil.which("prlimit"):
        return ["prlimit", f"--nofile={nofile}:{nofile}", "--"]
    code = (
        "import os, resource, sys; "
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({nofile}, {nofile})); "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    return [sys.executable, "-c", code]


def _frame(message: Message) -> bytes:
    return FRAMING.encode_frame(ISO87_ASCII.encode(message))


def _read_answer(sock: socket.socket) -> Message:
    data = b""
    while len(data) < 2 or len(data) < 2 + int.from_bytes(data[:2], "big"):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed by the host after {len(data)} bytes")
        data += chunk
    return ISO87_ASCII.decode(data[2 : 2 + int.from_bytes(data[:2], "big")])


def _timed_purchase(port: int, stan: int) -> tuple[Message, float]:
    """A new client's purchase: (the answer, seconds from connecting to the answer)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(_frame(purchase(PAN_OK, 1000, stan, terminal="TERMLIM1")))
        answer = _read_answer(sock)
    return answer, time.monotonic() - started


def _flood(port: int, count: int) -> list[socket.socket]:
    """``count`` connections that send nothing. Non-blocking connects: once the host's backlog
    is full, the kernel leaves the rest waiting instead of blocking this test. In batches of 25:
    a burst past the backlog (128) faster than the host accepts would have the kernel drop SYNs,
    and those clients retry only seconds later."""
    socks = []
    for i in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        socks.append(sock)
        if i % 25 == 24:
            time.sleep(0.02)
    return socks


def _close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(65536) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


def _metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _wait(condition: Callable[[], bool], seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def _open_files(host: HostProcess) -> int:
    assert host.proc is not None
    return len(os.listdir(f"/proc/{host.proc.pid}/fd"))


def _lines(log: str, pattern: str) -> list[str]:
    return [line for line in log.splitlines() if re.search(pattern, line, re.IGNORECASE)]


def _assert_quiet(log: str) -> None:
    """No traceback, no ERROR line, no card number: whatever the clients did."""
    assert "Traceback" not in log
    assert not _lines(log, r"\bERROR\b"), _lines(log, r"\bERROR\b")
    assert PAN_OK not in log


# -- floods under a descriptor limit --------------------------------------------------------------


def test_a_flood_past_the_descriptor_limit_pauses_accepting_and_the_host_still_answers(
    spawn: Any, db: str
) -> None:
    """``--max-connections`` above what the descriptors allow: the host runs out of them. It
    pauses accepting instead of spinning (asyncio's own loop logged tens of thousands of
    tracebacks here), keeps serving the connections it has, and once some of the flood goes a new
    client is answered within a second."""
    metrics = free_port()
    host = spawn(
        "--db", db, "--max-connections", "10000", "--metrics-port", str(metrics),
        prefix=_limited(NOFILE),
    )  # fmt: skip
    flood = _flood(host.port, FLOOD)
    try:
        _wait(lambda: "Too many open files" in host.output)
        time.sleep(2.0)  # two seconds out of descriptors, with clients waiting in the backlog
        assert host.proc.poll() is None
        _close_all(flood[50:])  # some of the flood goes; 50 idle connections stay
        _wait(lambda: _open_files(host) < NOFILE - 40)
        time.sleep(0.6)  # the longest pause of accepting
        answer, seconds = _timed_purchase(host.port, 1)
        assert answer.mti == "0210" and answer[39] == "00"
        assert seconds < 1.0, seconds
        counted = _metrics(metrics)
        assert counted["isopace_accept_errors_total"] >= 1
        assert counted["isopace_connections_open"] >= 1
    finally:
        _close_all(flood)
    host.stop()
    log = host.output
    about_accept = _lines(log, r"accept")
    assert 1 <= len(about_accept) < 20, about_accept
    assert "accepting paused for 0.1 s" in about_accept[0]
    _assert_quiet(log)


def test_a_flood_past_max_connections_is_refused_before_the_descriptors_run_out(
    spawn: Any, db: str
) -> None:
    """The default ``--max-connections`` (the descriptor limit minus a reserve): the flood past
    it is closed at once, one WARNING with the count per interval, the descriptors never run
    out, and a new client gets in as soon as a slot frees."""
    metrics = free_port()
    host = spawn("--db", db, "--metrics-port", str(metrics), prefix=_limited(NOFILE))
    maximum = NOFILE - RESERVED_FILES
    flood = _flood(host.port, FLOOD)
    try:

        def all_seen() -> bool:
            m = _metrics(metrics)
            return m["isopace_connections_open"] + m["isopace_connections_refused_total"] >= FLOOD

        _wait(all_seen)
        counted = _metrics(metrics)
        assert counted["isopace_connections_open"] == maximum
        assert counted["isopace_connections_refused_total"] == FLOOD - maximum
        assert counted["isopace_accept_errors_total"] == 0
        with socket.create_connection(("127.0.0.1", host.port), timeout=5) as refused:
            assert _closed_within(refused, 1.0)  # full: a new client is closed at once too
        _close_all(flood[:10])
        _wait(lambda: _metrics(metrics)["isopace_connections_open"] == maximum - 10)
        answer, seconds = _timed_purchase(host.port, 2)
        assert answer[39] == "00"
        assert seconds < 1.0, seconds
    finally:
        _close_all(flood)
    host.stop()
    log = host.output
    refusals = _lines(log, r"refused a connection")
    assert len(refusals) == 2, refusals  # one at once, one with the count (flushed at the stop)
    assert f"{maximum} connections open, the maximum" in refusals[0]
    assert f"{FLOOD - maximum} more in the last 10 s" in refusals[1]
    assert "Too many open files" not in log
    _assert_quiet(log)


# -- timeouts and the buffer cap, set from a TOML file and from flags -----------------------------


def test_timeouts_from_the_config_file_close_stalled_and_idle_connections(
    spawn: Any, db: str, tmp_path: Path
) -> None:
    config = tmp_path / "limits.toml"
    config.write_text("idle_timeout = 0.8\nframe_timeout = 0.4\n")
    metrics = free_port()
    host = spawn("--config", str(config), "--db", db, "--metrics-port", str(metrics))
    frame = _frame(purchase(PAN_OK, 1000, 3, terminal="TERMLIM3"))
    with (
        socket.create_connection(("127.0.0.1", host.port), timeout=5) as stalled,
        socket.create_connection(("127.0.0.1", host.port), timeout=5) as idle,
        socket.create_connection(("127.0.0.1", host.port), timeout=5) as alive,
    ):
        stalled.sendall(frame[:30])
        started = time.monotonic()
        for _ in range(15):  # 1.5 s of keep-alives: longer than both timeouts
            alive.sendall(FRAMING.keepalive())
            assert alive.recv(2) == b"\x00\x00"
            time.sleep(0.1)
        assert _closed_within(stalled, 0.1)
        assert _closed_within(idle, 0.1)
        assert time.monotonic() - started > 0.8
        alive.sendall(frame)
        assert _read_answer(alive)[39] == "00"
    counted = _metrics(metrics)
    assert counted['isopace_connections_closed_total{reason="frame_timeout"}'] == 1
    assert counted['isopace_connections_closed_total{reason="idle_timeout"}'] == 1
    assert counted['isopace_connections_closed_total{reason="buffer_cap"}'] == 0
    host.stop()
    log = host.output
    assert len(_lines(log, "did not finish a frame within 0.4 s")) == 1
    assert len(_lines(log, "sent no frame for 0.8 s")) == 1
    _assert_quiet(log)


def test_the_buffer_cap_closes_the_connection_holding_the_most(spawn: Any, db: str) -> None:
    metrics = free_port()
    host = spawn("--db", db, "--max-buffered-bytes", "1000", "--metrics-port", str(metrics))
    with (
        socket.create_connection(("127.0.0.1", host.port), timeout=5) as hog,
        socket.create_connection(("127.0.0.1", host.port), timeout=5) as other,
    ):
        hog.sendall(b"\xea\x60" + b"x" * 898)  # a 60,000-byte frame begun: 900 bytes held
        _wait(lambda: _metrics(metrics)["isopace_buffered_bytes"] == 900)
        other.sendall(b"\x01\x00" + b"y" * 198)  # 200 more: past the cap
        assert _closed_within(hog, 2.0)
        assert not _closed_within(other, 0.2)
        counted = _metrics(metrics)
        assert counted['isopace_connections_closed_total{reason="buffer_cap"}'] == 1
        assert counted["isopace_buffered_bytes"] == 200
    answer, seconds = _timed_purchase(host.port, 4)
    assert answer[39] == "00" and seconds < 1.0
    host.stop()
    _assert_quiet(host.output)


# -- the options themselves -----------------------------------------------------------------------


def test_the_limits_are_flags_listed_by_help() -> None:
    text = cli("serve", "--help").stdout
    for flag in ("--idle-timeout", "--frame-timeout", "--max-connections", "--max-buffered-bytes"):
        assert flag in text


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--idle-timeout", "-1"], "idle_timeout must be 0 (no limit) or positive, not -1"),
        (["--frame-timeout", "-0.5"], "frame_timeout must be 0 (no limit) or positive"),
        (["--max-connections", "0"], "max_connections must be at least 1, not 0"),
        (["--max-buffered-bytes", "-5"], "max_buffered_bytes must be 0 (no limit) or positive"),
    ],
)
def test_bad_limits_are_refused_with_one_line(args: list[str], needle: str, db: str) -> None:
    one_line_error(cli("serve", "--db", db, "--port", "0", *args), needle)


def test_a_mistyped_limit_in_the_config_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('max_connections = "many"\n')
    one_line_error(cli("serve", "--config", str(config)), "max_connections = 'many'", str(config))


def test_the_soft_descriptor_limit_is_raised_to_the_hard_one(spawn: Any, db: str) -> None:
    """``prlimit --nofile=100:400``: the host runs with 400, so its default maximum is 336."""
    metrics = free_port()
    prefix = ["prlimit", "--nofile=100:400", "--"] if shutil.which("prlimit") else None
    if prefix is None:
        pytest.skip("needs prlimit to set a soft limit below the hard one")
    host = spawn("--db", db, "--metrics-port", str(metrics), prefix=prefix)
    assert host.proc is not None
    with open(f"/proc/{host.proc.pid}/limits") as fh:
        (line,) = [row for row in fh if row.startswith("Max open files")]
    assert line.split()[3:5] == ["400", "400"]
    flood = _flood(host.port, 350)
    try:
        _wait(lambda: _metrics(metrics)["isopace_connections_refused_total"] >= 350 - 336)
        assert _metrics(metrics)["isopace_connections_open"] == 400 - RESERVED_FILES
    finally:
        with contextlib.suppress(OSError):
            _close_all(flood)
