"""Fuzz target for the HTTP/2 client side (l7/h2_downstream.py, l7/h2_fields.py) on the fake loop.

Invariant: for ANY sequence of frames after the connection preface - well-formed or not, any
type, flags, stream ids and payloads, header blocks with any fields - the proxy

* never lets an exception escape and never logs an internal error;
* forwards only requests whose head passed the checks (a method, an origin-form path with the
  characters HTTP/1.1 allows, a valid authority) - nothing else reaches a pod;
* either keeps the connection open or ends it with a GOAWAY (or a reset after a send timeout);

and feeding the bytes whole, one byte at a time or cut at arbitrary points ends the connection
the same way and forwards the same requests - except those that came in the same read as a
protocol error: ``h2`` reports nothing of a read it refuses, so cut finer, a request may go out
before the error ends the connection (and with it that request). ``same_outcome`` says so.

Run under pytest (hypothesis, bounded: tests/test_h2_fuzz.py), or longer with
``HYPOTHESIS_PROFILE=long``.
"""

from __future__ import annotations

import logging

from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import strategies as st

from l7.h1grammar import check_host as valid_host
from l7.h2_fields import valid_origin_target

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

_NAMES = [b":method", b":path", b":scheme", b":authority", b":status", b":bogus", b"host", b"content-length",
          b"te", b"connection", b"x-a", b"X-Upper", b"cookie", b"grpc-timeout", b"content-type", b"x_under", b""]
_VALUES = [b"GET", b"POST", b"CONNECT", b"/", b"/x?y=1", b"*", b"x", b"http", b"example.com", b"ex ample",
           b"example.com:99999", b"0", b"5", b"-1", b"trailers", b"gzip", b"application/grpc", b"1S", b"a\r\nb",
           b"a\x00", b" pad ", b""]

field = st.tuples(st.sampled_from(_NAMES), st.sampled_from(_VALUES))
good_head = st.just([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/x"), (b":authority", b"example.com")])
head_fields = st.one_of(good_head, st.lists(field, max_size=8), good_head.flatmap(
    lambda g: st.lists(field, max_size=4).map(lambda extra: g + extra)))
stream_id = st.sampled_from([0, 1, 1, 3, 3, 5, 7, 2, (1 << 31) - 1])


@st.composite
def frames(draw) -> list[bytes]:
    """A list of serialized frames (and their HPACK encoder's state kept across HEADERS)."""
    enc = Encoder()
    out = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["headers", "headers", "cont", "data", "rst", "settings", "ping", "window",
                                     "priority", "goaway", "raw"]))
        sid = draw(stream_id)
        if kind == "headers":
            block = enc.encode(draw(head_fields))
            flags = draw(st.sets(st.sampled_from(["END_HEADERS", "END_STREAM"])))
            out.append(HeadersFrame(sid or 1, data=block, flags=flags).serialize())
        elif kind == "cont":
            out.append(ContinuationFrame(sid or 1, data=draw(st.binary(max_size=32)),
                                         flags=draw(st.sets(st.just("END_HEADERS")))).serialize())
        elif kind == "data":
            out.append(DataFrame(sid or 1, data=draw(st.binary(max_size=64)),
                                 flags=draw(st.sets(st.just("END_STREAM")))).serialize())
        elif kind == "rst":
            out.append(RstStreamFrame(sid or 1, error_code=draw(st.integers(0, 15))).serialize())
        elif kind == "settings":
            s = draw(st.dictionaries(st.integers(1, 8), st.integers(0, (1 << 31)), max_size=3))
            out.append(SettingsFrame(0, settings=s).serialize())
        elif kind == "ping":
            out.append(PingFrame(0, opaque_data=draw(st.binary(min_size=8, max_size=8))).serialize())
        elif kind == "window":
            out.append(WindowUpdateFrame(sid, window_increment=draw(st.integers(1, (1 << 31) - 1))).serialize())
        elif kind == "priority":
            out.append(PriorityFrame(sid or 1, depends_on=draw(st.sampled_from([0, 1, 3])),
                                     stream_weight=draw(st.integers(0, 255))).serialize())
        elif kind == "goaway":
            out.append(GoAwayFrame(0, last_stream_id=0, error_code=0).serialize())
        else:
            out.append(draw(st.binary(max_size=40)))
    return out


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def drive(harness, data: bytes, cuts: list[int]) -> tuple:
    """Feed ``data`` (after the preface) cut at ``cuts``; return the outcome: the heads sent
    upstream and how the connection ended."""
    errors = _Errors()
    log = logging.getLogger("meshproxy.l7")
    log.addHandler(errors)
    try:
        conn, t = harness.client()
        stream = PREFACE + SettingsFrame(0).serialize() + data
        pieces, last = [], 0
        for c in sorted(set(x for x in cuts if 0 < x < len(stream))):
            pieces.append(stream[last:c])
            last = c
        pieces.append(stream[last:])
        for piece in pieces:
            proto = t.protocol or conn
            proto.data_received(piece)
        harness.loop.advance(0.0)
        heads = []
        for _addr, _labels, ex, _token in harness.pool.requests:
            head = ex.head
            assert head.method and head.method != b"CONNECT"
            assert valid_origin_target(head.target) or head.target == b"*", head.target
            assert valid_host(head.host) is not None, head.host
            heads.append((head.method, head.target, head.host))
        harness.pool.requests.clear()
        assert not errors.records, [r.getMessage() for r in errors.records]
        return tuple(heads), t.closing, t.aborted
    finally:
        log.removeHandler(errors)


def same_outcome(a: tuple, b: tuple) -> bool:
    """Two outcomes of ``drive`` on the same bytes agree (see the module docstring)."""
    if a[1:] != b[1:]:
        return False
    heads_a, heads_b = a[0], b[0]
    if heads_a == heads_b:
        return True
    if not a[1]:   # the connection is still open: no protocol error, so no excuse
        return False
    short, long_ = sorted((heads_a, heads_b), key=len)
    return long_[:len(short)] == short
