"""W3C Trace Context parsing and formatting (l7.tracecontext) and request ids (l7.requestid):
table tests. Rows follow the Recommendation's text and the cases of the W3C test suite
(test/test.py in the trace-context repository), written anew here."""

from __future__ import annotations

import re
import uuid

import pytest

from l7.requestid import new_request_id, request_id_for
from l7.tracecontext import (
    TraceParent,
    format_traceparent,
    parse_traceparent,
    parse_tracestate,
    trace_headers,
)

TID = "12345678901234567890123456789012"
PID = "1234567890123456"
OK = TraceParent(int(TID, 16), int(PID, 16), 1)

TRACEPARENT_CASES = [
    # (value, expected) - None: start a new trace
    (f"00-{TID}-{PID}-01", OK),
    (f"00-{TID}-{PID}-00", OK._replace(flags=0)),
    (f"00-{TID}-{PID}-09", OK._replace(flags=9)),                # other bits: read, sampled = bit 0
    (f" 00-{TID}-{PID}-01", OK),                                 # OWS around the value
    (f"\t00-{TID}-{PID}-01 \t", OK),
    (f"00-{TID}-{PID}-01.", None),                               # version 00: exactly 55 characters
    (f"00-{TID}-{PID}-01-what-the-future-will-be-like", None),
    (f"cc-{TID}-{PID}-01", OK),                                  # a future version: first four fields
    (f"cc-{TID}-{PID}-01-what-the-future-will-be-like", OK),
    (f"cc-{TID}-{PID}-01.what-the-future-will-be-like", None),  # ... only when "-" follows them
    (f"ff-{TID}-{PID}-01", None),                                # version ff is invalid
    (f".0-{TID}-{PID}-01", None),
    (f"0.-{TID}-{PID}-01", None),
    (f"000-{TID}-{PID}-01", None),
    (f"0-{TID}-{PID}-01", None),
    (f"00-{'0' * 32}-{PID}-01", None),                           # all-zero ids are invalid
    (f"00-{TID}-{'0' * 16}-01", None),
    (f"00-.{TID[1:]}-{PID}-01", None),
    (f"00-{TID[:-1]}.-{PID}-01", None),
    (f"00-{TID}3-{PID}-01", None),                               # wrong lengths
    (f"00-{TID[:-1]}-{PID}-01", None),
    (f"00-{TID}-{PID}7-01", None),
    (f"00-{TID}-{PID[:-1]}-01", None),
    (f"00-{TID}-{PID}-.0", None),
    (f"00-{TID}-{PID}-0.", None),
    (f"00-{TID}-{PID}-001", None),
    (f"00-{TID}-{PID}-1", None),
    (f"00-{TID.upper().replace('1', 'A')}-{PID}-01", None),      # hex must be lowercase
    ("", None),
    ("garbage", None),
    ([f"00-{TID}-{PID}-01"], OK),                                # one field given as a list
    ([f"00-{TID[:-1]}1-{PID}-01", f"00-{TID}-{PID}-01"], None),  # two traceparent fields: invalid
    (None, None),
]


@pytest.mark.parametrize("value,expected", TRACEPARENT_CASES)
def test_parse_traceparent(value, expected):
    assert parse_traceparent(value) == expected
    if isinstance(value, str):
        assert parse_traceparent(value.encode()) == expected


def test_format_traceparent_is_version_00_with_only_the_sampled_bit():
    assert format_traceparent(int(TID, 16), int(PID, 16), True) == f"00-{TID}-{PID}-01".encode()
    assert format_traceparent(1, 2, False) == b"00-" + b"0" * 31 + b"1-" + b"0" * 15 + b"2-00"
    for tid, sid, sampled in ((1, 1, True), ((1 << 128) - 1, (1 << 64) - 1, False)):
        out = format_traceparent(tid, sid, sampled)
        assert parse_traceparent(out) == TraceParent(tid, sid, int(sampled))


KEY_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_-*/"
VALUE_CHARS = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in ",=")
TRACESTATE_CASES = [
    # (field values, forwarded)
    ("foo=1,bar=2", "foo=1,bar=2"),
    (["foo=1,bar=2", "rojo=1,congo=2", "baz=3"], "foo=1,bar=2,rojo=1,congo=2,baz=3"),   # fields joined in order
    ("foo=1 \t , \t bar=2, \t baz=3", "foo=1,bar=2,baz=3"),                         # OWS dropped
    (" foo=1", "foo=1"),
    ("foo=1\t", "foo=1"),
    ("foo= 1", "foo= 1"),                                       # a value's leading space is kept
    ("", None),                                                 # empty: accepted, not forwarded
    (["", "foo=1"], "foo=1"),
    (["foo=1", ""], "foo=1"),
    (",,foo=1,, ,", "foo=1"),                                   # empty members skipped
    ("foo=1,foo=1", None),                                      # duplicate keys: all discarded
    (["foo=1", "foo=2"], None),
    ("foo =1", None),                                           # illegal keys
    ("FOO=1", None),
    ("foo.bar=1", None),
    ("foo@=1,bar=2", None),
    ("@foo=1,bar=2", None),
    ("foo@@bar=1,bar=2", None),
    ("foo@bar@baz=1,bar=2", None),
    ("foo=bar=baz", None),                                      # illegal values
    ("foo=,bar=3", None),
    ("foo=a\x7fb", None),
    ("1abc=x", "1abc=x"),                                       # a key may start with a digit
    (KEY_CHARS + "=" + VALUE_CHARS, KEY_CHARS + "=" + VALUE_CHARS),
    (KEY_CHARS + "@a-z0-9_-*/=" + VALUE_CHARS, KEY_CHARS + "@a-z0-9_-*/=" + VALUE_CHARS),
    (["foo=1", "z" * 256 + "=1"], "foo=1," + "z" * 256 + "=1"),   # key length limits
    (["foo=1", "z" * 257 + "=1"], None),
    (["foo=1", "t" * 241 + "@" + "v" * 14 + "=1"], "foo=1," + "t" * 241 + "@" + "v" * 14 + "=1"),
    (["foo=1", "t" * 242 + "@v=1"], None),
    (["foo=1", "t@" + "v" * 15 + "=1"], None),
    ("k=" + "v" * 256, "k=" + "v" * 256),                      # value length limit
    ("k=" + "v" * 257, None),
    (",".join(f"bar{i:02d}={i:02d}" for i in range(1, 33)), ",".join(f"bar{i:02d}={i:02d}" for i in range(1, 33))),
    (",".join(f"bar{i:02d}={i:02d}" for i in range(1, 34)), None),   # 33 members: discarded
    (None, None),
]


@pytest.mark.parametrize("values,expected", TRACESTATE_CASES)
def test_parse_tracestate(values, expected):
    got = parse_tracestate(values)
    assert got == (expected.encode() if expected is not None else None)


def test_trace_headers_finds_fields_in_any_case_and_keeps_repeats():
    h = [(b"Host", b"x"), (b"TraceParent", b"a"), (b"tracestate", b"k=1"), (b"TRACESTATE", b"j=2"),
         (b"trace-parent", b"no")]
    assert trace_headers(h) == (b"a", [b"k=1", b"j=2"])
    assert trace_headers([(b"traceparent", b"a"), (b"traceparent", b"b")]) == ([b"a", b"b"], None)
    assert trace_headers([(b"x", b"y")]) == (None, None)


# -- request ids ------------------------------------------------------------------------------------

def test_new_request_id_is_a_version_4_uuid():
    seen = set()
    for _ in range(2000):
        rid = new_request_id()
        assert re.fullmatch(rb"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", rid), rid
        u = uuid.UUID(rid.decode())
        assert u.version == 4 and u.variant == uuid.RFC_4122
        seen.add(rid)
    assert len(seen) == 2000


@pytest.mark.parametrize("incoming,kept", [(b"abc", True), (b"7f1c-any-form", True), (None, False), (b"", False)])
def test_request_id_for_keeps_a_present_id_and_makes_one_otherwise(incoming, kept):
    rid, generated = request_id_for(incoming)
    assert generated is not kept
    if kept:
        assert rid is incoming
    else:
        assert len(rid) == 36 and uuid.UUID(rid.decode()).version == 4
