"""isopace.iso8583: the ISO 8583 message, its specs and codecs, TLV, validation and masking.

``Message`` is immutable and copy-on-write; ``Spec`` decodes lazily and re-encodes only what
changed. See :mod:`isopace.iso8583.message` and :mod:`isopace.iso8583.spec` for the decisions.
The answer policy every layer uses: :mod:`~isopace.iso8583.mti` (what an MTI says, the
answer's MTI), :mod:`~isopace.iso8583.answers` (the echo fields, ``error_reply``, the response
code of an error), :mod:`~isopace.iso8583.response_codes`.
"""

from isopace.iso8583 import mti, response_codes
from isopace.iso8583.answers import ECHO_FIELDS, error_reply, response_code_for
from isopace.iso8583.composite import BitmapComposite, Positional
from isopace.iso8583.currencies import format_amount, minor_units
from isopace.iso8583.errors import DecodeError, EncodeError, Iso8583Error
from isopace.iso8583.fields import FieldDef
from isopace.iso8583.masking import (
    CARD_DATA_FIELDS,
    CARD_TLV_TAGS,
    card_number,
    luhn_ok,
    mask_pan,
    mask_value,
)
from isopace.iso8583.message import Message
from isopace.iso8583.mti import mti_problems, response_mti
from isopace.iso8583.response_codes import APPROVALS, is_approval, meaning
from isopace.iso8583.spec import Spec
from isopace.iso8583.specs import (
    ISO87_ASCII,
    ISO87_ASCII_BINARY_BITMAP,
    ISO87_BINARY,
    ISO87_EBCDIC,
    SPECS,
    iso87_ebcdic,
    load_spec_file,
    spec_by_name,
)
from isopace.iso8583.tlv import TLV, TlvError, build_tlv, parse_tlv
from isopace.iso8583.validation import Violation, date_time_problem

__all__ = [
    "APPROVALS",
    "CARD_DATA_FIELDS",
    "CARD_TLV_TAGS",
    "ECHO_FIELDS",
    "ISO87_ASCII",
    "ISO87_ASCII_BINARY_BITMAP",
    "ISO87_BINARY",
    "ISO87_EBCDIC",
    "SPECS",
    "TLV",
    "BitmapComposite",
    "DecodeError",
    "EncodeError",
    "FieldDef",
    "Iso8583Error",
    "Message",
    "Positional",
    "Spec",
    "TlvError",
    "Violation",
    "build_tlv",
    "card_number",
    "date_time_problem",
    "error_reply",
    "format_amount",
    "is_approval",
    "iso87_ebcdic",
    "load_spec_file",
    "luhn_ok",
    "mask_pan",
    "mask_value",
    "meaning",
    "minor_units",
    "mti",
    "mti_problems",
    "parse_tlv",
    "response_code_for",
    "response_codes",
    "response_mti",
    "spec_by_name",
]
