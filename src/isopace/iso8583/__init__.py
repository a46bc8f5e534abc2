"""isopace.iso8583: the ISO 8583 message, its specs and codecs, TLV, validation and masking.

``Message`` is immutable and copy-on-write; ``Spec`` decodes lazily and re-encodes only what
changed. See :mod:`isopace.iso8583.message` and :mod:`isopace.iso8583.spec` for the decisions.
"""

from isopace.iso8583.composite import BitmapComposite, Positional
from isopace.iso8583.errors import DecodeError, EncodeError, Iso8583Error
from isopace.iso8583.fields import FieldDef
from isopace.iso8583.masking import CARD_DATA_FIELDS, CARD_TLV_TAGS, luhn_ok, mask_pan, mask_value
from isopace.iso8583.message import ECHO_FIELDS, Message, response_mti
from isopace.iso8583.spec import Spec
from isopace.iso8583.specs import ISO87_ASCII, ISO87_BINARY, ISO87_EBCDIC, iso87_ebcdic
from isopace.iso8583.tlv import TLV, TlvError, build_tlv, parse_tlv
from isopace.iso8583.validation import Violation, date_time_problem, mti_problems

__all__ = [
    "CARD_DATA_FIELDS",
    "CARD_TLV_TAGS",
    "ECHO_FIELDS",
    "ISO87_ASCII",
    "ISO87_BINARY",
    "ISO87_EBCDIC",
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
    "date_time_problem",
    "iso87_ebcdic",
    "luhn_ok",
    "mask_pan",
    "mask_value",
    "mti_problems",
    "parse_tlv",
    "response_mti",
]
