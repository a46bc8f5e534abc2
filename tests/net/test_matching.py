"""Sans-IO matcher: keys, duplicates, missing keys, deadlines, drain."""

from __future__ import annotations

import pytest

from isopace.iso8583 import Message
from isopace.net import DuplicateKeyError, Matcher, MatchKeyError, rrn_key, stan_terminal_key


def req(stan: str | None, tid: str | None = "TERM0001", rrn: str | None = None) -> Message:
    fields: dict[int, str | bytes] = {}
    if stan is not None:
        fields[11] = stan
    if tid is not None:
        fields[41] = tid
    if rrn is not None:
        fields[37] = rrn
    return Message("0200", fields)


def test_match_by_stan_and_terminal() -> None:
    m: Matcher[str] = Matcher()
    m.add(req("000001"), "a")
    m.add(req("000001", "TERM0002"), "b")
    m.add(req("000002", None), "c")
    assert len(m) == 3
    assert m.match(req("000001", "TERM0002").reply()) == "b"
    assert m.match(req("000001", "TERM0002").reply()) is None
    assert m.match(req("000002", None).with_mti("0210")) == "c"
    assert m.match(req("000009")) is None
    assert m.match(Message("0210")) is None
    assert len(m) == 1


def test_duplicate_and_missing_keys() -> None:
    m: Matcher[int] = Matcher()
    m.add(req("000001"), 1)
    with pytest.raises(DuplicateKeyError, match="000001"):
        m.add(req("000001"), 2)
    with pytest.raises(MatchKeyError, match="no matching key"):
        m.add(req(None), 3)
    assert len(m) == 1


def test_rrn_key() -> None:
    m: Matcher[int] = Matcher(key=rrn_key)
    m.add(req("000001", rrn="123456789012"), 1)
    assert m.match(req("999999", rrn="123456789012").with_mti("0210")) == 1
    assert stan_terminal_key(req("000001")) == ("000001", "TERM0001")


def test_deadlines_expire_and_rebuild() -> None:
    m: Matcher[int] = Matcher()
    for i in range(10):
        m.add(req(f"{i:06d}"), i, deadline=float(i))
    assert m.next_deadline() == 0.0
    assert m.match(req("000000").reply()) == 0
    assert m.next_deadline() == 1.0
    expired = m.expire(4.0)
    assert [t for _, t in expired] == [1, 2, 3, 4]
    assert m.remove(("000005", "TERM0001")) == 5
    assert m.next_deadline() == 6.0
    for i in range(1000):  # matched entries never pile up in the deadline heap
        m.add(req(f"{i + 100:06d}"), i, deadline=100.0)
        m.match(req(f"{i + 100:06d}"))
    assert len(m._deadlines) < 200
    assert [t for _, t in m.drain()] == [6, 7, 8, 9]
    assert len(m) == 0 and m.next_deadline() is None
