"""Fuzz: random and mutated bytes only ever raise DecodeError (never IndexError, KeyError,
UnicodeDecodeError, struct.error, ...), whether at decode time or when the fields are read.

Inputs tried: random bytes; valid messages of every built-in spec and of an "exotic" spec
(binary, BCD, EBCDIC and four-digit length prefixes, nibble counts, pads), with secondary and
tertiary bitmaps, binary and BCD fields, with bytes flipped, inserted, deleted, truncated or
extended and length prefixes set to random digits. Hypothesis runs 10k + 12k cases, then a
seeded loop runs another 30k mutations quickly.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from isopace.iso8583 import (
    ISO87_ASCII,
    ISO87_ASCII_BINARY_BITMAP,
    ISO87_BINARY,
    ISO87_EBCDIC,
    DecodeError,
    Message,
    Spec,
)

from .conftest import AUTH, ICC, PIN
from .test_differential import _exotic

SPECS = [ISO87_ASCII, ISO87_ASCII_BINARY_BITMAP, ISO87_BINARY, ISO87_EBCDIC]
SAMPLES = [
    Message("0200", {**AUTH, 52: PIN, 55: ICC}),
    Message("0800", {7: "1129204455", 11: "000001", 70: "301"}),
    Message("0210", {3: "000000", 39: "00", 90: "0" * 42, 128: bytes(8), 131: "x" * 10}),
    Message("0100", {2: "476173900101001", 22: "051", 35: "476173900101001=2812"}),
]
SEEDS = [(spec, spec.encode(m)) for spec in SPECS for m in SAMPLES]
EXOTIC = Spec.from_pyiso8583(_exotic())
SPECS.append(EXOTIC)
SEEDS.append(
    (
        EXOTIC,
        EXOTIC.encode(
            Message(
                "0200",
                {
                    2: "4761739001010010",
                    3: "000000",
                    22: "051",
                    32: "123",
                    35: b"\x01\x02",
                    43: "äbc",
                    44: "é",
                    45: "x" * 10,
                    48: b"\x00" * 5,
                    54: "abc",
                    62: "12345",
                    130: "tertiary",
                },
            )
        ),
    )
)


def exercise(spec: Spec, data: bytes) -> None:
    try:
        m = spec.decode(data)
        m.fields()
        repr(m)
        m.describe()
        spec.encode(m)
        spec.encode(m.set(39, "00"))
        spec.validate(m)
    except DecodeError as e:
        assert isinstance(e.offset, int)
        str(e)


@settings(
    max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck), database=None
)
@given(st.sampled_from(SPECS), st.binary(max_size=300))
def test_random_bytes(spec: Spec, data: bytes) -> None:
    exercise(spec, data)


@st.composite
def mutated(draw: st.DrawFn) -> tuple[Spec, bytes]:
    spec, wire = draw(st.sampled_from(SEEDS))
    buf = bytearray(wire)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(
            st.sampled_from(["flip", "set", "insert", "delete", "truncate", "extend", "digit"])
        )
        i = draw(st.integers(0, max(0, len(buf) - 1)))
        if op == "flip" and buf:
            buf[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and buf:
            buf[i] = draw(st.integers(0, 255))
        elif op == "insert":
            buf[i:i] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del buf[i : i + draw(st.integers(1, 4))]
        elif op == "truncate":
            del buf[i:]
        elif op == "extend":
            buf += draw(st.binary(min_size=1, max_size=8))
        elif op == "digit" and buf:
            buf[i] = draw(st.sampled_from(b"0123456789"))
    return spec, bytes(buf)


@settings(
    max_examples=12_000, deadline=None, suppress_health_check=list(HealthCheck), database=None
)
@given(mutated())
def test_mutated_messages(case: tuple[Spec, bytes]) -> None:
    exercise(*case)


@pytest.mark.parametrize("seed", range(3))
def test_seeded_mutation_loop(seed: int) -> None:
    rnd = random.Random(seed)
    for _ in range(10_000):
        spec, wire = rnd.choice(SEEDS)
        buf = bytearray(wire)
        for _ in range(rnd.randint(1, 3)):
            i = rnd.randrange(len(buf)) if buf else 0
            r = rnd.random()
            if r < 0.4 and buf:
                buf[i] = rnd.randrange(256)
            elif r < 0.6:
                del buf[i:]
            elif r < 0.8:
                buf[i:i] = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 3)))
            elif buf:
                buf[i] = rnd.choice(b"0123456789")
        exercise(spec, bytes(buf))
