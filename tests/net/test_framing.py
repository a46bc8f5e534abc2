"""Sans-IO framing: every header kind, TPDU, keep-alive, maximum size, bad headers, chunking.

Inputs tried: each header kind with and without ``include_header``; empty, 1-byte and maximum-size
payloads; payloads one byte over the maximum (encode and decode); non-digit ASCII headers;
non-BCD headers; declared lengths smaller than an included header; a huge 4-byte declared
length (never allocated); frames shorter than their TPDU; arbitrary chunkings (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from isopace.net import (
    Frame,
    FrameDecoder,
    FrameError,
    FrameTooLargeError,
    Framing,
    IncompleteFrameError,
    LengthHeader,
    Tpdu,
)

ALL_FRAMINGS = [
    Framing(header=h, include_header=inc, tpdu=tp)
    for h in LengthHeader
    for inc in (False, True)
    for tp in (False, True)
]


def _ids(f: Framing) -> str:
    return f"{f.header.value}{'-incl' if f.include_header else ''}{'-tpdu' if f.tpdu else ''}"


@pytest.mark.parametrize("framing", ALL_FRAMINGS, ids=_ids)
def test_round_trip_every_kind(framing: Framing) -> None:
    tpdu = Tpdu(b"\x00\x01", b"\x00\x02") if framing.tpdu else None
    sizes = [1, 2, 5, 50, framing.max_body - (5 if framing.tpdu else 0)]
    payloads = [bytes(range(256)) * (n // 256) + bytes(range(n % 256)) for n in sizes]
    wire = b"".join(framing.encode_frame(p, tpdu) for p in payloads) + framing.keepalive()
    frames = framing.decoder().frames(wire)
    assert [f.payload for f in frames] == [*payloads, b""]
    assert all(f.tpdu == tpdu for f in frames[:-1])
    assert frames[-1].keepalive


def test_header_bytes() -> None:
    assert Framing().encode_frame(b"abc") == b"\x00\x03abc"
    assert Framing(header=LengthHeader.BINARY4).encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert Framing(header=LengthHeader.ASCII2).encode_frame(b"abc") == b"03abc"
    assert Framing(header=LengthHeader.ASCII4).encode_frame(b"abc") == b"0003abc"
    assert Framing(header=LengthHeader.BCD2).encode_frame(b"a" * 1234)[:2] == b"\x12\x34"
    assert Framing(header=LengthHeader.VMLH).encode_frame(b"abc") == b"\x00\x03\x00\x00abc"
    assert Framing(include_header=True).encode_frame(b"abc") == b"\x00\x05abc"
    assert Framing(header=LengthHeader.ASCII4, include_header=True).keepalive() == b"0004"
    assert Framing().keepalive() == b"\x00\x00"


def test_tpdu_swap_on_reply() -> None:
    framing = Framing(tpdu=True)
    tpdu = Tpdu(destination=b"\x00\x03", source=b"\x00\x07")
    wire = framing.encode_frame(b"0800", tpdu)
    assert wire == b"\x00\x09\x60\x00\x03\x00\x070800"
    (frame,) = framing.decoder().frames(wire)
    assert frame.tpdu == tpdu
    assert frame.tpdu.reply() == Tpdu(destination=b"\x00\x07", source=b"\x00\x03")
    assert framing.encode_frame(b"0810", frame.tpdu.reply())[2:7] == b"\x60\x00\x07\x00\x03"


def test_tpdu_required_and_refused() -> None:
    with pytest.raises(FrameError, match="needs a TPDU"):
        Framing(tpdu=True).encode_frame(b"0800")
    with pytest.raises(FrameError, match="no TPDU"):
        Framing().encode_frame(b"0800", Tpdu())
    with pytest.raises(ValueError):
        Tpdu(b"\x00", b"\x00\x00")


def test_frame_shorter_than_tpdu_keeps_sync() -> None:
    framing = Framing(tpdu=True)
    wire = b"\x00\x03abc" + framing.encode_frame(b"0800", Tpdu())
    frames = framing.decoder().frames(wire)
    assert frames == [Frame(b"abc", None), Frame(b"0800", Tpdu())]


def test_oversize_declared_length_never_allocated() -> None:
    framing = Framing(header=LengthHeader.BINARY4, max_frame_size=1024)
    dec = framing.decoder()
    dec.feed(b"\xff\xff\xff\xf0")
    with pytest.raises(FrameTooLargeError) as info:
        dec.take(1)
    assert info.value.length == 0xFFFFFFF0 and info.value.max_size == 1024
    assert "exceeds the maximum frame size 1024" in str(info.value)
    with pytest.raises(FrameTooLargeError):  # stays broken
        dec.take(1)


def test_max_size_is_inclusive_and_encode_refuses_larger() -> None:
    framing = Framing(max_frame_size=10)
    assert framing.decoder().frames(framing.encode_frame(b"x" * 10))[0].payload == b"x" * 10
    with pytest.raises(FrameTooLargeError):
        framing.encode_frame(b"x" * 11)
    with pytest.raises(FrameTooLargeError):
        framing.decoder().frames(b"\x00\x0b" + b"x" * 11)
    with pytest.raises(FrameTooLargeError):
        Framing(header=LengthHeader.ASCII2).encode_frame(b"x" * 100)
    with pytest.raises(ValueError):
        Framing(max_frame_size=0)


@pytest.mark.parametrize(
    ("framing", "wire", "match"),
    [
        (Framing(header=LengthHeader.ASCII4), b"00x1abc", "not 4 ASCII digits"),
        (Framing(header=LengthHeader.ASCII2), b"-1abc", "not 2 ASCII digits"),
        (Framing(header=LengthHeader.BCD2), b"\x0a\x00abc", "not BCD"),
        (Framing(include_header=True), b"\x00\x01abc", "smaller than the 2-byte header"),
    ],
)
def test_bad_headers(framing: Framing, wire: bytes, match: str) -> None:
    with pytest.raises(FrameError, match=match):
        framing.decoder().frames(wire)


def test_incomplete_at_close() -> None:
    dec = Framing().decoder()
    assert dec.frames(b"\x00\x05ab") == []
    assert dec.pending == 4
    with pytest.raises(IncompleteFrameError, match="4 bytes"):
        dec.close()
    dec.frames(b"cde")
    dec.close()


def test_large_stream_compacts() -> None:
    framing = Framing()
    wire = framing.encode_frame(b"y" * 1000) * 200
    dec = FrameDecoder(framing)
    assert len(dec.frames(wire)) == 200
    assert dec.pending == 0


@settings(max_examples=150, deadline=None)
@given(
    framing=st.sampled_from(ALL_FRAMINGS),
    payloads=st.lists(st.binary(min_size=0, max_size=300), max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=30),
)
def test_any_chunking_gives_the_same_frames(
    framing: Framing, payloads: list[bytes], cuts: list[int]
) -> None:
    tpdu = Tpdu(b"\x12\x34", b"\x56\x78") if framing.tpdu else None
    payloads = [p[: min(len(p), framing.max_body - 5)] for p in payloads]
    wire = b"".join(framing.encode_frame(p, tpdu if p else None) for p in payloads)
    expected = framing.decoder().frames(wire)
    assert [f.payload for f in expected] == payloads
    points = sorted({c % (len(wire) + 1) for c in cuts})
    dec = framing.decoder()
    got: list[Frame] = []
    last = 0
    for point in [*points, len(wire)]:
        got += dec.frames(wire[last:point])
        last = point
    assert got == expected
    dec.close()


def _one_by_one(framing: Framing, chunks: list[bytes]) -> tuple[list[Frame], str | None]:
    dec = framing.decoder()
    out: list[Frame] = []
    try:
        for chunk in chunks:
            dec.feed(chunk)
            while frames := dec.take(1):
                out.extend(frames)
    except FrameError as exc:
        return out, str(exc)
    return out, None


def _batched(framing: Framing, chunks: list[bytes], limit: int) -> tuple[list[Frame], str | None]:
    dec = framing.decoder()
    out: list[Frame] = []
    try:
        for chunk in chunks:
            dec.feed(chunk)
            while frames := dec.take(limit):
                out += frames
    except FrameError as exc:
        return out, str(exc)
    return out, None


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.binary(max_size=60), max_size=8),
    st.sampled_from(ALL_FRAMINGS),
    st.integers(min_value=1, max_value=4),
)
def test_garbage_never_crashes_and_take_agrees(
    chunks: list[bytes], framing: Framing, limit: int
) -> None:
    """Arbitrary bytes: only FrameError, and batch decoding (take) finds the same frames and the
    same error as frame-by-frame decoding."""
    assert _batched(framing, chunks, limit) == _one_by_one(framing, chunks)
