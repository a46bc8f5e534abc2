"""Exchange: property bag, durable properties, abort state, restore."""

from __future__ import annotations

import pytest

from isopace.flow import Exchange


def test_property_bag() -> None:
    ex = Exchange("t", "req")
    assert ex.get("a") is None and ex.get("a", 5) == 5 and "a" not in ex
    ex.set("a", 1)
    assert ex.get("a") == 1 and "a" in ex
    assert ex.response is None and ex.error is None and not ex.aborted
    assert ex.request == "req" and ex.id == "t"
    assert ex.durable() == {}


def test_durable_properties() -> None:
    ex = Exchange("t", "req")
    ex.set("hold", "H1", durable=True)
    ex.set("amounts", {"held": 2500, "codes": ["00", None], "ok": True, "r": 1.5}, durable=True)
    ex.set("plain", object())
    assert ex.durable() == {
        "amounts": {"held": 2500, "codes": ["00", None], "ok": True, "r": 1.5},
        "hold": "H1",
    }
    ex.set("hold", "H2", durable=False)  # the latest set decides
    assert "hold" not in ex.durable()
    with pytest.raises(TypeError, match="'bad'"):
        ex.set("bad", object(), durable=True)
    with pytest.raises(TypeError):
        ex.set("bad", {1: "x"}, durable=True)


def test_abort_with_none_never_erases_a_cause() -> None:
    ex = Exchange("t", "r")
    cause = ValueError("x")
    ex.abort(cause)
    ex.abort()
    assert ex.aborted
    assert ex._cause is cause


def test_restore_rebuilds_what_recovery_needs() -> None:
    ex = Exchange.restore("t", "req", durable={"hold": "H1"}, joined=["a", "b"], response="0210")
    assert ex.durable() == {"hold": "H1"}
    assert ex.joined == ("a", "b")
    assert ex.response == "0210"
    assert repr(ex) == "<Exchange 't' open>"
