"""The one error answer (isopace.iso8583.error_reply), the echo fields, and the response code
each error maps to (response_code_for): decoded requests whose fields do or do not decode,
partial ones, MTIs no request has, headers."""

from __future__ import annotations

import pytest

from isopace.iso8583 import (
    ECHO_FIELDS,
    ISO87_ASCII,
    DecodeError,
    EncodeError,
    Iso8583Error,
    Message,
    Spec,
    TlvError,
    error_reply,
    response_code_for,
)
from isopace.iso8583 import response_codes as rc
from isopace.iso8583.tlv import TlvBuildError

REQUEST = {
    2: "4761739001010119",
    3: "000000",
    4: "000000002500",
    7: "1206143000",
    11: "100006",
    41: "TERM0001",
    43: "SHOP".ljust(40),
    49: "840",
}


def test_error_reply_echoes_the_echo_fields_and_sets_the_code() -> None:
    built = Message("0200", REQUEST)
    for request in (built, ISO87_ASCII.decode(ISO87_ASCII.encode(built))):
        answer = error_reply(request, rc.FORMAT_ERROR)
        assert answer.mti == "0210"
        expected = {n: v for n, v in REQUEST.items() if n in ECHO_FIELDS} | {39: "30"}
        assert answer.fields() == expected  # DE 43 is no echo field


def test_a_field_that_does_not_decode_is_left_out_the_others_echoed() -> None:
    wire = ISO87_ASCII.encode(Message("0200", REQUEST)).replace(b"TERM0001", b"\xffERM0001")
    request = ISO87_ASCII.decode(wire)
    with pytest.raises(DecodeError):
        request.reply()
    answer = error_reply(request, rc.FORMAT_ERROR)
    assert 41 not in answer and answer[11] == "100006" and answer[39] == "30"
    assert ISO87_ASCII.decode(ISO87_ASCII.encode(answer))[11] == "100006"


@pytest.mark.parametrize("mti", ["9999", "ABCD", "0210"])
def test_an_mti_no_request_has_is_answered_as_received(mti: str) -> None:
    answer = error_reply(Message(mti, REQUEST), rc.FORMAT_ERROR)
    assert answer.mti == mti and answer[39] == "30" and answer[11] == "100006"


def test_a_repeat_is_answered_as_its_original() -> None:
    assert error_reply(Message("0421", REQUEST), rc.FORMAT_ERROR).mti == "0430"


def test_the_header_is_kept() -> None:
    layout = ISO87_ASCII.to_pyiso8583()
    layout["h"] = {"data_enc": "ascii", "len_type": 0, "max_len": 5, "desc": "Header"}
    spec = Spec.from_pyiso8583(layout)
    wire = spec.encode(Message("0200", REQUEST, header="HDR01"))
    request = spec.decode(wire.replace(b"TERM0001", b"\xffERM0001"))  # not reply()'s path
    answer = error_reply(request, rc.SYSTEM_MALFUNCTION)
    assert answer.header == "HDR01" and answer[39] == "96" and 41 not in answer
    assert spec.decode(spec.encode(answer)).header == "HDR01"


def test_partial_requests_echo_only_what_was_recovered() -> None:
    wire = ISO87_ASCII.encode(Message("0200", REQUEST))
    partial = ISO87_ASCII.decode_partial(wire[:-1])
    assert error_reply(partial, rc.FORMAT_ERROR).fields() == {39: "30"}


def test_each_error_names_its_response_code() -> None:
    assert response_code_for(DecodeError(11, 3, "bad")) == rc.FORMAT_ERROR
    assert response_code_for(TlvError(55, 0, "bad")) == rc.FORMAT_ERROR
    assert response_code_for(Iso8583Error("field 4: not an amount")) == rc.FORMAT_ERROR
    # a message this side built and cannot encode: not the peer's fault
    assert response_code_for(EncodeError(39, "too long")) == rc.SYSTEM_MALFUNCTION
    assert response_code_for(TlvBuildError(55, "bad")) == rc.SYSTEM_MALFUNCTION
    assert response_code_for(RuntimeError("boom")) == rc.SYSTEM_MALFUNCTION
    assert response_code_for(TimeoutError()) == rc.SYSTEM_MALFUNCTION
