"""The MTI rules every layer reads an MTI by (isopace.iso8583.mti): request or answer, repeat,
advice, the answer's MTI; checked over every four-character MTI of digits, and on MTIs that are
no request's."""

from __future__ import annotations

import itertools

import pytest

from isopace.iso8583 import Iso8583Error, Message, mti_problems
from isopace.iso8583.mti import (
    answer_mti,
    is_advice,
    is_repeat,
    is_request,
    is_response,
    original_mti,
    response_mti,
)

ALL = ["".join(d) for d in itertools.product("0123456789", repeat=4)]


@pytest.mark.parametrize(
    ("request_mti", "answer"),
    [
        ("0100", "0110"),
        ("0200", "0210"),
        ("0220", "0230"),
        ("0400", "0410"),
        ("0420", "0430"),
        ("0800", "0810"),
        ("1200", "1210"),
        ("0102", "0112"),  # issuer-originated
        # a repeat is answered as its original: the acquirer matches it to that transaction
        ("0101", "0110"),
        ("0201", "0210"),
        ("0221", "0230"),
        ("0401", "0410"),
        ("0421", "0430"),
        ("0103", "0112"),
        ("0240", "0250"),  # a notification
    ],
)
def test_the_answer_mti(request_mti: str, answer: str) -> None:
    assert response_mti(request_mti) == answer
    assert answer_mti(request_mti) == answer
    assert Message(request_mti).reply().mti == answer


def test_every_mti_is_a_request_or_an_answer_never_both() -> None:
    for mti in ALL:
        assert not (is_request(mti) and is_response(mti))
        assert (is_request(mti) or is_response(mti)) == (mti[2] in "012345")
        if is_request(mti):
            answer = response_mti(mti)
            assert is_response(answer) and not is_repeat(answer)
            assert answer[:2] == mti[:2] and int(answer[2]) == int(mti[2]) + 1
            assert original_mti(mti)[3] == answer[3]
        else:
            with pytest.raises(Iso8583Error, match="not a request MTI"):
                response_mti(mti)
            assert answer_mti(mti) == mti


@pytest.mark.parametrize("mti", ["9999", "ABCD", "0210", "02", "", "020O", "٠٢٠٠"])
def test_an_mti_no_request_has_is_answered_as_received(mti: str) -> None:
    assert not is_request(mti)
    assert answer_mti(mti) == mti
    with pytest.raises(Iso8583Error):
        response_mti(mti)


def test_repeats_and_advices() -> None:
    assert [m for m in ("0200", "0201", "0203", "0205", "0421") if is_repeat(m)] == [
        "0201",
        "0203",
        "0205",
        "0421",
    ]
    assert original_mti("0421") == "0420" and original_mti("0201") == "0200"
    assert original_mti("0200") == "0200" and original_mti("ABCD") == "ABCD"
    assert [m for m in ("0120", "0220", "0230", "0420", "0200", "0410") if is_advice(m)] == [
        "0120",
        "0220",
        "0230",
        "0420",
    ]


def test_mti_problems() -> None:
    assert mti_problems("0200") == []
    assert mti_problems("ABCD") == ["MTI must be four digits"]
    assert mti_problems("9060") == [
        "MTI version 9 is not 0, 1 or 2",
        "MTI class 0 is reserved",
        "MTI function 6 is not 0..5",
    ]
