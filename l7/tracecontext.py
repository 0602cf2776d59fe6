"""W3C Trace Context (``traceparent`` / ``tracestate``, Level 1 Recommendation): pure functions.

Parsing follows the Recommendation's rules, and the rules of its test suite where the text
leaves room:

* ``traceparent`` is ``version-traceid-parentid-flags`` in lowercase hex, optional whitespace
  around it ignored. Version ``ff`` is invalid; version ``00`` must be exactly 55 characters;
  a higher version is read by its first four fields when what follows them starts with ``-``
  (the format is meant to grow only at the end). All-zero trace or parent ids are invalid.
  More than one ``traceparent`` field is invalid. Invalid means: start a new trace, and drop
  ``tracestate`` with it (its entries describe the trace being left).
* ``tracestate`` may come in several fields, joined in order; members are ``key=value``
  separated by commas with optional whitespace, empty members are skipped. One invalid member,
  a key seen twice or more than 32 members make the whole header invalid; then it is not
  forwarded, as the test suite expects ("discarded"). Keys: ``[a-z0-9][a-z0-9_-*/]{0,255}`` or
  the multi-tenant ``tenant@system`` (at most 241 and 14 characters); values: up to 256
  printable ASCII characters except ``,`` and ``=``, not ending in a space.
* What goes out is always version ``00`` with the sampled bit as decided and the other flag
  bits zero (the Recommendation reserves them and tells producers to send zeros);
  ``tracestate`` goes out as the valid members in their order, without whitespace.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Sequence

__all__ = [
    "TraceParent",
    "parse_traceparent",
    "format_traceparent",
    "parse_tracestate",
    "trace_headers",
    "MAX_TRACESTATE_MEMBERS",
    "SAMPLED",
]

SAMPLED = 0x01
MAX_TRACESTATE_MEMBERS = 32

_TP = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_OWS = b" \t"
_KEY = re.compile(rb"[a-z0-9][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13}")
_VALUE = re.compile(rb"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")


class TraceParent(NamedTuple):
    trace_id: int
    parent_id: int
    flags: int

    @property
    def sampled(self) -> bool:
        return bool(self.flags & SAMPLED)


def _b(v) -> bytes:
    return v.encode("latin-1") if isinstance(v, str) else bytes(v)


def parse_traceparent(value: bytes | str | Sequence[bytes | str] | None) -> TraceParent | None:
    """The parent of an incoming request, or None (absent or invalid: start a new trace).
    A list or tuple stands for several ``traceparent`` fields: one is read, two are invalid."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            return None
        value = value[0]
    v = _b(value).strip(_OWS)
    n = len(v)
    if n < 55:
        return None
    m = _TP.match(v)
    if m is None:
        return None
    version = m.group(1)
    if version == b"ff":
        return None
    if version == b"00":
        if n != 55:
            return None
    elif n > 55 and v[55:56] != b"-":
        return None
    trace_id = int(m.group(2), 16)
    parent_id = int(m.group(3), 16)
    if not trace_id or not parent_id:
        return None
    return TraceParent(trace_id, parent_id, int(m.group(4), 16))


def format_traceparent(trace_id: int, span_id: int, sampled: bool) -> bytes:
    return b"00-%032x-%016x-%s" % (trace_id, span_id, b"01" if sampled else b"00")


def parse_tracestate(values: bytes | str | Sequence[bytes | str] | None) -> bytes | None:
    """The ``tracestate`` to forward: valid members in order, comma-joined; None when absent,
    empty or invalid (see the module docstring)."""
    if values is None:
        return None
    if isinstance(values, (list, tuple)):
        joined = b",".join(_b(v) for v in values)
    else:
        joined = _b(values)
    members = []
    keys = set()
    for raw in joined.split(b","):
        member = raw.strip(_OWS)
        if not member:
            continue
        key, eq, val = member.partition(b"=")
        if not eq or _KEY.fullmatch(key) is None or _VALUE.fullmatch(val) is None or key in keys:
            return None
        keys.add(key)
        members.append(member)
        if len(members) > MAX_TRACESTATE_MEMBERS:
            return None
    return b",".join(members) if members else None


def trace_headers(headers: Sequence[tuple[bytes, bytes]]):
    """(traceparent, tracestate) from a field list, each None, one value, or a list of the
    values when the field came more than once - the shapes the two parsers take."""
    tp = ts = None
    for name, value in headers:
        if 10 <= len(name) <= 11:       # "tracestate", "traceparent": skip the rest cheaply
            lname = name.lower()
            if lname == b"traceparent":
                tp = value if tp is None else (tp + [value] if isinstance(tp, list) else [tp, value])
            elif lname == b"tracestate":
                ts = value if ts is None else (ts + [value] if isinstance(ts, list) else [ts, value])
    return tp, ts
