"""isopace.iso8583 against pyiso8583 4.0.1, measured in the same run.

Run: ``./scripts/bench iso8583`` (= ``python -m benchmarks iso8583``). Each case is timed with
``time.perf_counter`` over loops of about 4 ms, the two libraries alternating, best of 15 rounds
each; the ratio is pyiso8583 time / isopace time.
"decode + reply + set(39) + encode" is the server side of an authorization: the response
echoes the request's fields (``Message.reply``; pyiso8583: a new dict of the echo fields).
Messages: an 18-field 0200 authorization (2, 3, 4, 7, 11, 12, 13, 14, 18, 22, 25, 32, 35, 37, 41,
42, 43, 49) and the same with 52 + 55, on ISO87_ASCII / pyiso8583 ``default_ascii`` (same wire).
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable

from iso8583.specs import default_ascii

import iso8583
from isopace.iso8583 import ECHO_FIELDS, ISO87_ASCII, Message

TARGETS = {
    "decode + read 3, 41, 4": 10.0,
    "decode + read every field": 4.0,
    "encode new message": 5.0,
    "encode unchanged decoded": 100.0,
    "decode + set(39) + encode": 10.0,
    "decode + reply + set(39) + encode": 10.0,
    "changing-bitmap stream: decode + 3 reads": 4.0,
}

BASE: dict[int, str] = {
    2: "4761739001010010",
    3: "000000",
    4: "000000002500",
    7: "1129204455",
    11: "123456",
    12: "204455",
    13: "1129",
    14: "2812",
    18: "5411",
    22: "051",
    25: "00",
    32: "12345678",
    35: "4761739001010010=28122011234567890",
    37: "123456789012",
    41: "TERM0001",
    42: "MERCHANT0000001",
    43: "ACME STORES              LONDON       GB",
    49: "826",
}
ICC = bytes.fromhex(
    "9F2608AABBCCDDEEFF00119F2701809F100706010A03A0B8009F3704A1B2C3D4950500000000009A032611299C01005F2A0208269F02060000000025008407A0000000031010"
)
PIN = bytes.fromhex("1234567890ABCDEF")


REPEAT = 15
ROUND_SECONDS = 0.004


def _once(fn: Callable[[], object], loops: int) -> float:
    t0 = time.perf_counter()
    for _ in range(loops):
        fn()
    return (time.perf_counter() - t0) / loops


def _loops_for(fn: Callable[[], object]) -> int:
    """Loops that take about ROUND_SECONDS (short rounds: some of them see an idle machine)."""
    per_call = min(_once(fn, 20) for _ in range(3))
    return max(1, int(ROUND_SECONDS / max(per_call, 1e-9)))


def pair(theirs: Callable[[], object], ours: Callable[[], object]) -> tuple[float, float]:
    """Best time per call (seconds) of each, measured in alternating short rounds so that both
    see the same machine load; best of REPEAT rounds each."""
    lt, lo = _loops_for(theirs), _loops_for(ours)
    t_theirs: list[float] = []
    t_ours: list[float] = []
    for _ in range(REPEAT):
        t_theirs.append(_once(theirs, lt))
        t_ours.append(_once(ours, lo))
    return min(t_theirs), min(t_ours)


def cases(fields: dict[int, str | bytes]) -> list[tuple[str, float, float]]:
    msg = Message("0200", fields)
    wire = ISO87_ASCII.encode(msg)
    pdoc = {"t": "0200"}
    for n, v in fields.items():
        pdoc[str(n)] = v.hex().upper() if isinstance(v, bytes) else v
    pwire = bytes(iso8583.encode(dict(pdoc), default_ascii)[0])
    assert pwire == wire, "wire formats differ"
    spec = ISO87_ASCII
    decode = spec.decode
    encode = spec.encode
    pdecode = iso8583.decode
    pencode = iso8583.encode
    keys = list(fields)
    out = []

    def ours_3() -> object:
        m = decode(wire)
        return m[3], m[41], m[4]

    def theirs_3() -> object:
        d, _ = pdecode(wire, default_ascii)
        return d["3"], d["41"], d["4"]

    out.append(("decode + read 3, 41, 4", *pair(theirs_3, ours_3)))

    def ours_all() -> object:
        m = decode(wire)
        return [m[n] for n in keys]

    def theirs_all() -> object:
        d, _ = pdecode(wire, default_ascii)
        return [d[str(n)] for n in keys]

    out.append(("decode + read every field", *pair(theirs_all, ours_all)))

    def ours_new() -> object:
        return encode(Message("0200", fields))

    def theirs_new() -> object:
        return pencode(dict(pdoc), default_ascii)

    out.append(("encode new message", *pair(theirs_new, ours_new)))

    decoded = decode(wire)
    pdecoded, _ = pdecode(wire, default_ascii)

    def ours_same() -> object:
        return encode(decoded)

    def theirs_same() -> object:
        return pencode(dict(pdecoded), default_ascii)

    out.append(("encode unchanged decoded", *pair(theirs_same, ours_same)))

    def ours_set() -> object:
        return encode(decode(wire).set(39, "00"))

    def theirs_set() -> object:
        d, _ = pdecode(wire, default_ascii)
        d["39"] = "00"
        return pencode(d, default_ascii)

    out.append(("decode + set(39) + encode", *pair(theirs_set, ours_set)))

    echo = [str(n) for n in ECHO_FIELDS]

    def ours_reply() -> object:
        return encode(decode(wire).reply().set(39, "00"))

    def theirs_reply() -> object:
        d, _ = pdecode(wire, default_ascii)
        r = {"t": "0210"}
        for k in echo:
            if k in d:
                r[k] = d[k]
        r["39"] = "00"
        return pencode(r, default_ascii)

    assert bytes(theirs_reply()[0]) == ours_reply()  # type: ignore[index]
    out.append(("decode + reply + set(39) + encode", *pair(theirs_reply, ours_reply)))

    # a stream in which every message has a different bitmap (more layouts than the cache holds)
    rnd = random.Random(7)
    optional = [n for n in fields if n not in (3, 4, 41)]
    stream = []
    seen = set()
    while len(stream) < 2000:
        chosen = frozenset(rnd.sample(optional, rnd.randint(4, len(optional))))
        if chosen in seen:
            continue
        seen.add(chosen)
        sub = {n: v for n, v in fields.items() if n in chosen or n in (3, 4, 41)}
        stream.append(encode(Message("0200", sub)))
    # each call decodes the next message of the stream (cycling over 2000 distinct bitmaps,
    # four times more than the layout cache holds: every decode is a first sighting)
    ours_iter = itertools.cycle(stream)
    theirs_iter = itertools.cycle(stream)

    def ours_stream() -> object:
        m = decode(next(ours_iter))
        return m[3], m[41], m[4]

    def theirs_stream() -> object:
        d, _ = pdecode(next(theirs_iter), default_ascii)
        return d["3"], d["41"], d["4"]

    out.append(("changing-bitmap stream: decode + 3 reads", *pair(theirs_stream, ours_stream)))
    return out


def main() -> None:
    for label, fields in (
        ("0200, 18 fields", dict(BASE)),
        ("0200, 18 fields + 52 + 55", {**BASE, 52: PIN, 55: ICC}),
    ):
        print(
            f"-- {label} (pyiso8583 {iso8583.__version__} vs isopace,"
            f" best of {REPEAT}, alternating)"
        )
        for name, theirs, ours in cases(fields):
            ratio = theirs / ours
            target = TARGETS[name]
            mark = "ok" if ratio >= target else "MISSED"
            print(
                f"{name:<42} pyiso8583 {theirs * 1e6:8.2f} us  isopace {ours * 1e6:8.3f} us"
                f"  {ratio:8.1f}x  (target >= {target:g}x: {mark})"
            )


if __name__ == "__main__":
    main()
